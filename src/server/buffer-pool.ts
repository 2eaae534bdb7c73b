// Reusable buffers for large replies.
//
// A 1 MiB READ reply allocated fresh each time costs page faults on first touch and
// garbage-collector work afterwards; measured on the rmem 1 MiB read benchmark, that was
// most of the node's CPU time. Buffers of 64 KiB and up are taken from here instead and
// given back once the socket has handed them to the kernel (the write callback).
//
//   size classes: 64 KiB, 128 KiB, ... up to `maxSize`; `perClass` kept each
//
// What the pool keeps idle is at most perClass x (64 KiB + ... + maxSize), under 2 x
// perClass x maxSize; buffers above maxSize are handed out but left to the GC.
//
// Smaller replies come from Node's own slab allocator, which is cheaper than any pool.

export const POOL_MIN = 64 * 1024;

export class BufferPool {
  private readonly free: Map<number, Buffer[]>;
  private readonly perClass: number;
  private readonly maxSize: number;

  constructor(perClass = 8, maxSize = Number.POSITIVE_INFINITY) {
    this.free = new Map();
    this.perClass = perClass;
    this.maxSize = maxSize;
  }

  /** A buffer of at least `size` bytes; below POOL_MIN a fresh one, else a pooled one. */
  acquire(size: number): Buffer {
    if (size < POOL_MIN) return Buffer.allocUnsafe(size);
    const cls = sizeClass(size);
    return this.free.get(cls)?.pop() ?? Buffer.allocUnsafeSlow(cls);
  }

  /** Gives back a buffer that came from acquire; small ones are left to the GC. */
  release(buf: Buffer): void {
    if (buf.length < POOL_MIN || buf.length > this.maxSize || buf.length !== sizeClass(buf.length)) return;
    let list = this.free.get(buf.length);
    if (list === undefined) {
      list = [];
      this.free.set(buf.length, list);
    }
    if (list.length < this.perClass) list.push(buf);
  }
}

function sizeClass(size: number): number {
  return 2 ** Math.ceil(Math.log2(size));
}
