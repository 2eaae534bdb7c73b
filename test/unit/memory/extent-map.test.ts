import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ExtentMap } from '../../../src/memory/extent-map.js';
import { KINDS, type Kind } from '../../../src/kinds.js';

type Op =
  | { op: 'convert'; from: Kind; to: Kind; n: number }
  | { op: 'assign'; kind: Kind; owner: string; n: number }
  | { op: 'release'; owner: string; pick: number };

const kindArb = fc.constantFrom(...KINDS);
const ownerArb = fc.constantFrom('a', 'b', 'c');
const opArb: fc.Arbitrary<Op> = fc.oneof(
  fc.record({ op: fc.constant('convert' as const), from: kindArb, to: kindArb, n: fc.nat({ max: 40 }) }),
  fc.record({ op: fc.constant('assign' as const), kind: kindArb, owner: ownerArb, n: fc.nat({ max: 12 }) }),
  fc.record({ op: fc.constant('release' as const), owner: ownerArb, pick: fc.nat() }),
);

/** Checks every invariant of the map against a scan and against what the model says owners hold. */
function checkInvariants(map: ExtentMap, held: Map<string, Set<number>>): void {
  let sum = 0;
  for (const kind of KINDS) {
    let total = 0;
    let idle = 0;
    for (let i = 0; i < map.count; i++) {
      if (map.kindOf(i) !== kind) continue;
      total++;
      if (map.ownerOf(i) === null) idle++;
    }
    assert.equal(map.countOf(kind), total, `count of ${kind}`);
    assert.equal(map.idleOf(kind), idle, `idle of ${kind}`);
    sum += total;
  }
  assert.equal(sum, map.count, 'kinds add up to the medium');

  // No extent is held by two owners, and the map agrees with the model.
  const seen = new Map<number, string>();
  for (const [owner, set] of held) {
    for (const i of set) {
      assert.equal(seen.get(i), undefined, `extent ${i} held by ${owner} and ${seen.get(i)}`);
      seen.set(i, owner);
      assert.equal(map.ownerOf(i), owner);
    }
  }
  for (let i = 0; i < map.count; i++) if (map.ownerOf(i) !== null) assert.ok(seen.has(i), `extent ${i} owned outside the model`);

  // Runs cover every extent exactly once, in order, and merge whatever can be merged.
  const runs = map.runs();
  let next = 0;
  for (const [k, run] of runs.entries()) {
    assert.equal(run.first, next);
    assert.ok(run.count > 0);
    next += run.count;
    const prev = runs[k - 1];
    if (prev !== undefined) assert.ok(prev.kind !== run.kind || prev.owner !== run.owner, 'adjacent runs that should have merged');
  }
  assert.equal(next, map.count);
}

test('extent map: random conversions, assignments and releases keep every invariant', () => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 64 }), fc.array(opArb, { maxLength: 60 }), (count, ops) => {
      const map = new ExtentMap(count);
      const held = new Map<string, Set<number>>();
      for (const step of ops) {
        const before = map.runs();
        try {
          if (step.op === 'convert') {
            const kindsBefore = Array.from({ length: count }, (_, i) => map.kindOf(i));
            const moved = map.convert(step.from, step.to, step.n);
            if (step.from !== step.to) assert.equal(moved.length, step.n);
            for (const i of moved) {
              assert.equal(kindsBefore[i], step.from);
              assert.equal(map.ownerOf(i), null, 'only idle extents change kind');
            }
          } else if (step.op === 'assign') {
            const got = map.assign(step.kind, step.owner, step.n);
            assert.equal(got.length, step.n);
            const set = held.get(step.owner) ?? new Set<number>();
            for (const i of got) {
              assert.equal(map.kindOf(i), step.kind);
              set.add(i);
            }
            held.set(step.owner, set);
          } else {
            const set = held.get(step.owner) ?? new Set<number>();
            const give = [...set].filter((_, k) => (step.pick >> k) % 2 === 1);
            map.release(give, step.owner);
            for (const i of give) set.delete(i);
          }
        } catch (error) {
          assert.equal((error as { code?: string }).code, 'MS_EXTENTS_EXHAUSTED');
          assert.deepEqual(map.runs(), before, 'a failed operation changes nothing');
        }
        checkInvariants(map, held);
      }
    }),
    { numRuns: 300 },
  );
});

test('assign prefers the lowest contiguous run that fits', () => {
  const map = new ExtentMap(10);
  map.convert('free', 'server', 10);
  map.assign('server', 'x', 2); // 0,1
  map.assign('server', 'y', 1); // 2
  map.release([0, 1], 'x');
  assert.deepEqual(map.assign('server', 'z', 3), [3, 4, 5], 'the hole at 0-1 is too small');
  assert.deepEqual(map.assign('server', 'w', 2), [0, 1]);
});

test('assign scatters when no run is long enough, and release refuses extents of another owner', () => {
  const map = new ExtentMap(6);
  map.convert('free', 'cache', 6);
  map.assign('cache', 'a', 6);
  map.release([1, 3, 5], 'a');
  assert.deepEqual(map.assign('cache', 'b', 3), [1, 3, 5]);
  assert.throws(() => map.release([1], 'a'), { code: 'MS_EXTENT_NOT_OWNED' });
  assert.throws(() => map.release([99], 'b'), { code: 'MS_EXTENT_NOT_OWNED' });
  assert.deepEqual(map.ownersOf('cache'), [{ owner: 'a', extents: 3 }, { owner: 'b', extents: 3 }]);
});

test('convert keeps a kind in one run by taking the nearest donors', () => {
  const map = new ExtentMap(12);
  map.convert('free', 'cache', 4); // 0-3 (nearest to nothing: lowest first)
  map.convert('free', 'server', 4); // 4-7, next to nothing of server: lowest free
  map.convert('free', 'server', 2); // 8-9 touch the server run
  assert.deepEqual(
    map.runs().map((r) => [r.kind, r.first, r.count]),
    [['cache', 0, 4], ['server', 4, 6], ['free', 10, 2]],
  );
  map.convert('cache', 'server', 2); // the cache extents next to server go first
  assert.deepEqual(
    map.runs().map((r) => [r.kind, r.first, r.count]),
    [['cache', 0, 2], ['server', 2, 8], ['free', 10, 2]],
  );
});
