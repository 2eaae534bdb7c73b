// Reusable buffers for payloads and replies.
//
// A 1 MiB READ reply allocated fresh each time costs page faults on first touch and
// garbage-collector work afterwards; measured on the rmem 1 MiB read benchmark, that was
// most of the node's CPU time. Buffers from `minSize` up are taken from here instead and
// given back once the socket has handed them to the kernel (the write callback), or once
// the storage call that read a WRITE's payload has settled (settle.ts).
//
//   size classes: powers of two from `minSize` up to the largest frame; at most
//   `perClass` kept of each, or with `smallClassBytes`, of each class below 1 MiB as
//   many as fit in that many bytes (so 4 KiB buffers, the common NBD request, are
//   reused at queue depth 32); at most `maxBytes` kept in all (what the pool holds is
//   outside any request's budget, so it is bounded on its own). The small classes
//   together hold little of the cap (9 MiB of NBD's 32 MiB: seven classes of 1 MiB,
//   four buffers of 512 KiB), so 1 MiB buffers still find room.
//
// With `round`, sizes from `minSize` up to 1 MiB come from the pool rounded up to their
// class, for callers that use a subarray and give the whole buffer back: NVRAM devices
// stage the records of an append in one (given back once the device's memory and the
// journal file have the bytes), the rmem service assembles a JAPPEND body that spans
// socket reads in one (given back once the append has settled) and the mirror service a
// partner's APPEND body (given back once the replica has the records), all from 4 KiB. A fresh
// buffer for each was garbage the size of everything appended. Their budgets charge the
// length, not the class: what the rounding adds is at most the length again, and what
// the pools keep is bounded on its own.
//
// Below 4 KiB, Node's own slab allocator is cheaper than any pool. From 4 KiB up,
// Buffer.allocUnsafe makes a new ArrayBuffer each time, and the collector pays for it.
// NBD pools from 4 KiB (docs/BENCHMARKS.md: 4k randrw QD32 1.07x, 16 KiB random writes
// 1.09x); rmem replies from 64 KiB. Without `round`, below 64 KiB only sizes that are a
// class themselves come from the pool: a 20 KiB NBD request gets a buffer of its own
// size, not one of 32 KiB that its budget (charged by length) would not count.

/** The default least size pooled. */
export const POOL_MIN = 64 * 1024;
const MiB = 1024 * 1024;
/** With `round`, the largest class a size is rounded up to; larger sizes get a buffer of their own size. */
const ROUND_MAX = MiB;

export interface BufferPoolOptions {
  /** Buffers kept per size class (default 8). */
  perClass?: number;
  /** Bytes kept in all (default unbounded). */
  maxBytes?: number;
  /** The least size pooled (default POOL_MIN). */
  minSize?: number;
  /** Classes below 1 MiB may keep as many buffers as fit in this many bytes, if more than perClass. */
  smallClassBytes?: number;
  /**
   * Every size from `minSize` up to 1 MiB gets a buffer of its class, below POOL_MIN too
   * (default false): for callers that use a subarray of it and give the whole buffer back.
   */
  round?: boolean;
}

export class BufferPool {
  private readonly free: Map<number, Buffer[]>;
  private readonly perClass: number;
  private readonly maxBytes: number;
  private readonly minSize: number;
  private readonly smallClassBytes: number;
  private readonly round: boolean;
  private kept: number;

  constructor(options: BufferPoolOptions = {}) {
    this.free = new Map();
    this.perClass = options.perClass ?? 8;
    this.maxBytes = options.maxBytes ?? Number.POSITIVE_INFINITY;
    this.minSize = options.minSize ?? POOL_MIN;
    this.smallClassBytes = options.smallClassBytes ?? 0;
    this.round = options.round ?? false;
    this.kept = 0;
  }

  /** Bytes held in the pool now. */
  get retained(): number {
    return this.kept;
  }

  /** A buffer of at least `size` bytes: a pooled one of its size class, or a fresh one (of its class with `round`, else of `size`). */
  acquire(size: number): Buffer {
    if (size < this.minSize || (!this.round && size < POOL_MIN && size !== sizeClass(size))) return Buffer.allocUnsafe(size);
    const cls = sizeClass(size);
    // Rounded up, a large size would take twice its bytes for a buffer the pool may never keep.
    if (this.round && cls > Math.min(ROUND_MAX, this.maxBytes)) return Buffer.allocUnsafe(size);
    const buf = this.free.get(cls)?.pop();
    if (buf === undefined) return Buffer.allocUnsafeSlow(cls);
    this.kept -= buf.length;
    return buf;
  }

  /**
   * Gives back a buffer that came from acquire; others (below minSize, not a class, or
   * with `round` a class acquire never hands out) are left to the GC. Kept, such a
   * buffer would hold room in `maxBytes` that no acquire could ever take back.
   */
  release(buf: Buffer): void {
    if (buf.length < this.minSize || buf.length !== sizeClass(buf.length)) return;
    if (this.round && buf.length > Math.min(ROUND_MAX, this.maxBytes)) return;
    let list = this.free.get(buf.length);
    if (list === undefined) {
      list = [];
      this.free.set(buf.length, list);
    }
    const room = buf.length < MiB ? Math.max(this.perClass, Math.floor(this.smallClassBytes / buf.length)) : this.perClass;
    if (list.length < room && this.kept + buf.length <= this.maxBytes) {
      list.push(buf);
      this.kept += buf.length;
    }
  }
}

/**
 * Request bodies a connection assembles in buffers of a pool: each body is a view of its
 * buffer, which goes back to the pool once the request is done with the body. A body
 * never given back (its connection closed first, with the socket perhaps still reading
 * into it) is left to the GC with the connection.
 */
export class PooledBodies {
  private readonly pool: BufferPool;
  /** Each body handed out and not given back, with the buffer it is a view of. */
  private readonly owners: Map<Buffer, Buffer>;

  constructor(pool: BufferPool) {
    this.pool = pool;
    this.owners = new Map();
  }

  /** A body of exactly `length` bytes in a buffer of the pool. */
  take(length: number): Buffer {
    const owner = this.pool.acquire(length);
    const body = owner.subarray(0, length);
    this.owners.set(body, owner);
    return body;
  }

  /** Gives the buffer of `body` back to the pool, if `body` came from take. */
  release(body: Buffer): void {
    const owner = this.owners.get(body);
    if (owner === undefined) return;
    this.owners.delete(body);
    this.pool.release(owner);
  }
}

/**
 * A pool for staging bytes from 4 KiB up, rounded to their class (see `round`), keeping
 * up to 1 MiB of each class below 1 MiB and `maxBytes` in all: NVRAM appends' records,
 * rmem JAPPEND bodies and mirror APPEND bodies.
 */
export function stagingPool(maxBytes: number): BufferPool {
  return new BufferPool({ minSize: 4096, round: true, perClass: 8, smallClassBytes: MiB, maxBytes });
}

/** The power of two at or above `size` (by counting bits: Math.log2 and ** showed in profiles of 4 KiB requests). */
function sizeClass(size: number): number {
  if (size <= 1) return 1;
  if (size > 2 ** 31) return 2 ** Math.ceil(Math.log2(size));
  return 2 ** (32 - Math.clz32(size - 1));
}
