// Isolation between the storage cache and server memory (issue 10 item 1; the live
// partition of the Hitachi seed's claim 1), under interleavings chosen by fast-check's
// scheduler: every medium and data-file call waits for the scheduler, and so does the
// start of every operation.
//
// In each run, concurrently: cache writes of the volume's pattern to disjoint blocks,
// cache reads of blocks written before the run, flushes, destager runs, a volume shrink
// (to a size that is not a multiple of a line), resizes of the cache partition, and rmem
// binds (which grow the server partition by taking cache extents) whose servers write
// their own pattern, some of them freed again. After every scheduled step: every cached
// line lives in an extent the cache owns. After the run: the volume, flushed, equals the
// model, and every region holds exactly what its server wrote.
//
// The second test runs the same with DRAM media that keep their synchronous read and
// write (the paths that answer without a promise: StorageCache.readNow and writeNow,
// which its writes try first, ServerMemory.readNow) and
// after every scheduled step reads every block and every reachable region through them:
// the volume's own bytes (or zeros for blocks being written), a region's own server's
// bytes or zeros, never another tenant's or memory handed over. It also borrows lines'
// memory (StorageCache.readViews, what large NBD READs send from) and holds each loan
// over several steps, as a reply the socket has not yet sent does, while lines are
// evicted, demoted and reclaimed and servers write their regions: at every step every
// loan still shows only the volume's bytes (the same bytes, for blocks the run does not
// write), and once all are released no slot stays pinned.
//
// A failing run prints fast-check's seed and path; pass them to fc.assert to replay it.
// MEMSTRATA_SOAK=1 runs many more interleavings (npm run soak).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import pino from 'pino';
import type { MediumName } from '../../../../src/kinds.js';
import { AllocationTable } from '../../../../src/memory/allocation-table.js';
import { PartitionTable, type MediumLayout } from '../../../../src/memory/partition-table.js';
import { ServerMemory, Tenancy, type ServerRegion } from '../../../../src/memory/server-memory.js';
import { LINE_SIZE } from '../../../../src/storage/cache/line.js';
import { StorageCache } from '../../../../src/storage/cache/storage-cache.js';
import type { CacheViews } from '../../../../src/storage/volume-io.js';
import { Volume } from '../../../../src/storage/volume-manager.js';
import { FaultPlan, FaultyMedium } from '../../../support/faults.js';
import { MemoryStore } from '../../../support/memory-store.js';
import { GatedDram, NamedDram } from '../../../support/named-dram.js';

const log = pino({ level: 'silent' });
const E = 4 * LINE_SIZE; // four lines per extent
const BLOCK = 4096;
const VOLUME = 32 * LINE_SIZE;
const SOAK = process.env.MEMSTRATA_SOAK === '1';

function layout(name: MediumName, extents: number, cache: number, server: number): MediumLayout {
  const capacity = extents * E;
  return {
    name,
    capacity,
    extentSize: E,
    initial: { cache: cache * E, server: server * E, nvram: 0 },
    bounds: { cache: { min: 0, max: capacity }, server: { min: 0, max: capacity }, nvram: { min: 0, max: capacity } },
  };
}

/** Bytes of `who`'s pattern at absolute position `at`: tenants never share a byte value sequence. */
function pattern(who: number, at: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  const period = Math.min(length, 251 * 4); // the bytes repeat every 251 words
  for (let i = 0; i < period; i++) buf[i] = ((who * 131 + ((at + i) >> 2) * 7) % 251) + 1;
  for (let filled = period; filled < length; filled *= 2) buf.copyWithin(filled, 0, Math.min(filled, length - filled));
  return buf;
}

type Op =
  | { kind: 'write'; block: number; blocks: number; fua: boolean }
  | { kind: 'read'; block: number }
  | { kind: 'flush' }
  | { kind: 'destage' }
  | { kind: 'shrink'; sectors: number }
  | { kind: 'resize'; extents: number }
  | { kind: 'bind'; server: number; extents: number; free: boolean };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { arbitrary: fc.record({ kind: fc.constant('write' as const), block: fc.nat({ max: 63 }), blocks: fc.integer({ min: 1, max: 20 }), fua: fc.boolean() }), weight: 5 },
  { arbitrary: fc.record({ kind: fc.constant('read' as const), block: fc.integer({ min: 64, max: 127 }) }), weight: 3 },
  { arbitrary: fc.constant({ kind: 'flush' as const }), weight: 1 },
  { arbitrary: fc.constant({ kind: 'destage' as const }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant('shrink' as const), sectors: fc.integer({ min: 0, max: 100 }) }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant('resize' as const), extents: fc.integer({ min: 1, max: 8 }) }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant('bind' as const), server: fc.integer({ min: 1, max: 3 }), extents: fc.integer({ min: 1, max: 3 }), free: fc.boolean() }), weight: 3 },
);

/** Resizes the DRAM cache partition to `extents`; a resize the table cannot make now is no failure. */
async function resizeCache(partition: PartitionTable, extents: number): Promise<void> {
  try {
    await partition.resize('dram', 'cache', extents * E);
  } catch (error) {
    const code = (error as { code?: string }).code;
    if (code !== 'MS_PARTITION_BUSY' && code !== 'MS_PARTITION_NO_CAPACITY') throw error;
  }
}

/**
 * The concurrent runs described at the top. `syncReads`: gated DRAM media that keep
 * readSync, and the synchronous read paths probed after every step. Returns how often
 * those paths answered (so a test can tell they were exercised).
 */
async function isolationRuns(syncReads: boolean, numRuns: number): Promise<{ blocks: number; regions: number; views: number; writes: number }> {
  const answered = { blocks: 0, regions: 0, views: 0, writes: 0 };
  await fc.assert(
    fc.asyncProperty(fc.scheduler(), fc.array(opArb, { minLength: 2, maxLength: 12 }), async (s, ops) => {
      const plan = new FaultPlan();
      const layouts = [layout('dram', 12, 8, 2), layout('flash', 4, 4, 0)];
      const gated = syncReads ? layouts.map((l) => new GatedDram(l.name, l.capacity, E)) : [];
      const media = syncReads ? gated : layouts.map((l) => new FaultyMedium(new NamedDram(l.name, l.capacity, E), plan));
      for (const m of media) await m.open();
      const partition = new PartitionTable(layouts);
      const memory = new ServerMemory({ partition, allocation: new AllocationTable(), media });
      const store = new MemoryStore(VOLUME, plan);
      const volume = new Volume('v', false, new Date().toISOString(), store);
      const cache = new StorageCache({ partition, media, log, maxDirtyAgeMs: 0, destageIntervalMs: 0 });
      cache.start();
      const model = Buffer.alloc(VOLUME);
      try {
        // Before the run: blocks 64..127 hold the volume's pattern, some of them cached.
        const before = pattern(0, 64 * BLOCK, 64 * BLOCK);
        await cache.write(volume, 64 * BLOCK, before, false);
        before.copy(model, 64 * BLOCK);

        // Writes go to disjoint blocks among 0..63 so their outcome is known.
        const claimed = new Set<number>();
        const tenancies = [1, 2, 3].map((n) => new Tenancy(`srv-${n}`, n));
        const regions: { server: string; region: ServerRegion; data: Buffer; freed: boolean }[] = [];
        let shrunkTo = VOLUME;
        const checkHomes = (): void => {
          for (const r of cache.residents()) {
            const map = partition.extents(r.medium);
            const e = Math.floor(r.slot / E);
            if (map.kindOf(e) !== 'cache' || map.ownerOf(e) !== 'cache') {
              assert.fail(`line ${r.index} lives in ${r.medium} extent ${e}, which is ${map.kindOf(e)} owned by ${map.ownerOf(e) ?? 'nobody'}`);
            }
          }
        };
        // The synchronous read paths, after every step: blocks 64..127 are not written in
        // the run (the model holds them), blocks 0..63 are zero or the volume's pattern (a
        // write may be in flight); a reachable region is zero or its own server's bytes.
        // Loans of lines' memory, oldest first, with the range they show; each is held
        // for a few steps, as a reply waiting for its socket would be.
        const loans: { at: number; views: CacheViews }[] = [];
        const checkLoan = (loan: { at: number; views: CacheViews }): void => {
          let at = loan.at;
          for (const view of loan.views.buffers) {
            if (at >= 64 * BLOCK) {
              assert.ok(view.equals(model.subarray(at, at + view.length)), `a loan of bytes ${at}..${at + view.length}: not the volume's bytes any more`);
            } else {
              const want = pattern(0, at, view.length);
              if (!view.equals(want)) for (let i = 0; i < view.length; i++) if (view[i] !== 0 && view[i] !== want[i]) assert.fail(`a loan of byte ${at + i}: ${view[i]} is neither zero nor the volume's`);
            }
            at += view.length;
          }
        };
        const probeSyncReads = (): void => {
          for (const loan of loans) checkLoan(loan);
          for (const [at, length] of [[0, LINE_SIZE], [3 * LINE_SIZE, 2 * LINE_SIZE], [4 * LINE_SIZE, LINE_SIZE], [5 * LINE_SIZE + BLOCK, 3 * BLOCK], [6 * LINE_SIZE, 2 * LINE_SIZE]] as const) {
            const views = cache.readViews(volume, at, length);
            if (views === undefined) continue;
            answered.views++;
            const loan = { at, views };
            checkLoan(loan);
            loans.push(loan);
            if (loans.length > 6) loans.shift()?.views.release();
          }
          for (let b = 0; b < 128; b++) {
            const got = Buffer.alloc(BLOCK);
            if (!cache.readNow(volume, b * BLOCK, got)) continue;
            answered.blocks++;
            if (b >= 64) {
              assert.ok(got.equals(model.subarray(b * BLOCK, (b + 1) * BLOCK)), `readNow of block ${b}: not the volume's bytes`);
              continue;
            }
            const want = pattern(0, b * BLOCK, BLOCK);
            for (let i = 0; i < BLOCK; i++) if (got[i] !== 0 && got[i] !== want[i]) assert.fail(`readNow of block ${b} byte ${i}: ${got[i]} is neither zero nor the volume's`);
          }
          for (const r of regions) {
            const tenancy = tenancies[Number(r.server.slice(4)) - 1];
            if (tenancy === undefined) continue;
            let region: ServerRegion;
            try {
              region = memory.lookup(tenancy, r.region.id, r.region.key);
            } catch {
              continue; // freed
            }
            const got = Buffer.alloc(region.size);
            if (!memory.readNow(region, 0, got)) continue;
            answered.regions++;
            for (let i = 0; i < got.length; i++) if (got[i] !== 0 && got[i] !== r.data[i]) assert.fail(`region ${region.id} of ${r.server}: byte ${i} = ${got[i]}, neither zero nor its server's`);
          }
        };
        const gate = (op: string): Promise<void> =>
          s.schedule(Promise.resolve(), op).then(() => {
            checkHomes();
            if (syncReads) probeSyncReads();
          });
        plan.gate = gate;
        for (const m of gated) m.gate = gate;

        const run = async (o: Op): Promise<void> => {
          await s.schedule(Promise.resolve(), o.kind);
          switch (o.kind) {
            case 'write': {
              const blocks: number[] = [];
              for (let b = o.block; b < Math.min(64, o.block + o.blocks) && !claimed.has(b); b++) blocks.push(b);
              if (blocks.length === 0) return;
              for (const b of blocks) claimed.add(b);
              const at = (blocks[0] ?? 0) * BLOCK;
              const data = pattern(0, at, blocks.length * BLOCK);
              // With synchronous media, the write-hit path takes what it can at once.
              if (syncReads && !o.fua && cache.writeNow(volume, at, data)) answered.writes++;
              else await cache.write(volume, at, data, o.fua);
              data.copy(model, at);
              return;
            }
            case 'read': {
              const got = Buffer.alloc(BLOCK);
              await cache.read(volume, o.block * BLOCK, got);
              assert.ok(got.equals(model.subarray(o.block * BLOCK, (o.block + 1) * BLOCK)), `read of block ${o.block} returned someone else's bytes`);
              return;
            }
            case 'flush':
              return cache.flush(volume);
            case 'destage':
              return cache.destage(Date.now() + 60_000);
            case 'shrink': {
              // A shrink never cuts below the blocks this run reads or writes (0..127).
              const size = Math.min(shrunkTo, 128 * BLOCK + o.sectors * BLOCK);
              if (size >= shrunkTo) return;
              shrunkTo = size;
              await cache.forget(volume, size);
              await store.resize(size);
              return;
            }
            case 'resize':
              return resizeCache(partition, o.extents);
            case 'bind': {
              const server = `srv-${o.server}`;
              const tenancy = tenancies[o.server - 1] ?? new Tenancy(server, o.server);
              let region: ServerRegion;
              try {
                region = await memory.bind(tenancy, o.extents * E, { kind: 'medium', medium: 'dram' });
              } catch (error) {
                if ((error as { code?: string }).code === 'MS_RMEM_NO_CAPACITY') return;
                throw error;
              }
              const entry = { server, region, data: pattern(o.server, region.id * E, region.size), freed: false };
              regions.push(entry);
              // The region reads as zeros before its server writes (memory handed over is zeroed).
              const fresh = Buffer.alloc(region.size);
              await memory.read(region, 0, fresh);
              assert.ok(fresh.equals(Buffer.alloc(fresh.length)), 'a new region holds a former owner\'s bytes');
              await memory.write(region, 0, entry.data);
              if (o.free) {
                entry.freed = true;
                await memory.free(tenancy, region.id, region.key);
              }
              return;
            }
          }
        };

        await s.waitFor(Promise.all(ops.map(run)));
        plan.gate = undefined;
        for (const m of gated) m.gate = undefined;
        checkHomes();
        for (const loan of loans) {
          checkLoan(loan);
          loan.views.release();
        }
        assert.equal(cache.stats().pinnedSlots, 0, 'slots still pinned once every loan was released');
        for (const r of regions) {
          if (r.freed) continue;
          const got = Buffer.alloc(r.region.size);
          await memory.read(r.region, 0, got);
          assert.ok(got.equals(r.data), `region ${r.region.id} of ${r.server} no longer holds what its server wrote`);
        }
        await cache.flush(volume);
        const onDisk = Buffer.alloc(shrunkTo);
        await store.read(0, onDisk);
        assert.ok(onDisk.equals(model.subarray(0, shrunkTo)), 'the flushed volume differs from what was written to it');
      } finally {
        plan.gate = undefined;
        for (const m of gated) m.gate = undefined;
        await cache.stop();
      }
    }),
    { numRuns },
  );
  return answered;
}

test('cache lines and server regions never share memory, whatever the interleaving of writes, reclaims, binds and frees', async () => {
  await isolationRuns(false, SOAK ? 20_000 : 300);
});

test('the synchronous read paths (cache and server memory) and loans of cache memory never show another tenant\'s or handed-over bytes, at every scheduled step (writes taking the synchronous path too)', async () => {
  const answered = await isolationRuns(true, SOAK ? 5_000 : 150);
  assert.ok(answered.blocks > 0 && answered.regions > 0 && answered.views > 0 && answered.writes > 0, `the synchronous paths answered ${answered.blocks} block and ${answered.regions} region reads, lent ${answered.views} ranges and stored ${answered.writes} writes`);
});

type LoanOp =
  | { kind: 'write'; who: number; line: number; blocks: number }
  | { kind: 'read'; who: number; line: number }
  | { kind: 'resize'; extents: number };

const loanOpArb: fc.Arbitrary<LoanOp> = fc.oneof(
  { arbitrary: fc.record({ kind: fc.constant('write' as const), who: fc.integer({ min: 0, max: 1 }), line: fc.nat({ max: 11 }), blocks: fc.integer({ min: 1, max: 16 }) }), weight: 5 },
  { arbitrary: fc.record({ kind: fc.constant('read' as const), who: fc.integer({ min: 0, max: 1 }), line: fc.nat({ max: 11 }) }), weight: 2 },
  { arbitrary: fc.record({ kind: fc.constant('resize' as const), extents: fc.integer({ min: 1, max: 3 }) }), weight: 1 },
);

test('a loan of cache memory (readViews) keeps its own volume\'s bytes while the lines it shows are evicted, demoted and reclaimed and their slots go to another volume', async () => {
  let lent = 0;
  let left = 0;
  await fc.assert(
    fc.asyncProperty(fc.scheduler(), fc.array(loanOpArb, { minLength: 4, maxLength: 24 }), fc.nat(), async (s, ops, seed) => {
      // Sixteen DRAM slots (four may be lent) for 24 lines of two volumes: writes evict.
      const layouts = [layout('dram', 8, 4, 0), layout('flash', 2, 1, 0)];
      const media = layouts.map((l) => new GatedDram(l.name, l.capacity, E));
      for (const m of media) await m.open();
      const partition = new PartitionTable(layouts);
      const volumes = [0, 1].map((who) => new Volume(`v${who}`, false, new Date().toISOString(), new MemoryStore(12 * LINE_SIZE)));
      const cache = new StorageCache({ partition, media, log, maxDirtyAgeMs: 0, destageIntervalMs: 0 });
      cache.start();
      // Loans held over a few scheduled steps, as replies waiting for their sockets are.
      const loans: { who: number; at: number; views: CacheViews; slot: number; until: number; moved: boolean }[] = [];
      let steps = 0;
      // The first wrong byte seen; reported once the run is over (thrown from a medium's
      // gate, it would only fail the cache operation that waited there).
      let wrong: string | undefined;
      const check = (): void => {
        for (const loan of loans) {
          let at = loan.at;
          for (const view of loan.views.buffers) {
            const want = pattern(loan.who, at, view.length);
            if (!view.equals(want)) for (let i = 0; i < view.length; i++) if (view[i] !== 0 && view[i] !== want[i]) wrong ??= `a loan of v${loan.who} byte ${at + i}: ${view[i]} is neither zero nor its volume's`;
            at += view.length;
          }
        }
      };
      const step = (): void => {
        steps++;
        check();
        const homes = new Map(cache.residents().filter((r) => r.medium === 'dram').map((r) => [`${r.volume}:${r.index}`, r.slot]));
        for (let i = loans.length - 1; i >= 0; i--) {
          const loan = loans[i];
          if (loan === undefined) continue;
          // The line left the slot the loan shows (evicted, demoted, reclaimed): counted,
          // so the test shows it ran into that.
          if (!loan.moved && homes.get(`v${loan.who}:${loan.at / LINE_SIZE}`) !== loan.slot) {
            loan.moved = true;
            left++;
          }
          if (loan.until <= steps) {
            loan.views.release();
            loans.splice(i, 1);
          }
        }
        // Borrow one more line now and then (a READ of a whole line, with the first block
        // of the next when it is cached: that part is a copy).
        const who = (seed + steps) % 2;
        const line = (seed + steps * 7) % 11;
        const views = loans.length < 6 ? (cache.readViews(volumes[who] as Volume, line * LINE_SIZE, LINE_SIZE + BLOCK) ?? cache.readViews(volumes[who] as Volume, line * LINE_SIZE, LINE_SIZE)) : undefined;
        const slot = homes.get(`v${who}:${line}`);
        if (views === undefined || slot === undefined) {
          views?.release();
          return;
        }
        lent++;
        loans.push({ who, at: line * LINE_SIZE, views, slot, until: steps + 1 + ((seed + steps) % 10), moved: false });
        check();
      };
      for (const m of media) m.gate = (op) => s.schedule(Promise.resolve(), op).then(step);
      try {
        const run = async (o: LoanOp): Promise<void> => {
          await s.schedule(Promise.resolve(), o.kind).then(step);
          switch (o.kind) {
            case 'write': {
              const at = o.line * LINE_SIZE;
              await cache.write(volumes[o.who] as Volume, at, pattern(o.who, at, o.blocks * BLOCK), false);
              return;
            }
            case 'read': {
              const got = Buffer.alloc(LINE_SIZE);
              await cache.read(volumes[o.who] as Volume, o.line * LINE_SIZE, got);
              const want = pattern(o.who, o.line * LINE_SIZE, LINE_SIZE);
              for (let i = 0; i < got.length; i++) if (got[i] !== 0 && got[i] !== want[i]) assert.fail(`a read of v${o.who} byte ${o.line * LINE_SIZE + i}: not its volume's`);
              return;
            }
            case 'resize':
              return resizeCache(partition, o.extents);
          }
        };
        await s.waitFor(Promise.all(ops.map(run)));
        for (const m of media) m.gate = undefined;
        check();
        assert.equal(wrong, undefined);
        for (const loan of loans.splice(0)) loan.views.release();
        assert.equal(cache.stats().pinnedSlots, 0, 'slots still pinned once every loan was released');
      } finally {
        for (const m of media) m.gate = undefined;
        await cache.stop();
      }
    }),
    { numRuns: SOAK ? 5_000 : 400 },
  );
  assert.ok(lent > 0 && left > 0, `lent ${lent} ranges, of which ${left} saw their line leave its slot while lent`);
});
