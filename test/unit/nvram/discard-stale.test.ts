// A copy the cluster no longer names is removed (cluster/ownership.ts), but never one a
// primary has begun to fill again: DeviceManager.discardStale refuses when a RESET reached
// the replica after the caller read its count, and never touches a serving primary or a
// volume's write log. A primary that stepped aside keeps its journal aside.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import { PartitionTable } from '../../../src/memory/partition-table.js';
import { DeviceManager } from '../../../src/nvram/device-manager.js';

const MiB = 1024 * 1024;
const log = pino({ level: 'silent' });

async function manager(t: { after(fn: () => Promise<void>): void }): Promise<{ nvram: DeviceManager; partition: PartitionTable }> {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-discard-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const medium = new DramMedium({ capacity: 32 * MiB, extentSize: MiB });
  await medium.open();
  const partition = new PartitionTable([
    { name: 'dram', capacity: 32 * MiB, extentSize: MiB, initial: { cache: 0, server: 0, nvram: 16 * MiB }, bounds: { cache: { min: 0, max: 32 * MiB }, server: { min: 0, max: 0 }, nvram: { min: 0, max: 32 * MiB } } },
  ]);
  const nvram = new DeviceManager({ dataDir: dir, partition, media: [medium], log, clustered: true });
  await nvram.open();
  t.after(() => nvram.close());
  return { nvram, partition };
}

const reset = { name: 'r', policy: 'mirrored' as const, medium: 'dram' as const, size: 4 * MiB, epoch: 1, trimmedTo: 0, firstSeq: 1 };

test('a replica reset after its count was read stays; one that was not goes, its extents back in the partition', async (t) => {
  const { nvram, partition } = await manager(t);
  await nvram.resetReplica(reset);
  const read = nvram.resetCount('r');
  // The primary named this node again and began to fill it.
  await nvram.resetReplica(reset);
  assert.equal(await nvram.discardStale('r', read, 'test'), false);
  assert.equal(nvram.find('r')?.role, 'replica');
  const idleBefore = partition.usage()[0]?.kinds.nvram.idleBytes ?? 0;
  assert.equal(await nvram.discardStale('r', nvram.resetCount('r'), 'test'), true);
  assert.equal(nvram.find('r'), undefined);
  assert.equal((partition.usage()[0]?.kinds.nvram.idleBytes ?? 0) - idleBefore, 4 * MiB);
  assert.equal(await nvram.discardStale('r', nvram.resetCount('r'), 'test'), false, 'nothing left to remove');
});

test('a RESET queued before the discard runs wins it', async (t) => {
  const { nvram } = await manager(t);
  await nvram.resetReplica(reset);
  const read = nvram.resetCount('r');
  const filling = nvram.resetReplica(reset);
  const discarded = nvram.discardStale('r', read, 'test');
  await filling;
  assert.equal(await discarded, false);
  assert.equal(nvram.find('r')?.role, 'replica');
});

test('a serving primary and a write log stay; a primary that stepped aside goes, its journal kept aside', async (t) => {
  const { nvram } = await manager(t);
  await nvram.create('p', 4 * MiB, 'mirrored');
  await nvram.create('w', 4 * MiB, 'mirrored');
  assert.equal(await nvram.discardStale('p', nvram.resetCount('p'), 'test'), false, 'a primary that serves');
  nvram.claimedBy = (device) => (device === 'w' ? 'volume-1' : undefined);
  nvram.stepAside('w', 'test');
  assert.equal(await nvram.discardStale('w', nvram.resetCount('w'), 'test'), false, 'a volume\'s write log');
  nvram.stepAside('p', 'test');
  assert.equal(await nvram.discardStale('p', nvram.resetCount('p'), 'the cluster names another primary and replica'), true);
  assert.equal(nvram.find('p'), undefined);
  assert.equal((await nvram.divergedOf('p')).length, 1, 'its journal is kept aside');
});
