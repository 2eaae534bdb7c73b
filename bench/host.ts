// The host library under a zipfian workload (DESIGN section 8): 4 KiB reads and writes
// (70/30) over a working set four times the local DRAM budget, three ways in one run:
//
//   swap only    local DRAM budget, then the swap volume (an NBD volume on a node   baseline
//                whose block cache is off, so it pages to a file)
//   remote       local DRAM budget, then DRAM borrowed from a memstrata node over rmem
//   all local    a local DRAM budget large enough for the whole working set
//
// Each is a HierarchyMemory with its default page cache (a quarter of the budget). Reads
// use read(), which returns a new Buffer each time; remote and all local run again with
// readInto(), which reads into the caller's own buffers (a buffer pool's frames) and
// takes no new memory for the bytes.
// Pages are ranked by a zipf law (s = 0.99) and the ranks scattered over the working set,
// so the hot pages are spread over every segment and tier.
//
// The three run BENCH_ROUNDS times (default 3) in turn; the table gives medians, and the
// last line remote memory against all local in each round (support/harness.ts).
//
//   npm run bench -- host        BENCH_MS=5000 for longer runs; HOST_DEPTH (default 16)

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HierarchyMemory, type HierarchyOptions } from '../src/host/hierarchy-memory.js';
import { startNode } from '../test/support/node-process.js';
import { benchRounds, measure, median, reportRounds, type CaseResult } from './support/harness.js';

const PAGE = 4096;
const BUDGET = 16 * 1024 * 1024;
const WORKING_SET = 4 * BUDGET;
const SEGMENT = 1024 * 1024;
const DEPTH = Number(process.env.HOST_DEPTH ?? 16);

/** Page numbers drawn from a zipf law over `n` pages, ranks scattered by a fixed permutation. */
function zipfPages(n: number, s: number, count: number): Uint32Array {
  const cdf = new Float64Array(n);
  let sum = 0;
  for (let k = 1; k <= n; k++) {
    sum += 1 / k ** s;
    cdf[k - 1] = sum;
  }
  let seed = 0x2545f491;
  const random = (): number => {
    // xorshift32: the same sequence every run, so the three ways see the same accesses
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) / 4294967296;
  };
  const permutation = Uint32Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    const t = permutation[i] ?? 0;
    permutation[i] = permutation[j] ?? 0;
    permutation[j] = t;
  }
  const out = new Uint32Array(count);
  for (let i = 0; i < count; i++) {
    const u = random() * sum;
    let lo = 0;
    let hi = n - 1;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((cdf[mid] ?? 0) < u) lo = mid + 1;
      else hi = mid;
    }
    out[i] = permutation[lo] ?? 0;
  }
  return out;
}

async function run(name: string, options: HierarchyOptions, accesses: Uint32Array, into = false): Promise<{ result: CaseResult; stats: string }> {
  const memory = await HierarchyMemory.open(options);
  try {
    // The working set as 1 MiB segments, highest class: local DRAM first, then the far tier.
    const segments = [];
    for (let at = 0; at < WORKING_SET; at += SEGMENT) segments.push(await memory.alloc(SEGMENT, { class: 'highest' }));
    const base = segments[0]?.address ?? 0;
    const data = Buffer.alloc(PAGE, 0x5a);
    // readInto's targets: a frame per request in flight, taken for the read and given back
    // after it (at most DEPTH run at once, so DEPTH frames; never two reads in one frame).
    const frames = Array.from({ length: DEPTH }, () => Buffer.alloc(PAGE));
    for (const s of segments) await s.write(0, Buffer.alloc(SEGMENT, 1));
    const result = await measure(
      {
        name,
        bytesPerOp: PAGE,
        run: async (i) => {
          const page = accesses[i % accesses.length] ?? 0;
          // Segments are allocated back to back, so the working set is one virtual range.
          if (i % 10 >= 7) await memory.write(base + page * PAGE, data);
          else if (into) {
            const frame = frames.pop() ?? Buffer.alloc(PAGE);
            try {
              await memory.readInto(base + page * PAGE, frame);
            } finally {
              frames.push(frame);
            }
          }
          else await memory.read(base + page * PAGE, PAGE);
        },
      },
      { depth: DEPTH },
    );
    const { cache, moved } = memory.stats();
    const far = moved.filter((m) => m.device !== 'local').map((m) => `${m.device}/${m.medium} read ${(m.readBytes / 2 ** 20).toFixed(0)} MiB, written ${(m.writtenBytes / 2 ** 20).toFixed(0)} MiB`);
    const hitRatio = cache.hits + cache.misses === 0 ? 0 : cache.hits / (cache.hits + cache.misses);
    return { result, stats: `${name}: page cache ${cache.capacityPages} pages, hit ratio ${(hitRatio * 100).toFixed(1)}%, promotions ${cache.promotions}, demotions ${cache.demotions}; ${far.join('; ') || 'nothing far'}` };
  } finally {
    await memory.close();
  }
}

const dir = await mkdtemp(join(tmpdir(), 'memstrata-bench-host-'));
const swapDir = await mkdtemp(join(tmpdir(), 'memstrata-bench-swap-'));
const node = await startNode({ cwd: dir, args: ['--dram-size', '512MiB', '--flash-size', '512MiB', '--set', 'partition.dram.server.initial=256MiB', '--set', 'partition.dram.cache.initial=128MiB'] });
// The swap volume is a plain disk-backed volume: a node with its block cache off, so the
// baseline pages to a file as a swap device would, not to a node's DRAM cache.
const swapNode = await startNode({ cwd: swapDir, args: ['--dram-size', '64MiB', '--flash-size', '0', '--set', 'volumes.defaultSize=256MiB', '--set', 'cache.enabled=false'] });
try {
  const accesses = zipfPages(WORKING_SET / PAGE, 0.99, 1 << 20);
  // Rounds, the three ways in turn (support/harness.ts, Rounds).
  const rounds: CaseResult[][] = [];
  const notes: string[] = [];
  for (let round = 0; round < benchRounds(); round++) {
    const swap = await run('swap only (baseline)', { serverId: 'bench-swap', localDram: BUDGET, swap: `nbd://${swapNode.nbd.host}:${swapNode.nbd.port}/default` }, accesses);
    const remote = await run('remote memory on a node', { serverId: 'bench-remote', localDram: BUDGET, nodes: [{ name: 'node', host: node.rmem.host, port: node.rmem.port }] }, accesses);
    const local = await run('all local', { serverId: 'bench-local', localDram: 2 * WORKING_SET }, accesses);
    const remoteInto = await run('remote memory, readInto', { serverId: 'bench-remote-into', localDram: BUDGET, nodes: [{ name: 'node', host: node.rmem.host, port: node.rmem.port }] }, accesses, true);
    const localInto = await run('all local, readInto', { serverId: 'bench-local-into', localDram: 2 * WORKING_SET }, accesses, true);
    rounds.push([swap.result, remote.result, local.result, remoteInto.result, localInto.result]);
    notes.push(...[swap, remote, local, remoteInto, localInto].map((r) => `round ${round + 1}, ${r.stats}`));
  }
  reportRounds(`Host zipfian 4 KiB 70/30, working set ${WORKING_SET / 2 ** 20} MiB over a ${BUDGET / 2 ** 20} MiB budget, ${DEPTH} in flight (ratios against swap only)`, rounds);
  // The target compares remote memory with all local (DESIGN section 8: >= 0.5x).
  const rate = (r: CaseResult | undefined): number => (r === undefined ? 0 : r.ops / r.seconds);
  const ratios = (remote: number, local: number): number[] => rounds.map((r) => (rate(r[local]) > 0 ? rate(r[remote]) / rate(r[local]) : 0));
  const line = (xs: number[]): string => `${xs.map((x) => `${x.toFixed(2)}x`).join(' / ')}; median ${median(xs).toFixed(2)}x`;
  console.log(`\nremote memory / all local, each round: ${line(ratios(1, 2))}`);
  console.log(`the same with readInto: ${line(ratios(3, 4))}`);
  console.log(`\n${notes.join('\n')}`);
} finally {
  await node.stop('SIGTERM');
  await swapNode.stop('SIGTERM');
  await rm(dir, { recursive: true, force: true });
  await rm(swapDir, { recursive: true, force: true });
}
