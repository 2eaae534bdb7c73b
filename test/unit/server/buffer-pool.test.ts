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

test('a pool from 4 KiB (NBD) reuses small buffers, keeps as many of a small class as fit in perClass MiB, and leaves smaller sizes to Node', () => {
  const pool = new BufferPool(4, 32 * MiB, 4096);
  const small = pool.acquire(4000);
  assert.equal(small.length, 4000, 'below the least size: a fresh buffer of the size asked');
  pool.release(small);
  assert.equal(pool.retained, 0, 'and not kept');
  const a = pool.acquire(4096);
  pool.release(a);
  assert.equal(pool.acquire(4096), a, '4 KiB buffers are reused');
  const many = Array.from({ length: 2000 }, () => pool.acquire(4096));
  for (const b of many) pool.release(b);
  assert.equal(pool.retained, 4 * MiB, 'of 2,000 buffers of 4 KiB, 1,024 are kept: 4 MiB');
  const large = Array.from({ length: 10 }, () => pool.acquire(4 * MiB));
  for (const b of large) pool.release(b);
  assert.equal(pool.retained, 4 * MiB + 4 * 4 * MiB, 'of large classes perClass are kept');
  // The default least size (rmem) leaves anything under 64 KiB to Node.
  const rmem = new BufferPool(8, 64 * MiB);
  const b = rmem.acquire(16 * 1024);
  rmem.release(b);
  assert.equal(rmem.retained, 0);
});
