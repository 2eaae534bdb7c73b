// The page cache's admission filter: a count-min sketch never counts a page less than it
// was recorded since the last aging (up to its ceiling of 15), and aging halves every count.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { FrequencySketch } from '../../../src/host/frequency-sketch.js';

test('an estimate is never below the records of a page since the last aging, capped at 15; collisions only raise it (fast-check)', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 4096 }),
      fc.array(fc.oneof(fc.nat(64), fc.nat(2 ** 40), fc.constant(2 ** 53 - 1)), { minLength: 1, maxLength: 400 }),
      (capacity, pages) => {
        const sketch = new FrequencySketch(capacity);
        const sample = Math.max(64, 10 * capacity);
        const counts = new Map<number, number>();
        pages.forEach((page, i) => {
          sketch.record(page);
          counts.set(page, (counts.get(page) ?? 0) + 1);
          // Every `sample` records all counts are halved: the true lower bound halves too.
          if ((i + 1) % sample === 0) for (const [p, c] of counts) counts.set(p, c >>> 1);
        });
        for (const [page, count] of counts) assert.ok(sketch.estimate(page) >= Math.min(15, count), `page ${page}: estimate ${sketch.estimate(page)} < ${count}`);
      },
    ),
  );
});

test('pages far apart in number, the high bits of large page numbers included, do not share counters in a sketch with room', () => {
  const sketch = new FrequencySketch(1024);
  for (let i = 0; i < 10; i++) sketch.record(2 ** 40);
  assert.equal(sketch.estimate(2 ** 40), 10);
  assert.equal(sketch.estimate(2 ** 40 + 2 ** 33), 0, 'a page that differs only above bit 32');
  assert.equal(sketch.estimate(0), 0);
  assert.equal(sketch.estimate(2 ** 40 + 1), 0);
});

test('aging: after `sample` records every count is halved, so a page hot long ago does not outweigh one hot now', () => {
  const sketch = new FrequencySketch(8); // sample: 80 records
  for (let i = 0; i < 12; i++) sketch.record(7);
  assert.equal(sketch.estimate(7), 12);
  for (let i = 0; i < 68; i++) sketch.record(1000 + (i % 4)); // the 80th record ages the sketch
  assert.equal(sketch.estimate(7), 6);
  assert.equal(sketch.estimate(1000), 7, '17 records, counted up to 15, halved');
  for (let i = 0; i < 80; i++) sketch.record(1000 + (i % 4));
  assert.equal(sketch.estimate(7), 3);
  assert.ok(sketch.estimate(1000) > sketch.estimate(7));
});

test('every cache size gets a working sketch of at most 64 MiB: up to 2^26 pages (256 GiB), and none', () => {
  for (const capacity of [0, 1, 1024, 2 ** 23 + 1, 2 ** 24, 2 ** 26]) {
    const sketch = new FrequencySketch(capacity);
    for (let i = 0; i < 3; i++) sketch.record(777);
    assert.equal(sketch.estimate(777), 3, `${capacity} pages`);
    assert.equal(sketch.estimate(778), 0, `${capacity} pages`);
  }
});

test('halving four counters at a time halves each one, whatever its neighbours hold', () => {
  const sketch = new FrequencySketch(1); // sample: 64 records
  // Pages with counts 15 (saturated), 9 and 1, recorded in one sample.
  for (let i = 0; i < 20; i++) sketch.record(1);
  for (let i = 0; i < 9; i++) sketch.record(2);
  sketch.record(3);
  for (let i = 0; i < 33; i++) sketch.record(1000 + i); // 63 records so far
  assert.deepEqual([sketch.estimate(1), sketch.estimate(2), sketch.estimate(3)], [15, 9, 1]);
  sketch.record(4); // the 64th: every count is halved
  assert.deepEqual([sketch.estimate(1), sketch.estimate(2), sketch.estimate(3)], [7, 4, 0]);
});
