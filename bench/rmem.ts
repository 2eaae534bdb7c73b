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
// round, and gives medians (support/harness.ts).
//
//   npm run bench -- rmem        BENCH_MS=5000 for longer runs

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { RmemClient } from '../src/client/rmem-client.js';
import { startNode } from '../test/support/node-process.js';
import { benchRounds, measure, reportRounds, withCpuWakeBound, type CaseResult } from './support/harness.js';
import { freePort, have } from './support/ports.js';

const KB4 = 4096;
const MB1 = 1024 * 1024;
const SLOTS = 256;


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
  const client = await RmemClient.connect({ ...node.rmem, serverId: 'bench' });
  const small = await client.bind(SLOTS * KB4, { medium: 'dram' });
  const big = await client.bind(8 * MB1, { medium: 'dram' });
  const block = Buffer.alloc(KB4, 0x5a);
  const mega = Buffer.alloc(MB1, 0xa5);
  const into = Buffer.alloc(MB1);
  for (let i = 0; i < SLOTS; i++) await client.write(small, i * KB4, block);
  for (let i = 0; i < 8; i++) await client.write(big, i * MB1, mega);

  const ioredis = redis === undefined ? undefined : new Redis({ port: redis.port });
  if (ioredis !== undefined) {
    for (let i = 0; i < SLOTS; i++) await ioredis.set(`k${i}`, block);
    await ioredis.set('big', mega);
  }
  const slot = (i: number): number => (i * 7) % SLOTS;
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
  await table(
    '4 KiB write, one in flight',
    ioredis === undefined ? undefined : () => measure({ name: 'ioredis SET (baseline)', bytesPerOp: KB4, run: async (i) => { await ioredis.set(`k${slot(i)}`, block); } }),
    () => measure({ name: 'rmem WRITE', bytesPerOp: KB4, run: (i) => client.write(small, slot(i) * KB4, block) }),
  );
  await table(
    '4 KiB read, one in flight',
    ioredis === undefined ? undefined : () => measure({ name: 'ioredis GET (baseline)', bytesPerOp: KB4, run: async (i) => { await ioredis.getBuffer(`k${slot(i)}`); } }),
    () => measure({ name: 'rmem READ', bytesPerOp: KB4, run: async (i) => { await client.read(small, slot(i) * KB4, KB4); } }),
  );
  // The two QD1 tables again with no CPU halting while idle (the baseline's processes too):
  // what is left between Redis and memstrata is their request paths.
  const skipped = await withCpuWakeBound(async (label) => {
    await table(
      `4 KiB write, one in flight, ${label}`,
      ioredis === undefined ? undefined : () => measure({ name: 'ioredis SET (baseline)', bytesPerOp: KB4, run: async (i) => { await ioredis.set(`k${slot(i)}`, block); } }),
      () => measure({ name: 'rmem WRITE', bytesPerOp: KB4, run: (i) => client.write(small, slot(i) * KB4, block) }),
    );
    await table(
      `4 KiB read, one in flight, ${label}`,
      ioredis === undefined ? undefined : () => measure({ name: 'ioredis GET (baseline)', bytesPerOp: KB4, run: async (i) => { await ioredis.getBuffer(`k${slot(i)}`); } }),
      () => measure({ name: 'rmem READ', bytesPerOp: KB4, run: async (i) => { await client.read(small, slot(i) * KB4, KB4); } }),
    );
  });
  if (skipped !== undefined) console.log(`\n4 KiB one in flight with the CPU wake-up bound held: skipped (${skipped})`);
  await table(
    '4 KiB read, 32 in flight (one connection, pipelined)',
    ioredis === undefined ? undefined : () => measure({ name: 'ioredis GET x32 (baseline)', bytesPerOp: KB4, run: async (i) => { await ioredis.getBuffer(`k${slot(i)}`); } }, { depth: 32 }),
    () => measure({ name: 'rmem READ x32', bytesPerOp: KB4, run: async (i) => { await client.read(small, slot(i) * KB4, KB4); } }, { depth: 32 }),
  );
  await table(
    '4 KiB write, 32 in flight (one connection, pipelined)',
    ioredis === undefined ? undefined : () => measure({ name: 'ioredis SET x32 (baseline)', bytesPerOp: KB4, run: async (i) => { await ioredis.set(`k${slot(i)}`, block); } }, { depth: 32 }),
    () => measure({ name: 'rmem WRITE x32', bytesPerOp: KB4, run: (i) => client.write(small, slot(i) * KB4, block) }, { depth: 32 }),
  );
  await table(
    '1 MiB read',
    ioredis === undefined ? undefined : () => measure({ name: 'ioredis GET 1 MiB (baseline)', bytesPerOp: MB1, run: async () => { await ioredis.getBuffer('big'); } }),
    () => measure({ name: 'rmem READ 1 MiB', bytesPerOp: MB1, run: async (i) => { await client.read(big, (i % 8) * MB1, MB1); } }),
    () => measure({ name: 'rmem READ 1 MiB x4', bytesPerOp: MB1, run: async (i) => { await client.read(big, (i % 8) * MB1, MB1); } }, { depth: 4 }),
    () => measure({ name: 'rmem readInto 1 MiB', bytesPerOp: MB1, run: async (i) => { await client.readInto(big, (i % 8) * MB1, into); } }),
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
  ioredis?.disconnect();
  await client.close();
} finally {
  redis?.proc.kill('SIGTERM');
  await node.stop('SIGTERM');
  await rm(dir, { recursive: true, force: true });
}
