// rmem against Redis on the same machine in the same run (DESIGN section 8):
//   4 KiB read and write, one in flight (p50, p99) and 32 in flight (ops/s);
//   1 MiB read (GB/s). The one-in-flight tables run again with the CPU wake-up bound held
//   at 0 (where /dev/cpu_dma_latency can be written; support/harness.ts), which leaves the
//   request paths.
// Baselines: a redis-server started here on loopback, driven by ioredis GET/SET the same
// way, and redis-benchmark -d 4096 figures. Needs redis-server and redis-benchmark
// (Debian: redis-server, redis-tools); without them the Redis rows are skipped.
//
// Every table runs its cases BENCH_ROUNDS times (default 3), the baseline first in each
// round, and gives medians (support/harness.ts). Each case runs in a client process of
// its own (support/rmem-case.ts), so no case inherits the V8 state of the one before it.
//
//   npm run bench -- rmem        BENCH_MS=5000 for longer runs

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { fileURLToPath } from 'node:url';
import { startNode } from '../test/support/node-process.js';
import { benchRounds, reportRounds, withCpuWakeBound, type CaseResult } from './support/harness.js';
import { freePort, have } from './support/ports.js';
import type { RmemCaseKind, RmemCaseSpec } from './support/rmem-case.js';

const KB4 = 4096;
const CASE_SCRIPT = fileURLToPath(new URL('./support/rmem-case.js', import.meta.url));

/** Runs one case in a client process of its own and returns what it measured. */
function runCase(spec: RmemCaseSpec): Promise<CaseResult> {
  return new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, [CASE_SCRIPT, JSON.stringify(spec)], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    proc.stdout.setEncoding('utf8');
    proc.stdout.on('data', (chunk: string) => {
      out += chunk;
    });
    proc.once('error', reject);
    proc.once('exit', (code) => {
      const last = out.trim().split('\n').at(-1);
      if (code !== 0 || last === undefined) reject(new Error(`${spec.name}: the client process exited with ${code}`));
      else resolve(JSON.parse(last) as CaseResult);
    });
  });
}


async function startRedis(): Promise<{ port: number; proc: ChildProcess }> {
  const port = await freePort();
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  for (let i = 0; i < 100; i++) {
    const probe = new Redis({ port, lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
    probe.on('error', () => undefined); // refused while redis-server starts; retried below
    try {
      await probe.connect();
      await probe.ping();
      probe.disconnect();
      return { port, proc };
    } catch {
      probe.disconnect();
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  throw new Error('redis-server did not start');
}

/** redis-benchmark's own figures for one command: requests per second and p50 in ms. */
function redisBenchmark(port: number, test: 'set' | 'get', pipeline: number): { rps: number; p50ms: number } | undefined {
  const n = pipeline > 1 ? 400_000 : 60_000;
  const out = spawnSync('redis-benchmark', ['-p', String(port), '-t', test, '-d', String(KB4), '-n', String(n), '-c', '1', '-P', String(pipeline), '-q'], { encoding: 'utf8' });
  const line = out.stdout.split(/\r|\n/).reverse().find((l) => /requests per second/.test(l));
  const match = line === undefined ? null : /([\d.]+) requests per second(?:, p50=([\d.]+) msec)?/.exec(line);
  if (match === null) return undefined;
  return { rps: Number(match[1]), p50ms: Number(match[2] ?? NaN) };
}

const dir = await mkdtemp(join(tmpdir(), 'memstrata-bench-rmem-'));
const node = await startNode({ cwd: dir, args: ['--dram-size', '1GiB', '--flash-size', '256MiB', '--set', 'partition.dram.server.initial=512MiB', '--set', 'partition.dram.cache.initial=256MiB'] });
const redisAvailable = have('redis-server') && have('redis-benchmark');
const redis = redisAvailable ? await startRedis() : undefined;
try {
  const rmem = { host: node.rmem.host, port: node.rmem.port };
  /** A case run in a client process of its own (support/rmem-case.ts says why). */
  const inChild = (name: string, kind: RmemCaseKind, depth = 1): (() => Promise<CaseResult>) => () => runCase({ name, kind, depth, rmem, ...(redis === undefined ? {} : { redisPort: redis.port }) });
  const baseline = (name: string, kind: RmemCaseKind, depth = 1): (() => Promise<CaseResult>) | undefined => (redis === undefined ? undefined : inChild(name, kind, depth));
  /**
   * Runs the cases one after another (never two at once), in rounds (support/harness.ts),
   * and prints their medians; a missing baseline is skipped.
   */
  const table = async (title: string, ...cases: ((() => Promise<CaseResult>) | undefined)[]): Promise<void> => {
    const rounds: CaseResult[][] = [];
    for (let round = 0; round < benchRounds(); round++) {
      const results: CaseResult[] = [];
      for (const c of cases) if (c !== undefined) results.push(await c());
      rounds.push(results);
    }
    reportRounds(title, rounds);
  };
  const qd1 = async (label: string): Promise<void> => {
    await table(`4 KiB write, one in flight${label}`, baseline('ioredis SET (baseline)', 'redis-set'), inChild('rmem WRITE', 'rmem-write'));
    await table(`4 KiB read, one in flight${label}`, baseline('ioredis GET (baseline)', 'redis-get'), inChild('rmem READ', 'rmem-read'));
  };
  await qd1('');
  // The two QD1 tables again with no CPU halting while idle (the baseline's processes too):
  // what is left between Redis and memstrata is their request paths.
  const skipped = await withCpuWakeBound((label) => qd1(`, ${label}`));
  if (skipped !== undefined) console.log(`\n4 KiB one in flight with the CPU wake-up bound held: skipped (${skipped})`);
  await table('4 KiB read, 32 in flight (one connection, pipelined)', baseline('ioredis GET x32 (baseline)', 'redis-get', 32), inChild('rmem READ x32', 'rmem-read', 32));
  await table('4 KiB write, 32 in flight (one connection, pipelined)', baseline('ioredis SET x32 (baseline)', 'redis-set', 32), inChild('rmem WRITE x32', 'rmem-write', 32));
  await table(
    '1 MiB read',
    baseline('ioredis GET 1 MiB (baseline)', 'redis-get-1m'),
    inChild('rmem READ 1 MiB', 'rmem-read-1m'),
    inChild('rmem READ 1 MiB x4', 'rmem-read-1m', 4),
    inChild('rmem readInto 1 MiB', 'rmem-readinto-1m'),
  );

  if (redis !== undefined) {
    console.log('\nredis-benchmark -d 4096 -c 1 (its own client, in C), for reference');
    for (const [test, pipeline] of [['set', 1], ['get', 1], ['get', 32], ['set', 32]] as const) {
      const r = redisBenchmark(redis.port, test, pipeline);
      console.log(`  ${test.toUpperCase()} -P ${String(pipeline).padEnd(2)}  ${r === undefined ? 'no result' : `${Math.round(r.rps).toLocaleString('en-US')} ops/s, p50 ${r.p50ms} ms`}`);
    }
  } else {
    console.log('\nredis-server or redis-benchmark not found: Redis baselines skipped (Debian: apt-get install redis-server redis-tools)');
  }
} finally {
  redis?.proc.kill('SIGTERM');
  await node.stop('SIGTERM');
  await rm(dir, { recursive: true, force: true });
}
