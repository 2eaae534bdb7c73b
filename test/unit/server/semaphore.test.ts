import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Semaphore } from '../../../src/server/semaphore.js';

test('Semaphore: at most `slots` holders, the others served oldest first as slots come back', async () => {
  const slots = new Semaphore(2);
  const got: number[] = [];
  const holders = [0, 1, 2, 3, 4].map((i) => slots.acquire().then(() => got.push(i)));
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(got, [0, 1]);
  assert.deepEqual([slots.active, slots.waiting], [2, 3]);
  slots.release();
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(got, [0, 1, 2], 'a released slot goes to the oldest waiter');
  assert.equal(slots.active, 2);
  slots.release();
  slots.release();
  await Promise.all(holders);
  assert.deepEqual([slots.active, slots.waiting], [2, 0]);
  assert.deepEqual(got, [0, 1, 2, 3, 4]);
  slots.release();
  slots.release();
  assert.deepEqual([slots.active, slots.waiting], [0, 0]);
});
