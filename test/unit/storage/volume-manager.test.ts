// The volume manager's resize is all or nothing, and a resize settles the write log first.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import { PartitionTable } from '../../../src/memory/partition-table.js';
import { LINE_SIZE } from '../../../src/storage/cache/line.js';
import { StorageCache } from '../../../src/storage/cache/storage-cache.js';
import { VolumeManager } from '../../../src/storage/volume-manager.js';
import { tempDir } from '../../support/node-process.js';

const log = pino({ level: 'silent' });

test('a shrink whose store resize fails keeps the cache\'s acknowledged writes past the new end', async (t) => {
  // Review finding: the cache let go of the lines past the new end before the store was
  // resized; when the resize failed, those acknowledged writes were gone.
  const dir = await tempDir(t);
  const E = 4 * LINE_SIZE;
  const media = [new DramMedium({ capacity: 4 * E, extentSize: E })];
  await media[0]?.open();
  const partition = new PartitionTable([
    { name: 'dram', capacity: 4 * E, extentSize: E, initial: { cache: 2 * E, server: 0, nvram: 0 }, bounds: { cache: { min: 0, max: 4 * E }, server: { min: 0, max: 4 * E }, nvram: { min: 0, max: 4 * E } } },
  ]);
  const cache = new StorageCache({ partition, media, log, maxDirtyAgeMs: 60_000, destageIntervalMs: 0 });
  cache.start();
  const volumes = new VolumeManager(dir, { log });
  await volumes.open(4 * LINE_SIZE);
  t.after(async () => {
    await cache.stop();
    await volumes.close();
  });
  const steps: string[] = [];
  volumes.onDrop = (volume, from) => {
    steps.push('drop');
    return cache.forget(volume, from);
  };
  volumes.beforeResize = () => {
    steps.push('settle the write log');
    return Promise.resolve();
  };
  const volume = volumes.get('default');
  await cache.write(volume, 3 * LINE_SIZE, Buffer.alloc(4096, 0xcd), false); // acknowledged, dirty
  const store = volume.store as { resize(size: number): Promise<void> };
  const resize = store.resize.bind(store);
  store.resize = () => Promise.reject(Object.assign(new Error('EIO: injected'), { code: 'EIO' }));
  await assert.rejects(volumes.resize('default', 2 * LINE_SIZE));
  assert.deepEqual(steps, ['settle the write log'], 'the cache did not let go of anything');
  assert.equal(volume.size, 4 * LINE_SIZE);
  const back = Buffer.alloc(4096);
  await cache.read(volume, 3 * LINE_SIZE, back);
  assert.ok(back.every((b) => b === 0xcd), 'the acknowledged write past the new end is still there');
  store.resize = resize;
  await volumes.resize('default', 2 * LINE_SIZE);
  assert.deepEqual(steps, ['settle the write log', 'settle the write log', 'drop']);
});
