// The page cache when a tier refuses a write-back that is not a node loss (the swap
// volume's I/O error, a dropped NBD connection): the failure stays with the page, which
// stays dirty and is reported by flush(); requests on other segments, on other tiers, go
// on. The last test lets fast-check's scheduler interleave requests on a healthy node
// with failing write-backs to the swap volume.

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { HierarchyMemory } from '../../../src/host/hierarchy-memory.js';
import { BufferStore, RangeTier, type RangeStore } from '../../../src/host/tiers.js';
import { FakeNode } from '../../support/host-fakes.js';
import { IoGate } from '../../../src/host/io-gate.js';
import { PageCache, type PageSource } from '../../../src/host/page-cache.js';
import { NetworkError, type MemstrataError } from '../../../src/errors.js';

const PAGE = 4096;
const MiB = 1024 * 1024;

/** The swap volume in memory; its writes fail while `broken` is set. */
class BreakableStore implements RangeStore {
  readonly bytes: Buffer;
  broken = false;
  writes = 0;

  constructor(size: number) {
    this.bytes = Buffer.alloc(size);
  }

  async read(at: number, target: Buffer): Promise<void> {
    this.bytes.copy(target, 0, at, at + target.length);
  }

  async write(at: number, data: Buffer): Promise<void> {
    this.writes++;
    if (this.broken) throw new Error('swap volume: injected EIO');
    data.copy(this.bytes, at);
  }

  async zero(at: number, length: number): Promise<void> {
    this.bytes.fill(0, at, at + length);
  }
}

/** BreakableStore whose calls take effect when fast-check's scheduler lets them. */
class ScheduledBreakableStore extends BreakableStore {
  constructor(
    private readonly s: fc.Scheduler,
    size: number,
  ) {
    super(size);
  }

  override async read(at: number, target: Buffer): Promise<void> {
    await this.s.schedule(Promise.resolve(), `swap read ${at}`);
    return super.read(at, target);
  }

  override async write(at: number, data: Buffer): Promise<void> {
    const copy = Buffer.from(data);
    await this.s.schedule(Promise.resolve(), `swap write ${at}`);
    return super.write(at, copy);
  }
}

async function setup(cachePages: number) {
  const swap = new BreakableStore(16 * PAGE);
  const node = new FakeNode(MiB);
  const memory = HierarchyMemory.assemble({
    serverId: 'unit',
    dram: new RangeTier('local', 'dram', 0, new BufferStore(0)),
    swap: new RangeTier('swap', 'volume', 16 * PAGE, swap),
    nodes: [{ name: 'a', address: 'fake-a', session: node.session(), connect: () => Promise.resolve(node.session()) }],
    pageCacheBytes: cachePages * PAGE,
  });
  await memory.refresh();
  const onSwap = await memory.alloc(PAGE, { device: 'swap' });
  const onNode = await memory.alloc(8 * PAGE, { device: 'a' });
  for (let i = 0; i < 2; i++) await onSwap.write(0, Buffer.alloc(PAGE, 0x51 + i)); // promoted on the first write (a slot was free): dirty in the cache
  assert.equal(memory.stats().cache.dirtyPages, 1);
  return { memory, swap, onSwap, onNode };
}

const page = (fill: number) => Buffer.alloc(PAGE, fill);

test('a dirty page whose write-back fails breaks no request on another segment; it stays dirty and flush() reports the failure until the tier works again', async (t) => {
  const { memory, swap, onSwap, onNode } = await setup(2);
  t.after(() => memory.close());
  swap.broken = true;
  const before = memory.stats().cache;
  // Node pages hot in turn, each touched once more than the one before it (6 + p times):
  // each is promoted once it has been touched more often lately than the page it pushes
  // out, and all but the first need a slot.
  for (let p = 0; p < 8; p++) {
    await onNode.write(p * PAGE, page(0x10 + p));
    for (let touch = 0; touch < 5 + p; touch++) assert.ok((await onNode.read(p * PAGE, PAGE)).equals(page(0x10 + p)), `node page ${p}`);
  }
  const after = memory.stats().cache;
  assert.equal(after.promotions - before.promotions, 8, 'the node segment still gets a slot of the cache');
  assert.equal(after.demotions - before.demotions, 7);
  assert.equal(after.failedWriteBacks, 1, 'the failed page is passed over while there is another victim');
  assert.equal(after.dirtyPages, 1);
  assert.ok((await onSwap.read(0, PAGE)).equals(page(0x52)), 'the swap page is still served, from the cache');
  assert.ok(swap.bytes.subarray(0, PAGE).equals(page(0)), 'it never reached the swap volume');

  await assert.rejects(memory.flush(), /swap volume: injected EIO/);
  await assert.rejects(memory.flush(), /swap volume: injected EIO/, 'a later flush does not pretend');
  swap.broken = false;
  await memory.flush();
  assert.ok(swap.bytes.subarray(0, PAGE).equals(page(0x52)), 'the flush wrote it back');
  assert.equal(memory.stats().cache.dirtyPages, 0);
  assert.equal((await onNode.read(0, 1))[0], 0x10);
});

test('with every slot held by a failed page, requests are served from their tier directly, and a later demotion writes the page back once the tier works', async (t) => {
  const { memory, swap, onSwap, onNode } = await setup(1);
  t.after(() => memory.close());
  swap.broken = true;
  // Each node page is touched three times, more often lately than the swap page (twice):
  // the third touch would promote it.
  for (let p = 0; p < 4; p++) {
    await onNode.write(p * PAGE, page(0x20 + p));
    for (let touch = 0; touch < 2; touch++) assert.ok((await onNode.read(p * PAGE, PAGE)).equals(page(0x20 + p)), `node page ${p}`);
  }
  const stats = memory.stats().cache;
  assert.equal(stats.cachedPages, 1);
  assert.equal(stats.dirtyPages, 1, 'the failed page is kept, dirty');
  assert.equal(stats.failedWriteBacks, 4, 'each promotion tried it once, then served its page directly');
  assert.ok((await onSwap.read(0, PAGE)).equals(page(0x52)));

  swap.broken = false;
  // The swap page has been touched three times now: the fourth touch of page 5 promotes it.
  for (let touch = 0; touch < 3; touch++) await onNode.read(5 * PAGE, PAGE);
  assert.ok(swap.bytes.subarray(0, PAGE).equals(page(0)), 'not yet');
  await onNode.read(5 * PAGE, PAGE); // promoted: demotes the swap page, written back this time
  assert.ok(swap.bytes.subarray(0, PAGE).equals(page(0x52)));
  assert.equal(memory.stats().cache.dirtyPages, 0);
  await memory.flush();
});

type Op = { kind: 'write' | 'read'; seg: 'node' | 'swap'; page: number } | { kind: 'flush' } | { kind: 'break' };

test('under any interleaving of failing swap write-backs with requests: no request on the node segment fails, and after the swap heals a flush writes back every acknowledged write (fc.scheduler)', async () => {
  const op: fc.Arbitrary<Op> = fc.oneof(
    fc.record({ kind: fc.constantFrom('write' as const, 'read' as const), seg: fc.constantFrom('node' as const, 'swap' as const), page: fc.nat(3) }),
    fc.record({ kind: fc.constant('flush' as const) }),
  );
  await fc.assert(
    fc.asyncProperty(fc.scheduler(), fc.array(op, { minLength: 4, maxLength: 24 }), fc.nat(24), async (s, ops, at) => {
      // From the 'break' on, every write to the swap volume fails, write-backs included, until it heals at the end.
      const program: Op[] = [...ops.slice(0, at), { kind: 'break' }, ...ops.slice(at)];
      const swap = new ScheduledBreakableStore(s, 4 * PAGE);
      const node = new FakeNode(MiB, s);
      const memory = HierarchyMemory.assemble({
        serverId: 'unit',
        dram: new RangeTier('local', 'dram', 0, new BufferStore(0)),
        swap: new RangeTier('swap', 'volume', 4 * PAGE, swap),
        nodes: [{ name: 'a', address: 'fake-a', session: node.session(), connect: () => Promise.resolve(node.session()) }],
        pageCacheBytes: 2 * PAGE,
      });
      await s.waitFor(memory.refresh());
      const segs = { node: await s.waitFor(memory.alloc(4 * PAGE, { device: 'a' })), swap: await s.waitFor(memory.alloc(4 * PAGE, { device: 'swap' })) };
      // A page is always written with the same bytes, unique to it, so what it may hold is known.
      const value = (seg: 'node' | 'swap', p: number) => (seg === 'node' ? 0x10 : 0x20) + p;
      const acked = new Set<string>();
      const problems: string[] = [];
      const tasks = program.map((o) =>
        s.schedule(Promise.resolve(), JSON.stringify(o)).then(async () => {
          if (o.kind === 'break') {
            swap.broken = true;
            return;
          }
          if (o.kind === 'flush') {
            await memory.flush().catch((error: unknown) => {
              if (!String(error).includes('injected EIO')) problems.push(`flush: ${String(error)}`);
            });
            return;
          }
          const key = `${o.seg}:${o.page}`;
          const fail = (error: unknown) => {
            // Only a request on the swap segment may fail, and only with the swap's own error.
            if (o.seg === 'node' || !String(error).includes('injected EIO')) problems.push(`${o.kind} ${key}: ${String(error)}`);
          };
          const seg = segs[o.seg];
          if (o.kind === 'write') {
            await seg.write(o.page * PAGE, page(value(o.seg, o.page))).then(() => void acked.add(key), fail);
            return;
          }
          await seg.read(o.page * PAGE, PAGE).then((got) => {
            if (!got.equals(page(0)) && !got.equals(page(value(o.seg, o.page)))) problems.push(`read ${key} saw bytes never written there`);
          }, fail);
        }),
      );
      await s.waitFor(Promise.all(tasks));
      swap.broken = false;
      await s.waitFor(memory.flush()).catch((error: unknown) => problems.push(`flush after healing: ${String(error)}`));
      const region = [...node.regions.values()][0]!;
      for (const key of acked) {
        const [seg, p] = key.split(':') as ['node' | 'swap', string];
        const at = Number(p) * PAGE;
        const stored = seg === 'node' ? region.data.subarray(at, at + PAGE) : swap.bytes.subarray(at, at + PAGE);
        if (!stored.equals(page(value(seg, Number(p))))) problems.push(`acknowledged write ${key} is not on its tier after the flush`);
      }
      await s.waitFor(memory.close());
      assert.deepEqual(problems, []);
    }),
    { numRuns: 300 },
  );
});

/** A hierarchy whose only far tier is a fake node, with a page cache of `cachePages`. */
function onFakeNode(node: FakeNode, cachePages: number): HierarchyMemory {
  return HierarchyMemory.assemble({
    serverId: 'unit',
    dram: new RangeTier('local', 'dram', 0, new BufferStore(0)),
    nodes: [{ name: 'a', address: 'fake-a', session: node.session(), connect: () => Promise.resolve(node.session()) }],
    pageCacheBytes: cachePages * PAGE,
  });
}

/** A segment of `pages` on a fake node, behind a page cache of `cachePages`, closed after the test. */
async function segmentOnFakeNode(t: TestContext, cachePages: number, pages: number) {
  const node = new FakeNode(MiB);
  const memory = onFakeNode(node, cachePages);
  t.after(() => memory.close());
  await memory.refresh();
  return { node, memory, seg: await memory.alloc(pages * PAGE, { device: 'a' }) };
}

type PageOp = { kind: 'write'; page: number; at: number; length: number } | { kind: 'read'; page: number; at: number; length: number } | { kind: 'flush' };

test('requests take effect in the order they were made on every page they share, under any interleaving of promotions, demotions and write-backs: every read returns what a one-at-a-time run would (fc.scheduler)', async () => {
  // Within one page, or across up to three (a request that crosses pages joins all their queues at once).
  const within = fc.record({ page: fc.nat(5), at: fc.nat(PAGE - 1) }).chain(({ page: p, at }) => fc.record({ page: fc.constant(p), at: fc.constant(at), length: fc.integer({ min: 1, max: PAGE - at }) }));
  const across = fc.record({ page: fc.nat(4), at: fc.nat(PAGE - 1) }).chain(({ page: p, at }) => fc.record({ page: fc.constant(p), at: fc.constant(at), length: fc.integer({ min: PAGE - at + 1, max: Math.min(2 * PAGE + 1, (6 - p) * PAGE - at) }) }));
  const part = fc.oneof({ weight: 3, arbitrary: within }, { weight: 1, arbitrary: across });
  const op: fc.Arbitrary<PageOp> = fc.oneof(
    { weight: 4, arbitrary: part.map((x) => ({ kind: 'write' as const, ...x })) },
    { weight: 4, arbitrary: part.map((x) => ({ kind: 'read' as const, ...x })) },
    { weight: 1, arbitrary: fc.constant({ kind: 'flush' as const }) },
  );
  await fc.assert(
    fc.asyncProperty(fc.scheduler(), fc.array(op, { minLength: 4, maxLength: 30 }), async (s, ops) => {
      const node = new FakeNode(MiB, s);
      const memory = onFakeNode(node, 2);
      await s.waitFor(memory.refresh());
      const seg = await s.waitFor(memory.alloc(6 * PAGE, { device: 'a' }));
      // What a run of the requests one at a time, in the order they were made, leaves.
      const model = Buffer.alloc(6 * PAGE);
      const problems: string[] = [];
      let made = 0;
      const tasks = ops.map((o, i) =>
        s.schedule(Promise.resolve(), JSON.stringify(o)).then(async () => {
          const order = made++;
          if (o.kind === 'flush') {
            await memory.flush();
            return;
          }
          const offset = o.page * PAGE + o.at;
          if (o.kind === 'write') {
            const data = Buffer.alloc(o.length, 1 + (i % 255));
            data.copy(model, offset);
            await seg.write(offset, data);
            return;
          }
          const expected = Buffer.from(model.subarray(offset, offset + o.length));
          const got = await seg.read(offset, o.length);
          if (!got.equals(expected)) problems.push(`read #${order} from page ${o.page} at ${o.at}+${o.length} saw bytes another order would give`);
        }),
      );
      await s.waitFor(Promise.all(tasks));
      await s.waitFor(memory.flush());
      const region = [...node.regions.values()][0];
      assert.ok(region !== undefined);
      if (!region.data.subarray(0, 6 * PAGE).equals(model)) problems.push('after a flush the node does not hold what the requests left');
      const stats = memory.stats().cache;
      if (stats.cachedPages > stats.capacityPages) problems.push(`${stats.cachedPages} pages cached in ${stats.capacityPages} slots`);
      await s.waitFor(memory.close());
      assert.deepEqual(problems, []);
    }),
    { numRuns: 300 },
  );
});

test('a full cache keeps the pages accessed most often lately: a stream of pages touched once or twice never displaces a hot set', async (t) => {
  const { node, memory, seg } = await segmentOnFakeNode(t, 4, 256);
  // Four hot pages, each touched between every two pages of the stream.
  const hot = [0, 1, 2, 3];
  for (const p of hot) await seg.write(p * PAGE, page(0x40 + p)); // slots free: each cached on its first access
  assert.equal(memory.stats().cache.promotions, 4);
  for (let cold = 10; cold < 250; cold++) {
    for (const p of hot) assert.ok((await seg.read(p * PAGE, PAGE)).equals(page(0x40 + p)));
    await seg.read(cold * PAGE, PAGE);
    if (cold % 2 === 0) await seg.read(cold * PAGE, PAGE); // twice: still less than a hot page
  }
  const stats = memory.stats().cache;
  assert.equal(stats.promotions, 4, 'no page of the stream entered the cache');
  assert.equal(stats.demotions, 0);
  assert.equal(stats.hits, 240 * 4, 'every access to a hot page was a hit');
  assert.equal(node.served.get('WRITE') ?? 0, 0, 'the hot pages never left the cache, so were never written back');

  // The stream turns hot, the hot set cools: a page touched more often lately than the
  // least recently used cached page takes its place (within two agings of the counts).
  const hotter = 100;
  for (let touch = 0; touch < 128 && memory.stats().cache.promotions === 4; touch++) await seg.read(hotter * PAGE, PAGE);
  assert.equal(memory.stats().cache.promotions, 5, 'a page hotter than a cached one gets in');
  assert.equal(memory.stats().cache.demotions, 1);
  assert.equal(node.served.get('WRITE'), 1, 'the dirty page it pushed out was written back');
});

test('a promotion and the demotion that makes room for it run side by side: the fetch does not wait for the victim\'s write-back', async (t) => {
  const { node, memory, seg } = await segmentOnFakeNode(t, 1, 8);
  await seg.write(0, page(0x11)); // cached, dirty: the victim of the next promotion
  for (let touch = 0; touch < 2; touch++) await seg.read(0, PAGE); // page 0: three touches
  for (let touch = 0; touch < 3; touch++) await seg.read(PAGE, PAGE); // page 1: not more often yet
  assert.equal(memory.stats().cache.promotions, 1);
  node.stall(); // every request now waits until resume()
  const promoting = seg.read(PAGE, PAGE); // fourth touch of page 1: beats page 0, promoted
  for (let turn = 0; turn < 100 && node.holding < 2; turn++) await new Promise((resolve) => setImmediate(resolve));
  assert.equal(node.holding, 2, 'the fetch of page 1 and the write-back of page 0 are both in flight');
  node.resume();
  assert.ok((await promoting).equals(page(0)));
  const stats = memory.stats().cache;
  assert.equal(stats.promotions, 2);
  assert.equal(stats.writeBacks, 1);
  assert.equal(stats.cachedPages, 1);
  assert.ok((await seg.read(0, PAGE)).equals(page(0x11)), 'the victim reached the node');
});

/** A segment's tier in memory, for the cache alone: a BreakableStore seen as a PageSource. */
class MemorySource extends BreakableStore implements PageSource {
  readonly gate = new IoGate();

  constructor(
    readonly address: number,
    size: number,
  ) {
    super(size);
  }

  failure(): undefined {
    return undefined;
  }

  noteLost(): void {}

  readPieces(offset: number, target: Buffer): Promise<void> {
    return this.read(offset, target);
  }

  writePieces(offset: number, data: Buffer): Promise<void> {
    return this.write(offset, data);
  }
}

test('a one-pass scan of 30,000 pages over a full 1,024-page cache promotes none of them: the hot pages stay, dirty, with no write-back', async () => {
  const capacity = 1024;
  const cache = new PageCache(capacity * PAGE);
  const source = new MemorySource(1 << 30, 40_000 * PAGE);
  const buf = Buffer.alloc(PAGE);
  for (let p = 0; p < capacity; p++) {
    await cache.write(source, p * PAGE, page(p % 251));
    for (let touch = 0; touch < 2; touch++) await cache.read(source, p * PAGE, buf);
  }
  const before = cache.stats();
  assert.equal(before.cachedPages, capacity);
  let hot = 0;
  for (let scanned = 0; scanned < 30_000; scanned++) {
    await cache.read(source, (10_000 + scanned) * PAGE, buf);
    for (let k = 0; k < 4; k++) await cache.read(source, (hot++ % capacity) * PAGE, buf);
  }
  const after = cache.stats();
  assert.equal(after.promotions - before.promotions, 0, 'pages of the scan entered the cache');
  assert.equal(after.demotions, 0);
  assert.equal(source.writes, 0, 'no hot page was written back');
  assert.equal(after.hits - before.hits, 4 * 30_000, 'every access to a hot page hit');
});

test('with every cached page failing its write-back, a request costs at most one more failed write-back, not one per cached page', async () => {
  const capacity = 64;
  const cache = new PageCache(capacity * PAGE);
  const broken = new MemorySource(1 << 30, capacity * PAGE);
  const healthy = new MemorySource(1 << 31, 16 * PAGE);
  const buf = Buffer.alloc(PAGE);
  for (let p = 0; p < capacity; p++) for (let touch = 0; touch < 3; touch++) await cache.write(broken, p * PAGE, page(p));
  broken.broken = true;
  // A hot page on the healthy source: every promotion it tries needs a victim.
  for (let touch = 0; touch < 12; touch++) {
    const writesBefore = broken.writes;
    await cache.read(healthy, 0, buf);
    assert.ok(broken.writes - writesBefore <= 1, `touch ${touch}: ${broken.writes - writesBefore} failed write-backs for one request`);
  }
  assert.ok(cache.stats().failedWriteBacks >= 1);
  assert.equal(cache.stats().dirtyPages, capacity, 'every failed page stays, dirty');
  broken.broken = false;
  await cache.flush();
  for (let p = 0; p < capacity; p++) assert.ok(broken.bytes.subarray(p * PAGE, (p + 1) * PAGE).equals(page(p)));
});

test('a page whose write-back failed during a blip of its tier is written back by a later demotion once the tier works, without a flush', async () => {
  const capacity = 4;
  const cache = new PageCache(capacity * PAGE);
  const tier = new MemorySource(1 << 30, 512 * PAGE);
  for (let p = 0; p < capacity; p++) await cache.write(tier, p * PAGE, page(p + 1)); // four dirty pages
  tier.broken = true;
  for (let touch = 0; touch < 3; touch++) await cache.read(tier, 10 * PAGE, Buffer.alloc(1)); // page 10 hot: two promotions, each fails one write-back
  assert.equal(cache.stats().failedWriteBacks, 2);
  tier.broken = false; // the blip is over
  // Pages of the same tier turn hot one after another (each touched until it is
  // promoted), and the cache demotes more than 64 times.
  for (let round = 0; round < 80; round++) {
    const promotions = cache.stats().promotions;
    for (let touch = 0; touch < 128 && cache.stats().promotions === promotions; touch++) await cache.read(tier, (20 + round) * PAGE, Buffer.alloc(1));
  }
  assert.ok(cache.stats().demotions > 64, `demotions ${cache.stats().demotions}`);
  for (let p = 0; p < capacity; p++) assert.ok(tier.bytes.subarray(p * PAGE, (p + 1) * PAGE).equals(page(p + 1)), `page ${p} reached its tier`);
  assert.equal(cache.stats().failedWriteBacks, 2, 'tried again only once the tier worked');
});

test('readNow and writeNow serve a cached page in the caller\'s turn only while its source is servable and no request holds the page; otherwise they decline and count nothing', async () => {
  const backing = Buffer.alloc(4 * PAGE);
  let failure: MemstrataError | undefined = undefined;
  const source: PageSource = {
    address: 0x1000_0000,
    gate: new IoGate(),
    readPieces: (offset, target) => {
      backing.copy(target, 0, offset, offset + target.length);
      return Promise.resolve();
    },
    writePieces: (offset, data) => {
      data.copy(backing, offset);
      return Promise.resolve();
    },
    failure: () => failure,
    noteLost: () => undefined,
  };
  const cache = new PageCache(8 * PAGE);
  await cache.write(source, 0, Buffer.alloc(PAGE, 7)); // promoted, dirty
  const before = cache.stats();
  const out = Buffer.alloc(16);
  assert.equal(cache.readNow(source, 10, out), true);
  assert.deepEqual(out, Buffer.alloc(16, 7));
  assert.equal(cache.writeNow(source, 20, Buffer.from('xy')), true);
  assert.equal(cache.stats().hits, before.hits + 2, 'each served access is a hit');
  assert.equal(cache.readNow(source, PAGE, Buffer.alloc(16)), false, 'a page not cached: the caller takes read()');
  assert.equal(cache.readNow(source, PAGE - 8, Buffer.alloc(16)), false, 'over two pages');
  assert.equal(cache.readNow(source, 0, Buffer.alloc(0)), false, 'nothing to read');
  // A page a request holds: a write over pages 0 and 1 holds both while page 1 (not
  // cached) is fetched from a stalled tier; a write to page 0 made after it waits for the
  // lock. A read made after both must see the second write: it may not be served at once.
  let release: () => void = () => undefined;
  source.readPieces = (offset, target) => new Promise<void>((resolve) => {
    release = () => {
      backing.copy(target, 0, offset, offset + target.length);
      resolve();
    };
  });
  const crossing = cache.write(source, PAGE - 2, Buffer.from('abcd'));
  const queued = cache.write(source, 0, Buffer.from('late'));
  const seen = Buffer.alloc(4);
  assert.equal(cache.readNow(source, 0, seen), false, 'a held page: the read waits its turn behind the write made before it');
  assert.equal(cache.writeNow(source, 0, Buffer.from('jump')), false, 'a held page: so does a write');
  const read = Buffer.alloc(4);
  const reading = cache.read(source, 0, read);
  release();
  await Promise.all([crossing, queued, reading]);
  assert.equal(read.toString(), 'late', 'in the order the requests were made');
  const counted = cache.stats();
  failure = new NetworkError('MS_HOST_NODE_LOST', 'node lost');
  assert.equal(cache.readNow(source, 0, Buffer.alloc(16)), false, 'a lost source is never served at once');
  assert.equal(cache.writeNow(source, 0, Buffer.from('z')), false);
  assert.deepEqual(cache.stats(), counted, 'a declined access counts nothing');
  await assert.rejects(cache.read(source, 0, Buffer.alloc(16)), (e: MemstrataError) => e.code === 'MS_HOST_NODE_LOST');
});
