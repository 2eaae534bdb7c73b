import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { FreeRanges } from '../../../src/memory/free-ranges.js';

const PAGES = 64;

test('free ranges match a set of free pages under random adds, takes and removes', () => {
  const op = fc.oneof(
    fc.record({ op: fc.constant('add' as const), start: fc.nat({ max: PAGES - 1 }), length: fc.integer({ min: 1, max: 8 }) }),
    fc.record({ op: fc.constant('take' as const), length: fc.integer({ min: 0, max: 12 }) }),
    fc.record({ op: fc.constant('remove' as const), start: fc.nat({ max: PAGES - 1 }), length: fc.integer({ min: 1, max: 8 }) }),
  );
  fc.assert(
    fc.property(fc.array(op, { maxLength: 60 }), (ops) => {
      const ranges = new FreeRanges();
      const model = new Set<number>();
      for (const o of ops) {
        if (o.op === 'add') {
          const pages = Array.from({ length: Math.min(o.length, PAGES - o.start) }, (_, i) => o.start + i);
          if (pages.some((p) => model.has(p))) {
            assert.throws(() => ranges.add(o.start, pages.length));
          } else {
            ranges.add(o.start, pages.length);
            for (const p of pages) model.add(p);
          }
        } else if (o.op === 'take') {
          const got = ranges.take(o.length);
          if (o.length > model.size) {
            assert.equal(got, undefined);
          } else {
            assert.ok(got !== undefined);
            assert.equal(got.reduce((s, r) => s + r.length, 0), o.length);
            for (const r of got) {
              for (let p = r.start; p < r.start + r.length; p++) {
                assert.ok(model.delete(p), `page ${p} handed out but not free`);
              }
            }
          }
        } else {
          const pages = Array.from({ length: o.length }, (_, i) => o.start + i);
          const whole = pages.every((p) => model.has(p));
          assert.equal(ranges.contains(o.start, o.length), whole);
          if (whole) {
            ranges.remove(o.start, o.length);
            for (const p of pages) model.delete(p);
          } else {
            assert.throws(() => ranges.remove(o.start, o.length));
          }
        }
        // The list is sorted, coalesced, and holds exactly the model's pages.
        assert.equal(ranges.total, model.size);
        const list = ranges.list();
        for (let i = 1; i < list.length; i++) assert.ok(list[i - 1]!.start + list[i - 1]!.length < list[i]!.start, 'sorted and not touching');
        const listed = new Set(list.flatMap((r) => Array.from({ length: r.length }, (_, i) => r.start + i)));
        assert.deepEqual([...listed].sort((a, b) => a - b), [...model].sort((a, b) => a - b));
      }
    }),
    { numRuns: 300 },
  );
});

test('take prefers one range that fits, then gathers from the lowest', () => {
  const ranges = new FreeRanges();
  ranges.add(0, 2);
  ranges.add(10, 3);
  ranges.add(20, 8);
  assert.deepEqual(ranges.take(5), [{ start: 20, length: 5 }]);
  assert.deepEqual(ranges.take(6), [{ start: 0, length: 2 }, { start: 10, length: 3 }, { start: 25, length: 1 }]);
  assert.deepEqual(ranges.list(), [{ start: 26, length: 2 }]);
});

test('take in at most maxPieces pieces: from the largest ranges when the lowest take too many, nothing when no way fits', () => {
  const ranges = new FreeRanges();
  ranges.add(0, 1);
  ranges.add(10, 1);
  ranges.add(20, 1);
  ranges.add(30, 4);
  assert.deepEqual(ranges.take(6, 2), undefined, 'six bytes need three pieces at least');
  assert.equal(ranges.total, 7, 'nothing was taken');
  assert.deepEqual(ranges.take(5, 2), [{ start: 0, length: 1 }, { start: 30, length: 4 }], 'the largest first, in address order');
  assert.deepEqual(ranges.take(2, 2), [{ start: 10, length: 1 }, { start: 20, length: 1 }]);
  assert.equal(ranges.total, 0);
});
