// The write log keeps the volume layer's promises: a fenced volume fails every FLUSH,
// with a write log as without one; plain WRITEs acknowledged before their record is
// synced never let a replay put an older record over newer data, and are not lost at
// a clean stop or by a checkpoint.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import type { DeviceManager } from '../../../src/nvram/device-manager.js';
import { NvramDevice } from '../../../src/nvram/device.js';
import { JournalFile, parseJournal } from '../../../src/nvram/journal-file.js';
import { RECORD_FLAG } from '../../../src/protocol/journal/record.js';
import { StorageCache } from '../../../src/storage/cache/storage-cache.js';
import { DirectVolumeIo } from '../../../src/storage/volume-io.js';
import { Volume } from '../../../src/storage/volume-manager.js';
import { WriteLogIo } from '../../../src/storage/write-log.js';
import { FaultPlan, faultyJournal } from '../../support/faults.js';
import { MemoryStore } from '../../support/memory-store.js';
import { tempDir } from '../../support/node-process.js';
import { smallCache } from '../../support/small-cache.js';

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

// ---- plain WRITEs deferred in the journal (issue 13) and what must still hold ----

const E = 64 * 1024;
const DEVICE = 4 * E;
const silent = pino({ level: 'silent' });

async function localDevice(path: string, plan = new FaultPlan()): Promise<NvramDevice> {
  const journal = await JournalFile.create(path, DEVICE, { wrap: faultyJournal(plan) });
  const medium = new DramMedium({ capacity: DEVICE, extentSize: E });
  await medium.open();
  return new NvramDevice({ name: 'wl', size: DEVICE, policy: 'local', medium, extents: [0, E, 2 * E, 3 * E], extentSize: E, journal });
}

/** What a restart after kill -9 finds (the page cache survives): the store as written, the journal replayed over it. */
async function afterKill(store: MemoryStore, journalPath: string): Promise<Buffer> {
  const image = Buffer.alloc(store.size);
  await store.read(0, image);
  const records = parseJournal(readFileSync(journalPath)).records;
  let trimmed = 0;
  for (const r of records) if ((r.flags & RECORD_FLAG.TRIM) !== 0) trimmed = Math.max(trimmed, Number(r.payload.readBigUInt64BE(0)));
  for (const r of records) {
    if ((r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM | RECORD_FLAG.VOID)) !== 0 || r.seq <= trimmed || r.target === undefined) continue;
    if ((r.flags & RECORD_FLAG.ZERO) !== 0) image.fill(0, r.target.offset, r.target.offset + Number(r.payload.readBigUInt64BE(0)));
    else r.payload.copy(image, r.target.offset);
  }
  return image;
}

test('write-ahead: the cache makes a plain write\'s record durable before it writes the data back, so a kill -9 after the write-back replays no older record over it; without the cache every record is synced', async (t) => {
  const dir = await tempDir(t, 'memstrata-wl-');
  for (const withCache of [true, false]) {
    const path = join(dir, `wl-${withCache}.journal`);
    const device = await localDevice(path);
    const nvram = { get: () => device } as unknown as DeviceManager;
    const cache = withCache ? await smallCache() : undefined;
    const io = new WriteLogIo(cache ?? new DirectVolumeIo(), nvram, silent);
    const store = new MemoryStore(1 << 20, new FaultPlan());
    const volume = new Volume('v', false, new Date().toISOString(), store, 'wl');
    await io.write(volume, 0, Buffer.alloc(4096, 0xaa), true); // A, FUA: its record durable
    await io.write(volume, 0, Buffer.alloc(4096, 0xbb), false); // B, plain
    if (cache !== undefined) {
      assert.ok(device.uncommittedBytes > 0, 'B\'s record waits for a commit');
      await cache.destage(Date.now() + 3_600_000); // the destager writes B back
    }
    const image = await afterKill(store, path);
    assert.equal(image[0], 0xbb, `${withCache ? 'cache' : 'no cache'}: replay put an older record over B (0x${(image[0] ?? 0).toString(16)})`);
    await cache?.stop();
    await device.close();
  }
});

test('a clean stop whose last journal write fails rewrites the journal from memory: plain writes acknowledged before it are in the file', async (t) => {
  const dir = await tempDir(t, 'memstrata-wl-');
  const path = join(dir, 'wl.journal');
  const plan = new FaultPlan();
  const device = await localDevice(path, plan);
  const nvram = { get: () => device } as unknown as DeviceManager;
  const cache = await smallCache();
  const io = new WriteLogIo(cache, nvram, silent);
  const volume = new Volume('v', false, new Date().toISOString(), new MemoryStore(1 << 20, new FaultPlan()), 'wl');
  await io.write(volume, 0, Buffer.alloc(4096, 0xaa), true);
  await io.write(volume, 0, Buffer.alloc(4096, 0xbb), false);
  plan.fail({ op: 'journal.write', fault: 'EIO' });
  await device.close();
  const records = parseJournal(readFileSync(path)).records.filter((r) => r.target !== undefined);
  assert.deepEqual(records.map((r) => r.payload[0]), [0xaa, 0xbb], 'both acknowledged records are in the journal after the stop');
  await cache.stop();
});

test('the "larger than the journal" fallback trims only what was acknowledged before its flush: a write acknowledged during it keeps its record', async (t) => {
  const dir = await tempDir(t, 'memstrata-wl-');
  const path = join(dir, 'wl.journal');
  const device = await localDevice(path);
  const nvram = { get: () => device } as unknown as DeviceManager;
  const cache = await smallCache();
  const store = new MemoryStore(2 * 1024 * 1024, new FaultPlan());
  const volume = new Volume('v', false, new Date().toISOString(), store, 'wl');
  let flushes = 0;
  const late: { io?: WriteLogIo } = {};
  const C = Buffer.alloc(4096, 0xcc);
  const X = 1024 * 1024 + 65536; // a line the big write does not touch
  const inner = Object.assign(Object.create(cache) as StorageCache, {
    flush: async (v: Volume) => {
      flushes++;
      const flushing = cache.flush(v); // takes its list of dirty lines now
      // The fifth flush is the fallback's: a client's plain WRITE lands while it runs.
      if (flushes === 5 && late.io !== undefined) await late.io.write(volume, X, C, false);
      await flushing;
    },
  });
  const io = new WriteLogIo(inner, nvram, silent);
  late.io = io;
  await io.write(volume, 0, Buffer.alloc(DEVICE + 64 * 1024, 0xbb), false); // larger than the device
  assert.equal(flushes, 5, 'the big write went through the fallback');
  await io.flush(volume); // the client's FLUSH, after both writes were acknowledged
  const image = await afterKill(store, path);
  assert.ok(image.subarray(X, X + 4096).equals(C), 'a write acknowledged before a FLUSH that returned is lost after kill -9');
  await cache.stop();
  await device.close();
});
