// The idle-connection reserve of SharedBudget: a connection with nothing in flight may go
// past the service's cap by one request of at most `reserveBytes`, so that one client
// whose connections hold the whole budget (say, by never reading their replies) cannot
// stall another client's modest requests. A model-based property checks the bound this
// leaves (cap + connections x reserve, or one request alone) with pushes, reservations,
// completions and closes on several flows; examples show the reserve at work.

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

const FLOWS = 4;
type Step =
  | { op: 'push'; flow: number; cost: number }
  | { op: 'body'; flow: number; cost: number }
  | { op: 'done'; pick: number }
  | { op: 'close'; flow: number };

const step: fc.Arbitrary<Step> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ op: fc.constant('push' as const), flow: fc.nat(FLOWS - 1), cost: fc.integer({ min: 0, max: 5000 }) }) },
  { weight: 3, arbitrary: fc.record({ op: fc.constant('body' as const), flow: fc.nat(FLOWS - 1), cost: fc.integer({ min: 0, max: 5000 }) }) },
  { weight: 6, arbitrary: fc.record({ op: fc.constant('done' as const), pick: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('close' as const), flow: fc.nat(FLOWS - 1) }) },
);

test('with a reserve, all flows together hold at most the cap plus one reserve per connection (or one request alone)', () => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 6000 }), fc.integer({ min: 1, max: 12000 }), fc.integer({ min: 0, max: 1500 }), fc.boolean(), fc.array(step, { maxLength: 200 }), (maxBytes, serviceBytes, reserveBytes, waitersFirst, steps) => {
      const budget = new SharedBudget(serviceBytes, { reserveBytes, waitersFirst });
      const running: { flow: number; cost: number }[] = [];
      const flows: RequestFlow<number>[] = [];
      const closed: boolean[] = [];
      /** A reservation per flow: granted (its body is arriving) or still waiting. */
      const bodies: ({ cost: number; granted: boolean } | undefined)[] = [];
      const costs = new Map<number, number>();
      /** Bodies pushed with their reservation and not dispatched yet: id -> [flow, bytes]. */
      const queuedBodies = new Map<number, [number, number]>();
      let next = 0;
      for (let f = 0; f < FLOWS; f++) {
        closed.push(false);
        bodies.push(undefined);
        flows.push(new RequestFlow<number>(new FakeSocket(), { maxRequests: 4, maxBytes }, newFlowStats(), (id) => {
          queuedBodies.delete(id);
          running.push({ flow: f, cost: costs.get(id) ?? 0 });
        }, budget));
      }
      const reservedBytes = (): number[] => [
        ...bodies.map((b, f) => (b?.granted === true && !closed[f] ? b.cost : 0)),
        ...[...queuedBodies.values()].map(([f, bytes]) => (closed[f] ? 0 : bytes)),
      ];
      const held = (): number => running.reduce((s, r) => s + r.cost, 0) + reservedBytes().reduce((a, b) => a + b, 0);
      for (const s of steps) {
        if (s.op === 'push' || s.op === 'body') {
          if (closed[s.flow] || bodies[s.flow] !== undefined) continue;
          if (s.op === 'push') {
            costs.set(next, s.cost);
            flows[s.flow]!.push(next++, s.cost);
            continue;
          }
          // A body that arrives: reserved first, pushed once granted and "received".
          const body = { cost: s.cost, granted: false };
          bodies[s.flow] = body;
          if (flows[s.flow]!.reserve(s.cost, () => (body.granted = true))) body.granted = true;
        } else if (s.op === 'done') {
          // Either a running request completes, or a granted body finishes arriving.
          const ready = bodies.findIndex((b, f) => b?.granted === true && !closed[f]);
          if (ready >= 0 && s.pick % 2 === 0) {
            const body = bodies[ready]!;
            bodies[ready] = undefined;
            costs.set(next, body.cost);
            queuedBodies.set(next, [ready, body.cost]);
            flows[ready]!.push(next++, body.cost, body.cost);
          } else if (running.length > 0) {
            const [r] = running.splice(s.pick % running.length, 1);
            if (r !== undefined) flows[r.flow]!.done(r.cost);
          }
        } else {
          closed[s.flow] = true;
          bodies[s.flow] = undefined;
          flows[s.flow]!.close();
        }
        assert.equal(budget.bytes, held(), 'the shared budget holds exactly what runs and what is reserved');
        // One request (or reserved body) may exceed the cap while it is the only thing held.
        const largest = Math.max(running.reduce((m, r) => Math.max(m, r.cost), 0), ...reservedBytes());
        assert.ok(budget.bytes <= Math.max(serviceBytes, largest) + FLOWS * reserveBytes, `${budget.bytes} held over ${serviceBytes} + ${FLOWS} x ${reserveBytes}`);
      }
    }),
    { numRuns: 400 },
  );
});

test('an idle connection gets one reserve-sized request through while others hold the whole service budget', () => {
  const budget = new SharedBudget(1000, { reserveBytes: 100 });
  const runs: string[] = [];
  const flow = (name: string): RequestFlow<string> => new RequestFlow<string>(new FakeSocket(), { maxRequests: 8, maxBytes: 10_000 }, newFlowStats(), (r) => runs.push(`${name}:${r}`), budget);
  const hog = flow('hog');
  const good = flow('good');
  hog.push('a', 600);
  hog.push('b', 400); // the service budget is full now
  hog.push('c', 50); // waits, small as it is: the hog is not idle
  good.push('x', 100); // idle connection, within the reserve: runs
  good.push('y', 100); // not idle any more: waits for the budget
  let body = false;
  const other = flow('other');
  assert.equal(other.reserve(100, () => (body = true)), true, 'an idle connection may reserve a body within the reserve too');
  assert.deepEqual(runs, ['hog:a', 'hog:b', 'good:x']);
  assert.equal(budget.bytes, 1200);
  hog.done(600);
  assert.ok(runs.includes('hog:c') && runs.includes('good:y'), runs.join(' '));
  assert.equal(body, false);
});

test('without a reserve (the default) an idle connection waits like any other', () => {
  const budget = new SharedBudget(1000);
  const runs: string[] = [];
  const flow = (name: string): RequestFlow<string> => new RequestFlow<string>(new FakeSocket(), { maxRequests: 8, maxBytes: 10_000 }, newFlowStats(), (r) => runs.push(`${name}:${r}`), budget);
  const hog = flow('hog');
  const good = flow('good');
  hog.push('a', 1000);
  good.push('x', 1);
  assert.deepEqual(runs, ['hog:a']);
  hog.done(1000);
  assert.deepEqual(runs, ['hog:a', 'good:x']);
});

test('waiters first: a large request waiting for the service budget is not passed by smaller ones of other connections, except through the idle reserve', () => {
  const budget = new SharedBudget(1000, { reserveBytes: 50, waitersFirst: true });
  const runs: string[] = [];
  const flow = (name: string): RequestFlow<string> => new RequestFlow<string>(new FakeSocket(), { maxRequests: 8, maxBytes: 10_000 }, newFlowStats(), (r) => runs.push(`${name}:${r}`), budget);
  const hog = flow('hog');
  const big = flow('big');
  const small = flow('small');
  const idle = flow('idle');
  hog.push('a', 600);
  hog.push('b', 10);
  big.push('x', 600); // 1210 would be over the cap: waits
  assert.equal(big.waitingOnService, true);
  small.push('y', 100); // would fit (710) but an older waiter comes first
  assert.equal(small.waitingOnService, true);
  idle.push('z', 40); // an idle connection's request within the reserve goes past the waiters
  assert.deepEqual(runs, ['hog:a', 'hog:b', 'idle:z']);
  hog.done(10); // 1200 with big's 600: still waits, and small behind it
  assert.deepEqual(runs, ['hog:a', 'hog:b', 'idle:z']);
  hog.done(600);
  assert.deepEqual(runs, ['hog:a', 'hog:b', 'idle:z', 'big:x', 'small:y'], 'the oldest waiter first, then the next');
  assert.equal(budget.waiters, 0);
});

test('without waiters first (NBD), a smaller request that fits goes past a larger one waiting', () => {
  const budget = new SharedBudget(1000);
  const runs: string[] = [];
  const flow = (name: string): RequestFlow<string> => new RequestFlow<string>(new FakeSocket(), { maxRequests: 8, maxBytes: 10_000 }, newFlowStats(), (r) => runs.push(`${name}:${r}`), budget);
  const hog = flow('hog');
  const big = flow('big');
  const small = flow('small');
  hog.push('a', 600);
  big.push('x', 600);
  small.push('y', 100);
  assert.deepEqual(runs, ['hog:a', 'small:y']);
  hog.done(600);
  assert.deepEqual(runs, ['hog:a', 'small:y', 'big:x']);
});

test('a connection held back by its own requests is not waiting on the service, and does not hold back others', () => {
  const budget = new SharedBudget(1000, { waitersFirst: true });
  const runs: string[] = [];
  const own = new RequestFlow<string>(new FakeSocket(), { maxRequests: 1, maxBytes: 10_000 }, newFlowStats(), (r) => runs.push(`own:${r}`), budget);
  const other = new RequestFlow<string>(new FakeSocket(), { maxRequests: 8, maxBytes: 10_000 }, newFlowStats(), (r) => runs.push(`other:${r}`), budget);
  own.push('a', 900);
  own.push('b', 50); // its own limit of one request holds it back
  assert.equal(own.waitingOnService, false);
  other.push('x', 50);
  assert.deepEqual(runs, ['own:a', 'other:x']);
  other.push('y', 200); // the service holds this one back
  assert.equal(other.waitingOnService, true);
  own.done(900); // own's b goes (its turn: other's y fits too)
  assert.deepEqual(runs, ['own:a', 'other:x', 'other:y', 'own:b']);
  assert.equal(budget.waiters, 0);
});
