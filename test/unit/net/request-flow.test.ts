// RequestFlow: the per-connection budget every service uses. A model-based property
// drives random pushes, completions and write-buffer states against a fake socket and
// checks the invariants stated at the top of src/net/request-flow.ts after every step.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import fc from 'fast-check';
import { RequestFlow, newFlowStats } from '../../../src/net/request-flow.js';

class FakeSocket extends EventEmitter {
  paused = false;
  writableLength = 0;
  readonly writableHighWaterMark = 1000;
  pause(): this {
    this.paused = true;
    return this;
  }
  resume(): this {
    this.paused = false;
    return this;
  }
}

type Step = { op: 'push'; cost: number } | { op: 'done'; pick: number } | { op: 'buffer'; length: number };

const step: fc.Arbitrary<Step> = fc.oneof(
  fc.record({ op: fc.constant('push' as const), cost: fc.integer({ min: 0, max: 5000 }) }),
  fc.record({ op: fc.constant('done' as const), pick: fc.nat() }),
  fc.record({ op: fc.constant('buffer' as const), length: fc.integer({ min: 0, max: 2000 }) }),
);

test('RequestFlow keeps requests and bytes within the budget, in order, and pauses while anything waits', () => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 8 }), fc.integer({ min: 1, max: 8000 }), fc.array(step, { maxLength: 200 }), (maxRequests, maxBytes, steps) => {
      const socket = new FakeSocket();
      const stats = newFlowStats();
      const running: { id: number; cost: number }[] = [];
      const started: number[] = [];
      const costs = new Map<number, number>();
      const flow = new RequestFlow<number>(socket, { maxRequests, maxBytes }, stats, (id) => {
        started.push(id);
        running.push({ id, cost: costs.get(id) ?? 0 });
      });
      let next = 0;
      for (const s of steps) {
        if (s.op === 'push') {
          costs.set(next, s.cost);
          flow.push(next++, s.cost);
        } else if (s.op === 'done') {
          if (running.length === 0) continue;
          const [r] = running.splice(s.pick % running.length, 1);
          if (r !== undefined) flow.done(r.cost);
        } else {
          socket.writableLength = s.length;
          socket.emit('drain');
        }
        const bytes = running.reduce((sum, r) => sum + r.cost, 0);
        assert.equal(flow.inFlight, running.length);
        assert.equal(flow.bytesInFlight, bytes);
        if (running.length > 1) {
          assert.ok(running.length <= maxRequests, `${running.length} requests in flight, limit ${maxRequests}`);
          assert.ok(bytes <= maxBytes, `${bytes} bytes in flight, limit ${maxBytes}`);
        }
        // Dispatch order is arrival order.
        assert.deepEqual(started, [...started].sort((a, b) => a - b));
        // Reading stops while anything waits, the budget is used up, or replies back up.
        const mustPause = flow.queued > 0 || running.length >= maxRequests || bytes >= maxBytes || socket.writableLength > socket.writableHighWaterMark;
        assert.equal(socket.paused, mustPause);
        assert.equal(stats.pausedNow, socket.paused ? 1 : 0);
        // Nothing waits that could run.
        if (flow.queued > 0) assert.ok(running.length > 0);
      }
      // Once everything completes, everything queued has run.
      while (running.length > 0) {
        const r = running.shift();
        if (r !== undefined) flow.done(r.cost);
      }
      assert.equal(started.length, next);
      assert.equal(flow.queued, 0);
    }),
    { numRuns: 300 },
  );
});

test('RequestFlow.close drops what waits, dispatches nothing more, and lets the socket go', () => {
  const socket = new FakeSocket();
  const stats = newFlowStats();
  const started: number[] = [];
  const flow = new RequestFlow<number>(socket, { maxRequests: 1, maxBytes: 100 }, stats, (id) => started.push(id));
  flow.push(1, 10);
  flow.push(2, 10);
  flow.push(3, 10);
  assert.deepEqual(started, [1]);
  assert.equal(socket.paused, true);
  assert.deepEqual(flow.close(), [2, 3]);
  flow.done(10);
  flow.push(4, 10);
  assert.deepEqual(started, [1]);
  assert.equal(stats.pausedNow, 0);
});
