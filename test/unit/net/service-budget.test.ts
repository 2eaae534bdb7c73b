// ServiceBudget: the bytes in flight of a whole service, shared by the RequestFlows of its
// connections. A model-based property drives several flows at once (pushes, completions,
// closes, write-buffer states) and checks the invariants stated at the top of
// src/net/service-budget.ts after every step.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import fc from 'fast-check';
import { RequestFlow, newFlowStats } from '../../../src/net/request-flow.js';
import { ServiceBudget } from '../../../src/net/service-budget.js';

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

type Step =
  | { op: 'push'; flow: number; cost: number }
  | { op: 'done'; pick: number }
  | { op: 'close'; flow: number }
  | { op: 'buffer'; flow: number; length: number };

const FLOWS = 4;
const step: fc.Arbitrary<Step> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ op: fc.constant('push' as const), flow: fc.nat(FLOWS - 1), cost: fc.integer({ min: 0, max: 5000 }) }) },
  { weight: 5, arbitrary: fc.record({ op: fc.constant('done' as const), pick: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('close' as const), flow: fc.nat(FLOWS - 1) }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('buffer' as const), flow: fc.nat(FLOWS - 1), length: fc.integer({ min: 0, max: 2000 }) }) },
);

test('ServiceBudget bounds the bytes of all flows together, keeps each flow in order, and never leaves work waiting on an idle service', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 6 }),
      fc.integer({ min: 1, max: 6000 }),
      fc.integer({ min: 1, max: 12000 }),
      fc.integer({ min: 0, max: 1500 }),
      fc.array(step, { maxLength: 250 }),
      (maxRequests, maxBytes, serviceBytes, reserveBytes, steps) => {
        const budget = new ServiceBudget({ maxBytes: serviceBytes, reserveBytes });
        const running: { flow: number; id: number; cost: number }[] = [];
        const costs = new Map<number, number>();
        const sockets: FakeSocket[] = [];
        const flows: RequestFlow<number>[] = [];
        const started: number[][] = [];
        const closed: boolean[] = [];
        for (let f = 0; f < FLOWS; f++) {
          const socket = new FakeSocket();
          sockets.push(socket);
          started.push([]);
          closed.push(false);
          flows.push(new RequestFlow<number>(socket, { maxRequests, maxBytes }, newFlowStats(), (id) => {
            started[f]!.push(id);
            running.push({ flow: f, id, cost: costs.get(id) ?? 0 });
          }, budget));
        }
        let next = 0;
        for (const s of steps) {
          if (s.op === 'push') {
            costs.set(next, s.cost);
            flows[s.flow]!.push(next++, s.cost);
          } else if (s.op === 'done') {
            if (running.length === 0) continue;
            const [r] = running.splice(s.pick % running.length, 1);
            if (r !== undefined) flows[r.flow]!.done(r.cost);
          } else if (s.op === 'close') {
            closed[s.flow] = true;
            flows[s.flow]!.close();
          } else {
            sockets[s.flow]!.writableLength = s.length;
            sockets[s.flow]!.emit('drain');
          }
          const held = running.reduce((sum, r) => sum + r.cost, 0);
          assert.equal(budget.bytes, held, 'the budget holds exactly the costs of running requests');
          const largest = running.reduce((m, r) => Math.max(m, r.cost), 0);
          assert.ok(held <= Math.max(serviceBytes, largest) + FLOWS * reserveBytes, `held ${held} over ${serviceBytes} + ${FLOWS} x ${reserveBytes} (largest ${largest})`);
          for (let f = 0; f < FLOWS; f++) {
            const mine = running.filter((r) => r.flow === f);
            assert.equal(flows[f]!.inFlight, mine.length);
            if (mine.length > 1) {
              assert.ok(mine.length <= maxRequests);
              assert.ok(mine.reduce((sum, r) => sum + r.cost, 0) <= maxBytes);
            }
            assert.deepEqual(started[f], [...started[f]!].sort((a, b) => a - b), 'each flow dispatches in arrival order');
            // Nothing waits while the whole service is idle: the budget admits anything then.
            if (flows[f]!.queued > 0) assert.ok(running.length > 0, `flow ${f} waits on an idle service`);
            if (!closed[f] && flows[f]!.queued > 0) assert.ok(sockets[f]!.paused, 'a flow with waiting requests is not read');
          }
        }
        // Completing everything runs everything still queued on open flows.
        while (running.length > 0) {
          const r = running.shift();
          if (r !== undefined) flows[r.flow]!.done(r.cost);
        }
        for (let f = 0; f < FLOWS; f++) if (!closed[f]) assert.equal(flows[f]!.queued, 0);
        assert.equal(budget.bytes, 0);
        assert.equal(budget.waiters, 0);
      },
    ),
    { numRuns: 400 },
  );
});

test('an idle connection gets one reserve-sized request through while others hold the whole service budget', () => {
  const budget = new ServiceBudget({ maxBytes: 1000, reserveBytes: 100 });
  const runs: string[] = [];
  const flow = (name: string): RequestFlow<string> => new RequestFlow<string>(new FakeSocket(), { maxRequests: 8, maxBytes: 10_000 }, newFlowStats(), (r) => runs.push(`${name}:${r}`), budget);
  const hog = flow('hog');
  const good = flow('good');
  hog.push('a', 600);
  hog.push('b', 400); // the service budget is full now
  hog.push('c', 50); // waits, even though small: the hog is not idle
  good.push('x', 100); // idle connection, within the reserve: runs
  good.push('y', 100); // not idle any more: waits for the budget
  assert.deepEqual(runs, ['hog:a', 'hog:b', 'good:x']);
  assert.equal(budget.bytes, 1100);
  // The hog gives back 600: the waiters go in the order they came, hog first.
  hog.done(600);
  assert.deepEqual(runs, ['hog:a', 'hog:b', 'good:x', 'hog:c', 'good:y']);
});

test('a large request at the head of the line is not overtaken by smaller ones from other connections', () => {
  const budget = new ServiceBudget({ maxBytes: 1000, reserveBytes: 0 });
  const runs: string[] = [];
  const flow = (name: string): RequestFlow<string> => new RequestFlow<string>(new FakeSocket(), { maxRequests: 8, maxBytes: 10_000 }, newFlowStats(), (r) => runs.push(`${name}:${r}`), budget);
  const a = flow('a');
  const big = flow('big');
  const small = flow('small');
  a.push('1', 500);
  a.push('2', 500);
  big.push('B', 900); // waits first
  small.push('s', 10); // waits behind it
  a.done(500); // 500 free: not enough for B, so s must not pass it
  assert.deepEqual(runs, ['a:1', 'a:2']);
  a.done(500);
  assert.deepEqual(runs, ['a:1', 'a:2', 'big:B', 'small:s']);
});

test('a closed connection leaves the waiting line and still gives back what it held', () => {
  const budget = new ServiceBudget({ maxBytes: 100, reserveBytes: 0 });
  const runs: string[] = [];
  const flow = (name: string): RequestFlow<string> => new RequestFlow<string>(new FakeSocket(), { maxRequests: 8, maxBytes: 10_000 }, newFlowStats(), (r) => runs.push(`${name}:${r}`), budget);
  const a = flow('a');
  const b = flow('b');
  const c = flow('c');
  a.push('1', 100);
  b.push('1', 50);
  c.push('1', 50);
  assert.equal(budget.waiters, 2);
  b.close();
  assert.equal(budget.waiters, 1);
  a.close(); // its request is still running
  a.done(100);
  assert.deepEqual(runs, ['a:1', 'c:1']);
  assert.equal(budget.bytes, 50);
});
