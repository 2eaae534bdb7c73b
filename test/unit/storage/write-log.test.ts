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
  // Only the device lookup is needed: FLUSH through a write log appends nothing.
  const nvram = { get: () => ({ name: 'wl' }) } as unknown as DeviceManager;
  const io = new WriteLogIo(new DirectVolumeIo(), nvram, pino({ level: 'silent' }));
  await io.flush(volume);
  plan.fail({ op: 'mem.sync', fault: 'EIO' });
  await assert.rejects(volume.store.sync());
  await assert.rejects(io.flush(volume), (error: { code?: string }) => error.code === 'MS_VOLUME_FENCED');
});
