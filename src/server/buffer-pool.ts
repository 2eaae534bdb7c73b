// Reusable buffers for payloads and replies.
//
// A 1 MiB READ reply allocated fresh each time costs page faults on first touch and
// garbage-collector work afterwards; measured on the rmem 1 MiB read benchmark, that was
// most of the node's CPU time. Buffers from `minSize` up are taken from here instead and
// given back once the socket has handed them to the kernel (the write callback), or once
// the storage call that read a WRITE's payload has settled (settle.ts).
//
//   size classes: powers of two from `minSize` up to the largest frame; at most
//   `perClass` kept of each, and of the classes below 1 MiB as many as fit in
//   perClass MiB (so 4 KiB buffers, the common NBD request, are reused at queue depth
//   32), and at most `maxBytes` kept in all (what the pool holds is outside any
//   request's budget, so it is bounded on its own)
//
// Below 4 KiB, Node's own slab allocator is cheaper than any pool. From 4 KiB up,
// Buffer.allocUnsafe makes a new ArrayBuffer each time, and the collector pays for it:
// NBD pools from 4 KiB (bench/nbd: 16 KiB random writes at QD8, 51-57k IOPS fresh
// against 65-68k pooled); rmem from 64 KiB.

/** The default least size pooled. */
export const POOL_MIN = 64 * 1024;
const MiB = 1024 * 1024;

export class BufferPool {
  private readonly free: Map<number, Buffer[]>;
  private readonly perClass: number;
  private readonly maxBytes: number;
  private readonly minSize: number;
  private kept: number;

  constructor(perClass = 8, maxBytes = Number.POSITIVE_INFINITY, minSize = POOL_MIN) {
    this.free = new Map();
    this.perClass = perClass;
    this.maxBytes = maxBytes;
    this.minSize = minSize;
    this.kept = 0;
  }

  /** Bytes held in the pool now. */
  get retained(): number {
    return this.kept;
  }

  /** A buffer of at least `size` bytes; below minSize a fresh one, else a pooled one. */
  acquire(size: number): Buffer {
    if (size < this.minSize) return Buffer.allocUnsafe(size);
    const cls = sizeClass(size);
    const buf = this.free.get(cls)?.pop();
    if (buf === undefined) return Buffer.allocUnsafeSlow(cls);
    this.kept -= buf.length;
    return buf;
  }

  /** Gives back a buffer that came from acquire; small ones are left to the GC. */
  release(buf: Buffer): void {
    if (buf.length < this.minSize || buf.length !== sizeClass(buf.length)) return;
    let list = this.free.get(buf.length);
    if (list === undefined) {
      list = [];
      this.free.set(buf.length, list);
    }
    const room = Math.max(this.perClass, Math.floor((this.perClass * MiB) / buf.length));
    if (list.length < room && this.kept + buf.length <= this.maxBytes) {
      list.push(buf);
      this.kept += buf.length;
    }
  }
}

function sizeClass(size: number): number {
  return 2 ** Math.ceil(Math.log2(size));
}
