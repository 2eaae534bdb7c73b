// Reusable buffers for large replies.
//
// A 1 MiB READ reply allocated fresh each time costs page faults on first touch and
// garbage-collector work afterwards; measured on the rmem 1 MiB read benchmark, that was
// most of the node's CPU time. Buffers of 64 KiB and up are taken from here instead and
// given back once the socket has handed them to the kernel (the write callback).
//
//   size classes: 64 KiB, 128 KiB, ... up to the largest frame; `perClass` kept each,
//   and at most `maxBytes` kept in all (what the pool holds is outside any request's
//   budget, so it is bounded on its own)
//
// Smaller replies come from Node's own slab allocator, which is cheaper than any pool.

export const POOL_MIN = 64 * 1024;

export class BufferPool {
  private readonly free: Map<number, Buffer[]>;
  private readonly perClass: number;
  private readonly maxBytes: number;
  private kept: number;

  constructor(perClass = 8, maxBytes = Number.POSITIVE_INFINITY) {
    this.free = new Map();
    this.perClass = perClass;
    this.maxBytes = maxBytes;
    this.kept = 0;
  }

  /** Bytes held in the pool now. */
  get retained(): number {
    return this.kept;
  }

  /** A buffer of at least `size` bytes; below POOL_MIN a fresh one, else a pooled one. */
  acquire(size: number): Buffer {
    if (size < POOL_MIN) return Buffer.allocUnsafe(size);
    const cls = sizeClass(size);
    const buf = this.free.get(cls)?.pop();
    if (buf === undefined) return Buffer.allocUnsafeSlow(cls);
    this.kept -= buf.length;
    return buf;
  }

  /** Gives back a buffer that came from acquire; small ones are left to the GC. */
  release(buf: Buffer): void {
    if (buf.length < POOL_MIN || buf.length !== sizeClass(buf.length)) return;
    let list = this.free.get(buf.length);
    if (list === undefined) {
      list = [];
      this.free.set(buf.length, list);
    }
    if (list.length < this.perClass && this.kept + buf.length <= this.maxBytes) {
      list.push(buf);
      this.kept += buf.length;
    }
  }
}

function sizeClass(size: number): number {
  return 2 ** Math.ceil(Math.log2(size));
}
