// The node's ordered start-up and shutdown (src/node/lifecycle.ts) under interleavings
// explored by fast-check's scheduler: stop() called before, during or after start(), once
// or twice, with steps that fail to start or to stop. Whatever the order, every step that
// started is stopped exactly once, in reverse order, before any stop() resolves; no step
// starts after stop() was called (the one starting then finishes first); and a lifecycle
// never starts twice.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import pino from 'pino';
import { isMemstrataError } from '../../../src/errors.js';
import { Lifecycle } from '../../../src/node/lifecycle.js';

const log = pino({ level: 'silent' });

type Event = { kind: 'start-begin' | 'start-end' | 'start-failed' | 'stop' | 'stop-called'; step: number };

function codeOf(error: unknown): string | undefined {
  return isMemstrataError(error) ? error.code : undefined;
}

test('lifecycle: whenever stop() comes, every step that started is stopped once, in reverse, before stop() resolves, and none starts after it', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.scheduler(),
      fc.integer({ min: 1, max: 5 }),
      fc.option(fc.nat({ max: 4 }), { nil: undefined }),
      fc.array(fc.boolean(), { minLength: 5, maxLength: 5 }),
      fc.integer({ min: 0, max: 2 }),
      fc.boolean(),
      async (s, count, failAt, stopFails, stopCalls, stopAtOnce) => {
        const events: Event[] = [];
        const running = new Set<number>();
        const lifecycle = new Lifecycle(log);
        for (let i = 0; i < count; i++) {
          lifecycle.add({
            name: `step-${i}`,
            start: async () => {
              events.push({ kind: 'start-begin', step: i });
              await s.schedule(Promise.resolve(), `start ${i}`);
              if (i === failAt) {
                events.push({ kind: 'start-failed', step: i });
                throw new Error(`step ${i} failed to start`);
              }
              running.add(i);
              events.push({ kind: 'start-end', step: i });
            },
            stop: async () => {
              await s.schedule(Promise.resolve(), `stop ${i}`);
              assert.ok(running.delete(i), `step ${i} stopped once, and only after it started`);
              events.push({ kind: 'stop', step: i });
              if (stopFails[i] === true) throw new Error(`step ${i} failed to stop`);
            },
          });
        }
        const outcome = (p: Promise<void>): Promise<{ ok: boolean; error?: unknown }> =>
          p.then(
            () => ({ ok: true }),
            (error: unknown) => ({ ok: false, error }),
          );
        // A start() that rejects has stopped what it started by then (a failed step, or overtaken by stop()).
        let leftAtRejection: number[] = [];
        const started = outcome(lifecycle.start()).then((result) => {
          if (!result.ok) leftAtRejection = [...running];
          return result;
        });
        const watched = (): Promise<{ ok: boolean; error?: unknown }> =>
          outcome(lifecycle.stop()).then((result) => {
            assert.deepEqual([...running], [], 'nothing is left running when stop() resolves');
            return result;
          });
        // A stop() in the same turn as start(), before any step has had a turn.
        const atOnce: Promise<{ ok: boolean; error?: unknown }>[] = [];
        if (stopAtOnce) {
          events.push({ kind: 'stop-called', step: -1 });
          atOnce.push(watched());
        }
        // The stop() calls come at moments the scheduler picks among the steps' own.
        const stops = Array.from({ length: stopCalls }, (_, n) =>
          s.schedule(Promise.resolve(), `stop() call ${n}`).then(() => {
            events.push({ kind: 'stop-called', step: -1 });
            return watched();
          }),
        );
        stops.push(...atOnce);
        await s.waitFor(Promise.all([started, ...stops]));
        const start = await started;
        // Whatever stop() calls came, a last one leaves nothing running.
        const last = watched();
        await s.waitFor(last);
        const lastResult = await last;
        assert.deepEqual([...running], [], 'every step that started is stopped');

        const firstStopCall = events.findIndex((e) => e.kind === 'stop-called');
        if (firstStopCall >= 0) {
          const begunAfter = events.slice(firstStopCall).filter((e) => e.kind === 'start-begin');
          assert.deepEqual(begunAfter, [], 'no step begins to start once stop() was called');
        }
        const startOrder = events.filter((e) => e.kind === 'start-end').map((e) => e.step);
        const stopOrder = events.filter((e) => e.kind === 'stop').map((e) => e.step);
        assert.deepEqual(stopOrder, [...startOrder].reverse(), 'steps stop in reverse order of their start, each once');

        assert.deepEqual(leftAtRejection, [], 'nothing started is left running when start() rejects');
        const failed = events.some((e) => e.kind === 'start-failed');
        const lastStarted = events.findIndex((e) => e.kind === 'start-end' && e.step === count - 1);
        if (failed) {
          assert.equal(start.ok, false);
          assert.match((start.error as Error).message, /failed to start/, 'the start-up error is the one passed on');
        } else if (firstStopCall >= 0 && (lastStarted < 0 || firstStopCall < lastStarted)) {
          // Stopped before the last step had started (or while it started): never reported as started.
          assert.equal(codeOf(start.error), 'MS_SHUTTING_DOWN', 'a start cut short by stop() says so');
        } else {
          assert.equal(start.ok, true, `started: ${String(start.error)}`);
        }
        // Every stop(), concurrent or later, reports a step that failed to stop (also after a failed start-up), and only then.
        const stopFailed = stopOrder.some((i) => stopFails[i] === true);
        for (const result of [...(await Promise.all(stops)), lastResult]) {
          if (stopFailed) assert.match(String((result.error as Error | undefined)?.message), /failed to stop/, 'stop() passes on a step\'s failure to stop');
          else assert.equal(result.ok, true, `stop(): ${String(result.error)}`);
        }
        await assert.rejects(lifecycle.start(), (error: unknown) => codeOf(error) === 'MS_NODE_STARTED', 'a lifecycle starts once');
        assert.equal(running.size, 0, 'a refused start starts nothing');
      },
    ),
    { numRuns: 300 },
  );
});

test('lifecycle: a stop() from inside the first step\'s first turn waits for that step and stops it', async () => {
  const running = new Set<string>();
  const lifecycle = new Lifecycle(log);
  let stopped: Promise<void> | undefined;
  lifecycle.add({
    name: 'lock',
    start: () => {
      stopped = lifecycle.stop(); // before this step has awaited anything
      running.add('lock');
      return Promise.resolve();
    },
    stop: () => {
      running.delete('lock');
      return Promise.resolve();
    },
  });
  lifecycle.add({ name: 'listener', start: () => Promise.reject(new Error('never started')), stop: () => Promise.resolve() });
  await assert.rejects(lifecycle.start(), (error: unknown) => codeOf(error) === 'MS_SHUTTING_DOWN');
  await stopped;
  assert.deepEqual([...running], [], 'the step that was starting is stopped');
});

test('lifecycle: stop() before start() leaves start() refused, with nothing started', async () => {
  let starts = 0;
  const lifecycle = new Lifecycle(log);
  lifecycle.add({
    name: 'only',
    start: () => {
      starts++;
      return Promise.resolve();
    },
    stop: () => Promise.resolve(),
  });
  await lifecycle.stop();
  await assert.rejects(lifecycle.start(), (error: unknown) => codeOf(error) === 'MS_NODE_STARTED' && /stopped before it started/.test((error as Error).message));
  assert.equal(starts, 0);
});
