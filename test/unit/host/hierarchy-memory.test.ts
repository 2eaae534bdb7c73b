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

test('read and write refuse a bad length or non-bytes with a coded error before allocating anything', async (t) => {
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
});
