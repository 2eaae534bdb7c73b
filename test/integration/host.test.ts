// HierarchyMemory against real nodes: tier order (FIG. 16), growth before fallback
// (FIG. 14), spanning nodes, a model check of reads and writes, violations (FIG. 17),
// and the loss of a node.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import fc from 'fast-check';
import { HierarchyMemory, VIRTUAL_BASE } from '../../src/host/hierarchy-memory.js';
import { startNode, tempDir, type NodeProcess } from '../support/node-process.js';

type Ctx = { after(fn: () => Promise<unknown>): void };
const KiB = 1024;
const MiB = 1024 * KiB;

/**
 * Cleanups that run last-in, first-out (t.after runs hooks in the order they were
 * added): a hierarchy is closed while its nodes still run, then the nodes stop.
 */
function stack(t: Ctx): (fn: () => Promise<unknown>) => void {
  const fns: (() => Promise<unknown>)[] = [];
  t.after(async () => {
    for (const fn of fns.reverse()) await fn().catch(() => undefined);
  });
  return (fn) => fns.push(fn);
}

async function node(t: Ctx, later: (fn: () => Promise<unknown>) => void, args: string[] = []): Promise<NodeProcess> {
  const n = await startNode({ cwd: await tempDir(t), args });
  later(() => n.stop('SIGKILL'));
  return n;
}

/**
 * A hierarchy over every tier: local DRAM (`localDram`, `pageCache` of it for the page
 * cache), a 64 KiB local flash file, a node's memory (`n1`) and that node's default volume
 * as swap; closed before the node stops.
 */
async function everyTier(t: Ctx, serverId: string, localDram: number, pageCache: number): Promise<HierarchyMemory> {
  const later = stack(t);
  const n = await node(t, later);
  const dir = await tempDir(t);
  const memory = await HierarchyMemory.open({
    serverId,
    localDram,
    pageCache,
    localFlash: { path: join(dir, 'flash.bin'), size: 64 * KiB },
    nodes: [{ name: 'n1', host: n.rmem.host, port: n.rmem.port }],
    swap: `nbd://${n.nbd.host}:${n.nbd.port}/default`,
  });
  later(() => memory.close());
  return memory;
}

const hexOf = (address: number): string => `0x${address.toString(16)}`;

const placeOf = (m: HierarchyMemory, address: number) =>
  [...new Set(m.mapping().filter((r) => r.virtualStart >= address && r.virtualStart < address + 1).map((r) => `${r.device}/${r.medium}`))].join(',');

test('alloc follows FIG. 16 for each class, asks a node to grow before falling back, and ends in the swap volume', async (t) => {
  const later = stack(t);
  const n = await node(t, later);
  const dir = await tempDir(t);
  const memory = await HierarchyMemory.open({
    serverId: 'host-a',
    localDram: 64 * KiB,
    pageCache: 0,
    localFlash: { path: join(dir, 'flash.bin'), size: 128 * KiB },
    nodes: [{ name: 'n1', host: n.rmem.host, port: n.rmem.port }],
    swap: `nbd://${n.nbd.host}:${n.nbd.port}/default`,
  });
  later(() => memory.close());
  const where = async (size: number, options: Parameters<HierarchyMemory['alloc']>[1]) => {
    const s = await memory.alloc(size, options);
    return placeOf(memory, s.address);
  };
  assert.equal(await where(16 * KiB, { class: 'highest' }), 'local/dram');
  assert.equal(await where(60 * KiB, { class: 'highest' }), 'local/flash', 'local DRAM has 48 KiB left: the next tier');
  assert.equal(await where(16 * KiB, { class: 'standard' }), 'local/flash', 'standard never takes local DRAM');
  assert.equal(await where(64 * KiB, { class: 'standard' }), 'n1/dram', 'local flash is full for it: remote DRAM');
  assert.equal(await where(64 * KiB, { class: 'capacity' }), 'n1/flash', 'capacity prefers remote flash');
  assert.equal(await where(4 * KiB, { class: 'capacity', device: 'local' }), 'local/flash');
  assert.equal(await where(4 * KiB, { medium: 'volume' }), 'swap/volume');
  assert.equal(await where(4 * KiB, { class: 'highest', device: 'n1' }), 'n1/dram');

  // The node's server partition holds 16 MiB of DRAM; 24 MiB more is there only if it grows.
  const before = memory.discovery().find((r) => r.device === 'n1' && r.medium === 'dram');
  assert.ok(before !== undefined && before.offered > 24 * MiB);
  const big = await memory.alloc(24 * MiB, { class: 'standard', medium: 'dram' });
  assert.equal(placeOf(memory, big.address), 'n1/dram', 'the node grew its server partition for the bind');
  const partition = (await (await fetch(`${n.url}/v1/tables/partition`)).json()) as { rows: { medium: string; kind: string; length: number }[] };
  const serverDram = partition.rows.filter((r) => r.medium === 'dram' && r.kind === 'server').reduce((s, r) => s + r.length, 0);
  assert.ok(serverDram > 16 * MiB, `server partition on dram is now ${serverDram}`);

  // More than every tier holds: a coded error, and no table changed.
  const rowsBefore = memory.mapping().length;
  await assert.rejects(memory.alloc(2048 * MiB), { code: 'MS_HOST_NO_CAPACITY' });
  assert.equal(memory.mapping().length, rowsBefore);
  await assert.rejects(memory.alloc(4096, { device: 'elsewhere' }), { code: 'MS_HOST_INVALID' });
  await assert.rejects(memory.alloc(0), { code: 'MS_HOST_INVALID' });

  assert.match(memory.formatDiscovery(), /DEVICE +MEDIUM +OFFERED +ASSIGNED +STATE\nlocal +dram/);
  assert.match(memory.formatMapping(), /VIRTUAL ADDRESS +DEVICE +MEDIUM +PHYSICAL ADDRESS\n0x10000000 to 0x10003fff +local +dram +0x00000000 to 0x00003fff/);
});

test('an allocation larger than any one node spans nodes, and reads back what was written', async (t) => {
  const bounded = ['--set', 'partition.dram.server.max=16MiB'];
  const later = stack(t);
  const [a, b] = [await node(t, later, bounded), await node(t, later, bounded)];
  const memory = await HierarchyMemory.open({ serverId: 'host-b', localDram: 0, nodes: [{ name: 'a', host: a.rmem.host, port: a.rmem.port }, { name: 'b', host: b.rmem.host, port: b.rmem.port }] });
  later(() => memory.close());
  const segment = await memory.alloc(24 * MiB, { medium: 'dram' });
  const devices = new Set(segment.mapping().map((r) => r.device));
  assert.deepEqual([...devices].sort(), ['a', 'b']);
  const data = Buffer.alloc(24 * MiB);
  for (let i = 0; i < data.length; i += 4096) data.writeUInt32BE(i, i);
  await segment.write(0, data);
  assert.ok((await segment.read(0, data.length)).equals(data));
  // A write across the seam between the two nodes.
  const seam = segment.pieces[0]!.length;
  await segment.write(seam - 3, Buffer.from('across'));
  assert.equal((await segment.read(seam - 3, 6)).toString(), 'across');
});

test('reads and writes at virtual addresses match a buffer model across segments and tiers', async (t) => {
  const memory = await everyTier(t, 'host-c', 64 * KiB, 16 * KiB);
  const model = new Map<number, Buffer>(); // segment address -> contents
  const op = fc.oneof(
    fc.record({ kind: fc.constant('alloc' as const), size: fc.integer({ min: 1, max: 40 * KiB }), cls: fc.constantFrom('highest', 'standard', 'capacity' as const), medium: fc.constantFrom(undefined, 'volume' as const) }),
    fc.record({ kind: fc.constant('write' as const), pick: fc.nat(), at: fc.nat(), length: fc.integer({ min: 1, max: 20 * KiB }), seed: fc.nat(255) }),
    fc.record({ kind: fc.constant('read' as const), pick: fc.nat(), at: fc.nat(), length: fc.integer({ min: 1, max: 20 * KiB }), into: fc.boolean() }),
    fc.record({ kind: fc.constant('free' as const), pick: fc.nat() }),
  );
  // Virtual memory as the model sees it: contiguous runs of live segments.
  const flat = (address: number, length: number): Buffer | undefined => {
    const out = Buffer.alloc(length);
    let at = address;
    while (at < address + length) {
      const entry = [...model.entries()].find(([start, buf]) => at >= start && at < start + buf.length);
      if (entry === undefined) return undefined;
      const [start, buf] = entry;
      const n = Math.min(start + buf.length - at, address + length - at);
      buf.copy(out, at - address, at - start, at - start + n);
      at += n;
    }
    return out;
  };
  await fc.assert(
    fc.asyncProperty(fc.array(op, { minLength: 10, maxLength: 40 }), async (ops) => {
      for (const o of ops) {
        const live = [...model.keys()].sort((x, y) => x - y);
        if (o.kind === 'alloc') {
          const segment = await memory.alloc(o.size, { class: o.cls, ...(o.medium === undefined ? {} : { medium: o.medium }) }).catch((e: unknown) => {
            if ((e as { code?: string }).code === 'MS_HOST_NO_CAPACITY') return undefined;
            throw e;
          });
          if (segment !== undefined) model.set(segment.address, Buffer.alloc(segment.size));
          continue;
        }
        if (live.length === 0) continue;
        const start = live[o.pick % live.length]!;
        if (o.kind === 'free') {
          await memory.free(start);
          model.delete(start);
          continue;
        }
        // Start inside one segment; the range may run on into the next one if they touch.
        const address = start + (o.at % model.get(start)!.length);
        const expected = flat(address, o.length);
        if (o.kind === 'write') {
          const data = Buffer.alloc(o.length, o.seed);
          if (expected === undefined) {
            await assert.rejects(memory.write(address, data), { code: 'MS_HOST_VIOLATION' });
            continue;
          }
          await memory.write(address, data);
          let at = address;
          while (at < address + o.length) {
            const [s, buf] = [...model.entries()].find(([st, b]) => at >= st && at < st + b.length)!;
            const k = Math.min(s + buf.length - at, address + o.length - at);
            buf.fill(o.seed, at - s, at - s + k);
            at += k;
          }
        } else if (o.into) {
          // Into a window of a larger buffer: every byte of the window filled, none around it touched.
          const frame = Buffer.alloc(o.length + 32, 0xee);
          const window = frame.subarray(16, 16 + o.length);
          if (expected === undefined) {
            await assert.rejects(memory.readInto(address, window), { code: 'MS_HOST_VIOLATION' });
            assert.ok(frame.every((b) => b === 0xee), 'a refused readInto writes nothing');
          } else {
            await memory.readInto(address, window);
            assert.ok(window.equals(expected), `readInto at 0x${address.toString(16)} for ${o.length}`);
            assert.ok(frame.subarray(0, 16).every((b) => b === 0xee) && frame.subarray(16 + o.length).every((b) => b === 0xee), 'readInto writes only its target');
          }
        } else if (expected === undefined) {
          await assert.rejects(memory.read(address, o.length), { code: 'MS_HOST_VIOLATION' });
        } else {
          assert.ok((await memory.read(address, o.length)).equals(expected), `read at 0x${address.toString(16)} for ${o.length}`);
        }
      }
    }),
    { numRuns: 12 },
  );
  assert.ok(memory.mapping().every((r) => r.virtualStart >= VIRTUAL_BASE));
  // A random program may free its far pages before any is demoted (free drops them, which
  // is no demotion): a fixed tail makes sure every cache path ran, against the same model.
  const far = await memory.alloc(8 * 4096, { medium: 'volume' });
  for (let i = 0; i < 8; i++) {
    for (let k = 0; k < 2; k++) await far.write(i * 4096, Buffer.alloc(4096, 0x40 + i)); // cold, then promoted: 8 pages through a 4-page cache
    assert.ok((await far.read(i * 4096, 4096)).equals(Buffer.alloc(4096, 0x40 + i)));
  }
  // Once the cache is full a page enters only if accessed more often lately than the one
  // it would push out (TinyLFU), and the random program may have left pages that were
  // accessed more than twice: the last page is written until it beats them (the sketch
  // halves its counts every 64 records, so within a few dozen writes).
  for (let k = 0; k < 256 && memory.stats().cache.demotions === 0; k++) await far.write(7 * 4096, Buffer.alloc(4096, 0x47));
  for (let i = 0; i < 8; i++) assert.ok((await far.read(i * 4096, 4096)).equals(Buffer.alloc(4096, 0x40 + i)), `page ${i} after demotion`);
  const { cache } = memory.stats();
  assert.ok(cache.promotions > 0 && cache.demotions > 0 && cache.hits > 0, `the page cache was exercised: ${JSON.stringify(cache)}`);
});

test('readInto fills exactly its target from every tier and from the page cache', async (t) => {
  const memory = await everyTier(t, 'host-into', 16 * KiB, 8 * KiB);
  // Allocated back to back, so each segment touches the next: a range may cross tiers.
  const segments = [
    { where: 'local/dram', seg: await memory.alloc(8 * KiB, { class: 'highest' }) },
    { where: 'local/flash', seg: await memory.alloc(16 * KiB, { medium: 'flash', device: 'local' }) },
    { where: 'n1/dram', seg: await memory.alloc(16 * KiB, { medium: 'dram', device: 'n1' }) },
    { where: 'swap/volume', seg: await memory.alloc(16 * KiB, { medium: 'volume' }) },
  ];
  const start = segments[0]!.seg.address;
  const total = segments.reduce((sum, { seg }) => sum + seg.size, 0);
  const model = Buffer.alloc(total);
  for (let i = 0; i < total; i++) model[i] = (i * 7 + (i >> 12)) & 0xff;
  for (const { where, seg } of segments) {
    assert.equal(placeOf(memory, seg.address), where, `the segment is where the test needs it`);
    await seg.write(0, model.subarray(seg.address - start, seg.address - start + seg.size));
  }
  assert.equal(segments.at(-1)!.seg.address + segments.at(-1)!.seg.size - start, total, 'the segments touch');
  const check = async (address: number, length: number, what: string): Promise<void> => {
    const frame = Buffer.alloc(length + 24, 0xee);
    const window = frame.subarray(11, 11 + length); // an odd offset in its ArrayBuffer
    await memory.readInto(address, window);
    assert.ok(window.equals(model.subarray(address - start, address - start + length)), `${what}: the bytes`);
    assert.ok(frame.subarray(0, 11).every((b) => b === 0xee) && frame.subarray(11 + length).every((b) => b === 0xee), `${what}: nothing around the target`);
  };
  for (const { where, seg } of segments) {
    await check(seg.address, seg.size, `${where}, whole`);
    await check(seg.address + 4093, 6001, `${where}, across pages`);
    await check(seg.address + seg.size - 3, 3, `${where}, its last bytes`);
  }
  // Across every boundary between tiers, and the whole range at once.
  for (const { seg } of segments.slice(1)) await check(seg.address - 5000, 9000, `across ${hexOf(seg.address)}`);
  await check(start, total, 'every tier in one read');
  // A page of node memory read twice: the second time a page cache hit, answered at once.
  const far = segments[2]!.seg;
  const hitsBefore = memory.stats().cache.hits;
  await check(far.address + 8 * KiB + 100, 900, 'a far page');
  await check(far.address + 8 * KiB + 1000, 2000, 'the same far page, cached');
  assert.ok(memory.stats().cache.hits > hitsBefore, 'the page cache answered');
  // Segment.readInto is relative to the segment.
  const own = Buffer.alloc(100);
  await far.readInto(50, own);
  assert.ok(own.equals(model.subarray(far.address - start + 50, far.address - start + 150)));
  // Refused: a segment being freed (free() unlinks it at once, so it is no longer
  // allocated), an address past the last segment. The target stays as it was.
  const frame = Buffer.alloc(64, 0xee);
  const freeing = segments[1]!.seg.free();
  await assert.rejects(memory.readInto(segments[1]!.seg.address, frame), { code: 'MS_HOST_VIOLATION' });
  await freeing;
  await assert.rejects(memory.readInto(start + total, frame), { code: 'MS_HOST_VIOLATION' });
  assert.ok(frame.every((b) => b === 0xee), 'a refused readInto writes nothing');
});

test('free violations: unknown address, double free, use after free, and access past a segment', async (t) => {
  const memory = await HierarchyMemory.open({ serverId: 'host-d', localDram: 64 * KiB });
  t.after(() => memory.close());
  const a = await memory.alloc(8 * KiB, { class: 'highest' });
  const b = await memory.alloc(8 * KiB, { class: 'highest' });
  await a.write(0, Buffer.from('live'));
  await assert.rejects(memory.free(a.address + 4096), { code: 'MS_HOST_VIOLATION' });
  await assert.rejects(memory.free(0xdead000), { code: 'MS_HOST_VIOLATION' });
  await a.free();
  await assert.rejects(a.free(), { code: 'MS_HOST_VIOLATION' });
  await assert.rejects(a.read(0, 4), { code: 'MS_HOST_VIOLATION' });
  await assert.rejects(memory.write(a.address, Buffer.from('x')), { code: 'MS_HOST_VIOLATION' });
  await assert.rejects(b.read(8 * KiB - 2, 4), { code: 'MS_HOST_VIOLATION' });
  await assert.rejects(memory.read(b.address + 8 * KiB - 2, 4), { code: 'MS_HOST_VIOLATION' }, 'nothing is mapped after b');
  // Freed memory is zeroed before it is handed out again.
  const c = await memory.alloc(8 * KiB, { class: 'highest' });
  assert.ok((await c.read(0, 8 * KiB)).every((x) => x === 0));
  assert.notEqual(c.address, a.address, 'virtual addresses are not reused');
});

test('node loss: operations on its segments fail naming it, the rest keep working, discovery shows it lost', async (t) => {
  const later = stack(t);
  const [a, b] = [await node(t, later), await node(t, later)];
  // A killed node's connection is down: it is lost once the grace period is over.
  const memory = await HierarchyMemory.open({ serverId: 'host-e', localDram: 0, timeoutMs: 1000, nodeLoss: { graceMs: 300 }, nodes: [{ name: 'a', host: a.rmem.host, port: a.rmem.port }, { name: 'b', host: b.rmem.host, port: b.rmem.port }] });
  later(() => memory.close());
  const onA = await memory.alloc(64 * KiB, { device: 'a' });
  const onB = await memory.alloc(64 * KiB, { device: 'b' });
  await onA.write(0, Buffer.from('on a'));
  await onB.write(0, Buffer.from('on b'));
  await a.stop('SIGKILL');
  await assert.rejects(onA.read(0, 4), (error: Error & { code?: string }) => {
    assert.equal(error.code, 'MS_HOST_NODE_LOST');
    assert.match(error.message, /node a \(/);
    return true;
  });
  assert.equal((await onB.read(0, 4)).toString(), 'on b');
  const rows = memory.discovery().filter((r) => r.device === 'a');
  assert.ok(rows.length > 0 && rows.every((r) => r.state === 'lost' && r.offered === 0));
  const next = await memory.alloc(64 * KiB);
  assert.equal(next.mapping()[0]?.device, 'b', 'new allocations go to the nodes that answer');
  await onA.free(); // the node frees it itself after the lease; the host forgets it
  assert.match(memory.formatDiscovery(), /\na +dram .* lost/);
});

test('a swap volume whose node dies fails no request on another node: its dirty page stays in the cache, and flush() reports it', async (t) => {
  const later = stack(t);
  const [swapNode, b] = [await node(t, later), await node(t, later)];
  const memory = await HierarchyMemory.open({
    serverId: 'host-g',
    localDram: 16 * KiB,
    pageCache: 16 * KiB,
    nodes: [{ name: 'b', host: b.rmem.host, port: b.rmem.port }],
    swap: `nbd://${swapNode.nbd.host}:${swapNode.nbd.port}/default`,
  });
  later(() => memory.close());
  const onSwap = await memory.alloc(4 * KiB, { device: 'swap' });
  const onB = await memory.alloc(64 * KiB, { device: 'b' });
  for (let i = 0; i < 2; i++) await onSwap.write(0, Buffer.alloc(4 * KiB, 0x51 + i)); // promoted: dirty in the cache
  assert.equal(memory.stats().cache.dirtyPages, 1);
  await swapNode.stop('SIGKILL');

  // Pages of b hot in turn, page p touched 2 + p times: the first three fill the free
  // slots; each later one is promoted once it has been touched more often than the page
  // it pushes out, and needs a slot. The dirty swap page (touched twice) is the least
  // recently used, so the first of those promotions tries it first.
  for (let p = 0; p < 8; p++) {
    const data = Buffer.alloc(4 * KiB, 0x10 + p);
    await onB.write(p * 4 * KiB, data);
    for (let touch = 0; touch < 1 + p; touch++) assert.ok((await onB.read(p * 4 * KiB, 4 * KiB)).equals(data), `page ${p} of the segment on b`);
  }
  const cache = memory.stats().cache;
  assert.equal(cache.failedWriteBacks, 1, 'the swap page was tried, then passed over');
  assert.equal(cache.promotions, 1 + 8, 'the segment on b still gets slots of the cache');
  assert.equal(cache.dirtyPages, 1, 'the swap page stays dirty (the last pages of b were promoted clean, by a read)');
  assert.ok((await onSwap.read(0, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 0x52)), 'still served from the cache');
  await assert.rejects(memory.flush(), (error: Error & { code?: string }) => {
    assert.match(error.code ?? '', /^MS_NBD_/, String(error));
    return true;
  });
  assert.equal(memory.discovery().find((r) => r.device === 'b')?.state, 'ok');
  assert.ok((await onB.read(0, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 0x10)));
});

test('the page cache takes pages while it has room, then only pages accessed more often lately than its victim; resists a scan, writes back what it demotes, and counts it all', async (t) => {
  const later = stack(t);
  const n = await node(t, later);
  const memory = await HierarchyMemory.open({ serverId: 'host-f', localDram: 32 * KiB, pageCache: 32 * KiB, nodes: [{ name: 'n1', host: n.rmem.host, port: n.rmem.port }] });
  later(() => memory.close());
  const far = await memory.alloc(1 * MiB);
  assert.equal(far.mapping()[0]?.device, 'n1');
  const page = (i: number, fill: number) => Buffer.alloc(4096, fill);
  const cache = () => memory.stats().cache;

  const writtenToNode = () => memory.stats().moved.find((m) => m.device === 'n1')?.writtenBytes ?? 0;
  const writtenBefore = writtenToNode();

  await far.write(0, page(0, 7)); // a slot is free: promoted on its first access, dirty
  assert.equal(cache().promotions, 1);
  assert.equal(cache().dirtyPages, 1);
  assert.ok((await far.read(0, 4096)).equals(page(0, 7)));
  const hits = cache().hits;
  assert.ok((await far.read(100, 10)).equals(Buffer.alloc(10, 7)));
  assert.equal(cache().hits, hits + 1, 'a cached page is served locally');

  await far.write(4096, page(1, 1));
  await far.write(4096, page(1, 2));
  for (let i = 2; i < 8; i++) await far.write(i * 4096, page(i, 0x30 + i));
  assert.equal(cache().cachedPages, 8, 'the cache is full');
  assert.equal(cache().dirtyPages, 8);
  assert.equal(writtenToNode(), writtenBefore, 'write-back: nothing reached the node yet');

  // A one-pass scan of 200 pages over the full cache: none is promoted, and page 0 stays.
  const promotions = cache().promotions;
  for (let i = 10; i < 210; i++) await far.read(i * 4096, 4096);
  assert.equal(cache().promotions, promotions, 'no page of the scan entered the cache');
  const hitsBefore = cache().hits;
  await far.read(0, 1);
  assert.equal(cache().hits, hitsBefore + 1, 'the scan did not push the cached page out');

  // Twenty pages touched twice: each is accessed more often lately than the pages the
  // scan aged, so the 8-page cache demotes those, and writes back the dirty ones.
  for (let round = 0; round < 2; round++) for (let i = 20; i < 40; i++) await far.write(i * 4096, page(i, i));
  const after = cache();
  assert.ok(after.demotions >= 7, `demotions ${after.demotions}`);
  assert.ok(after.writeBacks >= 7, `write-backs ${after.writeBacks}`);
  assert.ok(after.cachedPages <= 8);
  assert.ok(writtenToNode() > writtenBefore);
  assert.ok((await far.read(4096, 4096)).equals(page(1, 2)), 'the demoted dirty page was written back');
  for (let i = 2; i < 8; i++) assert.ok((await far.read(i * 4096, 4096)).equals(page(i, 0x30 + i)));
  for (let i = 20; i < 40; i++) assert.ok((await far.read(i * 4096, 4096)).equals(page(i, i)));

  // Requests in flight together on overlapping pages, with the cache full: each page ends
  // with one of the values written to it, whole, and reads agree with each other.
  const concurrent = Array.from({ length: 96 }, (_, i) => far.write(((i * 7) % 48) * 4096 + 512, Buffer.alloc(6000, i)));
  await Promise.all(concurrent);
  const [x, y] = await Promise.all([far.read(0, 52 * 4096), far.read(0, 52 * 4096)]);
  assert.ok(x.equals(y));

  await memory.flush();
  assert.equal(cache().dirtyPages, 0);
  // After the flush the node holds exactly what the cache shows.
  const direct = Buffer.alloc(52 * 4096);
  await far.readPieces(0, direct);
  assert.ok(direct.equals(await far.read(0, 52 * 4096)));
  assert.ok(direct.equals(x));
  const moved = memory.stats().moved.find((m) => m.device === 'n1');
  assert.ok(moved !== undefined && moved.readBytes > 0 && moved.writtenBytes > 0);
});
