// Loans of the DRAM cache's memory (StorageCache.readViews: READ replies sent from the
// lines' own bytes), under what can happen while a client holds them unread: writes,
// TRIMs, reads, cache reclaims and rmem binds of other tenants that take the cache's
// extents. What a loan shows must be its own volume's bytes at its own position, and
// unread loans must not take the level from everyone else.
// MEMSTRATA_SOAK=1 runs many more interleavings (npm run soak).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import { AllocationTable } from '../../../../src/memory/allocation-table.js';
import { DramMedium } from '../../../../src/memory/dram-medium.js';
import { PartitionTable, type MediumLayout } from '../../../../src/memory/partition-table.js';
import { ServerMemory, Tenancy } from '../../../../src/memory/server-memory.js';
import { LINE_SIZE } from '../../../../src/storage/cache/line.js';
import { StorageCache } from '../../../../src/storage/cache/storage-cache.js';
import type { CacheViews } from '../../../../src/storage/volume-io.js';
import { Volume } from '../../../../src/storage/volume-manager.js';
import { MemoryStore } from '../../../support/memory-store.js';
import fc from 'fast-check';
import { FaultPlan } from '../../../support/faults.js';
import { GatedDram } from '../../../support/named-dram.js';
import type { MediumName } from '../../../../src/kinds.js';

const log = pino({ level: 'silent' });
const E = 4 * LINE_SIZE;

/** A medium of `extents` extents, `cache` of them the cache's at first, the rest free. */
function layout(name: MediumName, extents: number, cache = extents): MediumLayout {
  const capacity = extents * E;
  return {
    name,
    capacity,
    extentSize: E,
    initial: { cache: cache * E, server: 0, nvram: 0 },
    bounds: { cache: { min: 0, max: capacity }, server: { min: 0, max: capacity }, nvram: { min: 0, max: capacity } },
  };
}

// readViews lends while unread loans hold at most a quarter of the level's slots. A
// reclaim that shrinks the level (here an rmem bind of another tenant, which grows the
// server partition out of the cache) used to give back the emptiest extents, counting a
// slot a loan holds as used: the loans stayed in the extents kept and became the whole
// level, and every other tenant's writes went to the data store. It now gives back the
// extents the loans hold first (their memory is replaced, so the loans keep their bytes).
test('a reclaim gives back the extents that unread loans hold first: the loans left hold at most a quarter of the smaller level, and another tenant\'s writes are cached', async () => {
  const dram = new DramMedium({ capacity: 8 * E, extentSize: E });
  await dram.open();
  const partition = new PartitionTable([layout('dram', 8)]);
  const memory = new ServerMemory({ partition, allocation: new AllocationTable(), media: [dram] });
  const a = new Volume('a', false, new Date().toISOString(), new MemoryStore(32 * LINE_SIZE));
  const b = new Volume('b', false, new Date().toISOString(), new MemoryStore(32 * LINE_SIZE));
  const cache = new StorageCache({ partition, media: [dram], log, maxDirtyAgeMs: 0, destageIntervalMs: 0 });
  cache.start();
  const loans: { views: CacheViews; value: number }[] = [];
  try {
    // Tenant A fills all 32 slots.
    for (let i = 0; i < 32; i++) await cache.write(a, i * LINE_SIZE, Buffer.alloc(LINE_SIZE, i + 1), false);
    assert.equal(cache.stats().slots.dram, 32);
    // A's hog READs every line that lives in extents 0 and 1 and never reads the replies:
    // eight loans, exactly the quarter the cap allows.
    for (const r of cache.residents()) {
      if (Math.floor(r.slot / E) > 1) continue;
      const views = cache.readViews(a, r.index * LINE_SIZE, LINE_SIZE);
      assert.ok(views !== undefined, `line ${r.index} was not lent`);
      loans.push({ views, value: r.index + 1 });
    }
    assert.equal(loans.length, 8);
    assert.equal(cache.stats().pinnedSlots, 8);
    // Another tenant binds 6 extents of rmem: the cache gives 6 extents back (7..2).
    await memory.bind(new Tenancy('srv-1', 1), 6 * E, { kind: 'medium', medium: 'dram' });
    const { slots, pinnedSlots } = cache.stats();
    // Tenant B now writes: with the loans' extents given back, every slot left is B's to take.
    for (let i = 0; i < 8; i++) await cache.write(b, i * LINE_SIZE, Buffer.alloc(LINE_SIZE, 0x80 + i), false);
    const after = cache.stats();
    const dramLinesOfB = cache.residents().filter((r) => r.volume === 'b' && r.medium === 'dram').length;
    assert.equal(slots.dram, 8, 'the cache gave 6 of its 8 extents back');
    assert.ok(pinnedSlots * 4 <= slots.dram, `${pinnedSlots} of ${slots.dram} DRAM slots held by unread replies after the reclaim`);
    assert.ok(after.pinnedSlots * 4 <= after.slots.dram, `${after.pinnedSlots} of ${after.slots.dram} DRAM slots are held by unread replies (more than a quarter); B has ${dramLinesOfB} lines in DRAM`);
    assert.equal(dramLinesOfB, 8, 'B\'s eight lines are in DRAM');
    // The loans kept their bytes through the reclaim: A's lines as written.
    for (const { views, value } of loans) assert.ok(views.buffers.every((buf) => buf.every((x) => x === value)), `the loan of line ${value - 1} changed`);
  } finally {
    for (const { views } of loans) views.release();
    await cache.stop();
  }
});

// Every byte a loan shows is its own volume's, at its own position, never older than
// what the line held when lent; zeros only where a TRIM of that block ran after the loan
// was made (or the block was zeros then). Writes, TRIMs, reads, cache reclaims and rmem
// binds run concurrently under fast-check's scheduler; no two writes or TRIMs of one
// block are in flight together (so a block's generation only grows, except through a
// TRIM). With parking disabled in SlotPool.give, it fails at once with another volume's
// block.

const BLOCK = 4096;
const LINES = 10;
const BLOCKS = LINES * (LINE_SIZE / BLOCK);

/** A block of `who` (0, 1: volumes; 2+: rmem servers) at block `b`, generation `gen`: 8-byte words [who, b lo, b hi, 0x5a, gen u32]. */
function tagged(who: number, b: number, gen: number): Buffer {
  const buf = Buffer.alloc(BLOCK);
  const word = Buffer.alloc(8);
  word[0] = 0xa0 | who;
  word[1] = b & 0xff;
  word[2] = b >> 8;
  word[3] = 0x5a;
  word.writeUInt32LE(gen, 4);
  for (let i = 0; i < BLOCK; i += 8) word.copy(buf, i);
  return buf;
}

/** 'zero' or a generation, or { bad } describing what is wrong. */
function parse(view: Buffer, who: number, b: number): number | 'zero' | { bad: string } {
  if (view.every((x) => x === 0)) return 'zero';
  const gen = view.readUInt32LE(4);
  if (!view.equals(tagged(who, b, gen))) {
    return { bad: `block ${b} of v${who}: word ${[...view.subarray(0, 8)].map((x) => x.toString(16)).join(' ')} (not uniform or not its own)` };
  }
  return gen;
}

type VOp =
  | { kind: 'write'; who: number; block: number; blocks: number }
  | { kind: 'trim'; who: number; block: number; blocks: number }
  | { kind: 'read'; who: number; line: number }
  | { kind: 'resize'; extents: number }
  | { kind: 'bind'; server: number; extents: number; free: boolean };

const vopArb: fc.Arbitrary<VOp> = fc.oneof(
  { arbitrary: fc.record({ kind: fc.constant('write' as const), who: fc.integer({ min: 0, max: 1 }), block: fc.nat({ max: BLOCKS - 1 }), blocks: fc.integer({ min: 1, max: 24 }) }), weight: 6 },
  { arbitrary: fc.record({ kind: fc.constant('trim' as const), who: fc.integer({ min: 0, max: 1 }), block: fc.nat({ max: BLOCKS - 1 }), blocks: fc.integer({ min: 1, max: 24 }) }), weight: 2 },
  { arbitrary: fc.record({ kind: fc.constant('read' as const), who: fc.integer({ min: 0, max: 1 }), line: fc.nat({ max: LINES - 1 }) }), weight: 5 },
  { arbitrary: fc.record({ kind: fc.constant('resize' as const), extents: fc.integer({ min: 1, max: 4 }) }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant('bind' as const), server: fc.integer({ min: 2, max: 3 }), extents: fc.integer({ min: 1, max: 2 }), free: fc.boolean() }), weight: 2 },
);

test('loans show only their own volume\'s bytes at their own position, never older than lent, zeros only after a TRIM, through reclaims and other tenants\' binds', async () => {
  let lent = 0;
  let changed = 0;
  await fc.assert(
    fc.asyncProperty(fc.scheduler(), fc.array(vopArb, { minLength: 4, maxLength: 24 }), fc.nat(), async (s, ops, seed) => {
      const plan = new FaultPlan();
      const layouts = [layout('dram', 8, 2), layout('flash', 2)];
      const media = layouts.map((l) => new GatedDram(l.name, l.capacity, E));
      for (const m of media) await m.open();
      const partition = new PartitionTable(layouts);
      const memory = new ServerMemory({ partition, allocation: new AllocationTable(), media });
      const volumes = [0, 1].map((who) => new Volume(`v${who}`, false, new Date().toISOString(), new MemoryStore(LINES * LINE_SIZE, plan)));
      const cache = new StorageCache({ partition, media, log, maxDirtyAgeMs: 0, destageIntervalMs: 0 });
      cache.start();
      // Every block of both volumes holds generation 1 before the run (some lines end in flash).
      for (const who of [0, 1]) {
        for (let line = 0; line < LINES; line++) {
          await cache.write(volumes[who] as Volume, line * LINE_SIZE, Buffer.concat(Array.from({ length: 16 }, (_, k) => tagged(who, line * 16 + k, 1))), false);
        }
      }
      let gen = 1;
      let clock = 0;
      const busy = [new Set<number>(), new Set<number>()];
      /** TRIMs per volume and block, with the clock value at which each ended (Infinity while running). */
      const trims: { who: number; block: number; end: number }[] = [];
      type Loan = { who: number; at: number; views: CacheViews; made: number; lentGen: (number | 'zero')[]; until: number };
      const loans: Loan[] = [];
      let wrong: string | undefined;
      const blocksOf = (loan: Loan): { b: number; view: Buffer }[] => {
        const out: { b: number; view: Buffer }[] = [];
        let at = loan.at;
        for (const buf of loan.views.buffers) {
          for (let i = 0; i < buf.length; i += BLOCK) {
            out.push({ b: (at + i) / BLOCK, view: buf.subarray(i, i + BLOCK) });
          }
          at += buf.length;
        }
        return out;
      };
      const check = (loan: Loan): void => {
        blocksOf(loan).forEach(({ b, view }, k) => {
          const got = parse(view, loan.who, b);
          if (typeof got === 'object') {
            wrong ??= `loan made at ${loan.made}: ${got.bad}`;
            return;
          }
          const then = loan.lentGen[k] ?? 'zero';
          if (got !== then) changed++;
          if (got === 'zero') {
            if (then === 'zero') return;
            if (trims.some((t) => t.who === loan.who && t.block === b && t.end > loan.made)) return;
            wrong ??= `loan of v${loan.who} block ${b} made at ${loan.made} (gen ${then}) now shows zeros, with no TRIM of it since`;
            return;
          }
          if (then !== 'zero' && got < then) wrong ??= `loan of v${loan.who} block ${b} made at ${loan.made}: gen ${got}, older than the gen ${then} lent`;
        });
      };
      const step = (): void => {
        clock++;
        for (const loan of loans) check(loan);
        for (let i = loans.length - 1; i >= 0; i--) {
          const loan = loans[i];
          if (loan !== undefined && loan.until <= clock) {
            check(loan);
            loan.views.release();
            loans.splice(i, 1);
          }
        }
        if (loans.length >= 6) return;
        const who = (seed + clock) % 2;
        const line = (seed * 3 + clock * 7) % (LINES - 1);
        const shape = (seed + clock) % 3;
        const at = line * LINE_SIZE + (shape === 2 ? BLOCK : 0);
        const length = shape === 0 ? LINE_SIZE : shape === 1 ? 2 * LINE_SIZE : LINE_SIZE + BLOCK;
        const views = cache.readViews(volumes[who] as Volume, at, length);
        if (views === undefined) return;
        lent++;
        const loan: Loan = { who, at, views, made: clock, lentGen: [], until: clock + 1 + ((seed + clock) % 12) };
        for (const { b, view } of blocksOf(loan)) {
          const got = parse(view, who, b);
          if (typeof got === 'object') wrong ??= `at lending: ${got.bad}`;
          loan.lentGen.push(typeof got === 'object' ? 'zero' : got);
        }
        loans.push(loan);
      };
      const gate = (op: string): Promise<void> => s.schedule(Promise.resolve(), op).then(step);
      plan.gate = gate;
      for (const m of media) m.gate = gate;
      const claim = (who: number, block: number, blocks: number): number[] => {
        const got: number[] = [];
        for (let b = block; b < Math.min(BLOCKS, block + blocks) && !(busy[who] as Set<number>).has(b); b++) got.push(b);
        for (const b of got) (busy[who] as Set<number>).add(b);
        return got;
      };
      try {
        const run = async (o: VOp): Promise<void> => {
          await s.schedule(Promise.resolve(), o.kind).then(step);
          switch (o.kind) {
            case 'write': {
              const blocks = claim(o.who, o.block, o.blocks);
              if (blocks.length === 0) return;
              const g = ++gen;
              const data = Buffer.concat(blocks.map((b) => tagged(o.who, b, g)));
              const at = (blocks[0] ?? 0) * BLOCK;
              try {
                if (!cache.writeNow(volumes[o.who] as Volume, at, data)) await cache.write(volumes[o.who] as Volume, at, data, false);
              } finally {
                for (const b of blocks) busy[o.who]?.delete(b);
              }
              return;
            }
            case 'trim': {
              const blocks = claim(o.who, o.block, o.blocks);
              if (blocks.length === 0) return;
              const entries = blocks.map((b) => ({ who: o.who, block: b, end: Infinity }));
              trims.push(...entries);
              try {
                await cache.zero(volumes[o.who] as Volume, (blocks[0] ?? 0) * BLOCK, blocks.length * BLOCK, { fua: false, allocate: false });
              } finally {
                for (const t of entries) t.end = clock;
                for (const b of blocks) busy[o.who]?.delete(b);
              }
              return;
            }
            case 'read': {
              const got = Buffer.alloc(LINE_SIZE);
              await cache.read(volumes[o.who] as Volume, o.line * LINE_SIZE, got);
              for (let i = 0; i < LINE_SIZE; i += BLOCK) {
                const r = parse(got.subarray(i, i + BLOCK), o.who, o.line * 16 + i / BLOCK);
                if (typeof r === 'object') wrong ??= `read(): ${r.bad}`;
              }
              return;
            }
            case 'resize':
              try {
                await partition.resize('dram', 'cache', o.extents * E);
              } catch (error) {
                const code = (error as { code?: string }).code;
                if (code !== 'MS_PARTITION_BUSY' && code !== 'MS_PARTITION_NO_CAPACITY') throw error;
              }
              return;
            case 'bind': {
              const tenancy = new Tenancy(`srv-${o.server}`, o.server);
              let region;
              try {
                region = await memory.bind(tenancy, o.extents * E, { kind: 'medium', medium: 'dram' });
              } catch (error) {
                const code = (error as { code?: string }).code;
                if (code === 'MS_RMEM_NO_CAPACITY') return;
                throw error;
              }
              const data = Buffer.concat(Array.from({ length: region.size / BLOCK }, (_, b) => tagged(o.server, b, 1)));
              await memory.write(region, 0, data);
              if (o.free) await memory.free(tenancy, region.id, region.key);
              return;
            }
          }
        };
        await s.waitFor(Promise.all(ops.map(run)));
        plan.gate = undefined;
        for (const m of media) m.gate = undefined;
        for (const loan of loans) check(loan);
        assert.equal(wrong, undefined);
        for (const loan of loans.splice(0)) loan.views.release();
        assert.equal(cache.stats().pinnedSlots, 0, 'slots still pinned once every loan was released');
      } finally {
        plan.gate = undefined;
        for (const m of media) m.gate = undefined;
        for (const loan of loans.splice(0)) loan.views.release();
        await cache.stop();
      }
    }),
    { numRuns: process.env.MEMSTRATA_SOAK === '1' ? 5_000 : 100 },
  );
  process.stdout.write(`# lent ${lent}, block changes seen in loans ${changed}\n`);
  assert.ok(lent > 0, 'no loan was made: the property tested nothing');
});
