// Server memory under interleavings: binds, writes of a per-tenant pattern, reads (by
// the synchronous path, readNow, and the ordinary one), frees,
// session ends (lease expiry) and new sessions of the same server id (reconnects told
// resumed=false), all in flight at once, with fast-check's scheduler choosing the order
// in which every medium operation and every request start completes.
//
// Checked during each run: a read returns only zeros or what its own tenant wrote to that
// page; a region that is freed, or whose session ended, is never reachable again.
// Checked after each run: every live region holds exactly what its server wrote; the
// allocation table lists exactly the live regions; the partition table's server extents
// are exactly those the live regions use; every byte outside them is zero. Then every
// session ends and nothing is left.
//
// A failure prints fast-check's seed and path; replay it with
// MEMSTRATA_FC_SEED=<seed> MEMSTRATA_FC_PATH=<path> npm test -- server-memory-interleavings

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import type { MediumName } from '../../../src/kinds.js';
import { AllocationTable } from '../../../src/memory/allocation-table.js';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import { PartitionTable, type MediumLayout } from '../../../src/memory/partition-table.js';
import { PAGE_SIZE, ServerMemory, type BindPlacement, type ServerRegion, type Tenancy } from '../../../src/memory/server-memory.js';

const E = 4 * PAGE_SIZE; // 4 pages per extent
const EXTENTS = 16;
const SERVERS = ['srv-a', 'srv-b', 'srv-c'] as const;
const ZEROS = Buffer.alloc(EXTENTS * E);
const SCRATCH = Buffer.alloc(EXTENTS * E);

/** A medium whose every read, write and zero waits for the scheduler to let it complete. */
class ScheduledMedium extends DramMedium {
  override readonly name: MediumName;
  scheduler: fc.Scheduler | undefined;
  constructor(name: MediumName) {
    super({ capacity: EXTENTS * E, extentSize: E });
    this.name = name;
  }
  override async read(offset: number, target: Uint8Array): Promise<void> {
    await this.scheduler?.schedule(Promise.resolve(), `${this.name} read ${offset}`);
    return super.read(offset, target);
  }
  override async write(offset: number, source: Uint8Array): Promise<void> {
    await this.scheduler?.schedule(Promise.resolve(), `${this.name} write ${offset}`);
    return super.write(offset, source);
  }
  override async zero(offset: number, length: number): Promise<void> {
    await this.scheduler?.schedule(Promise.resolve(), `${this.name} zero ${offset}+${length}`);
    return super.zero(offset, length);
  }
}

type Where = 'dram' | 'flash' | 'highest' | 'capacity';
type Action =
  | { op: 'bind'; server: number; pages: number; where: Where; late: boolean }
  | { op: 'write'; server: number; pick: number; page: number }
  | { op: 'read'; server: number; pick: number; page: number; now: boolean }
  | { op: 'free'; server: number; pick: number }
  | { op: 'expire'; server: number }
  | { op: 'stale'; pick: number };

const server = fc.integer({ min: 0, max: SERVERS.length - 1 });
const action: fc.Arbitrary<Action> = fc.oneof(
  {
    weight: 3,
    arbitrary: fc.record({
      op: fc.constant('bind' as const),
      server,
      pages: fc.integer({ min: 1, max: 7 }),
      where: fc.constantFrom<Where>('dram', 'flash', 'highest', 'capacity'),
      // A BIND of an older connection that arrives after its session ended.
      late: fc.integer({ min: 0, max: 4 }).map((n) => n === 0),
    }),
  },
  { weight: 4, arbitrary: fc.record({ op: fc.constant('write' as const), server, pick: fc.nat(), page: fc.nat() }) },
  { weight: 3, arbitrary: fc.record({ op: fc.constant('read' as const), server, pick: fc.nat(), page: fc.nat(), now: fc.boolean() }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('free' as const), server, pick: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('expire' as const), server }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('stale' as const), pick: fc.nat() }) },
);

/** What the test knows of one region. */
interface Entry {
  region: ServerRegion;
  tenancy: Tenancy;
  server: number;
  /** live: reachable; freeing: FREE asked; freed: FREE answered; ended: its session ended. */
  state: 'live' | 'freeing' | 'freed' | 'ended';
  /** Last value written to each page by a completed write. */
  pages: Map<number, number>;
  /** Every value ever written to each page, in flight or done: what a read may see besides zeros. */
  written: Map<number, Set<number>>;
  /** Pages with a write in flight: the driver writes a page once at a time, so its final value is known. */
  writing: Set<number>;
}

function placement(where: Where): BindPlacement {
  return where === 'dram' || where === 'flash' ? { kind: 'medium', medium: where } : { kind: 'class', class: where };
}

function codeOf(error: unknown): string {
  return (error as { code?: string }).code ?? String(error);
}

function layout(name: MediumName): MediumLayout {
  return {
    name,
    capacity: EXTENTS * E,
    extentSize: E,
    initial: { cache: 0, server: 4 * E, nvram: 0 },
    bounds: { cache: { min: 0, max: 0 }, server: { min: 0, max: 12 * E }, nvram: { min: 0, max: 0 } },
  };
}

async function run(s: fc.Scheduler, actions: readonly Action[]): Promise<void> {
  const media = [new ScheduledMedium('dram'), new ScheduledMedium('flash')];
  for (const m of media) await m.open();
  const partition = new PartitionTable([layout('dram'), layout('flash')]);
  const allocation = new AllocationTable();
  const memory = new ServerMemory({ partition, allocation, media });
  for (const m of media) m.scheduler = s;

  const current = SERVERS.map((id) => memory.open(id));
  /** The last ended session of each server. */
  const ended = new Map<number, Tenancy>();
  const entries: Entry[] = [];
  const counters = SERVERS.map(() => 0);
  // Disjoint per server: a byte tells whose write it was.
  const nextValue = (srv: number): number => {
    const n = counters[srv] ?? 0;
    counters[srv] = n + 1;
    return 1 + srv * 80 + (n % 80);
  };
  const live = (srv: number, pick: number): Entry | undefined => {
    const mine = entries.filter((e) => e.server === srv && e.state === 'live');
    return mine[pick % Math.max(1, mine.length)];
  };
  const expectViolation = (fn: () => unknown, what: string): void => {
    assert.throws(fn, { code: 'MS_RMEM_VIOLATION' }, what);
  };

  const step = async (a: Action): Promise<void> => {
    switch (a.op) {
      case 'bind': {
        const tenancy = a.late ? (ended.get(a.server) ?? current[a.server]!) : current[a.server]!;
        let region: ServerRegion;
        try {
          region = await memory.bind(tenancy, a.pages * PAGE_SIZE, placement(a.where));
        } catch (error) {
          const code = codeOf(error);
          if (code === 'MS_RMEM_NO_SESSION') assert.equal(memory.isLive(tenancy), false, 'NO_SESSION only for an ended session');
          else assert.equal(code, 'MS_RMEM_NO_CAPACITY', `bind failed with ${code}`);
          return;
        }
        assert.equal(region.size, a.pages * PAGE_SIZE);
        const entry: Entry = { region, tenancy, server: a.server, state: memory.isLive(tenancy) ? 'live' : 'ended', pages: new Map(), written: new Map(), writing: new Set() };
        if (entry.state === 'ended') expectViolation(() => memory.lookup(tenancy, region.id, region.key), 'a region bound for an ended session is unreachable');
        entries.push(entry);
        return;
      }
      case 'write': {
        const entry = live(a.server, a.pick);
        if (entry === undefined) return;
        const page = a.page % (entry.region.size / PAGE_SIZE);
        if (entry.writing.has(page)) return;
        const value = nextValue(a.server);
        let seen = entry.written.get(page);
        if (seen === undefined) entry.written.set(page, (seen = new Set()));
        seen.add(value);
        entry.writing.add(page);
        try {
          const region = memory.lookup(entry.tenancy, entry.region.id, entry.region.key);
          await memory.write(region, page * PAGE_SIZE, Buffer.alloc(PAGE_SIZE, value));
          entry.pages.set(page, value);
        } catch (error) {
          assert.equal(codeOf(error), 'MS_RMEM_VIOLATION');
          assert.notEqual(entry.state, 'live', 'a write to a live region was refused');
        } finally {
          entry.writing.delete(page);
        }
        return;
      }
      case 'read': {
        const entry = live(a.server, a.pick);
        if (entry === undefined) return;
        const page = a.page % (entry.region.size / PAGE_SIZE);
        const target = Buffer.alloc(PAGE_SIZE, 0xff);
        try {
          const region = memory.lookup(entry.tenancy, entry.region.id, entry.region.key);
          // The rmem service's synchronous path (both media read synchronously here, as
          // DRAM and a flash the page cache holds do), or the ordinary one.
          if (!a.now || !memory.readNow(region, page * PAGE_SIZE, target)) await memory.read(region, page * PAGE_SIZE, target);
        } catch (error) {
          assert.equal(codeOf(error), 'MS_RMEM_VIOLATION');
          assert.notEqual(entry.state, 'live', 'a read of a live region was refused');
          return;
        }
        const allowed = entry.written.get(page) ?? new Set<number>();
        for (const byte of target) {
          assert.ok(byte === 0 || allowed.has(byte), `server ${SERVERS[a.server]} read byte ${byte} in region ${entry.region.id} page ${page}, which it never wrote`);
        }
        return;
      }
      case 'free': {
        const entry = live(a.server, a.pick);
        if (entry === undefined) return;
        entry.state = 'freeing';
        try {
          await memory.free(entry.tenancy, entry.region.id, entry.region.key);
          entry.state = 'freed';
        } catch (error) {
          assert.equal(codeOf(error), 'MS_RMEM_VIOLATION');
          assert.equal(memory.isLive(entry.tenancy), false, 'a FREE of a live region was refused');
          entry.state = 'ended';
        }
        expectViolation(() => memory.lookup(entry.tenancy, entry.region.id, entry.region.key), 'a freed region is unreachable');
        return;
      }
      case 'expire': {
        const old = current[a.server]!;
        // The lease ran out: the session ends, and the server's next HELLO opens a new one.
        for (const e of entries) if (e.tenancy === old && e.state !== 'freed') e.state = 'ended';
        const released = memory.end(old);
        ended.set(a.server, old);
        current[a.server] = memory.open(SERVERS[a.server]!);
        for (const e of entries) if (e.tenancy === old) expectViolation(() => memory.lookup(old, e.region.id, e.region.key), 'an ended session reaches nothing');
        await released;
        return;
      }
      case 'stale': {
        const gone = entries.filter((e) => e.state === 'freed' || e.state === 'ended');
        const entry = gone[a.pick % Math.max(1, gone.length)];
        if (entry === undefined) return;
        const now = current[entry.server]!;
        expectViolation(() => memory.lookup(entry.tenancy, entry.region.id, entry.region.key), 'stale region, its own session');
        expectViolation(() => memory.lookup(now, entry.region.id, entry.region.key), 'stale region, the server\'s current session');
        await assert.rejects(memory.free(now, entry.region.id, entry.region.key), { code: 'MS_RMEM_VIOLATION' });
        return;
      }
    }
  };

  const tasks = actions.map((a, i) => s.schedule(Promise.resolve(), `start ${i} ${a.op}`).then(() => step(a)));
  // Let the scheduler release waiting operations, in its order, until every action is over.
  await s.waitFor(Promise.all(tasks));

  // ---- after the run: the tables and the media agree with the live regions ----
  for (const m of media) m.scheduler = undefined;
  const alive = entries.filter((e) => e.state === 'live');
  for (const e of entries.filter((x) => x.state !== 'live')) {
    expectViolation(() => memory.lookup(e.tenancy, e.region.id, e.region.key), 'nothing freed or ended is reachable');
    expectViolation(() => memory.lookup(current[e.server]!, e.region.id, e.region.key), 'nor from the current session');
  }
  for (const e of alive) {
    const region = memory.lookup(e.tenancy, e.region.id, e.region.key);
    const content = Buffer.alloc(region.size);
    await memory.read(region, 0, content);
    for (let p = 0; p < region.size / PAGE_SIZE; p++) {
      const want = e.pages.get(p) ?? 0;
      assert.ok(content.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE).equals(Buffer.alloc(PAGE_SIZE, want)), `region ${region.id} page ${p} holds what its server wrote (${want})`);
    }
  }
  const rows = allocation.rows().map((r) => `${r.serverId} ${r.regionId} ${r.medium} ${r.start} ${r.length}`).sort();
  const expected = alive.flatMap((e) => e.region.ranges.map((r) => `${SERVERS[e.server]} ${e.region.id} ${r.medium} ${r.start} ${r.length}`)).sort();
  assert.deepEqual(rows, expected, 'the allocation table lists exactly the live regions');
  const owned = new Set<string>();
  for (const row of partition.rows()) {
    if (row.owner === null) continue;
    assert.equal(row.kind, 'server');
    for (let x = row.start; x < row.start + row.length; x += E) owned.add(`${row.owner} ${row.medium} ${x / E}`);
  }
  const used = new Set<string>();
  for (const e of alive) {
    for (const r of e.region.ranges) for (let x = Math.floor(r.start / E); x * E < r.start + r.length; x++) used.add(`${SERVERS[e.server]} ${r.medium} ${x}`);
  }
  assert.deepEqual([...owned].sort(), [...used].sort(), 'servers hold exactly the extents their live regions use');
  await assertZeroOutside(media, alive);

  // ---- every session ends: nothing is left ----
  for (const t of current) await memory.end(t);
  assert.deepEqual(allocation.rows(), []);
  assert.deepEqual(partition.rows().filter((r) => r.owner !== null), []);
  assert.equal(memory.regionCount(), 0);
  await assertZeroOutside(media, []);
}

/** Every byte of every medium outside the live regions is zero: nothing freed keeps its data. */
async function assertZeroOutside(media: readonly DramMedium[], alive: readonly Entry[]): Promise<void> {
  for (const m of media) {
    const all = SCRATCH;
    await m.read(0, all);
    for (const e of alive) for (const r of e.region.ranges) if (r.medium === m.name) all.fill(0, r.start, r.start + r.length);
    if (all.equals(ZEROS)) continue;
    const at = all.findIndex((b) => b !== 0);
    assert.fail(`${m.name} byte ${at} outside every live region holds ${all[at]}`);
  }
}

function replay(): { seed?: number; path?: string } {
  const seed = process.env.MEMSTRATA_FC_SEED;
  const path = process.env.MEMSTRATA_FC_PATH;
  return { ...(seed === undefined ? {} : { seed: Number(seed) }), ...(path === undefined ? {} : { path }) };
}

test('server memory under interleaved binds, writes, reads, frees, session ends and new sessions', async () => {
  await fc.assert(
    fc.asyncProperty(fc.scheduler(), fc.array(action, { minLength: 5, maxLength: 30 }), async (s, actions) => {
      await run(s, actions);
    }),
    { numRuns: 1000, ...replay() },
  );
});
