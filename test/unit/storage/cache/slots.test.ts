// SlotPool: random takes, gives, homes, pins, releases, drains and removals against a
// model; the invariants at the top of src/storage/cache/slots.ts hold after every step.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { LINE_SIZE } from '../../../../src/storage/cache/line.js';
import { SlotPool, type SlotPin } from '../../../../src/storage/cache/slots.js';

const E = 4 * LINE_SIZE;

type Step =
  | { op: 'take' }
  | { op: 'give'; pick: number }
  | { op: 'home'; pick: number }
  | { op: 'drain'; count: number }
  | { op: 'undrain' }
  | { op: 'remove' }
  | { op: 'add'; extent: number }
  | { op: 'pin'; pick: number }
  | { op: 'release'; pick: number };

const step: fc.Arbitrary<Step> = fc.oneof(
  { arbitrary: fc.constant({ op: 'take' as const }), weight: 4 },
  { arbitrary: fc.record({ op: fc.constant('give' as const), pick: fc.nat() }), weight: 3 },
  { arbitrary: fc.record({ op: fc.constant('home' as const), pick: fc.nat() }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('drain' as const), count: fc.integer({ min: 1, max: 3 }) }), weight: 1 },
  { arbitrary: fc.constant({ op: 'undrain' as const }), weight: 1 },
  { arbitrary: fc.constant({ op: 'remove' as const }), weight: 1 },
  { arbitrary: fc.record({ op: fc.constant('add' as const), extent: fc.integer({ min: 0, max: 7 }) }), weight: 1 },
  { arbitrary: fc.record({ op: fc.constant('pin' as const), pick: fc.nat() }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('release' as const), pick: fc.nat() }), weight: 2 },
);

test('slots: take never hands out a taken slot, a pinned one or one of a draining extent; drained means nothing taken', () => {
  fc.assert(
    fc.property(fc.array(step, { maxLength: 150 }), (steps) => {
      const pool = new SlotPool<string>('dram', E);
      pool.add([0, 1, 2]);
      const taken = new Set<number>();
      let held = new Set([0, 1, 2]);
      let draining: number[] = [];
      // Live pins in the model (a pin of an extent removed since is void), and every pin
      // handed out, void ones included, so that releasing those is tried too.
      let live: SlotPin[] = [];
      const pins: SlotPin[] = [];
      const pinned = (slot: number): boolean => live.some((p) => p.slot === slot);
      for (const s of steps) {
        if (s.op === 'take') {
          const slot = pool.take();
          if (slot !== undefined) {
            assert.ok(!taken.has(slot), `slot ${slot} handed out twice`);
            assert.ok(!pinned(slot), `slot ${slot} handed out while a pin holds it`);
            assert.ok(!draining.includes(pool.extentOf(slot)), `slot ${slot} of a draining extent handed out`);
            assert.ok(held.has(pool.extentOf(slot)), 'slot of an extent the pool does not hold');
            taken.add(slot);
          } else {
            // Nothing free: every slot of every active extent is taken or pinned.
            for (const e of held) if (!draining.includes(e)) for (let k = 0; k < 4; k++) assert.ok(taken.has(e * E + k * LINE_SIZE) || pinned(e * E + k * LINE_SIZE));
          }
        } else if (s.op === 'pin') {
          const list = [...taken];
          const slot = list[s.pick % Math.max(1, list.length)];
          if (slot === undefined) continue;
          const pin = pool.pin(slot);
          live.push(pin);
          pins.push(pin);
        } else if (s.op === 'release') {
          const pin = pins[s.pick % Math.max(1, pins.length)];
          if (pin === undefined) continue;
          pins.splice(pins.indexOf(pin), 1);
          live = live.filter((p) => p !== pin);
          pool.release(pin);
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
          const gone = draining;
          held = new Set([...held].filter((e) => !gone.includes(e)));
          live = live.filter((p) => !gone.includes(pool.extentOf(p.slot)));
          draining = [];
        } else {
          if (held.has(s.extent)) continue;
          pool.add([s.extent]);
          held.add(s.extent);
        }
        // drained() is exactly "no taken slot in those extents".
        if (draining.length > 0) assert.equal(pool.drained(draining), ![...taken].some((slot) => draining.includes(pool.extentOf(slot))));
        // free + taken + parked = slots of the extents held, minus the free slots of
        // draining extents (parked: given back while pinned).
        const parked = new Set(live.map((p) => p.slot).filter((slot) => !taken.has(slot)));
        const drainingFree = draining.reduce((n, e) => n + 4 - [...taken, ...parked].filter((slot) => pool.extentOf(slot) === e).length, 0);
        assert.equal(pool.freeSlots + taken.size + parked.size + drainingFree, held.size * 4);
        assert.equal(pool.pinnedSlots, new Set(live.map((p) => p.slot)).size);
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

test('slots: a slot given back while pinned is handed out again only after its last pin is released; pins of a removed extent are void', () => {
  const pool = new SlotPool<string>('dram', E);
  pool.add([0]);
  const slots = [pool.take(), pool.take(), pool.take(), pool.take()];
  const [a, b] = slots;
  assert.ok(a !== undefined && b !== undefined);
  const first = pool.pin(a);
  const second = pool.pin(a);
  pool.give(a);
  assert.equal(pool.take(), undefined, 'a parked slot was handed out');
  pool.release(first);
  assert.equal(pool.take(), undefined, 'handed out while a second pin holds it');
  pool.release(second);
  assert.equal(pool.take(), a);
  // A drain does not wait for a parked slot; once the extent is removed, its pins are
  // void, and releasing one never frees a slot of the extent added back.
  const pin = pool.pin(b);
  pool.startDrain([0]);
  for (const slot of [a, b, slots[2], slots[3]]) if (slot !== undefined) pool.give(slot);
  assert.ok(pool.drained([0]));
  pool.remove([0]);
  pool.add([0]);
  const again = [pool.take(), pool.take(), pool.take(), pool.take()];
  assert.ok(again.every((slot) => slot !== undefined));
  pool.release(pin);
  assert.equal(pool.freeSlots, 0, 'a void pin freed a slot that is taken');
  assert.equal(pool.pinnedSlots, 0);
  assert.throws(() => pool.pin(123 * LINE_SIZE), /not taken/);
});

test('slots: a void pin never ends a later pin of the same slot, and parked slots stay out of a drain that is called off', () => {
  const pool = new SlotPool<string>('dram', E);
  pool.add([0]);
  const slots = [pool.take(), pool.take(), pool.take(), pool.take()];
  const [a] = slots;
  assert.ok(a !== undefined);
  const old = pool.pin(a);
  pool.startDrain([0]);
  for (const slot of slots) if (slot !== undefined) pool.give(slot);
  pool.remove([0]);
  pool.add([0]);
  const again = [pool.take(), pool.take(), pool.take(), pool.take()];
  assert.ok(again.includes(a));
  // The slot, in use again, is pinned anew and given back: the old pin's release must
  // not count as the new one's.
  const fresh = pool.pin(a);
  pool.give(a);
  pool.release(old);
  assert.equal(pool.take(), undefined, 'a void pin freed a slot a live pin holds');
  // A drain begun and called off while the slot is parked leaves it parked.
  pool.startDrain([0]);
  pool.undrain([0]);
  assert.equal(pool.take(), undefined, 'an undrain freed a parked slot');
  pool.release(fresh);
  assert.equal(pool.take(), a);
  // After a removal, a slot parked before it is not parked in the extent added back.
  const b = again.find((slot) => slot !== a);
  assert.ok(b !== undefined);
  pool.pin(b);
  pool.startDrain([0]);
  for (const slot of [a, ...again.filter((slot) => slot !== a)]) if (slot !== undefined) pool.give(slot);
  pool.remove([0]);
  pool.add([0]);
  for (let k = 0; k < 4; k++) assert.ok(pool.take() !== undefined);
  for (const slot of [0, 1, 2, 3].map((k) => k * LINE_SIZE)) pool.give(slot);
  pool.startDrain([0]);
  pool.undrain([0]);
  assert.equal(pool.freeSlots, 4, 'a slot parked before the extent was removed stayed out of the free list');
});
