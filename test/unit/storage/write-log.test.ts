// The write log keeps the volume layer's promises: a fenced volume fails every FLUSH,
// with a write log as without one.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import type { DeviceManager } from '../../../src/nvram/device-manager.js';
import { DirectVolumeIo } from '../../../src/storage/volume-io.js';
import { Volume } from '../../../src/storage/volume-manager.js';
import { WriteLogIo } from '../../../src/storage/write-log.js';
import { FaultPlan } from '../../support/faults.js';
import { MemoryStore } from '../../support/memory-store.js';

test('a FLUSH through a write log fails once the volume is fenced', async () => {
  // Review finding: WriteLogIo.flush answered success without looking at the volume.
  const plan = new FaultPlan();
  const volume = new Volume('v', false, new Date().toISOString(), new MemoryStore(1 << 20, plan), 'wl');
  // Only the device lookup and its commit are needed: FLUSH through a write log appends nothing.
  const nvram = { get: () => ({ name: 'wl', commit: () => Promise.resolve() }) } as unknown as DeviceManager;
  const io = new WriteLogIo(new DirectVolumeIo(), nvram, pino({ level: 'silent' }));
  await io.flush(volume);
  plan.fail({ op: 'mem.sync', fault: 'EIO' });
  await assert.rejects(volume.store.sync());
  await assert.rejects(io.flush(volume), (error: { code?: string }) => error.code === 'MS_VOLUME_FENCED');
});

test('a checkpoint trims only what was acknowledged before its flush began: a write appended during the flush stays in the log', async () => {
  // Issue 11 item 12: the trim point must be read before the cache flush, not after.
  const { DramMedium } = await import('../../../src/memory/dram-medium.js');
  const { NvramDevice } = await import('../../../src/nvram/device.js');
  const E = 64 * 1024;
  const medium = new DramMedium({ capacity: 4 * E, extentSize: E });
  await medium.open();
  const device = new NvramDevice({ name: 'wl', size: 4 * E, policy: 'volatile', medium, extents: [0, E, 2 * E, 3 * E], extentSize: E, journal: undefined });
  const nvram = { get: () => device } as unknown as DeviceManager;
  let release = (): void => undefined;
  let flushing = false;
  const inner = new DirectVolumeIo();
  const slow = Object.assign(Object.create(inner) as DirectVolumeIo, {
    flush: async (v: Volume) => {
      flushing = true;
      await new Promise<void>((resolve) => (release = resolve));
      await inner.flush(v);
    },
  });
  const io = new WriteLogIo(slow, nvram, pino({ level: 'silent' }));
  const volume = new Volume('v', false, new Date().toISOString(), new MemoryStore(1 << 20, new FaultPlan()), 'wl');
  await io.write(volume, 0, Buffer.alloc(4096, 1), false);
  const checkpoint = (io as unknown as { checkpoint(v: Volume, d: typeof device): Promise<void> }).checkpoint(volume, device);
  while (!flushing) await new Promise((r) => setImmediate(r));
  await io.write(volume, 4096, Buffer.alloc(4096, 2), false);
  assert.equal(device.lastSeq, 2);
  release();
  await checkpoint;
  assert.equal(device.info().firstSeq, 2, 'record 2, appended while the flush ran, is still in the log');
});
