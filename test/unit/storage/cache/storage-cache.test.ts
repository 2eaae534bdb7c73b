import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import fc from 'fast-check';
import pino from 'pino';
import { DramMedium } from '../../../../src/memory/dram-medium.js';
import { FlashMedium } from '../../../../src/memory/flash-medium.js';
import type { Medium } from '../../../../src/memory/medium.js';
import type { MediumName } from '../../../../src/kinds.js';
import { PartitionTable, type MediumLayout } from '../../../../src/memory/partition-table.js';
import { LINE_SIZE } from '../../../../src/storage/cache/line.js';
import { StorageCache } from '../../../../src/storage/cache/storage-cache.js';
import { DataStore } from '../../../../src/storage/data-store.js';
import { Volume } from '../../../../src/storage/volume-manager.js';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { FaultPlan, faultyFiles } from '../../../support/faults.js';
import { MemoryStore } from '../../../support/memory-store.js';

const E = 256 * 1024; // 4 lines per extent
const SECTOR = 4096;
const log = pino({ level: 'silent' });

/**
 * A medium in process memory under any name. With a scheduler set, a write or zeroing
 * lands only when the scheduler lets it, as a flash write lands only once libuv's thread
 * pool has run it; reads, readSync included, see what has landed.
 */
class TestMedium extends DramMedium {
  override readonly name: MediumName;
  scheduler: fc.Scheduler | undefined;
  constructor(name: MediumName, capacity: number) {
    super({ capacity, extentSize: E });
    this.name = name;
  }
  override async write(offset: number, source: Uint8Array): Promise<void> {
    const bytes = Uint8Array.from(source);
    if (this.scheduler !== undefined) await this.scheduler.schedule(Promise.resolve(), `${this.name} write ${offset} lands`);
    return super.write(offset, bytes);
  }
  override async zero(offset: number, length: number): Promise<void> {
    if (this.scheduler !== undefined) await this.scheduler.schedule(Promise.resolve(), `${this.name} zero ${offset} lands`);
    return super.zero(offset, length);
  }
}

async function setup(t: { after(fn: () => Promise<void>): void }, options: { dramLines: number; flashLines: number; volumeSize: number; correlationWindow?: number; plan?: FaultPlan; streamMinBytes?: number; destageIntervalMs?: number; flash?: (capacity: number, dir: string) => Medium }) {
  const layout = (name: MediumName, lines: number): MediumLayout => {
    const capacity = Math.max(E, Math.ceil((lines * LINE_SIZE) / E) * E) * 2;
    return {
      name,
      capacity,
      extentSize: E,
      initial: { cache: Math.ceil((lines * LINE_SIZE) / E) * E, server: 0, nvram: 0 },
      bounds: { cache: { min: 0, max: capacity }, server: { min: 0, max: capacity }, nvram: { min: 0, max: capacity } },
    };
  };
  const layouts = [layout('dram', options.dramLines)];
  if (options.flashLines > 0) layouts.push(layout('flash', options.flashLines));
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-cache-'));
  const media = layouts.map((l): Medium => (l.name === 'flash' && options.flash !== undefined ? options.flash(l.capacity, dir) : new TestMedium(l.name, l.capacity)));
  for (const m of media) await m.open();
  const partition = new PartitionTable(layouts);
  const store = new DataStore(join(dir, 'v.img'), options.volumeSize, options.plan === undefined ? undefined : faultyFiles(options.plan));
  await store.open(true);
  const volume = new Volume('v', false, new Date().toISOString(), store);
  const cache = new StorageCache({ partition, media, log, maxDirtyAgeMs: 60_000, correlationWindow: options.correlationWindow, streamMinBytes: options.streamMinBytes, destageIntervalMs: options.destageIntervalMs });
  cache.start();
  t.after(async () => {
    await cache.stop();
    await store.close();
    for (const m of media) await m.close();
    await rm(dir, { recursive: true, force: true });
  });
  return { cache, volume, store, partition, media };
}

test('reads and writes through a small cache equal a plain buffer (with eviction, demotion, destage)', async (t) => {
  const size = 2 * 1024 * 1024;
  const { cache, volume, store } = await setup(t, { dramLines: 4, flashLines: 4, volumeSize: size });
  const model = Buffer.alloc(size);
  const op = fc.oneof(
    fc.record({ op: fc.constant('write' as const), offset: fc.nat({ max: size - 1 }), length: fc.integer({ min: 1, max: 150_000 }), seed: fc.nat({ max: 255 }), fua: fc.boolean() }),
    fc.record({ op: fc.constant('read' as const), offset: fc.nat({ max: size - 1 }), length: fc.integer({ min: 1, max: 150_000 }) }),
    fc.record({ op: fc.constant('zero' as const), offset: fc.nat({ max: size - 1 }), length: fc.integer({ min: 1, max: 300_000 }), allocate: fc.boolean() }),
    fc.record({ op: fc.constant('flush' as const) }),
  );
  await fc.assert(
    fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 30 }), async (ops) => {
      // Several operations in flight at once, as over NBD; each waits for the one before
      // on overlapping bytes, which is what a client may rely on.
      for (const o of ops) {
        if (o.op === 'flush') {
          await cache.flush(volume);
          continue;
        }
        const length = Math.min(o.length, size - o.offset);
        if (o.op === 'write') {
          const data = Buffer.alloc(length, o.seed);
          data[0] = (o.seed + 1) & 0xff;
          await cache.write(volume, o.offset, data, o.fua);
          data.copy(model, o.offset);
        } else if (o.op === 'zero') {
          await cache.zero(volume, o.offset, length, { fua: false, allocate: o.allocate });
          model.fill(0, o.offset, o.offset + length);
        } else {
          const got = Buffer.alloc(length);
          await cache.read(volume, o.offset, got);
          assert.ok(got.equals(model.subarray(o.offset, o.offset + length)), `read ${o.offset}+${length} differs`);
        }
      }
      const whole = Buffer.alloc(size);
      await cache.read(volume, 0, whole);
      assert.ok(whole.equals(model), 'whole volume through the cache');
      await cache.flush(volume);
      const onDisk = Buffer.alloc(size);
      await store.read(0, onDisk);
      assert.ok(onDisk.equals(model), 'the data store after a flush');
    }),
    { numRuns: 40 },
  );
  const stats = cache.stats();
  assert.ok(stats.evictions > 0 && stats.demotions > 0 && stats.promotions > 0, JSON.stringify(stats));
});

test('the read-hit path without a lock (readNow) never returns bytes a write has not finished, nor stale ones, at any interleaving', async (t) => {
  // 4 DRAM lines, 4 flash lines, a volume of 12 lines: writes evict, demote and promote.
  // Each sector holds one byte value repeated; per sector the model keeps the value of
  // the last completed write and the values of writes in flight. A readNow that answers
  // must give, per sector, one of those. readNow reads lines in DRAM and in flash; the
  // flash level's writes land only when the scheduler lets them, as a real flash write
  // lands when the thread pool has run it.
  const lines = 12;
  const { cache, volume, media } = await setup(t, { dramLines: 4, flashLines: 4, volumeSize: lines * LINE_SIZE });
  const flash = media.find((m) => m.name === 'flash') as TestMedium;
  let flashReads = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.record({ line: fc.nat({ max: lines - 1 }), sector: fc.nat({ max: 15 }), sectors: fc.integer({ min: 1, max: 4 }), value: fc.integer({ min: 1, max: 255 }) }), { minLength: 1, maxLength: 12 }),
      fc.array(fc.record({ line: fc.nat({ max: lines - 1 }), sector: fc.nat({ max: 15 }), sectors: fc.integer({ min: 1, max: 4 }) }), { minLength: 1, maxLength: 12 }),
      fc.scheduler(),
      async (writes, reads, s) => {
        // The bytes as they stand before this run: the model starts from them.
        const before = Buffer.alloc(lines * LINE_SIZE);
        await cache.read(volume, 0, before);
        flash.scheduler = s;
        const done: number[] = Array.from({ length: lines * 16 }, (_, i) => before[i * SECTOR] ?? 0);
        const inFlight: Set<number>[] = Array.from({ length: lines * 16 }, () => new Set());
        const check = (r: { line: number; sector: number; sectors: number }): void => {
          // Up to 4 sectors from any sector: some reads cross into the next line.
          const first = Math.min(r.line * 16 + r.sector, lines * 16 - r.sectors);
          const got = Buffer.alloc(r.sectors * SECTOR);
          const fromFlash = cache.stats().flashReadsNow;
          if (!cache.readNow(volume, first * SECTOR, got)) return;
          flashReads += cache.stats().flashReadsNow - fromFlash;
          for (let k = 0; k < r.sectors; k++) {
            const v = got[k * SECTOR] ?? -1;
            assert.ok(got.subarray(k * SECTOR, (k + 1) * SECTOR).every((b) => b === v), `sector ${first + k} torn`);
            assert.ok(v === done[first + k] || inFlight[first + k]?.has(v) === true, `sector ${first + k}: readNow gave ${v}, the model allows ${done[first + k]} or ${[...(inFlight[first + k] ?? [])].join(',')}`);
          }
        };
        const work = writes.map(async (w) => {
          const first = w.line * 16 + Math.min(w.sector, 16 - w.sectors);
          await s.schedule(Promise.resolve(), 'write starts');
          for (let k = 0; k < w.sectors; k++) inFlight[first + k]?.add(w.value);
          await cache.write(volume, first * SECTOR, Buffer.alloc(w.sectors * SECTOR, w.value), false);
          for (let k = 0; k < w.sectors; k++) {
            inFlight[first + k]?.delete(w.value);
            done[first + k] = w.value;
          }
        });
        const probes = reads.map(async (r) => {
          await s.schedule(Promise.resolve(), 'readNow');
          check(r);
        });
        try {
          await s.waitFor(Promise.all([...work, ...probes]));
        } finally {
          // Background evictions may still be writing to flash: let them land.
          flash.scheduler = undefined;
          await s.waitIdle();
        }
      },
    ),
    { numRuns: 100 },
  );
  assert.ok(flashReads > 0, 'readNow never read a line in flash');
});

test('readNow answers a read the DRAM level holds, across lines too, and declines what it does not hold', async (t) => {
  const { cache, volume } = await setup(t, { dramLines: 16, flashLines: 0, volumeSize: 4 * LINE_SIZE });
  await cache.write(volume, 0, Buffer.alloc(SECTOR, 7), false);
  const got = Buffer.alloc(SECTOR);
  assert.equal(cache.readNow(volume, 0, got), true);
  assert.equal(got[0], 7);
  // Across lines, when every line qualifies: the bytes of each, in place.
  await cache.write(volume, LINE_SIZE - SECTOR, Buffer.alloc(2 * SECTOR, 9), false);
  const across = Buffer.alloc(2 * SECTOR);
  assert.equal(cache.readNow(volume, LINE_SIZE - SECTOR, across), true);
  assert.ok(across.every((b) => b === 9));
  // A sector never staged, a line never cached: declined, nothing read.
  const untouched = Buffer.alloc(SECTOR, 0x55);
  assert.equal(cache.readNow(volume, 4 * SECTOR, untouched), false);
  assert.equal(cache.readNow(volume, 3 * LINE_SIZE, untouched), false);
  assert.ok(untouched.every((b) => b === 0x55));
});

test('writeNow stores a write the DRAM level holds, across lines too, and declines what it cannot store at once; what it stored is dirty and a flush writes it', async (t) => {
  // No background destager: its write-backs above the high watermark would hold the locks
  // of the lines this test expects writeNow to take, at moments of the timer's choosing.
  const { cache, volume, store } = await setup(t, { dramLines: 4, flashLines: 4, volumeSize: 16 * LINE_SIZE, destageIntervalMs: 0 });
  for (let i = 0; i < 2; i++) await cache.write(volume, i * LINE_SIZE, Buffer.alloc(LINE_SIZE, i + 1), false);
  // Across two lines in DRAM, whole sectors: stored, dirty, and read back.
  assert.equal(cache.writeNow(volume, LINE_SIZE - SECTOR, Buffer.alloc(2 * SECTOR, 0x33)), true);
  const across = Buffer.alloc(2 * SECTOR);
  await cache.read(volume, LINE_SIZE - SECTOR, across);
  assert.ok(across.every((b) => b === 0x33));
  // A line never cached: declined, nothing admitted.
  const residents = cache.residents().length;
  assert.equal(cache.writeNow(volume, 5 * LINE_SIZE, Buffer.alloc(SECTOR, 0x44)), false);
  assert.equal(cache.residents().length, residents);
  // Part of a sector: only where that sector is valid (nothing to stage first).
  await cache.write(volume, 2 * LINE_SIZE, Buffer.alloc(SECTOR, 0x55), false);
  assert.equal(cache.writeNow(volume, 2 * LINE_SIZE + SECTOR + 100, Buffer.alloc(50, 0x66)), false, 'a sector written in part that is not valid');
  assert.equal(cache.writeNow(volume, 2 * LINE_SIZE + 100, Buffer.alloc(50, 0x66)), true, 'a valid sector written in part');
  const partial = Buffer.alloc(SECTOR);
  await cache.read(volume, 2 * LINE_SIZE, partial);
  assert.ok(partial.subarray(0, 100).every((b) => b === 0x55) && partial.subarray(100, 150).every((b) => b === 0x66) && partial.subarray(150).every((b) => b === 0x55));
  // A line whose lock is held (a write under way takes it at once): declined.
  const pending = cache.write(volume, 0, Buffer.alloc(SECTOR, 0x77), false);
  assert.equal(cache.writeNow(volume, SECTOR, Buffer.alloc(SECTOR, 0x78)), false, 'a line whose lock is held');
  await pending;
  // A line demoted to flash: declined (a write promotes it, in write()).
  for (let i = 3; i < 9; i++) await cache.write(volume, i * LINE_SIZE, Buffer.alloc(LINE_SIZE, i + 1), false);
  const flashLine = cache.residents().find((r) => r.medium === 'flash');
  assert.ok(flashLine !== undefined, 'a line was demoted');
  assert.equal(cache.writeNow(volume, flashLine.index * LINE_SIZE, Buffer.alloc(SECTOR, 0x79)), false);
  // What writeNow stored was dirty: the flush put it in the data store, evicted or not.
  const dramLine = cache.residents().find((r) => r.medium === 'dram');
  assert.ok(dramLine !== undefined);
  assert.equal(cache.writeNow(volume, dramLine.index * LINE_SIZE + SECTOR, Buffer.alloc(SECTOR, 0x7a)), true);
  await cache.flush(volume);
  const onDisk = Buffer.alloc(SECTOR);
  await store.read(dramLine.index * LINE_SIZE + SECTOR, onDisk);
  assert.ok(onDisk.every((b) => b === 0x7a), 'a write stored by writeNow reached the store at the flush');
  await store.read(LINE_SIZE - SECTOR, onDisk);
  assert.ok(onDisk.every((b) => b === 0x33), 'the write across lines, evicted since, reached the store');
  assert.equal(cache.stats().writesNow, 3, 'the writes stored at once are counted');
});

test('writeNow of whole sectors a line does not hold yet makes them valid, so a read returns them and a flush stores them; it declines for a fenced volume', async (t) => {
  const plan = new FaultPlan();
  const { cache, volume, store } = await setup(t, { dramLines: 8, flashLines: 0, volumeSize: 16 * LINE_SIZE, plan, destageIntervalMs: 0 });
  // Line 0 holds sector 0 only; sector 5, written whole by writeNow, must not be staged
  // from the store afterwards.
  await cache.write(volume, 0, Buffer.alloc(SECTOR, 1), false);
  assert.equal(cache.writeNow(volume, 5 * SECTOR, Buffer.alloc(SECTOR, 0x5a)), true);
  const got = Buffer.alloc(SECTOR);
  await cache.read(volume, 5 * SECTOR, got);
  assert.ok(got.every((b) => b === 0x5a), `read back ${got[0]}`);
  await cache.flush(volume);
  const disk = Buffer.alloc(SECTOR);
  await store.read(5 * SECTOR, disk);
  assert.ok(disk.every((b) => b === 0x5a), `the store holds ${disk[0]}`);
  // A fenced volume (a sync failed): declined, and write() answers why.
  await cache.write(volume, 0, Buffer.alloc(LINE_SIZE, 3), false);
  plan.fail({ op: 'store.datasync', fault: 'EIO' });
  await assert.rejects(cache.flush(volume));
  assert.ok(volume.failure !== undefined, 'the volume is fenced');
  assert.equal(cache.writeNow(volume, 0, Buffer.alloc(SECTOR, 4)), false);
  await assert.rejects(cache.write(volume, 0, Buffer.alloc(SECTOR, 4), false), { code: 'MS_VOLUME_FENCED' });
});

test('writeNow among writes, evictions, demotions, promotions and destages at any interleaving: each sector ends with a write no later write superseded, and the store gets it', async (t) => {
  // 4 DRAM lines, 4 flash lines, a volume of 12 lines. Writes through write() and through
  // writeNow run together, started by the scheduler; both media land their asynchronous
  // writes only when the scheduler lets them (writeNow's synchronous write lands at once).
  // A write W to a sector is superseded when another write to it started after W
  // completed (writeNow starts and completes at once). Each sector must end holding the
  // value of a write that was not superseded, whole; after a flush the data store holds
  // what the cache does, so every write writeNow stored was marked dirty.
  const lines = 12;
  const { cache, volume, store, media } = await setup(t, { dramLines: 4, flashLines: 4, volumeSize: lines * LINE_SIZE });
  const gated = media.filter((m): m is TestMedium => m instanceof TestMedium);
  let stored = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.record({ line: fc.nat({ max: lines - 1 }), sector: fc.nat({ max: 15 }), sectors: fc.integer({ min: 1, max: 20 }), value: fc.integer({ min: 1, max: 255 }), now: fc.boolean(), destage: fc.boolean() }), { minLength: 1, maxLength: 16 }),
      fc.scheduler(),
      async (writes, s) => {
        const before = Buffer.alloc(lines * LINE_SIZE);
        await cache.read(volume, 0, before);
        for (const m of gated) m.scheduler = s;
        let clock = 0;
        const history: { value: number; start: number; end: number }[][] = Array.from({ length: lines * 16 }, () => []);
        const work = writes.map(async (w) => {
          const first = Math.min(w.line * 16 + w.sector, lines * 16 - w.sectors);
          await s.schedule(Promise.resolve(), w.now ? 'writeNow' : 'write');
          const data = Buffer.alloc(w.sectors * SECTOR, w.value);
          const start = ++clock;
          if (w.now && cache.writeNow(volume, first * SECTOR, data)) {
            stored++;
          } else {
            await cache.write(volume, first * SECTOR, data, false);
          }
          const end = ++clock;
          for (let k = 0; k < w.sectors; k++) history[first + k]?.push({ value: w.value, start, end });
          if (w.destage) await cache.destage(Date.now() + 60_000);
        });
        try {
          await s.waitFor(Promise.all(work));
        } finally {
          for (const m of gated) m.scheduler = undefined;
          await s.waitIdle();
        }
        const after = Buffer.alloc(lines * LINE_SIZE);
        await cache.read(volume, 0, after);
        for (let sector = 0; sector < lines * 16; sector++) {
          const bytes = after.subarray(sector * SECTOR, (sector + 1) * SECTOR);
          const v = bytes[0] ?? -1;
          assert.ok(bytes.every((b) => b === v), `sector ${sector} torn`);
          const h = history[sector] ?? [];
          const allowed = h.length === 0 ? [before[sector * SECTOR]] : h.filter((w) => !h.some((o) => o.start > w.end)).map((w) => w.value);
          assert.ok(allowed.includes(v), `sector ${sector} holds ${v}; the writes not superseded were ${allowed.join(',')}`);
        }
        await cache.flush(volume);
        const onDisk = Buffer.alloc(lines * LINE_SIZE);
        await store.read(0, onDisk);
        assert.ok(onDisk.equals(after), 'the data store after a flush differs from what the cache holds');
      },
    ),
    { numRuns: 150 },
  );
  assert.ok(stored > 0, 'writeNow never stored a write');
});

test('readViews lends the DRAM level\'s bytes of the lines a range covers whole and copies its ends; a lent slot is not reused until released, and a reclaimed extent leaves the loan its old bytes', async (t) => {
  const { cache, volume, partition } = await setup(t, { dramLines: 16, flashLines: 0, volumeSize: 64 * LINE_SIZE });
  const lineBytes = (i: number): Buffer => Buffer.alloc(LINE_SIZE, (i % 250) + 1);
  for (let i = 0; i < 8; i++) await cache.write(volume, i * LINE_SIZE, lineBytes(i), false);
  // Whole lines lent, the parts of lines at the ends copied: one buffer per line, in order.
  const edges = cache.readViews(volume, LINE_SIZE - SECTOR, LINE_SIZE + 2 * SECTOR);
  assert.ok(edges !== undefined);
  assert.deepEqual(edges.buffers.map((b) => [b.length, b[0]]), [[SECTOR, 1], [LINE_SIZE, 2], [SECTOR, 3]]);
  assert.equal(cache.stats().pinnedSlots, 1, 'only the whole line is lent');
  edges.release();
  // No line covered whole, or a line missing: declined.
  assert.equal(cache.readViews(volume, LINE_SIZE - SECTOR, 2 * SECTOR), undefined);
  assert.equal(cache.readViews(volume, 20 * LINE_SIZE, LINE_SIZE), undefined);
  // Two lines lent, and a second loan of the first: its slot is pinned twice.
  const loan = cache.readViews(volume, 0, 2 * LINE_SIZE);
  const other = cache.readViews(volume, 0, LINE_SIZE);
  assert.ok(loan !== undefined && other !== undefined);
  assert.deepEqual(loan.buffers.map((b) => [b.length, b[0]]), [[LINE_SIZE, 1], [LINE_SIZE, 2]]);
  assert.equal(cache.stats().pinnedSlots, 2);
  // Other lines take the cache over: the lent lines are evicted, their slots stay out of use.
  other.release();
  other.release(); // once is enough: more never end the other loan's pin of the same slot
  for (let i = 8; i < 40; i++) await cache.write(volume, i * LINE_SIZE, lineBytes(i), false);
  assert.ok(!cache.residents().some((r) => r.index === 0 || r.index === 1), 'the lent lines were evicted');
  assert.deepEqual(loan.buffers.map((b) => [b[0], b.every((x) => x === b[0])]), [[1, true], [2, true]]);
  assert.equal(cache.residents().filter((r) => r.medium === 'dram').length, cache.stats().slots.dram - 2, 'two slots are parked');
  loan.release();
  assert.equal(cache.stats().pinnedSlots, 0);
  // Released: the slots serve lines again (every slot home to a line after more writes).
  for (let i = 40; i < 56; i++) await cache.write(volume, i * LINE_SIZE, lineBytes(i), false);
  assert.equal(cache.residents().filter((r) => r.medium === 'dram').length, cache.stats().slots.dram);
  // A loan across a reclaim of every extent and a grow back: the extents' memory is new,
  // the loan keeps what it showed.
  const held = cache.readViews(volume, 55 * LINE_SIZE, LINE_SIZE);
  assert.ok(held !== undefined);
  await partition.resize('dram', 'cache', 0);
  assert.equal(cache.stats().slots.dram, 0);
  await partition.resize('dram', 'cache', 2 * E);
  for (let i = 0; i < 8; i++) await cache.write(volume, i * LINE_SIZE, lineBytes(100 + i), false);
  assert.ok(held.buffers.every((b) => b.every((x) => x === 56)), 'a lent view shows bytes written after its extent was handed back');
  held.release();
  assert.equal(cache.stats().pinnedSlots, 0);
  assert.ok(cache.stats().viewReads >= 4);
});

test('readViews lends no more than a quarter of the DRAM level\'s slots; past that a read is declined (and copied by the caller)', async (t) => {
  const { cache, volume } = await setup(t, { dramLines: 16, flashLines: 0, volumeSize: 32 * LINE_SIZE });
  assert.equal(cache.stats().slots.dram, 16);
  for (let i = 0; i < 8; i++) await cache.write(volume, i * LINE_SIZE, Buffer.alloc(LINE_SIZE, i + 1), false);
  const loans = [0, 1, 2].map((i) => cache.readViews(volume, i * LINE_SIZE, LINE_SIZE));
  assert.ok(loans.every((l) => l !== undefined));
  // Three of sixteen lent: a read of two more lines would make five, over the quarter.
  assert.equal(cache.readViews(volume, 3 * LINE_SIZE, 2 * LINE_SIZE), undefined);
  const fourth = cache.readViews(volume, 3 * LINE_SIZE, LINE_SIZE);
  assert.ok(fourth !== undefined);
  assert.equal(cache.stats().pinnedSlots, 4);
  assert.equal(cache.readViews(volume, 4 * LINE_SIZE, LINE_SIZE), undefined, 'a fifth slot lent');
  const got = Buffer.alloc(LINE_SIZE);
  assert.equal(cache.readNow(volume, 4 * LINE_SIZE, got), true, 'the copy path still answers');
  fourth.release();
  assert.ok(cache.readViews(volume, 4 * LINE_SIZE, LINE_SIZE) !== undefined);
});

test('readNow reads lines in a real flash level while its synchronous reads are fast, and declines them while they are slow', async (t) => {
  // A clock the test moves: each synchronous flash read takes `cost` ms of it.
  let now = 0;
  let cost = 0.002;
  let reading = false;
  const clock = (): number => {
    if (reading) now += cost;
    reading = !reading;
    return now;
  };
  const lines = 12;
  let flashMedium: FlashMedium | undefined;
  const { cache, volume } = await setup(t, {
    dramLines: 4,
    flashLines: 8,
    volumeSize: lines * LINE_SIZE,
    flash: (capacity, dir) => (flashMedium = new FlashMedium({ path: join(dir, 'flash.img'), capacity, extentSize: E, clock })),
  });
  const content = (i: number): Buffer => Buffer.alloc(2 * SECTOR, i + 1);
  for (let i = 0; i < lines; i++) await cache.write(volume, i * LINE_SIZE, content(i), false);
  await cache.flush(volume);
  for (let i = 0; i < lines; i++) await cache.read(volume, i * LINE_SIZE, Buffer.alloc(2 * SECTOR));
  const inFlash = cache.residents().filter((r) => r.medium === 'flash').map((r) => r.index);
  const inDram = cache.residents().filter((r) => r.medium === 'dram').map((r) => r.index);
  assert.ok(inFlash.length >= 4 && inDram.length > 0, JSON.stringify(cache.residents()));
  const readNow = (i: number): boolean => {
    const got = Buffer.alloc(2 * SECTOR);
    const made = flashMedium?.syncReads.made ?? 0;
    const answered = cache.readNow(volume, i * LINE_SIZE, got);
    // A declined read reads the clock once, a read made twice.
    if (flashMedium !== undefined && flashMedium.syncReads.made === made) reading = false;
    if (answered) assert.ok(got.equals(content(i)), `line ${i} by readNow`);
    return answered;
  };
  const before = cache.stats();
  for (const i of inFlash) assert.equal(readNow(i), true, `flash line ${i} while reads are fast`);
  let stats = cache.stats();
  assert.equal(stats.flashReadsNow - before.flashReadsNow, inFlash.length);
  assert.equal(stats.flashHits - before.flashHits, inFlash.length);
  // The flash file's reads turn slow (5 ms, a device): after a few, its lines are
  // declined; DRAM's are not.
  cost = 5;
  let slowReads = 0;
  while (readNow(inFlash[slowReads % inFlash.length]!) && slowReads < 20) slowReads++;
  assert.ok(slowReads < 20, 'slow synchronous reads were never declined');
  for (const i of inFlash) assert.equal(readNow(i), false, `flash line ${i} while reads are slow`);
  for (const i of inDram) assert.equal(readNow(i), true, `DRAM line ${i}`);
  // The ordinary path still serves the flash lines, from flash, through the thread pool.
  stats = cache.stats();
  for (const i of inFlash) {
    const got = Buffer.alloc(2 * SECTOR);
    await cache.read(volume, i * LINE_SIZE, got);
    assert.ok(got.equals(content(i)), `line ${i} by read`);
  }
  const after = cache.stats();
  assert.equal(after.flashHits - stats.flashHits, inFlash.length);
  assert.equal(after.flashReadsNow, stats.flashReadsNow);
});

test("readNow never returns a flash line's sectors that are not valid: they hold what another volume left in the slot", async (t) => {
  // Review finding (issue 13): a demotion copies the whole DRAM slot, so a flash line's
  // invalid sectors hold the bytes of the slot's earlier line; only the valid bits keep
  // readNow from serving them.
  const { cache, media } = await setup(t, {
    dramLines: 4,
    flashLines: 8,
    volumeSize: LINE_SIZE,
    flash: (capacity, dir) => new FlashMedium({ path: join(dir, 'flash.img'), capacity, extentSize: E }),
  });
  const flash = media.find((m) => m.name === 'flash') as FlashMedium;
  // Tenant B fills every DRAM slot with 0xbb, written back (clean).
  const b = new Volume('tenant-b', false, new Date().toISOString(), new MemoryStore(4 * LINE_SIZE));
  await cache.write(b, 0, Buffer.alloc(4 * LINE_SIZE, 0xbb), false);
  await cache.flush(b);
  // Tenant A reads one sector of each of 8 lines: each takes a slot B's bytes fill,
  // stages sector 0 only, and the earlier ones are demoted to flash.
  const aStore = new MemoryStore(8 * LINE_SIZE);
  await aStore.write(0, Buffer.alloc(8 * LINE_SIZE, 0xaa));
  const a = new Volume('tenant-a', false, new Date().toISOString(), aStore);
  for (let i = 0; i < 8; i++) await cache.read(a, i * LINE_SIZE, Buffer.alloc(SECTOR));
  const inFlash = cache.residents().filter((r) => r.volume === 'tenant-a' && r.medium === 'flash');
  assert.ok(inFlash.length > 0, JSON.stringify(cache.residents()));
  let foreign = 0;
  for (const r of inFlash) {
    const head = Buffer.alloc(SECTOR);
    assert.equal(cache.readNow(a, r.index * LINE_SIZE, head), true, `the valid sector of flash line ${r.index}`);
    assert.ok(head.every((x) => x === 0xaa));
    // Sector 5 of the slot holds B's bytes (the test's premise), and readNow declines it.
    const slot = Buffer.alloc(SECTOR);
    flash.readSync(r.slot + 5 * SECTOR, slot);
    if (slot[0] === 0xbb) foreign++;
    const got = Buffer.alloc(SECTOR);
    assert.equal(cache.readNow(a, r.index * LINE_SIZE + 5 * SECTOR, got), false, `readNow served sector 5 of flash line ${r.index}, which is not valid`);
  }
  assert.ok(foreign > 0, 'no flash slot held the other volume\'s bytes: the test shows nothing');
  // The ordinary path stages those sectors from A's store.
  for (const r of inFlash) {
    const got = Buffer.alloc(SECTOR);
    await cache.read(a, r.index * LINE_SIZE + 5 * SECTOR, got);
    assert.ok(got.every((x) => x === 0xaa));
  }
});

test('concurrent writes and reads of disjoint ranges all land', async (t) => {
  const size = 4 * 1024 * 1024;
  const { cache, volume } = await setup(t, { dramLines: 8, flashLines: 0, volumeSize: size });
  const blocks = Array.from({ length: 64 }, (_, i) => Buffer.alloc(4096 * 3, i + 1));
  await Promise.all(blocks.map((b, i) => cache.write(volume, i * 65536 + 1000, b, false)));
  const back = await Promise.all(blocks.map(async (_, i) => {
    const got = Buffer.alloc(4096 * 3);
    await cache.read(volume, i * 65536 + 1000, got);
    return got;
  }));
  back.forEach((got, i) => assert.ok(got.equals(blocks[i]!), `block ${i}`));
});

test('lines demoted from DRAM are served from flash, with many misses racing for DRAM slots', async (t) => {
  // 16 DRAM lines, 64 flash lines, a volume of 64 lines: everything fits in DRAM plus
  // flash. Requests run 16 at a time, so takers of DRAM slots race for the same victims
  // (a second taker used to drop the line the first had just demoted, and the flash
  // level stayed all but empty).
  const lines = 64;
  const { cache, volume, store } = await setup(t, { dramLines: 16, flashLines: 64, volumeSize: lines * LINE_SIZE });
  const content = (i: number): Buffer => Buffer.alloc(LINE_SIZE, (i * 7 + 1) & 0xff);
  const inBatches = async (fn: (i: number) => Promise<void>): Promise<void> => {
    for (let first = 0; first < lines; first += 16) await Promise.all(Array.from({ length: 16 }, (_, k) => fn(first + k)));
  };
  await inBatches((i) => cache.write(volume, i * LINE_SIZE, content(i), false));
  await cache.flush(volume);
  assert.equal(cache.stats().lines.dram + cache.stats().lines.flash, lines, JSON.stringify(cache.stats()));
  // The store is not read again: every line is in DRAM or flash, and reads are hits.
  let storeReads = 0;
  const read = store.read.bind(store);
  store.read = (offset, target) => {
    storeReads++;
    return read(offset, target);
  };
  const before = cache.stats();
  for (let pass = 0; pass < 2; pass++) {
    await inBatches(async (i) => {
      const got = Buffer.alloc(LINE_SIZE);
      await cache.read(volume, i * LINE_SIZE, got);
      assert.ok(got.equals(content(i)), `line ${i}, pass ${pass}`);
    });
  }
  const after = cache.stats();
  assert.equal(storeReads, 0);
  assert.equal(after.misses - before.misses, 0, JSON.stringify(after));
  // Lines in flash are read where they lie (two passes over the 48 lines DRAM cannot hold).
  assert.ok(after.flashHits - before.flashHits >= 2 * (lines - 16), JSON.stringify(after));
  assert.equal(after.lines.dram + after.lines.flash, lines, JSON.stringify(after));
  // A write to a line in flash brings it back to DRAM, and reads see the new bytes.
  const inFlash = cache.residents().filter((r) => r.medium === 'flash').map((r) => r.index);
  assert.ok(inFlash.length > 0);
  const updated = Buffer.alloc(4096, 0xee);
  await Promise.all(inFlash.map((i) => cache.write(volume, i * LINE_SIZE + 8192, updated, false)));
  await inBatches(async (i) => {
    const got = Buffer.alloc(LINE_SIZE);
    await cache.read(volume, i * LINE_SIZE, got);
    const want = content(i);
    if (inFlash.includes(i)) updated.copy(want, 8192);
    assert.ok(got.equals(want), `line ${i} after the writes`);
  });
  assert.ok(cache.stats().promotions > after.promotions, JSON.stringify(cache.stats()));
});

test('the DRAM level keeps a few slots free by evicting in the background, and loses nothing doing so', async (t) => {
  // 512 DRAM lines, 256 flash lines, a volume of 1024 lines written once with 8 requests
  // in flight: misses race the background eviction for the same victims.
  const lines = 1024;
  const { cache, volume } = await setup(t, { dramLines: 512, flashLines: 256, volumeSize: lines * LINE_SIZE });
  const content = (i: number): Buffer => Buffer.alloc(8192, (i * 13 + 5) & 0xff);
  for (let first = 0; first < lines; first += 8) {
    await Promise.all(Array.from({ length: 8 }, (_, k) => cache.write(volume, (first + k) * LINE_SIZE + 4096, content(first + k), false)));
  }
  // The refill runs after the request that started it: wait for it to leave slots free.
  const deadline = Date.now() + 10_000;
  while (cache.stats().lines.dram >= cache.stats().slots.dram && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
  const stats = cache.stats();
  assert.ok(stats.lines.dram < stats.slots.dram, `no DRAM slot was freed ahead of misses: ${JSON.stringify(stats)}`);
  for (let i = 0; i < lines; i++) {
    const got = Buffer.alloc(LINE_SIZE);
    await cache.read(volume, i * LINE_SIZE, got);
    const want = Buffer.alloc(LINE_SIZE);
    content(i).copy(want, 4096);
    assert.ok(got.equals(want), `line ${i}`);
  }
});

/** A cache of one 4-line DRAM extent, in real DRAM, that destages only when asked. */
async function fourLineCache(t: { after(fn: () => Promise<void>): void }): Promise<StorageCache> {
  const extent = 4 * LINE_SIZE;
  const dram = new DramMedium({ capacity: 2 * extent, extentSize: extent });
  await dram.open();
  const partition = new PartitionTable([{ name: 'dram', capacity: 2 * extent, extentSize: extent, initial: { cache: extent, server: 0, nvram: 0 }, bounds: { cache: { min: 0, max: 2 * extent }, server: { min: 0, max: 2 * extent }, nvram: { min: 0, max: 0 } } }]);
  const cache = new StorageCache({ partition, media: [dram], log, maxDirtyAgeMs: 60_000, destageIntervalMs: 0 });
  cache.start();
  t.after(() => cache.stop());
  return cache;
}

test('a READ admitted across a shrink never leaves another volume\'s bytes valid past the end: after a grow they read as zeros, by both read paths', async (t) => {
  // Review finding (issue 13): stage() clipped its store read at the end of the volume but
  // marked every sector it was asked for valid, so the slot's previous bytes stayed.
  const plan = new FaultPlan();
  const other = new Volume('tenant-w', false, new Date().toISOString(), new MemoryStore(4 * LINE_SIZE, plan));
  const vStore = new MemoryStore(2 * LINE_SIZE, plan);
  const v = new Volume('tenant-v', false, new Date().toISOString(), vStore);
  const cache = await fourLineCache(t);
  // Another tenant fills every DRAM slot (4 lines), dirty.
  await cache.write(other, 0, Buffer.alloc(4 * LINE_SIZE, 0xaa), false);
  // Its write-back is slow: a READ of v's line 1 (valid while v is 2 lines) waits for a slot.
  const held: (() => void)[] = [];
  plan.gate = (op) => (op === 'mem.write' ? new Promise<void>((r) => held.push(r)) : undefined);
  const reading = cache.read(v, LINE_SIZE, Buffer.alloc(LINE_SIZE));
  while (held.length === 0) await new Promise((r) => setImmediate(r));
  // Meanwhile v shrinks to one line and 4 KiB (VolumeManager.resize: the store, then forget).
  await vStore.resize(LINE_SIZE + 4096);
  await cache.forget(v, LINE_SIZE + 4096);
  plan.gate = undefined;
  for (const go of held.splice(0)) go();
  const got = Buffer.alloc(LINE_SIZE);
  await reading.catch(() => undefined);
  // ... and grows again: the bytes past the old end read as zeros.
  await vStore.resize(2 * LINE_SIZE);
  const fast = Buffer.alloc(4096);
  const served = cache.readNow(v, LINE_SIZE + 4096, fast);
  await cache.read(v, LINE_SIZE, got);
  assert.ok(got.subarray(4096).every((b) => b === 0), `the ordinary read returns 0x${(got[4096] ?? 0).toString(16)}, another volume's bytes`);
  if (served) assert.ok(fast.every((b) => b === 0), `readNow returns 0x${(fast[0] ?? 0).toString(16)}, another volume's bytes`);
});

test('a sequential stream on a full DRAM level goes to the data store instead of churning the cache, and every byte reads back right', async (t) => {
  const lines = 64;
  const { cache, volume, store } = await setup(t, { dramLines: 16, flashLines: 16, volumeSize: lines * LINE_SIZE, streamMinBytes: 4 * LINE_SIZE });
  const model = Buffer.alloc(lines * LINE_SIZE);
  // Earlier writes leave lines in DRAM (dirty) and in flash (clean, demoted).
  for (let i = 0; i < 40; i += 2) {
    const data = Buffer.alloc(8192, 0x10 + i);
    await cache.write(volume, i * LINE_SIZE + 4096, data, false);
    data.copy(model, i * LINE_SIZE + 4096);
  }
  await cache.flush(volume);
  const before = cache.stats();
  // The stream: 64 KiB writes one after another over the whole volume, 4 in flight.
  for (let i = 0; i < lines; i += 4) {
    await Promise.all([0, 1, 2, 3].map(async (k) => {
      const data = Buffer.alloc(LINE_SIZE, (i + k) & 0xff);
      await cache.write(volume, (i + k) * LINE_SIZE, data, false);
      data.copy(model, (i + k) * LINE_SIZE);
    }));
  }
  const after = cache.stats();
  // Most of the stream went to the store: far fewer evictions than lines written.
  assert.ok(after.evictions - before.evictions < lines / 2, `the stream churned the cache: ${after.evictions - before.evictions} evictions for ${lines} lines`);
  const got = Buffer.alloc(lines * LINE_SIZE);
  await cache.read(volume, 0, got);
  assert.ok(got.equals(model), 'the volume reads back what was written, through the cache');
  await cache.flush(volume);
  const onDisk = Buffer.alloc(lines * LINE_SIZE);
  await store.read(0, onDisk);
  assert.ok(onDisk.equals(model), 'after FLUSH the store holds what was written');
});

/** A store in memory that keeps what a crash would leave: its bytes as of the last sync. */
class DurableStore extends MemoryStore {
  durable: Buffer;
  constructor(size: number, plan: FaultPlan) {
    super(size, plan);
    this.durable = Buffer.alloc(size);
  }

  override async sync(): Promise<void> {
    const snapshot = Buffer.alloc(this.size);
    await this.read(0, snapshot);
    await super.sync();
    this.durable = snapshot;
  }
}

test('a FLUSH while an overlapping zeroing runs never syncs a store older than a write it covers', async (t) => {
  // Review finding (issue 13): zero() dropped the cached (dirty) sectors before its store
  // zeroing landed; a FLUSH in between synced a store holding neither the write nor zeros.
  const plan = new FaultPlan();
  const store = new DurableStore(8 * LINE_SIZE, plan);
  const volume = new Volume('v', false, new Date().toISOString(), store);
  const cache = await fourLineCache(t);
  await cache.write(volume, 0, Buffer.alloc(LINE_SIZE, 0x55), false);
  await cache.flush(volume);
  await cache.write(volume, 0, Buffer.alloc(LINE_SIZE, 0xaa), false); // completed, dirty in DRAM
  const held: (() => void)[] = [];
  plan.gate = (op) => (op === 'mem.zero' ? new Promise<void>((r) => held.push(r)) : undefined);
  const zeroing = cache.zero(volume, 0, LINE_SIZE, { fua: false, allocate: false });
  while (held.length === 0) await new Promise((r) => setImmediate(r));
  let durable: number | undefined;
  const flushed = cache.flush(volume).then(() => {
    durable = store.durable[0];
  });
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
  plan.gate = undefined;
  for (const go of held.splice(0)) go();
  await flushed;
  await zeroing;
  assert.ok(durable === 0xaa || durable === 0, `the FLUSH returned with 0x${(durable ?? 0).toString(16)} durable: older than the write it covers`);
});

/** Touches the hot lines in rounds, with the accesses of `between` other lines in between, so 2Q sees reuse. */
async function warm(cache: StorageCache, volume: Volume, hot: readonly number[], rounds: number): Promise<void> {
  const buf = Buffer.alloc(4096);
  for (let round = 0; round < rounds; round++) for (const offset of hot) await cache.read(volume, offset, buf);
}

test('scan resistance: a one-pass sequential read does not evict the hot set', async (t) => {
  const size = 16 * 1024 * 1024;
  const { cache, volume } = await setup(t, { dramLines: 16, flashLines: 0, volumeSize: size, correlationWindow: 4 });
  const hot = [0, 1, 2, 3, 4, 5].map((i) => i * LINE_SIZE);
  const buf = Buffer.alloc(4096);
  // Touch the hot lines in rounds longer than the correlation window so 2Q promotes them to Am.
  await warm(cache, volume, hot, 3);
  const before = cache.stats();
  for (let offset = 64 * LINE_SIZE; offset < size; offset += LINE_SIZE) await cache.read(volume, offset, buf);
  const afterScan = cache.stats();
  for (const offset of hot) await cache.read(volume, offset, buf);
  const after = cache.stats();
  assert.ok(afterScan.misses - before.misses >= 190, 'the scan missed');
  assert.equal(after.misses, afterScan.misses, 'every hot line is still cached after the scan');
});

test('scan resistance holds for requests smaller than a line: a sequential 4 KiB scan counts each line once', async (t) => {
  // Issue 10 item 8: the second 4 KiB access to the same 64 KiB line used to promote it,
  // so a sequential 4 KiB scan pushed the hot set out of Am.
  const size = 16 * 1024 * 1024;
  const { cache, volume } = await setup(t, { dramLines: 16, flashLines: 0, volumeSize: size, correlationWindow: 32 });
  const hot = [0, 1, 2, 3, 4, 5].map((i) => i * LINE_SIZE);
  const buf = Buffer.alloc(4096);
  // Rounds of the hot set with 40 other accesses between the touches of each hot line.
  for (let round = 0; round < 3; round++) {
    for (const offset of hot) await cache.read(volume, offset, buf);
    for (let k = 0; k < 40; k++) await cache.read(volume, 8 * LINE_SIZE + (k % 4) * SECTOR, buf);
  }
  const before = cache.stats();
  for (let offset = 64 * LINE_SIZE; offset < size; offset += SECTOR) await cache.read(volume, offset, buf);
  const afterScan = cache.stats();
  for (const offset of hot) await cache.read(volume, offset, buf);
  const after = cache.stats();
  assert.ok(afterScan.misses - before.misses >= 190, 'the scan missed');
  assert.equal(after.misses, afterScan.misses, 'every hot line is still cached after a 4 KiB scan');
});

test('shrinking the cache partition under load destages and keeps every byte', async (t) => {
  const size = 8 * 1024 * 1024;
  const { cache, volume, partition } = await setup(t, { dramLines: 32, flashLines: 0, volumeSize: size });
  const model = Buffer.alloc(size);
  let stop = false;
  const writer = (async () => {
    let i = 0;
    while (!stop) {
      const offset = ((i * 7919) % 120) * 65536 + (i % 3) * 512;
      const data = Buffer.alloc(8192, (i % 250) + 1);
      await cache.write(volume, offset, data, false);
      data.copy(model, offset);
      i++;
    }
  })();
  await new Promise((resolve) => setTimeout(resolve, 50));
  const result = await partition.resize('dram', 'cache', 2 * E); // 32 lines -> 8
  assert.ok(result.reclaimedBytes > 0, 'the cache was asked and gave extents back');
  await new Promise((resolve) => setTimeout(resolve, 50));
  stop = true;
  await writer;
  assert.equal(cache.stats().slots.dram, 8);
  const whole = Buffer.alloc(size);
  await cache.read(volume, 0, whole);
  assert.ok(whole.equals(model));
  await partition.resize('dram', 'cache', 8 * E);
  await cache.read(volume, 0, whole); // grows back into the new extents
  assert.ok(whole.equals(model));
});

test('shrinking a volume to a size inside a line keeps the acknowledged, unflushed writes below the new end', async (t) => {
  // Issue 10 item 4: forget() dropped the whole 64 KiB line that straddles the new end.
  const { cache, volume, store } = await setup(t, { dramLines: 4, flashLines: 0, volumeSize: 2 * LINE_SIZE });
  const data = Buffer.alloc(LINE_SIZE);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
  await cache.write(volume, 0, data, false);
  const end = 9 * SECTOR; // not a multiple of 64 KiB
  await cache.forget(volume, end);
  await store.resize(end);
  await cache.flush(volume);
  const onDisk = Buffer.alloc(end);
  await store.read(0, onDisk);
  assert.ok(onDisk.equals(data.subarray(0, end)), 'the sectors below the new end reached the store');
  const back = Buffer.alloc(end);
  await cache.read(volume, 0, back);
  assert.ok(back.equals(data.subarray(0, end)));
});

test('a request reports a failed piece only after every other piece has stopped using its buffer', async (t) => {
  // Issue 10 item 6: Promise.all rejected at the first failed piece while a sibling still
  // copied into the (pooled) buffer, which the NBD service then reused.
  const plan = new FaultPlan();
  const { cache, volume, store } = await setup(t, { dramLines: 8, flashLines: 0, volumeSize: 4 * LINE_SIZE, plan });
  await store.write(0, Buffer.alloc(4 * LINE_SIZE, 1)); // data chunks: staging reads the file
  let release: () => void = () => undefined;
  const held = new Promise<void>((resolve) => (release = resolve));
  plan.fail({ op: 'store.read', from: 1, fault: 'EIO' });
  plan.gate = (op) => (op === 'store.read' && plan.count('store.read') >= 1 ? held : undefined);
  let settled = false;
  const target = Buffer.alloc(2 * LINE_SIZE);
  const read = cache.read(volume, 0, target).finally(() => (settled = true));
  for (let i = 0; i < 50; i++) await new Promise((resolve) => setImmediate(resolve));
  assert.equal(settled, false, 'the read waits for its held piece although the other one failed');
  release();
  await assert.rejects(read, (error: { code?: string }) => error.code === 'EIO');
});

test('block status through the cache: dirty lines read as data, the rest as the store says, for any range', async (t) => {
  const size = 64 * LINE_SIZE;
  const { cache, volume, store } = await setup(t, { dramLines: 16, flashLines: 0, volumeSize: size });
  await fc.assert(
    fc.asyncProperty(
      fc.uniqueArray(fc.nat({ max: 63 }), { maxLength: 10 }),
      fc.uniqueArray(fc.nat({ max: 63 }), { maxLength: 20 }),
      fc.nat({ max: size - 1 }),
      fc.integer({ min: 1, max: size }),
      async (dirtyLines, dataChunks, offset, want) => {
        await cache.flush(volume);
        await cache.zero(volume, 0, size, { fua: true, allocate: false });
        for (const c of dataChunks) await store.write(c * LINE_SIZE, Buffer.alloc(512, 1));
        for (const l of dirtyLines) await cache.write(volume, l * LINE_SIZE + 4096, Buffer.alloc(512, 2), false);
        const length = Math.min(want, size - offset);
        const got = cache.blockStatus(volume, offset, length);
        // The reference: one extent per line piece, merged.
        const expect: { length: number; flags: number }[] = [];
        for (let at = offset; at < offset + length; ) {
          const line = Math.floor(at / LINE_SIZE);
          const n = Math.min((line + 1) * LINE_SIZE, offset + length) - at;
          const flags = dirtyLines.includes(line) || dataChunks.includes(line) ? 0 : 3;
          const last = expect[expect.length - 1];
          if (last !== undefined && last.flags === flags) last.length += n;
          else expect.push({ length: n, flags });
          at += n;
        }
        assert.deepEqual(got, expect);
      },
    ),
    { numRuns: 60 },
  );
});

test('zeroing a large range gives the event loop turns and never holds a lock per line at once', async (t) => {
  // Review finding: a whole-volume TRIM started one lock and closure per 64 KiB line at
  // once and resolved in microtasks only, freezing every other client of the node.
  const { cache, volume } = await setup(t, { dramLines: 4, flashLines: 0, volumeSize: 64 * 1024 * 1024 });
  let turns = 0;
  let done = false;
  const spin = (): void => {
    if (done) return;
    turns++;
    setImmediate(spin);
  };
  setImmediate(spin);
  const locks = (cache as unknown as { locks: { size: number } }).locks;
  let most = 0;
  const watch = setInterval(() => (most = Math.max(most, locks.size)), 0);
  await cache.zero(volume, 0, 64 * 1024 * 1024, { fua: false, allocate: false });
  done = true;
  clearInterval(watch);
  assert.ok(turns > 4, `the event loop had ${turns} turns during the zeroing`);
  assert.ok(most <= 64, `${most} line locks held at once`);
});
