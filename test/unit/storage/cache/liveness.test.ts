// The cache never stops for good: reclaims that take every extent of a level, medium
// errors in the middle of a promotion or demotion, promotions fighting over one DRAM
// slot, and a flash reclaim meeting a DRAM eviction all finish, and so does whatever
// waited behind them (the partition table's queue: every later resize and rmem bind).
// Each case is one an adversarial review reproduced against the first version of the
// split cache.
//
// A hang shows as a promise that does not settle: `settles` waits for one with a
// generous deadline, which fails only on a real hang, never on a slow machine. A livelock
// spins on microtasks and would starve any timer, so medium calls are counted through
// the fault plan and a run that makes too many fails instead.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import type { MediumName } from '../../../../src/kinds.js';
import { AllocationTable } from '../../../../src/memory/allocation-table.js';
import { PartitionTable, type MediumLayout } from '../../../../src/memory/partition-table.js';
import { ServerMemory, Tenancy } from '../../../../src/memory/server-memory.js';
import { LINE_SIZE } from '../../../../src/storage/cache/line.js';
import { StorageCache } from '../../../../src/storage/cache/storage-cache.js';
import { Volume } from '../../../../src/storage/volume-manager.js';
import { FaultPlan, FaultyMedium } from '../../../support/faults.js';
import { MemoryStore } from '../../../support/memory-store.js';
import { NamedDram } from '../../../support/named-dram.js';

const E = LINE_SIZE; // one line per extent: the smallest cache there can be
const log = pino({ level: 'silent' });

interface Spec {
  name: MediumName;
  extents: number;
  cache: number;
}

async function rig(specs: readonly Spec[]) {
  const plan = new FaultPlan();
  const layouts: MediumLayout[] = specs.map((m) => ({
    name: m.name,
    capacity: m.extents * E,
    extentSize: E,
    initial: { cache: m.cache * E, server: 0, nvram: 0 },
    bounds: { cache: { min: 0, max: m.extents * E }, server: { min: 0, max: m.extents * E }, nvram: { min: 0, max: m.extents * E } },
  }));
  const media = layouts.map((l) => new FaultyMedium(new NamedDram(l.name, l.capacity, E), plan));
  for (const m of media) await m.open();
  const partition = new PartitionTable(layouts);
  const memory = new ServerMemory({ partition, allocation: new AllocationTable(), media });
  const volume = new Volume('v', false, new Date().toISOString(), new MemoryStore(32 * LINE_SIZE, plan));
  const cache = new StorageCache({ partition, media, log, maxDirtyAgeMs: 60_000, destageIntervalMs: 0 });
  cache.start();
  return { plan, partition, memory, volume, cache };
}

/** Holds calls of `op` until released; `hit` resolves when the first arrives. */
function hold(plan: FaultPlan, op: string): { hit: Promise<void>; release: () => void } {
  let release: () => void = () => undefined;
  const released = new Promise<void>((resolve) => (release = resolve));
  let arrived: () => void = () => undefined;
  const hit = new Promise<void>((resolve) => (arrived = resolve));
  let on = true;
  plan.gate = (o) => {
    if (on && o === op) {
      arrived();
      return released;
    }
    return undefined;
  };
  return {
    hit,
    release: () => {
      on = false;
      release();
    },
  };
}

const ticks = async (n = 5): Promise<void> => {
  for (let i = 0; i < n; i++) await new Promise((resolve) => setImmediate(resolve));
};

/** Resolves with 'settled' or 'failed: CODE'; rejects if the promise hangs. */
async function settles(promise: Promise<unknown>, what: string): Promise<string> {
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} never settled`)), 10_000);
  });
  try {
    return await Promise.race([promise.then(() => 'settled', (error: unknown) => `failed: ${(error as { code?: string }).code ?? String(error)}`), hang]);
  } finally {
    clearTimeout(timer);
  }
}

const block = (): Buffer => Buffer.alloc(4096);

test('a request waiting for a slot while a reclaim takes every DRAM extent goes to the data store', async () => {
  const { plan, partition, volume, cache } = await rig([{ name: 'dram', extents: 2, cache: 1 }]);
  await cache.read(volume, 0, block());
  const gate = hold(plan, 'dram.zero'); // the reclaim, holding in its zeroing step
  const resize = partition.resize('dram', 'server', 2 * E);
  await gate.hit;
  const read = cache.read(volume, LINE_SIZE, block());
  await ticks();
  gate.release();
  assert.equal(await settles(resize, 'the resize'), 'settled');
  assert.equal(await settles(read, 'a read issued during the reclaim'), 'settled');
  assert.equal(await settles(cache.read(volume, 2 * LINE_SIZE, block()), 'a read after it'), 'settled');
});

test('a demotion while the flash level is being taken away neither waits forever nor holds the partition table up', async () => {
  const { plan, partition, memory, volume, cache } = await rig([
    { name: 'dram', extents: 2, cache: 1 },
    { name: 'flash', extents: 2, cache: 1 },
  ]);
  await cache.read(volume, 0, block());
  const gate = hold(plan, 'flash.zero');
  const resize = partition.resize('flash', 'server', 2 * E);
  await gate.hit;
  const read = cache.read(volume, LINE_SIZE, block()); // evicts line 0, which would demote
  await ticks();
  gate.release();
  assert.equal(await settles(resize, 'the flash resize'), 'settled');
  assert.equal(await settles(read, 'the read that evicts'), 'settled');
  assert.equal(await settles(cache.read(volume, 0, block()), 'a read of the evicted line'), 'settled');
  assert.equal(await settles(memory.bind(new Tenancy('srv', 1), 2 * E, { kind: 'medium', medium: 'dram' }), 'an rmem bind that reclaims DRAM'), 'settled');
  assert.equal(await settles(partition.resize('flash', 'server', 0), 'a later resize'), 'settled');
});

test('a medium error in the middle of a promotion or a demotion gives the slot back', async () => {
  {
    const { plan, partition, volume, cache } = await rig([
      { name: 'dram', extents: 2, cache: 1 },
      { name: 'flash', extents: 2, cache: 2 },
    ]);
    await cache.read(volume, 0, block());
    await cache.read(volume, LINE_SIZE, block()); // line 0 demoted to flash
    plan.fail({ op: 'flash.read', fault: 'EIO' }); // its promotion fails
    assert.equal(await settles(cache.read(volume, 0, block()), 'the failed promotion'), 'failed: EIO');
    plan.heal();
    assert.equal(await settles(cache.read(volume, 5 * LINE_SIZE, block()), 'a read after the fault'), 'settled');
    assert.equal(await settles(cache.write(volume, 6 * LINE_SIZE, Buffer.alloc(4096, 1), false), 'a write after the fault'), 'settled');
    assert.equal(await settles(partition.resize('dram', 'server', 2 * E), 'a reclaim of the DRAM extent'), 'settled');
  }
  {
    const { plan, partition, volume, cache } = await rig([
      { name: 'dram', extents: 2, cache: 1 },
      { name: 'flash', extents: 2, cache: 1 },
    ]);
    await cache.read(volume, 0, block());
    plan.fail({ op: 'flash.write', fault: 'EIO' }); // the demotion's copy fails
    await settles(cache.read(volume, LINE_SIZE, block()), 'the read whose eviction fails to demote');
    plan.heal();
    assert.equal(await settles(partition.resize('flash', 'server', 2 * E), 'a reclaim of the flash extent'), 'settled');
  }
});

test('two lines in flash and one DRAM slot: a read over both finishes (no promotion livelock)', async () => {
  const { plan, volume, cache } = await rig([
    { name: 'dram', extents: 2, cache: 1 },
    { name: 'flash', extents: 3, cache: 3 },
  ]);
  for (const i of [0, 1, 2]) await cache.read(volume, i * LINE_SIZE, block()); // 0 and 1 demoted
  let calls = 0;
  plan.gate = () => {
    if (++calls > 10_000) throw new Error('more than 10000 medium calls for one read: the pieces evict each other forever');
    return undefined;
  };
  const got = Buffer.alloc(2 * LINE_SIZE, 0xff);
  await cache.read(volume, 0, got);
  assert.ok(got.every((b) => b === 0));
});

test('a flash reclaim and a DRAM eviction that needs a flash slot do not wait for each other', async () => {
  const { plan, partition, memory, volume, cache } = await rig([
    { name: 'dram', extents: 3, cache: 2 },
    { name: 'flash', extents: 2, cache: 2 },
  ]);
  const read = (line: number): Promise<void> => cache.read(volume, line * LINE_SIZE, block());
  for (const l of [3, 1, 5, 6]) await read(l); // 3 and 1 demoted to flash; 5 and 6 in DRAM
  await cache.zero(volume, 5 * LINE_SIZE, 4096, { fua: false, allocate: false }); // one DRAM slot free
  const gate = hold(plan, 'mem.zero');
  const zeroing = cache.zero(volume, 3 * LINE_SIZE + 4096, 4096, { fua: false, allocate: false }); // holds line 3's lock
  await gate.hit;
  const resize = partition.resize('flash', 'server', 2 * E); // lists lines 3 and 1, waits for line 3
  await ticks();
  assert.equal(await settles(read(1), 'the read that promotes line 1'), 'settled');
  const read7 = read(7); // evicts line 1 from DRAM, which would want a flash slot
  await ticks();
  gate.release();
  assert.equal(await settles(zeroing, 'the zeroing'), 'settled');
  assert.equal(await settles(resize, 'the flash resize'), 'settled');
  assert.equal(await settles(read7, 'the read that evicts'), 'settled');
  assert.equal(await settles(memory.bind(new Tenancy('srv', 1), 3 * E, { kind: 'medium', medium: 'dram' }), 'an rmem bind queued behind the resize'), 'settled');
});
