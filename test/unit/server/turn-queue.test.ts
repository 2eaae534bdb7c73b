import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TurnQueue } from '../../../src/server/turn-queue.js';

test('TurnQueue resolves one waiter per event-loop iteration, oldest first, so other callbacks run between two turns', async () => {
  const turns = new TurnQueue();
  const order: string[] = [];
  const waiting = [0, 1, 2, 3].map((i) =>
    turns.wait().then(() => {
      order.push(`turn ${i}`);
      // Queued now, it runs in the next iteration's check phase: after the turn already
      // queued for it, before the one after.
      if (i === 0) setImmediate(() => order.push('other'));
    }),
  );
  assert.equal(turns.waiting, 4);
  assert.deepEqual(order, [], 'never at once');
  await Promise.all(waiting);
  assert.deepEqual(order, ['turn 0', 'turn 1', 'other', 'turn 2', 'turn 3']);
  assert.equal(turns.waiting, 0);
  // Idle again: a new waiter gets a turn of its own.
  await turns.wait();
});
