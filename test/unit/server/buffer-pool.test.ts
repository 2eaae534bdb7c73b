// BufferPool's bound on what it keeps idle: `perClass` buffers per size class, none above
// `maxSize` (the NBD service keeps 4 up to 4 MiB, so a burst of 32 MiB requests does not
// leave 32 MiB buffers behind).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BufferPool } from '../../../src/server/buffer-pool.js';

const MiB = 2 ** 20;

test('buffers up to maxSize are reused, at most perClass of a size; larger ones are never kept', () => {
  const pool = new BufferPool(2, 4 * MiB);
  const a = pool.acquire(3 * MiB);
  assert.equal(a.length, 4 * MiB, 'rounded up to its size class');
  pool.release(a);
  assert.equal(pool.acquire(4 * MiB), a, 'reused');

  const kept = [pool.acquire(MiB), pool.acquire(MiB), pool.acquire(MiB)];
  for (const b of kept) pool.release(b);
  const again = [pool.acquire(MiB), pool.acquire(MiB), pool.acquire(MiB)];
  assert.equal(again.filter((b) => kept.includes(b)).length, 2, 'two kept of three');

  const big = pool.acquire(8 * MiB);
  pool.release(big);
  assert.notEqual(pool.acquire(8 * MiB), big, 'a buffer above maxSize goes to the GC');
});
