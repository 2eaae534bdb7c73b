// NBD against `nbdkit memory` on the same machine in the same run (DESIGN section 8),
// driven by fio with its nbd engine:
//   4k randrw 70/30 at iodepth 32 (cached), 4k randread at iodepth 1,
//   1M sequential read and write at iodepth 8.
// Needs fio and nbdkit (Debian: fio, nbdkit).
//
//   npm run bench -- nbd        BENCH_SECONDS=20 for longer runs (default 8 per workload)

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startNode } from '../test/support/node-process.js';
import { freePort, have } from './support/ports.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 8);
const SIZE = '256M';

interface Workload {
  name: string;
  args: string[];
}

// Read-only workloads first; before each one memstrata's destager is let finish, so a
// measurement does not include write-back left over from the one before.
const WORKLOADS: Workload[] = [
  { name: '4k randread QD1', args: ['--rw=randread', '--bs=4k', '--iodepth=1'] },
  { name: '1M seq read QD8', args: ['--rw=read', '--bs=1M', '--iodepth=8'] },
  { name: '4k randrw 70/30 QD32', args: ['--rw=randrw', '--rwmixread=70', '--bs=4k', '--iodepth=32'] },
  { name: '1M seq write QD8', args: ['--rw=write', '--bs=1M', '--iodepth=8'] },
];

interface Result {
  iops: number;
  mbps: number;
  p50us: number;
  p99us: number;
}


function fio(uri: string, workload: Workload, seconds: number): Result {
  const out = spawnSync(
    'fio',
    ['--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--size=${SIZE}`, '--time_based', `--runtime=${seconds}`, '--ramp_time=1', '--output-format=json', ...workload.args],
    { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 },
  );
  if (out.status !== 0) throw new Error(`fio failed: ${out.stderr}`);
  const job = (JSON.parse(out.stdout.slice(out.stdout.indexOf('{'))) as { jobs: FioJob[] }).jobs[0];
  if (job === undefined) throw new Error('fio printed no job');
  const sides = [job.read, job.write].filter((s) => s.io_bytes > 0);
  const iops = sides.reduce((sum, s) => sum + s.iops, 0);
  const mbps = sides.reduce((sum, s) => sum + s.bw_bytes, 0) / 1e6;
  // Latency of the dominant side (reads for the mixed workload).
  const main = sides.sort((a, b) => b.io_bytes - a.io_bytes)[0];
  const percentile = (p: string): number => (main?.clat_ns.percentile?.[p] ?? 0) / 1000;
  return { iops, mbps, p50us: percentile('50.000000'), p99us: percentile('99.000000') };
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
}

async function startNbdkit(): Promise<{ port: number; proc: ChildProcess }> {
  const port = await freePort();
  const proc = spawn('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), 'memory', '1G'], { stdio: 'ignore' });
  for (let i = 0; i < 100; i++) {
    const up = await new Promise<boolean>((resolve) => {
      const socket = connect(port, '127.0.0.1');
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (up) return { port, proc };
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error('nbdkit did not start');
}

if (!have('fio') || !have('nbdkit')) {
  console.log('fio or nbdkit not found: bench/nbd skipped (Debian: apt-get install fio nbdkit)');
  process.exit(0);
}

const dir = await mkdtemp(join(tmpdir(), 'memstrata-bench-nbd-'));
const node = await startNode({ cwd: dir, small: false, args: ['--dram-size', '1GiB', '--flash-size', '1GiB', '--set', 'volumes.defaultSize=512MiB'] });
const nbdkit = await startNbdkit();
try {
  const memstrataUri = `nbd://${node.nbd.host}:${node.nbd.port}/`;
  const nbdkitUri = `nbd://127.0.0.1:${nbdkit.port}/`;
  // Fill both so reads are of written data, and memstrata's working set is in its cache.
  for (const uri of [memstrataUri, nbdkitUri]) fio(uri, { name: 'fill', args: ['--rw=write', '--bs=1M', '--iodepth=8', '--time_based=0', '--runtime=0'] }, 30);

  const header = ['workload', 'server', 'IOPS', 'MB/s', 'p50 us', 'p99 us', 'IOPS ratio', 'p50 ratio'];
  const rows: string[][] = [];
  const settle = async (): Promise<void> => {
    for (let i = 0; i < 600; i++) {
      const info = (await (await fetch(`${node.url}/v1/node`)).json()) as { cache: { dirtyBytes: number } | null };
      if ((info.cache?.dirtyBytes ?? 0) === 0) return;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  };
  for (const workload of WORKLOADS) {
    await settle();
    const base = fio(nbdkitUri, workload, SECONDS);
    const ours = fio(memstrataUri, workload, SECONDS);
    rows.push([workload.name, 'nbdkit memory (baseline)', base.iops.toFixed(0), base.mbps.toFixed(1), base.p50us.toFixed(1), base.p99us.toFixed(1), '1.00x', '1.00x']);
    rows.push([workload.name, 'memstrata', ours.iops.toFixed(0), ours.mbps.toFixed(1), ours.p50us.toFixed(1), ours.p99us.toFixed(1), `${(ours.iops / base.iops).toFixed(2)}x`, `${(ours.p50us / base.p50us).toFixed(2)}x`]);
  }
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => (i < 2 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join('  ');
  console.log(`\nNBD, fio nbd engine, ${SECONDS} s per workload, ${SIZE} working set\n${line(header)}\n${rows.map(line).join('\n')}`);
  const info = (await (await fetch(`${node.url}/v1/node`)).json()) as { cache: { hits: number; misses: number } | null };
  if (info.cache !== null) {
    const lookups = info.cache.hits + info.cache.misses;
    console.log(`memstrata cache hit ratio over the run: ${((info.cache.hits / Math.max(1, lookups)) * 100).toFixed(1)}% (${info.cache.hits} hits, ${info.cache.misses} misses)`);
  }
} finally {
  nbdkit.proc.kill('SIGTERM');
  await node.stop('SIGTERM');
  await rm(dir, { recursive: true, force: true });
}
