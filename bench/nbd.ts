// NBD against nbdkit on the same machine in the same run (DESIGN section 8), driven by
// fio with its nbd engine (libnbd, one connection per job).
//
// Part 1, a working set that fits in memstrata's DRAM cache (256 MiB): against
// `nbdkit memory` (the ceiling of the protocol path) and `nbdkit file` on a file on the
// same disk as memstrata's data directory (the same durability promise as memstrata:
// durable after FLUSH, the page cache in between):
//   4k randread QD1, 1M sequential read QD8, 4k randread QD8 on one connection and on
//   two (multi-conn), 4k randrw 70/30 QD32, 4k randwrite QD32, 1M sequential write QD8.
// Then 4k randread QD1 again against the floor of a Node.js NBD server
// (support/floor-nbd.ts), to tell memstrata's share of its QD1 latency from the runtime's,
// and once more with the CPU wake-up bound held at 0 (/dev/cpu_dma_latency, where it can
// be written: no idle CPU halts, for the three servers alike), which leaves the request
// paths (docs/BENCHMARKS.md, CPU wake-up latency).
// Part 2, a working set four times memstrata's DRAM cache level and within DRAM plus
// flash (a second node: 128 MiB DRAM cache, 512 MiB flash cache, 512 MiB working set),
// against `nbdkit file`: a 1M sequential write of the whole 1 GiB volume (a stream eight
// times the DRAM level), a warm-up pass, the hit ratio after it, then 4k randread QD16
// and QD1, and the flash level's lines.
// Needs fio and nbdkit (Debian: fio, nbdkit).
//
// Every timed workload runs BENCH_ROUNDS times (default 3) on each server, the servers in
// turn each round, and the tables give medians (support/harness.ts). Part 1 prints fio's
// own CPU use beside each figure: near 100% (one job on one core), the client is what
// limits the run, whichever server it drives.
//
//   npm run bench -- nbd        BENCH_SECONDS=20 for longer runs (default 8 per workload);
//                               BENCH_NBD_PART=cached or large runs one part

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { openSync, closeSync, ftruncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startNode, type NodeProcess } from '../test/support/node-process.js';
import { freePort, have, waitForPort } from './support/ports.js';
import { benchRounds, median, nodeSettings, withCpuWakeBound } from './support/harness.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 8);

interface Workload {
  name: string;
  args: string[];
}

// Read-only workloads first; before each one memstrata's destager is let finish, so a
// measurement does not include write-back left over from the one before.
const WORKLOADS: Workload[] = [
  { name: '4k randread QD1', args: ['--rw=randread', '--bs=4k', '--iodepth=1'] },
  { name: '1M seq read QD8', args: ['--rw=read', '--bs=1M', '--iodepth=8'] },
  // Multi-conn (the export says CAN_MULTI_CONN): the same load on one connection and
  // split over two (two fio jobs, each its own connection), to see that two scale over one.
  { name: '4k randread QD8, 1 conn', args: ['--rw=randread', '--bs=4k', '--iodepth=8'] },
  { name: '4k randread QD8, 2 conns', args: ['--rw=randread', '--bs=4k', '--iodepth=8', '--numjobs=2', '--group_reporting'] },
  { name: '4k randrw 70/30 QD32', args: ['--rw=randrw', '--rwmixread=70', '--bs=4k', '--iodepth=32'] },
  { name: '4k randwrite QD32', args: ['--rw=randwrite', '--bs=4k', '--iodepth=32'] },
  { name: '1M seq write QD8', args: ['--rw=write', '--bs=1M', '--iodepth=8'] },
];

interface Result {
  iops: number;
  mbps: number;
  p50us: number;
  p99us: number;
  /** fio's own CPU use, user and system, as fio reports it (% of one core for one job): near 100, the client is what limits the run. */
  clientCpu: number;
}

interface FioSide {
  io_bytes: number;
  iops: number;
  bw_bytes: number;
  clat_ns: { percentile?: Record<string, number> };
}

interface FioJob {
  read: FioSide;
  write: FioSide;
  usr_cpu: number;
  sys_cpu: number;
}

function fio(uri: string, size: string, workload: Workload, seconds: number): Result {
  const timed = seconds > 0 ? ['--time_based', `--runtime=${seconds}`, '--ramp_time=1'] : [];
  const out = spawnSync('fio', ['--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--size=${size}`, '--output-format=json', ...timed, ...workload.args], {
    encoding: 'utf8',
    maxBuffer: 64 * 1024 * 1024,
  });
  if (out.status !== 0) throw new Error(`fio failed: ${out.stderr}`);
  const job = (JSON.parse(out.stdout.slice(out.stdout.indexOf('{'))) as { jobs: FioJob[] }).jobs[0];
  if (job === undefined) throw new Error('fio printed no job');
  const sides = [job.read, job.write].filter((s) => s.io_bytes > 0);
  const iops = sides.reduce((sum, s) => sum + s.iops, 0);
  const mbps = sides.reduce((sum, s) => sum + s.bw_bytes, 0) / 1e6;
  // Latency of the dominant side (reads for the mixed workload).
  const main = sides.sort((a, b) => b.io_bytes - a.io_bytes)[0];
  const percentile = (p: string): number => (main?.clat_ns.percentile?.[p] ?? 0) / 1000;
  return { iops, mbps, p50us: percentile('50.000000'), p99us: percentile('99.000000'), clientCpu: job.usr_cpu + job.sys_cpu };
}

async function startNbdkit(plugin: string[]): Promise<{ uri: string; proc: ChildProcess }> {
  const port = await freePort();
  const proc = spawn('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), ...plugin], { stdio: 'ignore' });
  await waitForPort(port);
  return { uri: `nbd://127.0.0.1:${port}/`, proc };
}

interface CacheInfo {
  hits: number;
  misses: number;
  flashHits: number;
  /** Of flashHits, those read on the event loop (absent before 2026-11-30). */
  flashReadsNow?: number;
  dirtyBytes: number;
  lines: { dram: number; flash: number };
  slots: { dram: number; flash: number };
}

async function cacheOf(node: NodeProcess): Promise<CacheInfo> {
  const info = (await (await fetch(`${node.url}/v1/node`, { headers: { connection: 'close' } })).json()) as { cache: CacheInfo | null };
  if (info.cache === null) throw new Error('the node has no cache');
  return info.cache;
}

/** Waits until the node's destager has written back every dirty byte. */
async function settle(node: NodeProcess): Promise<void> {
  for (let i = 0; i < 600; i++) {
    if ((await cacheOf(node)).dirtyBytes === 0) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

const ratio = (ours: number, base: number): string => (base > 0 ? `${(ours / base).toFixed(2)}x` : '-');

/** Each round's ratio of a figure of `ours` to the same figure of `base` (0 where the base's is 0). */
function roundRatios(ours: readonly Result[], base: readonly Result[], pick: (r: Result) => number): number[] {
  return ours.map((r, i) => {
    const b = base[i];
    return b === undefined || pick(b) === 0 ? 0 : pick(r) / pick(b);
  });
}

const iopsOf = (r: Result): number => r.iops;
const p50Of = (r: Result): number => r.p50us;

/** Each figure's median over rounds (undefined for none). */
function medianResult(results: readonly Result[]): Result | undefined {
  if (results.length === 0) return undefined;
  return {
    iops: median(results.map((r) => r.iops)),
    mbps: median(results.map((r) => r.mbps)),
    p50us: median(results.map((r) => r.p50us)),
    p99us: median(results.map((r) => r.p99us)),
    clientCpu: median(results.map((r) => r.clientCpu)),
  };
}

function printTable(title: string, header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]): string => cells.map((c, i) => (i < 2 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join('  ');
  console.log(`\n${title}\n${line(header)}\n${rows.map(line).join('\n')}`);
}

/** A sparse file for nbdkit's file plugin in `dir` (the same disk as the node's data directory). */
function sparseFile(path: string, bytes: number): string {
  const fd = openSync(path, 'w');
  ftruncateSync(fd, bytes);
  closeSync(fd);
  return path;
}

async function cachedSet(dir: string): Promise<void> {
  const size = '256M';
  const node = await startNode({ cwd: dir, small: false, args: ['--dram-size', '1GiB', '--flash-size', '1GiB', '--set', 'volumes.defaultSize=512MiB'] });
  const memory = await startNbdkit(['memory', '1G']);
  const file = await startNbdkit(['file', sparseFile(join(dir, 'nbdkit-file.img'), 512 * 1024 * 1024)]);
  try {
    const ours = `nbd://${node.nbd.host}:${node.nbd.port}/`;
    const fill: Workload = { name: 'fill', args: ['--rw=write', '--bs=1M', '--iodepth=8'] };
    for (const uri of [ours, memory.uri, file.uri]) fio(uri, size, fill, 0);
    const rows: string[][] = [];
    const iops = new Map<string, number>();
    const rounds = benchRounds();
    const servers = [
      { name: 'nbdkit memory', uri: memory.uri },
      { name: 'nbdkit file', uri: file.uri },
      { name: 'memstrata', uri: ours },
    ] as const;
    for (const workload of WORKLOADS) {
      // Rounds, the three servers in turn, the order rotated each round so that none is
      // always the one after memstrata's write-back (harness.ts, Rounds).
      const runs: Result[][] = servers.map(() => []);
      for (let round = 0; round < rounds; round++) {
        for (let k = 0; k < servers.length; k++) {
          const at = (k + round) % servers.length;
          const server = servers[at];
          if (server === undefined) continue;
          await settle(node);
          runs[at]?.push(fio(server.uri, size, workload, SECONDS));
        }
      }
      const [mem, fil, us] = runs.map(medianResult);
      const perRound = (of: number, base: number, pick: (r: Result) => number): number[] => roundRatios(runs[of] ?? [], runs[base] ?? [], pick);
      const medianRatio = (of: number, base: number, pick: (r: Result) => number): string => `${median(perRound(of, base, pick)).toFixed(2)}x`;
      if (mem === undefined || fil === undefined || us === undefined) continue;
      for (const [server, r] of [['nbdkit memory', mem], ['nbdkit file', fil], ['memstrata', us]] as const) iops.set(`${server}|${workload.name}`, r.iops);
      const cells = (r: Result): string[] => [r.iops.toFixed(0), r.mbps.toFixed(1), r.p50us.toFixed(1), r.p99us.toFixed(1), `${r.clientCpu.toFixed(0)}%`];
      const each = (of: number, base: number): string => perRound(of, base, iopsOf).map((x) => x.toFixed(2)).join(' / ');
      rows.push([workload.name, 'nbdkit memory', ...cells(mem), '1.00x', '', '1.00x', '', '']);
      rows.push([workload.name, 'nbdkit file', ...cells(fil), medianRatio(1, 0, iopsOf), '1.00x', medianRatio(1, 0, p50Of), '1.00x', '']);
      rows.push([workload.name, 'memstrata', ...cells(us), medianRatio(2, 0, iopsOf), medianRatio(2, 1, iopsOf), medianRatio(2, 0, p50Of), medianRatio(2, 1, p50Of), `${each(2, 0)} | ${each(2, 1)}`]);
    }
    printTable(
      `NBD, fio nbd engine, ${SECONDS} s per workload, ${rounds} round${rounds === 1 ? '' : 's'} (medians; ratios are the median of each round's), ${size} working set (fits in memstrata's DRAM cache)`,
      ['workload', 'server', 'IOPS', 'MB/s', 'p50 us', 'p99 us', 'fio CPU', 'IOPS vs memory', 'IOPS vs file', 'p50 vs memory', 'p50 vs file', 'IOPS vs memory | vs file, each round'],
      rows,
    );
    for (const server of ['nbdkit memory', 'nbdkit file', 'memstrata']) {
      const one = iops.get(`${server}|4k randread QD8, 1 conn`) ?? 0;
      const two = iops.get(`${server}|4k randread QD8, 2 conns`) ?? 0;
      console.log(`multi-conn, ${server}: 4k randread QD8 on two connections ${two.toFixed(0)} IOPS against ${one.toFixed(0)} on one: ${ratio(two, one)}`);
    }
    const cache = await cacheOf(node);
    const lookups = cache.hits + cache.misses;
    console.log(`memstrata cache hit ratio over the run: ${((cache.hits / Math.max(1, lookups)) * 100).toFixed(1)}% (${cache.hits} hits, ${cache.misses} misses)`);
    await floor(size, memory.uri, ours);
  } finally {
    memory.proc.kill('SIGTERM');
    file.proc.kill('SIGTERM');
    await node.stop('SIGTERM');
  }
}

/**
 * QD1 against the floor of a Node.js NBD server (support/floor-nbd.ts: one Buffer, no
 * cache, no promise), nbdkit memory and memstrata, in turn, BENCH_ROUNDS rounds: the
 * part of memstrata's QD1 latency over nbdkit's that any server on this runtime pays.
 */
async function floor(size: string, memoryUri: string, ours: string): Promise<void> {
  const port = await freePort();
  const script = new URL('./support/floor-nbd.js', import.meta.url).pathname;
  const proc = spawn(process.execPath, [script, String(port), String(256 * 1024 * 1024)], { stdio: 'ignore' });
  try {
    await waitForPort(port);
    const floorUri = `nbd://127.0.0.1:${port}/`;
    const qd1: Workload = { name: '4k randread QD1', args: ['--rw=randread', '--bs=4k', '--iodepth=1'] };
    const seconds = Math.max(2, Math.round(SECONDS / 2));
    const rounds = (): { memory: number[]; floor: number[]; memstrata: number[] } => {
      const p50 = { memory: [] as number[], floor: [] as number[], memstrata: [] as number[] };
      for (let round = 0; round < benchRounds(); round++) {
        p50.memory.push(fio(memoryUri, size, qd1, seconds).p50us);
        p50.floor.push(fio(floorUri, size, qd1, seconds).p50us);
        p50.memstrata.push(fio(ours, size, qd1, seconds).p50us);
      }
      return p50;
    };
    const report = (p50: { memory: number[]; floor: number[]; memstrata: number[] }, how: string): void => {
      const [mem, flo, ms] = [median(p50.memory), median(p50.floor), median(p50.memstrata)];
      const list = (xs: number[]): string => xs.map((x) => x.toFixed(1)).join(' / ');
      console.log(
        `4k randread QD1 p50${how}, ${p50.memory.length} rounds in turn (${seconds} s each): nbdkit memory ${list(p50.memory)} us; ` +
          `the Node.js floor (bench/support/floor-nbd.ts) ${list(p50.floor)} us; memstrata ${list(p50.memstrata)} us. ` +
          `Medians: the floor ${ratio(flo, mem)} nbdkit memory, memstrata ${ratio(ms, mem)} nbdkit memory and ${ratio(ms, flo)} the floor`,
      );
    };
    report(rounds(), '');
    // Again with no CPU halting while idle, for every process alike: what is left
    // between the servers is their request paths.
    const skipped = await withCpuWakeBound((label) => {
      report(rounds(), `, ${label}`);
    });
    if (skipped !== undefined) console.log(`4k randread QD1 with the CPU wake-up bound held: skipped (${skipped})`);
  } finally {
    proc.kill('SIGTERM');
  }
}

async function largeSet(dir: string): Promise<void> {
  // DRAM cache level 128 MiB (2,048 lines), flash cache level 512 MiB (8,192 lines): a
  // 512 MiB working set is four times the DRAM level and fits in the two together.
  const size = '512M';
  const node = await startNode({
    cwd: dir,
    small: false,
    args: ['--dram-size', '256MiB', '--flash-size', '1GiB', '--set', 'partition.flash.cache.initial=50%', '--set', 'volumes.defaultSize=1GiB'],
  });
  const file = await startNbdkit(['file', sparseFile(join(dir, 'nbdkit-large.img'), 1024 * 1024 * 1024)]);
  try {
    const ours = `nbd://${node.nbd.host}:${node.nbd.port}/`;
    // A sequential write of the whole 1 GiB volume, eight times the DRAM level: a stream
    // the cache can only churn through. It also fills the set the reads use.
    const stream: Workload = { name: '1M seq write QD8, 1 GiB', args: ['--rw=write', '--bs=1M', '--iodepth=8'] };
    const streamed = [fio(file.uri, '1G', stream, 0), fio(ours, '1G', stream, 0)];
    await settle(node);
    // Warm-up: one random read pass over the set on each server.
    const warm: Workload = { name: 'warm-up', args: ['--rw=randread', '--bs=64k', '--iodepth=16'] };
    fio(file.uri, size, warm, 0);
    fio(ours, size, warm, 0);
    const before = await cacheOf(node);
    const rows: string[][] = [];
    const [fileStream, ourStream] = streamed;
    if (fileStream !== undefined && ourStream !== undefined) {
      rows.push([stream.name, 'nbdkit file', `${fileStream.mbps.toFixed(0)} MB/s`, fileStream.p50us.toFixed(1), fileStream.p99us.toFixed(1), '1.00x', '1.00x']);
      rows.push([stream.name, 'memstrata', `${ourStream.mbps.toFixed(0)} MB/s`, ourStream.p50us.toFixed(1), ourStream.p99us.toFixed(1), ratio(ourStream.mbps, fileStream.mbps), ratio(ourStream.p50us, fileStream.p50us)]);
    }
    for (const workload of [
      { name: '4k randread QD16', args: ['--rw=randread', '--bs=4k', '--iodepth=16'] },
      { name: '4k randread QD1', args: ['--rw=randread', '--bs=4k', '--iodepth=1'] },
    ]) {
      // Rounds, the two servers in turn (harness.ts, Rounds).
      const pairs: { fil: Result; us: Result }[] = [];
      for (let round = 0; round < benchRounds(); round++) pairs.push({ fil: fio(file.uri, size, workload, SECONDS), us: fio(ours, size, workload, SECONDS) });
      const [ourRuns, fileRuns] = [pairs.map((p) => p.us), pairs.map((p) => p.fil)];
      const fil = medianResult(fileRuns);
      const us = medianResult(ourRuns);
      if (fil === undefined || us === undefined) continue;
      const iopsRatio = median(roundRatios(ourRuns, fileRuns, iopsOf));
      const p50Ratio = median(roundRatios(ourRuns, fileRuns, p50Of));
      rows.push([workload.name, 'nbdkit file', fil.iops.toFixed(0), fil.p50us.toFixed(1), fil.p99us.toFixed(1), '1.00x', '1.00x']);
      rows.push([workload.name, 'memstrata', us.iops.toFixed(0), us.p50us.toFixed(1), us.p99us.toFixed(1), `${iopsRatio.toFixed(2)}x`, `${p50Ratio.toFixed(2)}x`]);
    }
    const after = await cacheOf(node);
    printTable(
      `NBD, ${size} working set: four times memstrata's DRAM cache level (${before.slots.dram} lines), within DRAM plus flash (${before.slots.flash} lines)`,
      ['workload', 'server', 'IOPS (or MB/s)', 'p50 us', 'p99 us', 'ratio', 'p50 ratio'],
      rows,
    );
    const hits = after.hits - before.hits;
    const lookups = hits + after.misses - before.misses;
    console.log(
      `after the warm-up: hit ratio ${((hits / Math.max(1, lookups)) * 100).toFixed(1)}% (${hits} hits, ${after.flashHits - before.flashHits} of them from flash, ${(after.flashReadsNow ?? 0) - (before.flashReadsNow ?? 0)} of those read at once, ${after.misses - before.misses} misses); ` +
        `lines in DRAM ${after.lines.dram}/${after.slots.dram}, in flash ${after.lines.flash}/${after.slots.flash}`,
    );
  } finally {
    file.proc.kill('SIGTERM');
    await node.stop('SIGTERM');
  }
}

if (!have('fio') || !have('nbdkit')) {
  console.log('fio or nbdkit not found: bench/nbd skipped (Debian: apt-get install fio nbdkit)');
  process.exit(0);
}

const dir = await mkdtemp(join(tmpdir(), 'memstrata-bench-nbd-'));
console.log(nodeSettings());
try {
  const part = process.env.BENCH_NBD_PART;
  if (part === undefined || part === 'cached') await cachedSet(await mkdtemp(join(dir, 'cached-')));
  if (part === undefined || part === 'large') await largeSet(await mkdtemp(join(dir, 'large-')));
} finally {
  await rm(dir, { recursive: true, force: true });
}
