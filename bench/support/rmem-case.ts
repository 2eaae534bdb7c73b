// One case of bench/rmem, in a client process of its own: `node rmem-case.js '<json>'`
// connects to the node or to Redis, stores the values it reads, runs the case
// (support/harness.ts) and prints its result as JSON on the last line of stdout. A
// script only: bench/rmem imports nothing from it but types.
//
// Why a process per case: run in the bench's own process, a case inherits the state the
// cases before it left in V8. After ioredis had run there, each young-generation
// collection during the rmem case that followed promoted about 1.5 MiB and a full
// collection ran every 50 ms or so, where a process that had run only rmem ran none: the
// rmem case came out 20% slower, with a p99 of 2.3 ms against 0.8 ms. Each client now
// starts clean, the baselines included.

import { Redis } from 'ioredis';
import { RmemClient, type Region } from '../../src/client/rmem-client.js';
import { measure, type CaseResult } from './harness.js';

export type RmemCaseKind = 'redis-set' | 'redis-get' | 'redis-get-1m' | 'rmem-write' | 'rmem-read' | 'rmem-read-1m' | 'rmem-readinto-1m';

export interface RmemCaseSpec {
  name: string;
  kind: RmemCaseKind;
  depth: number;
  rmem: { host: string; port: number };
  redisPort?: number;
}

const KB4 = 4096;
const MB1 = 1024 * 1024;
const SLOTS = 256;
const slot = (i: number): number => (i * 7) % SLOTS;

async function onRedis(spec: RmemCaseSpec): Promise<CaseResult> {
  if (spec.redisPort === undefined) throw new Error(`${spec.name}: no Redis port`);
  const redis = new Redis({ port: spec.redisPort });
  try {
    const block = Buffer.alloc(KB4, 0x5a);
    if (spec.kind === 'redis-get-1m') {
      await redis.set('big', Buffer.alloc(MB1, 0xa5));
      return await measure({ name: spec.name, bytesPerOp: MB1, run: async () => { await redis.getBuffer('big'); } }, { depth: spec.depth });
    }
    for (let i = 0; i < SLOTS; i++) await redis.set(`k${i}`, block);
    if (spec.kind === 'redis-set') return await measure({ name: spec.name, bytesPerOp: KB4, run: async (i) => { await redis.set(`k${slot(i)}`, block); } }, { depth: spec.depth });
    return await measure({ name: spec.name, bytesPerOp: KB4, run: async (i) => { await redis.getBuffer(`k${slot(i)}`); } }, { depth: spec.depth });
  } finally {
    redis.disconnect();
  }
}

async function onRmem(spec: RmemCaseSpec): Promise<CaseResult> {
  const client = await RmemClient.connect({ ...spec.rmem, serverId: `bench-${process.pid}` });
  const regions: Region[] = [];
  const bind = async (size: number): Promise<Region> => {
    const region = await client.bind(size, { medium: 'dram' });
    regions.push(region);
    return region;
  };
  try {
    if (spec.kind === 'rmem-read-1m' || spec.kind === 'rmem-readinto-1m') {
      const big = await bind(8 * MB1);
      const mega = Buffer.alloc(MB1, 0xa5);
      for (let i = 0; i < 8; i++) await client.write(big, i * MB1, mega);
      if (spec.kind === 'rmem-read-1m') return await measure({ name: spec.name, bytesPerOp: MB1, run: async (i) => { await client.read(big, (i % 8) * MB1, MB1); } }, { depth: spec.depth });
      const into = Buffer.alloc(MB1);
      return await measure({ name: spec.name, bytesPerOp: MB1, run: async (i) => { await client.readInto(big, (i % 8) * MB1, into); } }, { depth: spec.depth });
    }
    const small = await bind(SLOTS * KB4);
    const block = Buffer.alloc(KB4, 0x5a);
    for (let i = 0; i < SLOTS; i++) await client.write(small, i * KB4, block);
    if (spec.kind === 'rmem-write') return await measure({ name: spec.name, bytesPerOp: KB4, run: (i) => client.write(small, slot(i) * KB4, block) }, { depth: spec.depth });
    return await measure({ name: spec.name, bytesPerOp: KB4, run: async (i) => { await client.read(small, slot(i) * KB4, KB4); } }, { depth: spec.depth });
  } finally {
    // Freed at once: a closed session's regions would stay for its lease.
    for (const region of regions) await client.free(region);
    await client.close();
  }
}

async function main(): Promise<void> {
  const spec = JSON.parse(process.argv[2] ?? '') as RmemCaseSpec;
  const result = spec.kind.startsWith('redis') ? await onRedis(spec) : await onRmem(spec);
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
