// SlotPool: random takes, gives, homes, drains and removals against a model; the
// invariants at the top of src/storage/cache/slots.ts hold after every step.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { LINE_SIZE } from '../../../../src/storage/cache/line.js';
import { SlotPool } from '../../../../src/storage/cache/slots.js';

const E = 4 * LINE_SIZE;

type Step =
  | { op: 'take' }
  | { op: 'give'; pick: number }
  | { op: 'home'; pick: number }
  | { op: 'drain'; count: number }
  | { op: 'undrain' }
  | { op: 'remove' }
  | { op: 'add'; extent: number };

const step: fc.Arbitrary<Step> = fc.oneof(
  { arbitrary: fc.constant({ op: 'take' as const }), weight: 4 },
  { arbitrary: fc.record({ op: fc.constant('give' as const), pick: fc.nat() }), weight: 3 },
  { arbitrary: fc.record({ op: fc.constant('home' as const), pick: fc.nat() }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('drain' as const), count: fc.integer({ min: 1, max: 3 }) }), weight: 1 },
  { arbitrary: fc.constant({ op: 'undrain' as const }), weight: 1 },
  { arbitrary: fc.constant({ op: 'remove' as const }), weight: 1 },
  { arbitrary: fc.record({ op: fc.constant('add' as const), extent: fc.integer({ min: 0, max: 7 }) }), weight: 1 },
);

test('slots: take never hands out a taken slot or one of a draining extent; drained means nothing taken', () => {
  fc.assert(
    fc.property(fc.array(step, { maxLength: 150 }), (steps) => {
      const pool = new SlotPool<string>('dram', E);
      pool.add([0, 1, 2]);
      const taken = new Set<number>();
      let held = new Set([0, 1, 2]);
      let draining: number[] = [];
      for (const s of steps) {
        if (s.op === 'take') {
          const slot = pool.take();
          if (slot !== undefined) {
            assert.ok(!taken.has(slot), `slot ${slot} handed out twice`);
            assert.ok(!draining.includes(pool.extentOf(slot)), `slot ${slot} of a draining extent handed out`);
            assert.ok(held.has(pool.extentOf(slot)), 'slot of an extent the pool does not hold');
            taken.add(slot);
          } else {
            // Nothing free: every slot of every active extent is taken.
            for (const e of held) if (!draining.includes(e)) for (let k = 0; k < 4; k++) assert.ok(taken.has(e * E + k * LINE_SIZE));
          }
        } else if (s.op === 'give' || s.op === 'home') {
          const list = [...taken];
          const slot = list[s.pick % Math.max(1, list.length)];
          if (slot === undefined) continue;
          if (s.op === 'home') pool.home(slot, `line@${slot}`);
          else {
            pool.give(slot);
            taken.delete(slot);
          }
        } else if (s.op === 'drain') {
          if (draining.length > 0) continue;
          draining = pool.pick(s.count);
          pool.startDrain(draining);
        } else if (s.op === 'undrain') {
          pool.undrain(draining);
          draining = [];
        } else if (s.op === 'remove') {
          if (draining.length === 0 || !pool.drained(draining)) continue;
          pool.remove(draining);
          held = new Set([...held].filter((e) => !draining.includes(e)));
          draining = [];
        } else {
          if (held.has(s.extent)) continue;
          pool.add([s.extent]);
          held.add(s.extent);
        }
        // drained() is exactly "no taken slot in those extents".
        if (draining.length > 0) assert.equal(pool.drained(draining), ![...taken].some((slot) => draining.includes(pool.extentOf(slot))));
        // free + taken = slots of the extents held, minus the free slots of draining extents.
        const drainingFree = draining.reduce((n, e) => n + 4 - [...taken].filter((slot) => pool.extentOf(slot) === e).length, 0);
        assert.equal(pool.freeSlots + taken.size + drainingFree, held.size * 4);
        assert.equal(pool.slots, held.size * 4);
        // Lines living in draining extents are the homed, taken slots there.
        for (const line of pool.linesIn(draining)) assert.ok(taken.has(Number(line.split('@')[1])));
      }
    }),
    { numRuns: 500 },
  );
});

test('slots: a give, a home or an add wakes whoever waits for a change', async () => {
  const pool = new SlotPool<string>('dram', E);
  pool.add([0]);
  const slots = [pool.take(), pool.take(), pool.take(), pool.take()];
  assert.equal(pool.take(), undefined);
  let woke = 0;
  void pool.changed().then(() => woke++);
  const first = slots[0];
  assert.ok(first !== undefined);
  pool.give(first);
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(woke, 1);
  void pool.changed().then(() => woke++);
  const second = slots[1];
  assert.ok(second !== undefined);
  pool.home(second, 'line');
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(woke, 2);
  assert.throws(() => pool.give(first), /not taken/);
});
