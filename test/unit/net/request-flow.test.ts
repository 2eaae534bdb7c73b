// RequestFlow: the per-connection budget every service uses. A model-based property
// drives random pushes, completions and write-buffer states against a fake socket and
// checks the invariants stated at the top of src/net/request-flow.ts after every step.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import fc from 'fast-check';
import { RequestFlow, SharedBudget, newFlowStats } from '../../../src/net/request-flow.js';

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

// Several flows under one SharedBudget, with bodies reserved while they arrive (what a
// parser with admission does): the service-wide cap holds, each flow stays in order,
// a reserved body is always read to its end, and nothing waits for ever.
type SharedStep =
  | { op: 'push'; flow: number; cost: number }
  | { op: 'reserve'; flow: number; bytes: number; cost: number }
  | { op: 'complete'; flow: number }
  | { op: 'done'; flow: number; pick: number }
  | { op: 'buffer'; flow: number; length: number };

test('RequestFlow with a SharedBudget: the service cap holds across flows, reservations end, and every flow progresses, waiters first or not', () => {
  const flowIndex = fc.integer({ min: 0, max: 3 });
  const sharedStep: fc.Arbitrary<SharedStep> = fc.oneof(
    fc.record({ op: fc.constant('push' as const), flow: flowIndex, cost: fc.integer({ min: 0, max: 3000 }) }),
    fc.record({ op: fc.constant('reserve' as const), flow: flowIndex, bytes: fc.integer({ min: 1, max: 3000 }), cost: fc.integer({ min: 0, max: 3000 }) }),
    fc.record({ op: fc.constant('complete' as const), flow: flowIndex }),
    fc.record({ op: fc.constant('done' as const), flow: flowIndex, pick: fc.nat() }),
    fc.record({ op: fc.constant('buffer' as const), flow: flowIndex, length: fc.integer({ min: 0, max: 2000 }) }),
  );
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 6 }), fc.integer({ min: 1, max: 4000 }), fc.integer({ min: 1, max: 8000 }), fc.boolean(), fc.array(sharedStep, { maxLength: 250 }), (maxRequests, maxBytes, serviceBytes, waitersFirst, steps) => {
      const shared = new SharedBudget(serviceBytes, { waitersFirst });
      const stats = newFlowStats();
      interface Model {
        socket: FakeSocket;
        flow: RequestFlow<number>;
        running: { id: number; cost: number }[];
        started: number[];
        pushed: number;
        /** A reservation: asked (not yet granted), or granted and its body arriving. */
        reservation: { bytes: number; cost: number; granted: boolean } | undefined;
      }
      const costs = new Map<number, number>();
      let next = 0;
      const models: Model[] = [0, 1, 2, 3].map(() => {
        const socket = new FakeSocket();
        const m: Model = { socket, flow: undefined as unknown as RequestFlow<number>, running: [], started: [], pushed: 0, reservation: undefined };
        m.flow = new RequestFlow<number>(socket, { maxRequests, maxBytes }, stats, (id) => {
          m.started.push(id);
          m.running.push({ id, cost: costs.get(id) ?? 0 });
        }, shared);
        return m;
      });
      const check = (): void => {
        let total = 0;
        let holders = 0;
        for (const m of models) {
          const receiving = m.reservation?.granted === true ? m.reservation.bytes : 0;
          const queued = m.flow.queued;
          // Bytes a queued completed body still holds are its reservation; the model knows them only in sum.
          const own = m.running.reduce((s, r) => s + r.cost, 0) + receiving;
          assert.ok(m.flow.bytesInFlight >= own, 'the flow counts at least what runs and what is reserved');
          total += m.flow.bytesInFlight;
          if (m.running.length > 1) assert.ok(m.running.length <= maxRequests);
          // A completed body waiting in the queue for the rest of its cost still holds its reservation.
          const waitingReserved = queued > 0 && m.flow.bytesInFlight > own ? 1 : 0;
          const flowHolders = m.running.filter((r) => r.cost > 0).length + (receiving > 0 ? 1 : 0) + waitingReserved;
          holders += flowHolders;
          if (m.flow.bytesInFlight > maxBytes) assert.equal(flowHolders, 1, 'a flow is over its own budget only with one request');
          assert.deepEqual(m.started, [...m.started].sort((a, b) => a - b), 'each flow dispatches in arrival order');
          // A reserved body is read to its end; anything waiting pauses the socket.
          if (receiving > 0) assert.equal(m.socket.paused, false, 'a reserved body is read to its end');
          else if (queued > 0 || m.reservation !== undefined) assert.equal(m.socket.paused, true);
          // Only a flow with something waiting can wait on the service, and one that waits is listed.
          const waiting = queued > 0 || (m.reservation !== undefined && !m.reservation.granted);
          if (m.flow.waitingOnService) assert.ok(waiting, 'a flow with nothing waiting is not on the service\'s waiting list');
        }
        // Nothing waits on the service while the service holds nothing: the oldest waiter would fit.
        if (shared.bytes === 0) assert.equal(shared.waiters, 0, 'no flow waits on an empty service budget');
        assert.equal(shared.bytes, total, 'the shared budget counts exactly what its flows hold');
        // Over the cap only while one request (or reservation) holds every byte in flight.
        if (total > serviceBytes) assert.equal(holders, 1, `${total} bytes over the service cap ${serviceBytes} with ${holders} holders`);
      };
      for (const s of steps) {
        const m = models[s.flow]!;
        if (s.op === 'push') {
          if (m.reservation !== undefined) continue; // a parser pushes nothing while a body is reserved
          costs.set(next, s.cost);
          m.flow.push(next++, s.cost);
        } else if (s.op === 'reserve') {
          if (m.reservation !== undefined) continue;
          // A reservation covers the whole cost of the request the body becomes.
          const reservation = { bytes: s.bytes, cost: Math.min(s.cost, s.bytes), granted: false };
          m.reservation = reservation;
          reservation.granted = m.flow.reserve(s.bytes, () => {
            reservation.granted = true;
          });
        } else if (s.op === 'complete') {
          const r = m.reservation;
          if (r === undefined || !r.granted) continue;
          m.reservation = undefined;
          costs.set(next, r.cost);
          const id = next++;
          m.flow.push(id, r.cost, r.bytes);
          assert.equal(m.started.at(-1), id, 'a completed reservation starts at once');
        } else if (s.op === 'done') {
          if (m.running.length === 0) continue;
          const [r] = m.running.splice(s.pick % m.running.length, 1);
          if (r !== undefined) m.flow.done(r.cost);
        } else {
          m.socket.writableLength = s.length;
          m.socket.emit('drain');
        }
        check();
      }
      // Complete everything: every request runs, every reservation is granted, all bytes come back.
      for (let round = 0; round < 10_000; round++) {
        let moved = false;
        for (const m of models) {
          m.socket.writableLength = 0;
          const r = m.reservation;
          if (r?.granted === true) {
            m.reservation = undefined;
            costs.set(next, r.cost);
            m.flow.push(next++, r.cost, r.bytes);
            moved = true;
          }
          const run = m.running.shift();
          if (run !== undefined) {
            m.flow.done(run.cost);
            moved = true;
          }
          check();
        }
        if (!moved) break;
      }
      for (const m of models) {
        assert.equal(m.reservation, undefined, 'every reservation was granted');
        assert.equal(m.flow.queued, 0);
        assert.equal(m.flow.bytesInFlight, 0);
      }
      assert.equal(shared.bytes, 0);
      const started = models.reduce((n, m) => n + m.started.length, 0);
      assert.equal(started, next, 'every request pushed was dispatched');
    }),
    { numRuns: 400 },
  );
});

test('RequestFlow.close gives back what a connection reserved or queued to the shared budget', () => {
  const shared = new SharedBudget(100);
  const a = new RequestFlow<number>(new FakeSocket(), { maxRequests: 4, maxBytes: 100 }, newFlowStats(), () => undefined, shared);
  const b = new RequestFlow<number>(new FakeSocket(), { maxRequests: 4, maxBytes: 100 }, newFlowStats(), () => undefined, shared);
  assert.equal(a.reserve(80, () => undefined), true);
  let granted = false;
  assert.equal(b.reserve(50, () => (granted = true)), false, 'the service has no room for B');
  a.close();
  assert.equal(granted, true, 'closing A let B in');
  assert.equal(shared.bytes, 50);
});

test('RequestFlow.reprice gives waiting requests new costs and dispatches what then fits, the shared budget counting the new costs', () => {
  const shared = new SharedBudget(100);
  const hog = new RequestFlow<number>(new FakeSocket(), { maxRequests: 4, maxBytes: 100 }, newFlowStats(), () => undefined, shared);
  hog.push(0, 90);
  const socket = new FakeSocket();
  const started: number[] = [];
  const flow = new RequestFlow<number>(socket, { maxRequests: 4, maxBytes: 100 }, newFlowStats(), (id) => started.push(id), shared);
  flow.push(1, 50);
  flow.push(2, 60);
  assert.deepEqual(started, [], 'neither fits while the hog holds 90 of 100');
  assert.equal(socket.paused, true);
  flow.reprice((id) => (id === 1 ? 5 : 4));
  assert.deepEqual(started, [1, 2]);
  assert.equal(shared.bytes, 99);
  assert.equal(socket.paused, false);
  flow.done(5);
  flow.done(4);
  assert.equal(shared.bytes, 90);
});

test('RequestFlow.cancelReserve withdraws a reservation still waiting: nothing is taken, the socket is read again, and a granted one cannot be withdrawn', () => {
  const shared = new SharedBudget(100);
  const hog = new RequestFlow<number>(new FakeSocket(), { maxRequests: 4, maxBytes: 100 }, newFlowStats(), () => undefined, shared);
  hog.push(0, 90);
  const socket = new FakeSocket();
  const started: number[] = [];
  const flow = new RequestFlow<number>(socket, { maxRequests: 4, maxBytes: 100 }, newFlowStats(), (id) => started.push(id), shared);
  flow.push(1, 5);
  let granted = false;
  assert.equal(flow.reserve(50, () => (granted = true)), false);
  assert.equal(socket.paused, true);
  assert.equal(flow.cancelReserve(), true);
  assert.equal(socket.paused, false);
  hog.done(90);
  assert.equal(granted, false, 'a withdrawn reservation is never granted');
  assert.equal(shared.bytes, 5);
  flow.push(2, 5);
  assert.deepEqual(started, [1, 2], 'the body, dropped, becomes a request of its own cost');
  assert.equal(flow.reserve(50, () => undefined), true);
  assert.equal(flow.cancelReserve(), false, 'granted: its body is arriving');
  assert.equal(shared.bytes, 60);
});

test('RequestFlow.push after close gives nothing back: a granted reservation comes back once, in close()', () => {
  const shared = new SharedBudget(1000);
  const other = new RequestFlow<number>(new FakeSocket(), { maxRequests: 4, maxBytes: 1000 }, newFlowStats(), () => undefined, shared);
  other.push(0, 300);
  const started: number[] = [];
  const flow = new RequestFlow<number>(new FakeSocket(), { maxRequests: 4, maxBytes: 1000 }, newFlowStats(), (id) => started.push(id), shared);
  assert.equal(flow.reserve(500, () => undefined), true);
  assert.equal(shared.bytes, 800);
  flow.close();
  assert.equal(shared.bytes, 300, 'close() gave the reservation back');
  // The body that was arriving completes after the connection closed (rmem and the mirror push it anyway).
  flow.push(1, 400, 500);
  assert.deepEqual(started, []);
  assert.equal(flow.bytesInFlight, 0);
  assert.equal(shared.bytes, 300, 'the reservation is not given back a second time');
});
