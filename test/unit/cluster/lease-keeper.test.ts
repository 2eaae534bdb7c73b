// The lease keeper's one promise, on which membership and (later) fenced ownership rest:
// whenever it says the lease is held, etcd holds it too. Checked against a model of etcd
// (leases that expire a TTL after the last renewal etcd received, and that a restart of
// etcd gives a fresh TTL) with requests that take time to reach etcd, answers that take
// time to come back, requests lost on the way and answers lost after etcd acted on them.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import pino from 'pino';
import { LeaseKeeper, type LeaseApi } from '../../../src/cluster/lease-keeper.js';

const TTL_S = 2;
const CALL_TIMEOUT_MS = 700;

type Step =
  | { kind: 'ok'; there: number; back: number }
  /** The request never reaches etcd; the call fails after its timeout. */
  | { kind: 'lostRequest' }
  /** etcd acts on it; the answer is lost and the call fails after its timeout. */
  | { kind: 'lostAnswer'; there: number }
  /** etcd restarts before the request arrives: every lease gets a fresh TTL. */
  | { kind: 'restart'; there: number; back: number };

const step: fc.Arbitrary<Step> = fc.oneof(
  { weight: 5, arbitrary: fc.record({ kind: fc.constant('ok' as const), there: fc.integer({ min: 0, max: 600 }), back: fc.integer({ min: 0, max: 600 }) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('lostRequest' as const) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('lostAnswer' as const), there: fc.integer({ min: 0, max: 600 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('restart' as const), there: fc.integer({ min: 0, max: 600 }), back: fc.integer({ min: 0, max: 600 }) }) },
);

class ModelEtcd {
  clock = 0;
  readonly leases = new Map<string, number>();
  private next = 1;

  /** A lease is alive at `t` if etcd would still answer it with a TTL. */
  alive(id: string, t: number): boolean {
    return (this.leases.get(id) ?? -1) > t;
  }

  grant(): string {
    const id = String(this.next++);
    this.leases.set(id, this.clock + TTL_S * 1000);
    return id;
  }

  keepAlive(id: string): number {
    if (!this.alive(id, this.clock)) {
      this.leases.delete(id);
      return 0;
    }
    this.leases.set(id, this.clock + TTL_S * 1000);
    return TTL_S;
  }

  restart(): void {
    for (const id of this.leases.keys()) if (this.alive(id, this.clock)) this.leases.set(id, this.clock + TTL_S * 1000);
  }
}

test('the keeper never says it holds a lease that etcd has let go, whatever the delays and losses', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(step, { minLength: 5, maxLength: 60 }), async (steps) => {
      const etcd = new ModelEtcd();
      // Set once the keeper exists; the fake etcd's calls check it from then on.
      const ref: { keeper: LeaseKeeper | undefined } = { keeper: undefined };
      const violations: string[] = [];
      // At every moment the keeper's view changes or time passes: held => etcd holds it.
      const check = (when: string): void => {
        const keeper = ref.keeper;
        const id = keeper?.id;
        if (keeper === undefined || id === undefined) return;
        const heldUntil = etcd.clock + keeper.remainingMs();
        if ((etcd.leases.get(id) ?? -1) < heldUntil) violations.push(`${when} at ${etcd.clock}: keeper holds ${id} until ${heldUntil}, etcd until ${etcd.leases.get(id) ?? 'gone'}`);
      };
      const advance = (ms: number, when: string): void => {
        etcd.clock += ms;
        check(when);
      };
      let i = 0;
      const call = async <T>(act: () => T): Promise<T> => {
        const s = steps[i++ % steps.length] ?? { kind: 'ok', there: 0, back: 0 };
        await Promise.resolve();
        switch (s.kind) {
          case 'lostRequest':
            advance(CALL_TIMEOUT_MS, 'request lost');
            throw new Error('no answer');
          case 'lostAnswer': {
            advance(s.there, 'on the way');
            act();
            advance(CALL_TIMEOUT_MS - s.there, 'answer lost');
            throw new Error('no answer');
          }
          case 'restart':
          case 'ok': {
            advance(s.there, 'on the way');
            if (s.kind === 'restart') etcd.restart();
            const value = act();
            advance(s.back, 'on the way back');
            return value;
          }
        }
      };
      const api: LeaseApi = {
        grant: (ttl) => call(() => ({ id: etcd.grant(), ttlSeconds: ttl })),
        keepAlive: (id) => call(() => etcd.keepAlive(id)),
        revoke: (id) => {
          etcd.leases.delete(id);
          return Promise.resolve();
        },
      };
      let sleeps = 0;
      let stop: () => void = () => undefined;
      const done = new Promise<void>((resolve) => {
        stop = resolve;
      });
      const keeper = new LeaseKeeper({
        api,
        ttlMs: TTL_S * 1000,
        log: pino({ level: 'silent' }),
        now: () => etcd.clock,
        sleep: async (ms) => {
          advance(ms, 'asleep');
          if (++sleeps >= steps.length * 2) stop();
          await new Promise((resolve) => setImmediate(resolve));
        },
      });
      ref.keeper = keeper;
      keeper.on('granted', () => {
        check('granted');
      });
      keeper.start();
      await done;
      await keeper.close({ revoke: false });
      assert.deepEqual(violations, []);
    }),
    { numRuns: 200 },
  );
});

test('a renewal answered late counts from when it was sent, and one etcd refuses ends the lease at once', async () => {
  let clock = 0;
  let answer = 2;
  let delay = 0;
  const api: LeaseApi = {
    grant: () => Promise.resolve({ id: '7', ttlSeconds: 2 }),
    keepAlive: () => {
      clock += delay;
      return Promise.resolve(answer);
    },
    revoke: () => Promise.resolve(),
  };
  const events: string[] = [];
  let wake: (() => void) | undefined;
  const keeper = new LeaseKeeper({
    api,
    ttlMs: 2000,
    log: pino({ level: 'silent' }),
    now: () => clock,
    sleep: (ms) => {
      clock += Math.min(ms, 100);
      return new Promise((resolve) => {
        wake = resolve;
      });
    },
  });
  keeper.on('granted', (id) => events.push(`granted ${id}`));
  keeper.on('lost', (id, why) => events.push(`lost ${id}: ${why}`));
  const turn = async (): Promise<void> => {
    await new Promise((resolve) => setImmediate(resolve));
    const w = wake;
    wake = undefined;
    w?.();
    await new Promise((resolve) => setImmediate(resolve));
  };
  keeper.start();
  await turn();
  assert.equal(keeper.id, '7');
  // A renewal sent at t and answered 1500 ms later holds until t + TTL, not answer + TTL.
  delay = 1500;
  const sentAt = clock;
  await turn();
  assert.equal(keeper.id, '7');
  assert.ok(clock + keeper.remainingMs() <= sentAt + 2000, `held until ${clock + keeper.remainingMs()}, sent at ${sentAt}`);
  // etcd answers TTL 0: the lease is gone at once, and a new one is granted.
  delay = 0;
  answer = 0;
  await turn();
  assert.deepEqual(events, ['granted 7', 'lost 7: etcd says it expired']);
  answer = 2;
  await turn();
  assert.deepEqual(events, ['granted 7', 'lost 7: etcd says it expired', 'granted 7']);
  const closing = keeper.close({ revoke: true });
  wake?.();
  await closing;
  assert.equal(keeper.id, undefined);
});
