// The replacement policy alone: 2Q's queues, ghosts, and the correlated-reference window.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import type { Queue } from '../../../../src/storage/cache/line.js';
import { Replacement } from '../../../../src/storage/cache/replacement.js';
import { rng } from '../../../support/rng.js';

interface L {
  key: string;
  queue: Queue;
  firstRef: number;
  chain: object | undefined;
  older: L | undefined;
  newer: L | undefined;
}

const line = (key: string): L => ({ key, queue: 'a1in', firstRef: 0, chain: undefined, older: undefined, newer: undefined });

test('hits within the correlation window count as one reference; a hit after it promotes to Am', () => {
  const policy = new Replacement<L>(8);
  policy.resize(16);
  const a = line('a');
  policy.admitted(a);
  for (let i = 0; i < 8; i++) policy.hit(a); // 16 sub-line accesses of a scan: the same reference
  assert.equal(a.queue, 'a1in');
  const others = Array.from({ length: 8 }, (_, i) => line(`o${i}`));
  for (const o of others) policy.admitted(o);
  policy.hit(a); // a genuine second reference, after eight other accesses
  assert.equal(a.queue, 'am');
});

test('a line evicted from A1in leaves a ghost, and a miss that finds it goes straight to Am; Am leaves none', () => {
  const policy = new Replacement<L>(0);
  policy.resize(8);
  const a = line('a');
  policy.admitted(a);
  policy.evictedFromDram(a);
  assert.equal(policy.where('a'), 'ghost');
  const again = line('a');
  policy.admitted(again);
  assert.equal(again.queue, 'am');
  policy.evictedFromDram(again);
  assert.equal(policy.where('a'), undefined);
});

test('Am evicts its least recently hit line, exactly, under skewed hits', () => {
  const policy = new Replacement<L>(0);
  policy.resize(128);
  const lines = Array.from({ length: 64 }, (_, i) => line(`l${i}`));
  for (const l of lines) policy.admitted(l);
  for (const l of lines) policy.hit(l); // a second reference: all 64 in Am, A1in empty
  assert.ok(lines.every((l) => l.queue === 'am'));
  const random = rng(7);
  const lastHit = new Map<string, number>();
  for (let step = 0; step < 5000; step++) {
    // Skewed: a few hot lines take most hits, as under a zipf law.
    const l = lines[Math.floor(64 * random() ** 3)] as L;
    policy.hit(l);
    lastHit.set(l.key, step);
    const victim = policy.dramVictim();
    assert.ok(victim !== undefined);
    const least = lines.reduce((a, b) => ((lastHit.get(a.key) ?? -1) <= (lastHit.get(b.key) ?? -1) ? a : b));
    assert.equal(victim.key, least.key, `step ${step}: the victim is the line hit least recently`);
  }
});

test('a flash hit makes its line the most recent of the flash LRU, even right after a burst of demotions', () => {
  const policy = new Replacement<L>(0);
  policy.resize(2048);
  const lines = Array.from({ length: 1000 }, (_, i) => line(`f${i}`));
  for (const l of lines) policy.admitted(l);
  // A reclaim demotes many lines with no access in between.
  for (const l of lines) policy.demoted(l);
  policy.flashHit(lines[0] as L);
  assert.equal(policy.flashVictim()?.key, 'f1');
  for (let i = 1; i < 999; i++) policy.removed(lines[i] as L);
  assert.equal(policy.flashVictim()?.key, 'f999', 'f0, hit last, is the last to go');
});

test('a call repeated on a line links it once: a list never holds a line twice, nor loops', () => {
  const policy = new Replacement<L>(0);
  policy.resize(16);
  const [a, b, c] = ['a', 'b', 'c'].map(line) as [L, L, L];
  for (const l of [a, b, c]) policy.admitted(l);
  policy.admitted(a);
  assert.equal(policy.dramLines, 3);
  for (const l of [a, b, c]) policy.hit(l);
  policy.promoted(a); // already in Am
  assert.equal(policy.dramLines, 3);
  policy.demoted(a);
  policy.demoted(b);
  policy.demoted(a);
  assert.equal(policy.flashLines, 2);
  assert.equal(policy.dramLines, 1);
  assert.equal(policy.flashVictim(() => true), undefined, 'a walk of the flash list ends');
  assert.equal(policy.flashVictim()?.key, 'b');
  assert.equal(policy.dramVictim()?.key, 'c');
});

test('replacement invariants under random admissions, hits, evictions, demotions and promotions', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 0, max: 20 }),
      fc.integer({ min: 4, max: 32 }),
      fc.array(fc.record({ op: fc.constantFrom('admit', 'hit', 'evict', 'demote', 'promote', 'flashEvict', 'remove'), key: fc.integer({ min: 0, max: 40 }) }), { maxLength: 300 }),
      (window, slots, steps) => {
        const policy = new Replacement<L>(window);
        policy.resize(slots);
        const live = new Map<string, L>();
        for (const s of steps) {
          const key = `k${s.key}`;
          const l = live.get(key);
          const inDram = l !== undefined && l.queue !== 'flash';
          const dramCount = [...live.values()].filter((x) => x.queue !== 'flash').length;
          if (s.op === 'admit' && l === undefined && dramCount < slots) {
            const fresh = line(key);
            policy.admitted(fresh);
            live.set(key, fresh);
          } else if (s.op === 'hit' && inDram) policy.hit(l);
          else if (s.op === 'evict' && dramCount > 0) {
            const victim = policy.dramVictim();
            assert.ok(victim !== undefined && live.get(victim.key) === victim, 'the victim is a live DRAM line');
            policy.evictedFromDram(victim);
            live.delete(victim.key);
          } else if (s.op === 'demote' && inDram) policy.demoted(l);
          else if (s.op === 'promote' && l?.queue === 'flash' && dramCount < slots) policy.promoted(l);
          else if (s.op === 'flashEvict') {
            const victim = policy.flashVictim();
            if (victim !== undefined) {
              policy.removed(victim);
              live.delete(victim.key);
            }
          } else if (s.op === 'remove' && l !== undefined) {
            policy.removed(l);
            live.delete(key);
          }
          // Each live line is in exactly the queue its field names; ghosts are never live.
          for (const [k, x] of live) assert.equal(policy.where(k), x.queue);
          assert.equal(policy.dramLines + policy.flashLines, live.size);
          let ghosts = 0;
          for (let k = 0; k <= 40; k++) if (policy.where(`k${k}`) === 'ghost') ghosts++;
          assert.ok(ghosts <= Math.floor(slots / 2), `${ghosts} ghosts for ${slots} slots`);
          if (policy.dramLines === 0) assert.equal(policy.dramVictim(), undefined);
          else assert.ok(policy.dramVictim() !== undefined);
        }
      },
    ),
    { numRuns: 300 },
  );
});
