// BufferPool's bound on what it keeps idle: at most `perClass` buffers of a size class,
// and at most `maxBytes` in all (the NBD service keeps 32 MiB at most, so a burst of
// large requests does not leave its buffers behind).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BufferPool, PooledBodies, stagingPool } from '../../../src/memory/buffer-pool.js';

const MiB = 2 ** 20;

test('buffers are reused, at most perClass of a size and maxBytes in all; the rest go to the GC', () => {
  const pool = new BufferPool({ perClass: 2, maxBytes: 6 * MiB });
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

test('a pool from 4 KiB (NBD) reuses small buffers that are a size class, keeps up to smallClassBytes of each class below 1 MiB, and still has room for 1 MiB buffers once every small class is full', () => {
  const pool = new BufferPool({ perClass: 4, maxBytes: 32 * MiB, minSize: 4096, smallClassBytes: MiB });
  const small = pool.acquire(4000);
  assert.equal(small.length, 4000, 'below the least size: a fresh buffer of the size asked');
  pool.release(small);
  const odd = pool.acquire(20 * 1024);
  assert.equal(odd.length, 20 * 1024, 'below 64 KiB, a size that is no class gets a buffer of its own size (its budget is charged by length)');
  pool.release(odd);
  assert.equal(pool.retained, 0, 'neither is kept');
  const a = pool.acquire(4096);
  pool.release(a);
  assert.equal(pool.acquire(4096), a, '4 KiB buffers are reused');
  // A burst in every class below 1 MiB: each keeps 1 MiB, or perClass buffers if that is more (4 of 512 KiB).
  for (let size = 4096; size < MiB; size *= 2) {
    const burst = Array.from({ length: 2048 }, () => pool.acquire(size));
    for (const b of burst) pool.release(b);
  }
  assert.equal(pool.retained, 7 * MiB + 4 * 512 * 1024, 'seven small classes of 1 MiB, and four buffers of 512 KiB');
  const big = [pool.acquire(MiB), pool.acquire(MiB), pool.acquire(4 * MiB)];
  for (const b of big) pool.release(b);
  assert.equal(pool.acquire(MiB), big[1], 'a 1 MiB buffer is still reused');
  assert.equal(pool.acquire(4 * MiB), big[2], 'and a 4 MiB one');
});

test('the rmem pool (from 64 KiB, perClass per class) keeps its old rule: a burst of 64 KiB replies leaves perClass behind, and 1 MiB replies are still reused', () => {
  const pool = new BufferPool({ perClass: 8, maxBytes: 32 * MiB });
  const b = pool.acquire(16 * 1024);
  pool.release(b);
  assert.equal(pool.retained, 0, 'under 64 KiB: left to Node');
  for (let size = 64 * 1024; size < MiB; size *= 2) {
    const burst = Array.from({ length: 256 }, () => pool.acquire(size));
    for (const x of burst) pool.release(x);
  }
  assert.equal(pool.retained, 8 * (64 + 128 + 256 + 512) * 1024);
  const m = pool.acquire(MiB);
  pool.release(m);
  assert.equal(pool.acquire(MiB), m);
});

test('round: sizes from minSize up to 1 MiB get a buffer of their class, reused once given back; larger ones get their own size', () => {
  const pool = new BufferPool({ minSize: 4096, round: true, perClass: 8, smallClassBytes: 1024 * 1024, maxBytes: 8 * 1024 * 1024 });
  assert.equal(pool.acquire(1000).length, 1000);
  const small = pool.acquire(5000);
  assert.equal(small.length, 8192);
  pool.release(small);
  assert.equal(pool.acquire(6000), small, 'the same class is reused');
  assert.equal(pool.acquire(700_000).length, 1024 * 1024);
  // Rounded up, 8 MiB + 1 would take 16 MiB, more than the pool ever keeps.
  assert.equal(pool.acquire(8 * 1024 * 1024 + 1).length, 8 * 1024 * 1024 + 1);
  assert.equal(pool.acquire(1024 * 1024 + 1).length, 1024 * 1024 + 1);
  // Without round, a size below 64 KiB that is not a class keeps its own size.
  assert.equal(new BufferPool({ minSize: 4096 }).acquire(5000).length, 5000);
});

test('round: a buffer of a class above 1 MiB (a body of exactly 2, 4 or 8 MiB) is not kept, so it never holds room that no acquire could take back', () => {
  const pool = new BufferPool({ minSize: 4096, round: true, perClass: 8, smallClassBytes: 1024 * 1024, maxBytes: 8 * 1024 * 1024 });
  for (const size of [2, 4, 4, 8, 2, 2, 2, 2].map((m) => m * 1024 * 1024)) {
    const big = pool.acquire(size);
    assert.equal(big.length, size);
    pool.release(big);
  }
  assert.equal(pool.retained, 0);
  const small = pool.acquire(64 * 1024);
  pool.release(small);
  assert.equal(pool.acquire(64 * 1024), small, 'smaller classes are still kept and reused');
});

test('PooledBodies: a body is a view of exactly its length in a pooled buffer, which goes back once, and only for a body it handed out', () => {
  const pool = stagingPool(8 * 1024 * 1024);
  const bodies = new PooledBodies(pool);
  const body = bodies.take(10_000);
  assert.equal(body.length, 10_000);
  assert.equal(pool.retained, 0);
  bodies.release(Buffer.alloc(10_000)); // not one of its bodies
  assert.equal(pool.retained, 0);
  bodies.release(body);
  assert.equal(pool.retained, 16 * 1024);
  bodies.release(body); // again: nothing more
  assert.equal(pool.retained, 16 * 1024);
  const again = bodies.take(12_000);
  assert.equal(again.buffer, body.buffer, 'the buffer is reused');
});
