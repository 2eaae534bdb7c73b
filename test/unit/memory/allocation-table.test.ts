import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { AllocationTable, type PhysicalRange } from '../../../src/memory/allocation-table.js';

test('regions are recorded per server and shown as rows by server, region and address', () => {
  const table = new AllocationTable();
  const a1 = table.add('srv-a', [{ medium: 'dram', start: 0x6000, length: 0x2000 }]);
  const b1 = table.add('srv-b', [{ medium: 'flash', start: 0, length: 0x100000 }]);
  const a2 = table.add('srv-a', [
    { medium: 'dram', start: 0x10000, length: 0x1000 },
    { medium: 'flash', start: 0x100000, length: 0x1000 },
  ]);
  assert.deepEqual([a1.id, b1.id, a2.id], [1, 2, 3]);
  assert.equal(a2.bytes, 0x2000);
  assert.deepEqual(
    table.rows().map((r) => [r.serverId, r.regionId, r.medium, r.start]),
    [
      ['srv-a', 1, 'dram', 0x6000],
      ['srv-a', 3, 'dram', 0x10000],
      ['srv-a', 3, 'flash', 0x100000],
      ['srv-b', 2, 'flash', 0],
    ],
  );
  assert.deepEqual(table.servers(), [
    { serverId: 'srv-a', regions: 2, bytes: { dram: 0x3000, flash: 0x1000 } },
    { serverId: 'srv-b', regions: 1, bytes: { flash: 0x100000 } },
  ]);
});

test('overlapping ranges are refused, across servers and inside one region', () => {
  const table = new AllocationTable();
  table.add('srv-a', [{ medium: 'dram', start: 0x1000, length: 0x1000 }]);
  assert.throws(() => table.add('srv-b', [{ medium: 'dram', start: 0x1fff, length: 2 }]), { code: 'MS_ALLOC_OVERLAP' });
  assert.throws(
    () => table.add('srv-b', [{ medium: 'flash', start: 0, length: 10 }, { medium: 'flash', start: 5, length: 10 }]),
    { code: 'MS_ALLOC_OVERLAP' },
  );
  assert.throws(() => table.add('srv-b', [{ medium: 'dram', start: 0, length: 0 }]), { code: 'MS_BAD_REQUEST' });
  // The same addresses on another medium are another place.
  table.add('srv-b', [{ medium: 'flash', start: 0x1000, length: 0x1000 }]);
  assert.equal(table.rows().length, 2);
});

test('a server cannot free a region it does not hold (memory violation), and ids are not reused', () => {
  const table = new AllocationTable();
  const a = table.add('srv-a', [{ medium: 'dram', start: 0, length: 4096 }]);
  assert.throws(() => table.remove('srv-b', a.id), { code: 'MS_ALLOC_UNKNOWN_REGION' });
  assert.throws(() => table.remove('srv-a', 999), { code: 'MS_ALLOC_UNKNOWN_REGION' });
  assert.equal(table.region('srv-b', a.id), undefined);
  table.remove('srv-a', a.id);
  assert.throws(() => table.remove('srv-a', a.id), { code: 'MS_ALLOC_UNKNOWN_REGION' }, 'double free');
  const again = table.add('srv-a', [{ medium: 'dram', start: 0, length: 4096 }]);
  assert.notEqual(again.id, a.id);
});

test('removing a server frees all its regions and drops it from the table', () => {
  const table = new AllocationTable();
  table.add('srv-a', [{ medium: 'dram', start: 0, length: 4096 }]);
  table.add('srv-a', [{ medium: 'flash', start: 0, length: 4096 }]);
  table.add('srv-b', [{ medium: 'dram', start: 4096, length: 4096 }]);
  assert.equal(table.removeServer('srv-a').length, 2);
  assert.deepEqual(table.servers().map((s) => s.serverId), ['srv-b']);
  table.add('srv-c', [{ medium: 'dram', start: 0, length: 4096 }]);
});

test('random adds and removes: rows never overlap and match what is held', () => {
  const rangeArb = fc.record({
    medium: fc.constantFrom('dram' as const, 'flash' as const),
    start: fc.nat({ max: 64 }).map((n) => n * 4096),
    length: fc.integer({ min: 1, max: 4 }).map((n) => n * 4096),
  });
  const opArb = fc.oneof(
    fc.record({ add: fc.constantFrom('a', 'b', 'c'), ranges: fc.array(rangeArb, { minLength: 1, maxLength: 3 }) }),
    fc.record({ remove: fc.constantFrom('a', 'b', 'c'), pick: fc.nat() }),
  );
  fc.assert(
    fc.property(fc.array(opArb, { maxLength: 40 }), (ops) => {
      const table = new AllocationTable();
      const held = new Map<number, { server: string; ranges: PhysicalRange[] }>();
      for (const op of ops) {
        if ('add' in op) {
          try {
            const region = table.add(op.add, op.ranges);
            held.set(region.id, { server: op.add, ranges: op.ranges });
          } catch (error) {
            assert.equal((error as { code?: string }).code, 'MS_ALLOC_OVERLAP');
          }
        } else {
          const mine = [...held].filter(([, r]) => r.server === op.remove);
          const chosen = mine[op.pick % Math.max(1, mine.length)];
          if (chosen !== undefined) {
            table.remove(op.remove, chosen[0]);
            held.delete(chosen[0]);
          }
        }
        const rows = table.rows();
        assert.equal(rows.length, [...held.values()].reduce((s, r) => s + r.ranges.length, 0));
        for (const [i, x] of rows.entries()) {
          for (const y of rows.slice(i + 1)) {
            assert.ok(x.medium !== y.medium || x.start + x.length <= y.start || y.start + y.length <= x.start, 'rows overlap');
          }
        }
      }
    }),
    { numRuns: 200 },
  );
});
