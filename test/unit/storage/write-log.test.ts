// The write log keeps the volume layer's promises: a fenced volume fails every FLUSH,
// with a write log as without one; plain WRITEs acknowledged before their record is
// synced never let a replay put an older record over newer data, and are not lost at
// a clean stop or by a checkpoint.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import pino from 'pino';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import type { DeviceManager } from '../../../src/nvram/device-manager.js';
import { NvramDevice } from '../../../src/nvram/device.js';
import { JournalFile, parseJournal } from '../../../src/nvram/journal-file.js';
import { RECORD_FLAG, decodeRecord } from '../../../src/protocol/journal/record.js';
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

async function localDevice(path: string, plan = new FaultPlan(), size = DEVICE): Promise<NvramDevice> {
  const journal = await JournalFile.create(path, size, { wrap: faultyJournal(plan) });
  const medium = new DramMedium({ capacity: size, extentSize: E });
  await medium.open();
  return new NvramDevice({ name: 'wl', size, policy: 'local', medium, extents: Array.from({ length: size / E }, (_, i) => i * E), extentSize: E, journal });
}

/** What a restart after kill -9 finds (the page cache survives): the store as written, the journal replayed over it. */
async function afterKill(store: MemoryStore, journalPath: string): Promise<Buffer> {
  const image = Buffer.alloc(store.size);
  await store.read(0, image);
  return replayOver(image, journalPath);
}

/** Replays the journal file's live records over `image` (a copy of the data store), as a restart does. */
function replayOver(image: Buffer, journalPath: string): Buffer {
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

// ---- plain WRITEs stored in the turn they arrive (WriteLogIo.writeNow) ----

/** A volume on a `local` write log over a small cache; stopped and closed after the test. */
async function loggedVolume(t: { after(fn: () => Promise<void>): void }, options: { journalPlan?: FaultPlan; storePlan?: FaultPlan; storeBytes?: number } = {}) {
  const dir = await tempDir(t, 'memstrata-wl-');
  const path = join(dir, 'wl.journal');
  const device = await localDevice(path, options.journalPlan);
  const cache = await smallCache();
  const io = new WriteLogIo(cache, { get: () => device } as unknown as DeviceManager, silent);
  const store = new MemoryStore(options.storeBytes ?? 1 << 20, options.storePlan ?? new FaultPlan());
  const volume = new Volume('v', false, new Date().toISOString(), store, 'wl');
  t.after(async () => {
    await cache.stop();
    await device.close();
  });
  return { path, device, cache, io, store, volume };
}

/** Holds the plan's calls that `which` picks until the function returned is called. */
function hold(plan: FaultPlan, which: (op: string) => boolean): () => void {
  let open = (): void => undefined;
  const held = new Promise<void>((resolve) => { open = resolve; });
  plan.gate = (op) => (which(op) ? held : undefined);
  return () => {
    plan.gate = undefined;
    open();
  };
}

const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

test('writeNow through a write log stores the data in the cache and appends its record in the same turn, unsynced; it declines without touching the cache where the device would make it wait, and without a write-back cache', async (t) => {
  const plan = new FaultPlan();
  const { path, device, cache, io, store, volume } = await loggedVolume(t, { journalPlan: plan });
  await io.write(volume, 0, Buffer.alloc(4096, 0xaa), true); // the line in DRAM; A durable
  const seq = device.lastSeq;
  assert.equal(io.writeNow(volume, 0, Buffer.alloc(4096, 0xbb)), true);
  assert.equal(device.lastSeq, seq + 1, 'its record appended in the same turn');
  assert.ok(device.uncommittedBytes > 0, 'not synced: the write-ahead barrier will commit it');
  const got = Buffer.alloc(4096);
  await io.read(volume, 0, got);
  assert.ok(got.every((b) => b === 0xbb));
  // Write-ahead: the destage commits B's record before B reaches the store, so a kill -9
  // after the write-back replays no older record over it.
  await cache.destage(Date.now() + 3_600_000);
  assert.equal((await afterKill(store, path))[0], 0xbb, 'replay put an older record over a write writeNow stored');
  // A FLUSH makes the next one durable: after a kill -9 it is there, with nothing written back.
  assert.equal(io.writeNow(volume, 4096, Buffer.alloc(4096, 0xcc)), true);
  await io.flush(volume);
  assert.equal((await afterKill(store, path))[4096], 0xcc, 'a writeNow WRITE before a FLUSH that returned is lost after kill -9');
  // Behind an append in flight (a FUA write's, its sync held): declined, and the cache
  // was not written.
  const release = hold(plan, (op) => op === 'journal.datasync');
  const fua = io.write(volume, 8192, Buffer.alloc(4096, 0xdd), true);
  while (device.canAppendNow(device.epoch, [{ payload: Buffer.alloc(1) }])) await turn();
  assert.equal(io.writeNow(volume, 0, Buffer.alloc(4096, 0xee)), false);
  release();
  await fua;
  await io.read(volume, 0, got);
  assert.ok(got.every((b) => b === 0xbb), 'a declined writeNow wrote the cache');
  // A line the cache does not hold: declined, no record.
  const last = device.lastSeq;
  assert.equal(io.writeNow(volume, 512 * 1024, Buffer.alloc(4096, 1)), false);
  assert.equal(device.lastSeq, last, 'no record for a write not stored');
  // Without a write-back cache the record must be synced first: never here.
  const direct = new WriteLogIo(new DirectVolumeIo(), { get: () => device } as unknown as DeviceManager, silent);
  assert.equal(direct.writeNow(volume, 0, Buffer.alloc(4096, 2)), false);
  assert.equal(device.lastSeq, last);
});

test('a write log under plain, FUA and writeNow WRITEs, FLUSHes, destages and checkpoints at moments the scheduler picks: a kill -9 after any FLUSH keeps every block at a write that no write completed before the FLUSH superseded, and the data store after a last FLUSH holds what the cache does', async (t) => {
  // Blocks of 4 KiB in four lines, so writes overlap, some of them over two lines. Each request starts in a turn of its
  // own, as one arriving from a socket does (a macrotask: whatever the earlier requests
  // left to run in microtasks has run). The data store's and the journal's I/O complete
  // when the scheduler lets them. A write W to a block is superseded once another write
  // to it started after W completed.
  const dir = await tempDir(t, 'memstrata-wl-');
  const BLOCKS = 64;
  let run = 0;
  let stored = 0;
  let checkpointed = 0;
  await fc.assert(
    fc.asyncProperty(
      // Writes of one or two blocks; from blocks 15 and 31 two blocks span two lines.
      fc.array(fc.record({ op: fc.constantFrom('plain', 'now', 'now', 'now', 'fua', 'flush', 'destage'), block: fc.constantFrom(0, 1, 15, 17, 31, 40, 62), blocks: fc.constantFrom(1, 2) }), { minLength: 1, maxLength: 24 }),
      fc.scheduler(),
      async (ops, s) => {
        const path = join(dir, `p${run++}.journal`);
        const plan = new FaultPlan();
        // 64 KiB: about five writes fill half of it, and a checkpoint starts; about ten fill it.
        const device = await localDevice(path, plan, E);
        // A WRITE that finds the journal full waits for a checkpoint, which writes its bytes
        // back before its record can be appended (a stated limit of the write-ahead promise).
        let full = 0;
        const append = device.append.bind(device);
        device.append = async (...args) => {
          try {
            return await append(...args);
          } catch (error) {
            if ((error as { code?: string }).code === 'MS_NVRAM_FULL') full++;
            throw error;
          }
        };
        const nvram = { get: () => device } as unknown as DeviceManager;
        const cache = await smallCache();
        const io = new WriteLogIo(cache, nvram, silent);
        const store = new MemoryStore(BLOCKS * 4096, plan);
        const volume = new Volume('v', false, new Date().toISOString(), store, 'wl');
        // Every line in DRAM first, read (no write yet: the first WRITE may be one writeNow takes).
        for (let line = 0; line < 4; line++) await io.read(volume, line * 65536, Buffer.alloc(65536));
        plan.gate = (op) => s.schedule(Promise.resolve(), op);
        let clock = 0;
        // When the write-back that put each block's bytes in the data store began: the
        // barrier is called (under the line's lock) as a line's write-back begins. The
        // write-ahead promise covers writes acknowledged before then; one still on its way
        // (over two lines, its other line waiting for a lock) may be written back first.
        const begun = new Map<number, number>();
        const writtenBackFrom: (number | undefined)[] = [];
        let barrier: Volume['logBarrier'];
        Object.defineProperty(volume, 'logBarrier', {
          get: () => (barrier === undefined ? undefined : (offset: number, length: number) => {
            begun.set(offset / 65536, ++clock);
            return barrier?.(offset, length) ?? Promise.resolve();
          }),
          set: (fn: Volume['logBarrier']) => { barrier = fn; },
        });
        const storeWrite = store.write.bind(store);
        store.write = async (at, data) => {
          const from = begun.get(Math.floor(at / 65536));
          await storeWrite(at, data);
          for (let b = at / 4096; b < (at + data.length) / 4096; b++) writtenBackFrom[b] = from;
        };
        const history: { value: number; start: number; end: number }[][] = Array.from({ length: BLOCKS }, () => []);
        /** Values a block may hold after a kill -9 once a FLUSH sent at `sent` returned. */
        const allowed = (block: number, sent: number): number[] => {
          const h = history[block] ?? [];
          const done = h.filter((w) => w.end < sent);
          const kept = h.filter((w) => !done.some((o) => o.start > w.end)).map((w) => w.value);
          return done.length === 0 ? [0, ...kept] : kept;
        };
        const writes = new Map<number, { start: number; end: number }>([[0, { start: 0, end: 0 }]]);
        let flushed = 0;
        /**
         * What a kill -9 now leaves: every block at a write no write completed before the
         * last FLUSH that returned superseded, and never at one that the write the data
         * store holds superseded, where that write was acknowledged before its write-back
         * began (write-ahead: replay puts no older record over newer data).
         */
        const killNow = (when: string): void => {
          const raw = Buffer.from((store as unknown as { data: Buffer }).data);
          const image = replayOver(Buffer.from(raw), path);
          for (let b = 0; b < BLOCKS; b++) {
            const v = image[b * 4096] ?? -1;
            assert.ok(allowed(b, flushed).includes(v), `${when}, a kill -9 leaves block ${b} at ${v}; allowed ${allowed(b, flushed).join(',')}`);
            const got = writes.get(v);
            const inStore = writes.get(raw[b * 4096] ?? -1);
            assert.ok(got !== undefined && inStore !== undefined);
            const from = writtenBackFrom[b];
            if (full === 0 && from !== undefined && inStore.end < from) assert.ok(!(inStore.start > got.end), `${when}, replay puts block ${b} back at ${v}, older than the ${raw[b * 4096]} written back`);
          }
        };
        const work = ops.map(async ({ op, block, blocks }, i) => {
          await s.schedule(Promise.resolve(), op);
          await new Promise((resolve) => setImmediate(resolve));
          if (op === 'flush') {
            const sent = ++clock;
            try {
              await io.flush(volume);
            } catch {
              return;
            }
            flushed = Math.max(flushed, sent);
            killNow('after a FLUSH');
            return;
          }
          if (op === 'destage') {
            await cache.destage(Date.now() + 3_600_000).catch(() => undefined);
            killNow('after a destage');
            return;
          }
          const value = i + 1; // one value per write: the image tells which write a block holds
          const data = Buffer.alloc(blocks * 4096, value);
          // In flight (end Infinity) until it completes: a kill -9 may find it already.
          const write = { value, start: ++clock, end: Infinity };
          for (let k = 0; k < blocks; k++) history[block + k]?.push(write);
          writes.set(value, write);
          if (op === 'now' && io.writeNow(volume, block * 4096, data)) stored++;
          else await io.write(volume, block * 4096, data, op === 'fua');
          write.end = ++clock;
        });
        try {
          await s.waitFor(Promise.all(work));
          // What still waits for the scheduler (a checkpoint's write-backs, a journal write
          // it started) goes on; nothing waits for it from here.
          plan.gate = undefined;
          await s.waitIdle();
          if (device.trimPoint > 0) checkpointed++;
          await io.flush(volume);
          const image = await afterKill(store, path);
          const now = Buffer.alloc(BLOCKS * 4096);
          await io.read(volume, 0, now);
          assert.ok(image.equals(now), 'after a last FLUSH, a kill -9 finds other bytes than the cache held');
          await cache.flush(volume);
          const onDisk = Buffer.alloc(BLOCKS * 4096);
          await store.read(0, onDisk);
          assert.ok(onDisk.equals(now), 'the data store after a cache flush differs from what the cache held');
        } finally {
          plan.gate = undefined;
          await s.waitIdle();
          await cache.stop();
          await device.close();
        }
      },
    ),
    { numRuns: 80, includeErrorInReport: true },
  );
  assert.ok(stored > 0, 'writeNow never took a write');
  assert.ok(checkpointed > 0, 'no run reached a checkpoint');
});

test('the write-ahead barrier waits for a FUA write\'s record still on its way: a destage meanwhile writes nothing back until that record is in the journal', async (t) => {
  // Review finding: a synced append in flight counted as committed, so a destage could
  // write the FUA data back while the journal held only an older record for the block.
  const plan = new FaultPlan();
  const { path, device, cache, io, store, volume } = await loggedVolume(t, { journalPlan: plan });
  await io.write(volume, 0, Buffer.alloc(4096, 1), false);
  await io.flush(volume); // record 1 durable
  const release = hold(plan, (op) => op.startsWith('journal.'));
  const fua = io.write(volume, 0, Buffer.alloc(4096, 2), true);
  while (!device.appending) await turn();
  let destaged = false;
  const destage = cache.destage(Date.now() + 3_600_000).then(() => { destaged = true; });
  for (let i = 0; i < 10; i++) await turn();
  assert.equal(destaged, false, 'the destage went ahead of the FUA record');
  const raw = Buffer.alloc(4096);
  await store.read(0, raw);
  assert.equal(raw[0], 0, 'nothing written back yet');
  release();
  await fua;
  await destage;
  assert.equal((await afterKill(store, path))[0], 2);
});

test('overlapping WRITEs through a log are recorded in the order the cache took them: a WRITE over two lines, its first line stored, and a WRITE to that line meanwhile; after a FLUSH a kill -9 gives what reads gave', async (t) => {
  // Review finding: the later WRITE took its record number first, so replay put the
  // earlier one's bytes over it although reads before the crash returned the later one.
  const L = 65536;
  const plan = new FaultPlan();
  const { path, io, store, volume } = await loggedVolume(t, { storePlan: plan, storeBytes: 16 * L });
  await io.read(volume, 0, Buffer.alloc(L)); // line 0 in DRAM, line 1 not cached
  const release = hold(plan, (op) => op === 'mem.read'); // line 1's staging waits
  // A: the last 4 KiB of line 0 and 100 bytes of line 1 (a sector in part: staged first).
  const a = io.write(volume, L - 4096, Buffer.alloc(4096 + 100, 0xaa), false);
  for (let i = 0; i < 5; i++) await turn();
  // B, to line 0 that A has stored already: not at once (A is on its way), and after A.
  assert.equal(io.writeNow(volume, L - 4096, Buffer.alloc(4096, 0xbb)), false, 'writeNow took a WRITE overlapping one on its way');
  const b = io.write(volume, L - 4096, Buffer.alloc(4096, 0xbb), false);
  // A WRITE elsewhere is not held up.
  assert.equal(io.writeNow(volume, 0, Buffer.alloc(4096, 0xcc)), true);
  release();
  await Promise.all([a, b]);
  await io.flush(volume);
  const read = Buffer.alloc(4096);
  await io.read(volume, L - 4096, read);
  assert.equal(read[0], 0xbb);
  assert.equal((await afterKill(store, path))[L - 4096], 0xbb, 'after a FLUSH and kill -9 the block reads otherwise than before');
});

test('a WRITE larger than a record (17 MiB, under the 32 MiB NBD block size) is journaled as several records and replayed whole', async (t) => {
  // Review finding: its one record was refused (MAX_PAYLOAD 16 MiB) after the data was stored.
  const dir = await tempDir(t, 'memstrata-wl-');
  const path = join(dir, 'big.journal');
  const M = 1 << 20;
  const device = await localDevice(path, undefined, 64 * M);
  const io = new WriteLogIo(new DirectVolumeIo(), { get: () => device } as unknown as DeviceManager, silent);
  const store = new MemoryStore(32 * M, new FaultPlan());
  const volume = new Volume('v', false, new Date().toISOString(), store, 'wl');
  const data = Buffer.alloc(17 * M);
  for (let i = 0; i < data.length; i += 4096) data[i] = (i / 4096) % 251;
  await io.write(volume, M, data, false);
  assert.equal(device.lastSeq, 2, 'two records');
  const image = replayOver(Buffer.alloc(32 * M), path);
  assert.ok(image.subarray(M, 18 * M).equals(data), 'the replay gives the whole WRITE');
  await device.close();
});

test('writeNow through a write log when the device\'s memory refuses the record: not answered at once; the device repairs, the WRITE takes the usual path, and every record reads back in order', async (t) => {
  const { path, device, io, volume } = await loggedVolume(t);
  const medium = device.medium;
  assert.ok(medium instanceof DramMedium);
  await io.read(volume, 0, Buffer.alloc(E));
  assert.equal(io.writeNow(volume, 0, Buffer.alloc(4096, 0x10)), true);
  const writeSync = medium.writeSync.bind(medium);
  medium.writeSync = () => {
    medium.writeSync = writeSync;
    throw Object.assign(new Error('EIO: injected'), { code: 'EIO' });
  };
  assert.equal(io.writeNow(volume, 0, Buffer.alloc(4096, 0x11)), false, 'answered a WRITE whose record the device refused');
  assert.equal(device.info().state, 'failed', 'the device repairs');
  await io.write(volume, 0, Buffer.alloc(4096, 0x11), false);
  await io.flush(volume);
  const seqs = (await device.read(0, 100)).map((b) => {
    const decoded = decodeRecord(b);
    assert.ok('record' in decoded, 'a readable record that does not decode');
    return decoded.record.seq;
  });
  assert.deepEqual(seqs, seqs.map((_, i) => i + 1), 'numbers without a gap, the refused one voided');
  assert.equal(replayOver(Buffer.alloc(1 << 20), path)[0], 0x11);
});

test('writeNow alone installs the write-ahead barrier and starts checkpoints: the first WRITE of a volume taken at once still has its record made durable before its write-back, and a log filled past half by such WRITEs is trimmed', async (t) => {
  const { path, device, cache, io, store, volume } = await loggedVolume(t);
  await io.read(volume, 0, Buffer.alloc(E)); // cached by a read: no WRITE yet
  assert.equal(io.writeNow(volume, 0, Buffer.alloc(4096, 1)), true);
  await io.flush(volume);
  assert.equal(io.writeNow(volume, 0, Buffer.alloc(4096, 2)), true);
  await cache.destage(Date.now() + 3_600_000);
  const raw = Buffer.alloc(4096);
  await store.read(0, raw);
  assert.equal(raw[0], 2, 'written back');
  assert.equal((await afterKill(store, path))[0], 2, 'replay put an older record over data written back');
  let now = 0;
  for (let i = 0; i < 40 && device.trimPoint === 0; i++) {
    if (io.writeNow(volume, (i % 16) * 4096, Buffer.alloc(4096, i))) now++;
    else await io.write(volume, (i % 16) * 4096, Buffer.alloc(4096, i), false);
    for (let k = 0; k < 3; k++) await turn();
  }
  assert.ok(now > 20, `writeNow took ${now}`);
  assert.ok(device.trimPoint > 0, 'no checkpoint though writeNow filled the log past half');
});

test('the barrier lets a one-line WRITE whose cache write just ended take its record first: a destage granted the line\'s lock as that WRITE lets it go writes its bytes back only with its record in the journal', async (t) => {
  // Review finding: a destage waiting for the line's lock got it at the WRITE's release and
  // ran its barrier before the WRITE's record number was taken (microtasks later).
  const plan = new FaultPlan();
  const { path, cache, io, store, volume } = await loggedVolume(t, { storePlan: plan, storeBytes: 64 * 65536 });
  await io.write(volume, 4096, Buffer.alloc(100, 0x11), false); // Z: an older record for the bytes
  await io.flush(volume);
  await cache.destage(Date.now() + 3_600_000);
  const inner = cache as unknown as { lines: Map<string, { key: string }>; keyOf(v: Volume, i: number): string; locks: { run<T>(key: string, fn: () => Promise<T>): Promise<T> }; writeBack: { destage(line: unknown): Promise<void> } };
  // Line 0 leaves the cache (clean), so A's partial sector must be staged: A holds the lock meanwhile.
  for (let i = 1; i <= 40 && inner.lines.has(inner.keyOf(volume, 0)); i++) await io.read(volume, i * 65536, Buffer.alloc(512));
  assert.equal(inner.lines.has(inner.keyOf(volume, 0)), false, 'line 0 evicted');
  const release = hold(plan, (op) => op === 'mem.read');
  const a = io.write(volume, 4096, Buffer.alloc(100, 0xaa), false);
  await turn();
  const line = inner.lines.get(inner.keyOf(volume, 0));
  assert.ok(line !== undefined);
  const destaged = inner.locks.run(line.key, () => inner.writeBack.destage(line)); // waits for A's lock
  await turn();
  release();
  await destaged;
  const raw = Buffer.alloc(store.size);
  await store.read(0, raw);
  assert.equal(raw[4096], 0xaa, 'A written back');
  assert.equal(replayOver(Buffer.from(raw), path)[4096], 0xaa, 'written back ahead of its record: replay puts the older record over it');
  await a;
});

test('a zeroing that overlaps a WRITE on its way waits for it: after a FLUSH, a kill -9 and replay give the zeros reads gave', async (t) => {
  const L = 65536;
  const plan = new FaultPlan();
  const { path, io, store, volume } = await loggedVolume(t, { storePlan: plan, storeBytes: 16 * L });
  await io.read(volume, 0, Buffer.alloc(L)); // line 0 in DRAM, line 1 not
  const release = hold(plan, (op) => op === 'mem.read');
  const a = io.write(volume, L - 4096, Buffer.alloc(4096 + 100, 0xaa), false); // line 0 stored, line 1 staging
  for (let i = 0; i < 3; i++) await turn();
  const zeroed = io.zero(volume, L - 4096, 4096, { fua: false, allocate: false });
  for (let i = 0; i < 3; i++) await turn();
  release();
  await Promise.all([a, zeroed]);
  await io.flush(volume);
  const read = Buffer.alloc(4096);
  await io.read(volume, L - 4096, read);
  assert.ok(read.every((b) => b === 0));
  const image = await afterKill(store, path);
  assert.ok(image.subarray(L - 4096, L).every((b) => b === 0), 'after a FLUSH and kill -9 the zeroed block reads otherwise than before');
});
