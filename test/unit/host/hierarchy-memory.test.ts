// HierarchyMemory over in-memory tiers: arguments checked before anything is allocated,
// and the space of a freed segment coming back even when zeroing it fails at first.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { HierarchyMemory } from '../../../src/host/hierarchy-memory.js';
import { BufferStore, RangeTier } from '../../../src/host/tiers.js';

const PAGE = 4096;

function local(pages: number): HierarchyMemory {
  return HierarchyMemory.assemble({ serverId: 'unit', dram: new RangeTier('local', 'dram', pages * PAGE, new BufferStore(pages * PAGE)), pageCacheBytes: 0 });
}

test('read, readInto and write refuse a bad length, address or non-bytes with a coded error before allocating anything', async (t) => {
  const memory = local(2);
  t.after(() => memory.close());
  const seg = await memory.alloc(PAGE, { class: 'highest' });
  // Each of these made Buffer.alloc throw an uncoded RangeError, or allocate, before the range was checked.
  for (const length of [-1, -PAGE, Number.MAX_SAFE_INTEGER, 2 ** 40, 1.5, Number.NaN]) {
    await assert.rejects(memory.read(seg.address, length), { code: 'MS_HOST_VIOLATION' }, `length ${length}`);
  }
  await assert.rejects(memory.read(seg.address + PAGE, 1), { code: 'MS_HOST_VIOLATION' });
  assert.equal((await memory.read(seg.address, 0)).length, 0);
  for (const data of ['text', undefined, null, 42, [1, 2]]) {
    await assert.rejects(memory.write(seg.address, data as unknown as Uint8Array), { code: 'MS_HOST_INVALID' }, `data ${String(data)}`);
    await assert.rejects(seg.write(0, data as unknown as Uint8Array), { code: 'MS_HOST_INVALID' }, `data ${String(data)}`);
  }
  await memory.write(seg.address, new Uint8Array([1, 2, 3]));
  assert.deepEqual([...(await seg.read(0, 3))], [1, 2, 3]);
  for (const target of ['text', undefined, null, 42, [1, 2], new ArrayBuffer(4)]) {
    await assert.rejects(memory.readInto(seg.address, target as unknown as Uint8Array), { code: 'MS_HOST_INVALID' }, `target ${Object.prototype.toString.call(target)}`);
    await assert.rejects(seg.readInto(0, target as unknown as Uint8Array), { code: 'MS_HOST_INVALID' }, `target ${Object.prototype.toString.call(target)}`);
  }
  for (const address of [-1, 1.5, Number.NaN, seg.address + PAGE]) {
    await assert.rejects(memory.readInto(address, new Uint8Array(1)), { code: 'MS_HOST_VIOLATION' }, `address ${address}`);
  }
  await assert.rejects(seg.readInto(PAGE - 2, new Uint8Array(3)), { code: 'MS_HOST_VIOLATION' }, 'past the segment');
  await assert.rejects(seg.readInto(-1, new Uint8Array(1)), { code: 'MS_HOST_VIOLATION' });
  // Any view of bytes: a Uint8Array at an offset in its buffer, a Buffer, an empty one.
  const backing = new Uint8Array(8).fill(9);
  await seg.readInto(0, backing.subarray(2, 5));
  assert.deepEqual([...backing], [9, 9, 1, 2, 3, 9, 9, 9]);
  await memory.readInto(seg.address + 1, backing.subarray(6, 8));
  assert.deepEqual([...backing], [9, 9, 1, 2, 3, 9, 2, 3]);
  await memory.readInto(seg.address, new Uint8Array(0));
  // An empty target reads nothing anywhere, as read(address, 0) does; a detached buffer's view is empty.
  await memory.readInto(seg.address + 64 * PAGE, new Uint8Array(0));
  assert.equal((await memory.read(seg.address + 64 * PAGE, 0)).length, 0);
  const detached = new Uint8Array(new ArrayBuffer(8));
  structuredClone(detached.buffer, { transfer: [detached.buffer] });
  await memory.readInto(seg.address, detached);
  await seg.readInto(0, detached);
  await seg.free();
  await assert.rejects(memory.readInto(seg.address, new Uint8Array(1)), { code: 'MS_HOST_VIOLATION' }, 'after free');
});

/** Local memory whose zeroing fails while `failing` is set. */
class FlakyZeroStore extends BufferStore {
  failing = false;
  zeroCalls = 0;

  override zero(at: number, length: number): Promise<void> {
    this.zeroCalls++;
    if (this.failing) return Promise.reject(new Error('injected EIO on zero'));
    return super.zero(at, length);
  }
}

test('a free whose zeroing fails rejects, but the space is not lost: it is zeroed again before the tier hands out space', async (t) => {
  const store = new FlakyZeroStore(2 * PAGE);
  const memory = HierarchyMemory.assemble({
    serverId: 'unit',
    dram: new RangeTier('local', 'dram', 0, new BufferStore(0)),
    flash: new RangeTier('local', 'flash', 2 * PAGE, store),
    pageCacheBytes: 0,
  });
  t.after(() => memory.close());
  const where = { device: 'local', medium: 'flash' } as const;
  const flashRow = () => memory.discovery().find((r) => r.medium === 'flash');
  const old = await memory.alloc(2 * PAGE, where);
  await old.write(0, Buffer.alloc(2 * PAGE, 0xee));

  store.failing = true;
  await assert.rejects(old.free(), /injected EIO on zero/);
  await assert.rejects(old.free(), { code: 'MS_HOST_VIOLATION' }, 'the segment is freed all the same');
  await assert.rejects(old.read(0, 1), { code: 'MS_HOST_VIOLATION' });
  assert.deepEqual({ offered: flashRow()?.offered, assigned: flashRow()?.assigned }, { offered: 0, assigned: 2 * PAGE }, 'the unzeroed range is not offered');
  const calls = store.zeroCalls;
  await assert.rejects(memory.alloc(PAGE, where), { code: 'MS_HOST_NO_CAPACITY' }, 'never handed out with the old bytes');
  assert.equal(store.zeroCalls, calls + 1, 'the allocation tried to zero it again');

  store.failing = false;
  const next = await memory.alloc(2 * PAGE, where);
  assert.ok((await next.read(0, 2 * PAGE)).equals(Buffer.alloc(2 * PAGE)), 'the next owner reads zeros');
  const raw = Buffer.alloc(2 * PAGE);
  await store.read(0, raw);
  assert.ok(raw.equals(Buffer.alloc(2 * PAGE)), 'and the store holds none of the old bytes');
  await next.free();
  assert.deepEqual({ offered: flashRow()?.offered, assigned: flashRow()?.assigned }, { offered: 2 * PAGE, assigned: 0 });
});
