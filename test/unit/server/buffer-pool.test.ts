// BufferPool's bound on what it keeps idle: at most `perClass` buffers of a size class,
// and at most `maxBytes` in all (the NBD service keeps 32 MiB at most, so a burst of
// large requests does not leave its buffers behind).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BufferPool } from '../../../src/server/buffer-pool.js';

const MiB = 2 ** 20;

test('buffers are reused, at most perClass of a size and maxBytes in all; the rest go to the GC', () => {
  const pool = new BufferPool(2, 6 * MiB);
  const a = pool.acquire(3 * MiB);
  assert.equal(a.length, 4 * MiB, 'rounded up to its size class');
  pool.release(a);
  assert.equal(pool.retained, 4 * MiB);
  assert.equal(pool.acquire(4 * MiB), a, 'reused');
  assert.equal(pool.retained, 0);

  const kept = [pool.acquire(MiB), pool.acquire(MiB), pool.acquire(MiB)];
  for (const b of kept) pool.release(b);
  assert.equal(pool.retained, 2 * MiB, 'two kept of three');

  const big = pool.acquire(8 * MiB);
  pool.release(big);
  assert.equal(pool.retained, 2 * MiB, 'a buffer that would take the pool past maxBytes is not kept');
  assert.notEqual(pool.acquire(8 * MiB), big);
});
