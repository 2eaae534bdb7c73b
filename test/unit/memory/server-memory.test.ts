import { test } from 'node:test';
import assert from 'node:assert/strict';
import { StorageError } from '../../../src/errors.js';
import { AllocationTable } from '../../../src/memory/allocation-table.js';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import type { MediumName } from '../../../src/kinds.js';
import { PartitionTable, type MediumLayout } from '../../../src/memory/partition-table.js';
import { PAGE_SIZE, ServerMemory, type Tenancy } from '../../../src/memory/server-memory.js';

const E = 64 * 1024; // 16 pages per extent

/** A DRAM medium standing in for either medium, so tests stay in memory. */
class TestMedium extends DramMedium {
  override readonly name: MediumName;
  /** Zeroing waits for this while it is set, as a slow medium would. */
  zeroGate: Promise<void> | undefined;
  zeroes = 0;
  /** Zeroing at these offsets fails (EIO, as a full sparse file would with ENOSPC). */
  readonly failZeroAt = new Set<number>();
  constructor(name: MediumName, capacity: number) {
    super({ capacity, extentSize: E });
    this.name = name;
  }
  override async zero(offset: number, length: number): Promise<void> {
    this.zeroes++;
    if (this.zeroGate !== undefined) await this.zeroGate;
    if (this.failZeroAt.has(offset)) throw new StorageError('MS_MEDIUM_IO', `injected zeroing failure at ${offset}`);
    return super.zero(offset, length);
  }
}

async function setup(options: { dram?: Partial<MediumLayout>; flash?: Partial<MediumLayout> | false; maxRanges?: number } = {}) {
  const layout = (name: MediumName, extents: number, extra?: Partial<MediumLayout>): MediumLayout => ({
    name,
    capacity: extents * E,
    extentSize: E,
    initial: { cache: 4 * E, server: 4 * E, nvram: 0 },
    bounds: { cache: { min: 0, max: extents * E }, server: { min: 0, max: extents * E }, nvram: { min: 0, max: extents * E } },
    ...extra,
  });
  const layouts = [layout('dram', 16, options.dram)];
  if (options.flash !== false) layouts.push(layout('flash', 16, options.flash));
  const media: TestMedium[] = layouts.map((l) => new TestMedium(l.name, l.capacity));
  for (const m of media) await m.open();
  const partition = new PartitionTable(layouts);
  const allocation = new AllocationTable();
  const memory = new ServerMemory({ partition, allocation, media, ...(options.maxRanges === undefined ? {} : { maxRanges: options.maxRanges }) });
  // One session per server id unless a test opens another.
  const sessions = new Map<string, Tenancy>();
  const tenant = (serverId: string): Tenancy => {
    let t = sessions.get(serverId);
    if (t === undefined) {
      t = memory.open(serverId);
      sessions.set(serverId, t);
    }
    return t;
  };
  return { partition, allocation, memory, media, tenant };
}

test('bind rounds up to pages, records the region, and reads back what was written', async () => {
  const { memory, allocation, partition, tenant } = await setup();
  const region = await memory.bind(tenant('srv-a'), 5000, { kind: 'medium', medium: 'dram' });
  assert.equal(region.size, 2 * PAGE_SIZE);
  assert.deepEqual(allocation.rows().map((r) => [r.serverId, r.regionId, r.medium, r.length]), [['srv-a', region.id, 'dram', 2 * PAGE_SIZE]]);
  const owned = partition.rows().filter((r) => r.owner === 'srv-a');
  assert.deepEqual(owned.map((r) => [r.medium, r.kind, r.length]), [['dram', 'server', E]]);
  await memory.write(region, 4000, Buffer.from('across a page'));
  const back = Buffer.alloc(13);
  await memory.read(region, 4000, back);
  assert.equal(back.toString(), 'across a page');
  await assert.rejects(memory.read(region, 2 * PAGE_SIZE - 1, Buffer.alloc(2)), { code: 'MS_RMEM_RANGE' });
  await assert.rejects(memory.bind(tenant('srv-a'), 0, { kind: 'medium', medium: 'dram' }), { code: 'MS_RMEM_INVALID' });
});

test('memory is zero-filled when handed over, even after another server or another kind used it', async () => {
  const { memory, partition, media, tenant } = await setup();
  // Dirty the whole dram medium, as the cache or a previous tenant would have.
  await media[0]!.write(0, Buffer.alloc(16 * E, 0xee));
  const a = await memory.bind(tenant('srv-a'), 4 * E, { kind: 'medium', medium: 'dram' });
  const seen = Buffer.alloc(a.size);
  await memory.read(a, 0, seen);
  assert.ok(seen.every((b) => b === 0), 'fresh extents are zeroed');
  await memory.write(a, 0, Buffer.alloc(a.size, 0xaa));
  await memory.free(tenant('srv-a'), a.id, a.key);
  assert.equal(partition.rows().filter((r) => r.owner !== null).length, 0, 'whole free extents go back to the partition');
  const b = await memory.bind(tenant('srv-b'), 4 * E, { kind: 'medium', medium: 'dram' });
  await memory.read(b, 0, seen);
  assert.ok(seen.every((x) => x === 0), 'what A freed, B reads as zeros');
});

test('isolation: another server, a wrong key, or a freed region is a memory violation', async () => {
  const { memory, tenant } = await setup();
  const a = await memory.bind(tenant('srv-a'), PAGE_SIZE, { kind: 'medium', medium: 'dram' });
  assert.throws(() => memory.lookup(tenant('srv-b'), a.id, a.key), { code: 'MS_RMEM_VIOLATION' });
  assert.throws(() => memory.lookup(tenant('srv-a'), a.id, a.key ^ 1n), { code: 'MS_RMEM_VIOLATION' });
  assert.throws(() => memory.lookup(tenant('srv-a'), a.id + 1, a.key), { code: 'MS_RMEM_VIOLATION' });
  await assert.rejects(memory.free(tenant('srv-b'), a.id, a.key), { code: 'MS_RMEM_VIOLATION' });
  await memory.free(tenant('srv-a'), a.id, a.key);
  await assert.rejects(memory.free(tenant('srv-a'), a.id, a.key), { code: 'MS_RMEM_VIOLATION' }, 'double free');
  assert.throws(() => memory.lookup(tenant('srv-a'), a.id, a.key), { code: 'MS_RMEM_VIOLATION' }, 'use after free');
});

test('servers never share an extent, and small binds of one server share its extents', async () => {
  const { memory, partition, tenant } = await setup();
  const a1 = await memory.bind(tenant('srv-a'), PAGE_SIZE, { kind: 'medium', medium: 'dram' });
  const b1 = await memory.bind(tenant('srv-b'), PAGE_SIZE, { kind: 'medium', medium: 'dram' });
  const a2 = await memory.bind(tenant('srv-a'), PAGE_SIZE, { kind: 'medium', medium: 'dram' });
  const extent = (r: typeof a1) => Math.floor(r.ranges[0]!.start / E);
  assert.equal(extent(a1), extent(a2));
  assert.notEqual(extent(a1), extent(b1));
  assert.deepEqual(partition.rows().filter((r) => r.owner !== null).map((r) => r.owner).sort(), ['srv-a', 'srv-b']);
});

test('performance classes try their medium first, and span both when neither alone fits', async () => {
  const { memory, tenant } = await setup({ dram: { bounds: { cache: { min: 4 * E, max: 16 * E }, server: { min: 0, max: 6 * E }, nvram: { min: 0, max: 0 } } } });
  const fast = await memory.bind(tenant('srv-a'), E, { kind: 'class', class: 'highest' });
  assert.equal(fast.ranges[0]!.medium, 'dram');
  const slow = await memory.bind(tenant('srv-a'), E, { kind: 'class', class: 'capacity' });
  assert.equal(slow.ranges[0]!.medium, 'flash');
  // dram may reach 6 extents (5 left); flash has 15 left: 8 extents fit only on flash.
  const big = await memory.bind(tenant('srv-a'), 8 * E, { kind: 'class', class: 'highest' });
  assert.deepEqual([...new Set(big.ranges.map((r) => r.medium))], ['flash']);
  // 5 dram + 7 flash left: 10 extents fit on neither alone and span both, dram first.
  const span = await memory.bind(tenant('srv-a'), 10 * E, { kind: 'class', class: 'highest' });
  assert.deepEqual([...new Set(span.ranges.map((r) => r.medium))], ['dram', 'flash']);
  assert.equal(span.ranges.filter((r) => r.medium === 'dram').reduce((s, r) => s + r.length, 0), 5 * E);
  await assert.rejects(memory.bind(tenant('srv-a'), 3 * E, { kind: 'class', class: 'highest' }), { code: 'MS_RMEM_NO_CAPACITY' });
  const data = Buffer.alloc(span.size);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32BE(i, i);
  await memory.write(span, 0, data);
  const back = Buffer.alloc(span.size);
  await memory.read(span, 0, back);
  assert.ok(back.equals(data), 'a region spanning media reads back whole');
});

test('the server partition grows from free, then cache, and lack of capacity leaks nothing', async () => {
  const { memory, partition, allocation, tenant } = await setup({
    flash: false,
    dram: { bounds: { cache: { min: 2 * E, max: 16 * E }, server: { min: 0, max: 16 * E }, nvram: { min: 0, max: 0 } } },
  });
  // 4 server + 8 free + 2 reclaimable cache = 14 extents obtainable.
  const regions = [];
  regions.push(await memory.bind(tenant('srv-a'), 10 * E, { kind: 'medium', medium: 'dram' }));
  const usage = () => partition.usage()[0]!.kinds;
  assert.equal(usage().free.bytes, 2 * E, 'grew from free first');
  assert.equal(usage().cache.bytes, 4 * E);
  regions.push(await memory.bind(tenant('srv-a'), 4 * E, { kind: 'medium', medium: 'dram' }));
  assert.equal(usage().cache.bytes, 2 * E, 'then from the cache, down to its minimum');
  const before = JSON.stringify([partition.rows(), allocation.rows()]);
  await assert.rejects(memory.bind(tenant('srv-b'), PAGE_SIZE, { kind: 'medium', medium: 'dram' }), { code: 'MS_RMEM_NO_CAPACITY' });
  await assert.rejects(memory.bind(tenant('srv-a'), PAGE_SIZE, { kind: 'class', class: 'highest' }), { code: 'MS_RMEM_NO_CAPACITY' });
  assert.equal(JSON.stringify([partition.rows(), allocation.rows()]), before, 'a refused bind changes no table');
  for (const r of regions) await memory.free(tenant('srv-a'), r.id, r.key);
  assert.equal(allocation.rows().length, 0);
  assert.equal(partition.rows().filter((r) => r.owner !== null).length, 0);
});

test('address binds take exactly the pages asked for, or are refused', async () => {
  const { memory, partition, tenant } = await setup();
  const serverStart = partition.rows().find((r) => r.medium === 'dram' && r.kind === 'server')!.start;
  const at = serverStart + 3 * PAGE_SIZE;
  const region = await memory.bind(tenant('srv-a'), 2 * PAGE_SIZE, { kind: 'address', medium: 'dram', address: at });
  assert.deepEqual(region.ranges, [{ medium: 'dram', start: at, length: 2 * PAGE_SIZE }]);
  await assert.rejects(memory.bind(tenant('srv-a'), PAGE_SIZE, { kind: 'address', medium: 'dram', address: at + PAGE_SIZE }), { code: 'MS_RMEM_INVALID' }, 'already bound');
  await assert.rejects(memory.bind(tenant('srv-b'), PAGE_SIZE, { kind: 'address', medium: 'dram', address: at + 5 * PAGE_SIZE }), { code: 'MS_RMEM_INVALID' }, "another server's extent");
  await assert.rejects(memory.bind(tenant('srv-a'), PAGE_SIZE, { kind: 'address', medium: 'dram', address: at + 1 }), { code: 'MS_RMEM_INVALID' }, 'unaligned');
  await assert.rejects(memory.bind(tenant('srv-a'), PAGE_SIZE, { kind: 'address', medium: 'dram', address: 0 }), { code: 'MS_RMEM_INVALID' }, 'cache extent');
  const next = await memory.bind(tenant('srv-a'), PAGE_SIZE, { kind: 'address', medium: 'dram', address: at + 2 * PAGE_SIZE });
  assert.equal(next.ranges[0]!.start, at + 2 * PAGE_SIZE);
});

test('ending a session frees and zeroes all it holds, but not what a new session of the same server binds', async () => {
  const { memory, allocation, partition, media } = await setup();
  const first = memory.open('srv-a');
  const old = await memory.bind(first, E, { kind: 'medium', medium: 'flash' });
  await memory.write(old, 0, Buffer.alloc(E, 1));
  const release = memory.end(first);
  assert.throws(() => memory.lookup(first, old.id, old.key), { code: 'MS_RMEM_VIOLATION' }, 'unreachable at once, before the zeroing');
  const second = memory.open('srv-a');
  assert.throws(() => memory.lookup(second, old.id, old.key), { code: 'MS_RMEM_VIOLATION' }, 'a new session does not inherit the old keys');
  const fresh = memory.bind(second, PAGE_SIZE, { kind: 'medium', medium: 'dram' });
  await assert.rejects(memory.bind(first, PAGE_SIZE, { kind: 'medium', medium: 'dram' }), { code: 'MS_RMEM_NO_SESSION' }, 'an ended session binds nothing');
  assert.deepEqual(await release, { regions: 1, keptAsideBytes: 0 });
  const region = await fresh;
  assert.deepEqual(allocation.rows().map((r) => r.regionId), [region.id]);
  assert.deepEqual(partition.rows().filter((r) => r.owner === 'srv-a').map((r) => r.medium), ['dram']);
  const flash = media.find((m) => m.name === 'flash')!;
  const back = Buffer.alloc(E);
  await flash.read(old.ranges[0]!.start, back);
  assert.ok(back.every((b) => b === 0), 'the old region was zeroed');
});

test('ending a session while its BIND runs: the bind completes, then the release frees it', async () => {
  const { memory, allocation, partition, media } = await setup();
  const dram = media[0]!;
  let open: () => void = () => undefined;
  dram.zeroGate = new Promise<void>((resolve) => (open = resolve));
  const session = memory.open('srv-a');
  const bind = memory.bind(session, 3 * E, { kind: 'medium', medium: 'dram' });
  // The bind is zeroing the extents it took when the session ends.
  while (dram.zeroes === 0) await new Promise((resolve) => setImmediate(resolve));
  const released = memory.end(session);
  dram.zeroGate = undefined;
  open();
  const region = await bind;
  assert.throws(() => memory.lookup(session, region.id, region.key), { code: 'MS_RMEM_VIOLATION' });
  assert.deepEqual(await released, { regions: 1, keptAsideBytes: 0 });
  assert.deepEqual(allocation.rows(), []);
  assert.deepEqual(partition.rows().filter((r) => r.owner !== null), []);
});

test('a free waits for I/O in flight on the region before zeroing it', async () => {
  const { memory, tenant } = await setup();
  const region = await memory.bind(tenant('srv-a'), PAGE_SIZE, { kind: 'medium', medium: 'dram' });
  await memory.write(region, 0, Buffer.alloc(PAGE_SIZE, 7));
  const target = Buffer.alloc(PAGE_SIZE);
  const read = memory.read(region, 0, target);
  const freed = memory.free(tenant('srv-a'), region.id, region.key);
  await Promise.all([read, freed]);
  assert.ok(target.every((b) => b === 7), 'the read saw the data, not the zeroing');
});

test('a release goes on past a region whose zeroing fails: the others are freed, the unzeroed pages are kept aside and handed to no one, and a later release gives them back', async () => {
  const { memory, allocation, partition, media } = await setup();
  const dram = media[0]!;
  const session = memory.open('srv-a');
  const regions = [];
  for (let i = 0; i < 3; i++) regions.push(await memory.bind(session, E, { kind: 'medium', medium: 'dram' }));
  for (const r of regions) await memory.write(r, 0, Buffer.alloc(E, 0xaa));
  const failing = regions[0]!.ranges[0]!.start;
  dram.failZeroAt.add(failing);
  assert.deepEqual(await memory.end(session), { regions: 3, keptAsideBytes: E });
  assert.equal(memory.regionCount(), 0);
  assert.deepEqual(allocation.rows(), [], 'no region is left in the allocation table');
  assert.deepEqual(memory.keptAside().map((k) => [k.serverId, k.medium, k.start, k.length]), [['srv-a', 'dram', failing, E]]);
  assert.match(memory.keptAside()[0]!.error, /injected/);
  // Only the extent with the unzeroed pages stays held, by srv-a; the others went back.
  assert.deepEqual(partition.rows().filter((r) => r.owner !== null).map((r) => [r.owner, r.start]), [['srv-a', failing]]);
  // Nobody gets those pages meanwhile: not a new session of srv-a, not another server.
  const next = memory.open('srv-a');
  const other = memory.open('srv-b');
  const taken = [
    await memory.bind(next, E, { kind: 'medium', medium: 'dram' }),
    await memory.bind(other, E, { kind: 'medium', medium: 'dram' }),
    await memory.bind(other, PAGE_SIZE, { kind: 'medium', medium: 'dram' }),
  ];
  for (const r of taken) for (const range of r.ranges) assert.ok(range.medium !== 'dram' || range.start + range.length <= failing || range.start >= failing + E, 'kept-aside pages are handed out');
  // The medium recovers: the next release zeroes them and gives them back.
  dram.failZeroAt.clear();
  await memory.end(other);
  assert.deepEqual(memory.keptAside(), []);
  const back = Buffer.alloc(E);
  await dram.read(failing, back);
  assert.ok(back.every((b) => b === 0), 'zeroed before anyone can have them');
  await memory.end(next);
  assert.deepEqual(partition.rows().filter((r) => r.owner !== null), [], 'every extent went back');
});

test('a FREE whose zeroing fails rejects, but the region is gone and its pages are kept aside', async () => {
  const { memory, allocation, media, tenant } = await setup();
  const region = await memory.bind(tenant('srv-a'), 2 * PAGE_SIZE, { kind: 'medium', medium: 'dram' });
  media[0]!.failZeroAt.add(region.ranges[0]!.start);
  await assert.rejects(memory.free(tenant('srv-a'), region.id, region.key), { code: 'MS_MEDIUM_IO' });
  assert.throws(() => memory.lookup(tenant('srv-a'), region.id, region.key), { code: 'MS_RMEM_VIOLATION' });
  assert.deepEqual(allocation.rows(), []);
  assert.deepEqual(memory.keptAside().map((k) => [k.start, k.length]), [[region.ranges[0]!.start, 2 * PAGE_SIZE]]);
  const again = await memory.bind(tenant('srv-a'), 2 * PAGE_SIZE, { kind: 'medium', medium: 'dram' });
  assert.notEqual(again.ranges[0]!.start, region.ranges[0]!.start, 'the kept-aside pages are not handed out again');
});

/** Binds `pages` one-page regions on DRAM and frees every other one: a holding of one-page holes. */
async function fragment(memory: ServerMemory, session: Tenancy, pages: number): Promise<void> {
  const small = [];
  for (let i = 0; i < pages; i++) small.push(await memory.bind(session, PAGE_SIZE, { kind: 'medium', medium: 'dram' }));
  for (let i = 0; i < pages; i += 2) await memory.free(session, small[i]!.id, small[i]!.key);
}

test('a bind free memory can satisfy only in more than maxRanges ranges fails with NO_CAPACITY before anything is bound; with fewer pieces it binds', async () => {
  const { memory, allocation } = await setup({ maxRanges: 8 });
  const session = memory.open('srv-a');
  // Two whole extents of one-page regions, every other one freed: 16 one-page holes and nothing else free.
  await fragment(memory, session, 2 * (E / PAGE_SIZE));
  const rows = allocation.rows().length;
  await assert.rejects(memory.bind(session, 16 * PAGE_SIZE, { kind: 'medium', medium: 'dram' }), { code: 'MS_RMEM_NO_CAPACITY', message: /at most 8 ranges/ });
  assert.equal(allocation.rows().length, rows, 'nothing was bound');
  const eight = await memory.bind(session, 8 * PAGE_SIZE, { kind: 'medium', medium: 'dram' });
  assert.equal(eight.ranges.length, 8);
  // Past the holes a new extent is taken: its one range and the holes that remain make 9 pages in 2 ranges.
  const more = await memory.bind(session, (E / PAGE_SIZE + 1) * PAGE_SIZE, { kind: 'medium', medium: 'dram' });
  assert.equal(more.ranges.length, 2);
});

test('a read or write finds its range by binary search: a byte at the end of a region of many ranges looks at a few of them, not all', async () => {
  const { memory } = await setup();
  const session = memory.open('srv-a');
  await fragment(memory, session, 4 * (E / PAGE_SIZE));
  const region = await memory.bind(session, 2 * E, { kind: 'medium', medium: 'dram' });
  assert.equal(region.ranges.length, 2 * (E / PAGE_SIZE));
  await memory.write(region, region.size - 1, Buffer.from([7]));
  let looked = 0;
  const count = <T,>(target: readonly T[]): readonly T[] =>
    new Proxy(target, {
      get(t, key, receiver) {
        if (typeof key === 'string' && /^\d+$/.test(key)) looked++;
        return Reflect.get(t, key, receiver) as unknown;
      },
    });
  Object.defineProperty(region, 'ranges', { value: count(region.ranges) });
  Object.defineProperty(region, 'offsets', { value: count(region.offsets) });
  const byte = Buffer.alloc(1);
  await memory.read(region, region.size - 1, byte);
  assert.equal(byte[0], 7);
  assert.ok(looked <= 16, `${looked} ranges and offsets looked at for one byte of a region of ${region.ranges.length} ranges`);
});

test('readNow reads what read reads, across the ranges of a fragmented region, and checks bounds the same way', async () => {
  const { memory } = await setup();
  const session = memory.open('srv-a');
  await fragment(memory, session, 4 * (E / PAGE_SIZE));
  const region = await memory.bind(session, E, { kind: 'medium', medium: 'dram' });
  assert.ok(region.ranges.length > 1);
  const data = Buffer.alloc(region.size);
  for (let i = 0; i < data.length; i++) data[i] = (i * 31 + 7) & 0xff;
  await memory.write(region, 0, data);
  for (const [offset, length] of [[0, 1], [PAGE_SIZE - 3, 9], [100, 3 * PAGE_SIZE + 5], [0, region.size]] as const) {
    const slow = Buffer.alloc(length);
    const fast = Buffer.alloc(length);
    await memory.read(region, offset, slow);
    assert.equal(memory.readNow(region, offset, fast), true);
    assert.ok(fast.equals(slow) && fast.equals(data.subarray(offset, offset + length)), `offset ${offset} length ${length}`);
  }
  assert.throws(() => memory.readNow(region, region.size - 1, Buffer.alloc(2)), { code: 'MS_RMEM_RANGE' });
});
