// The places a host's memory can live (Hitachi US 9,304,828, FIG. 16), each handing out
// byte ranges and serving reads and writes of what it handed out:
//
//   local dram    a RangeTier over one Buffer of the configured budget   (BufferStore)
//   local flash   a RangeTier over a file of the configured size          (FileStore)
//   swap          a RangeTier over a block volume over NBD, the last resort (VolumeStore)
//   node <name>   regions bound on a memstrata node over rmem (remote-node.ts)
//
// A `Piece` is one part of a segment on one device; a segment is one or more pieces
// (an allocation spans nodes when no single node has room). Memory handed out reads as
// zeros: local and swap space is zeroed when it is freed, and nodes zero what they bind.
//
// A RangeTier trusts its caller to have stopped every I/O on a piece before releasing
// it (HierarchyMemory.free waits on the segment's IoGate first): release zeroes the
// ranges and hands them straight back to the free list, where the next `take` finds them.
// A range whose zeroing fails is neither free nor anyone's: it waits in `unzeroed`, still
// counted as assigned, and `rezero` (run before the tier is asked for space) tries again,
// so a transient failure costs the space only until the store works again.
//
// The stores sit behind one narrow interface (RangeStore) so that a test can wrap any of
// them to delay, reorder or fail chosen calls.

import { open, type FileHandle } from 'node:fs/promises';
import type { NbdClient } from '../client/nbd-client.js';
import { MisuseError, type MemstrataError } from '../errors.js';
import { writeAll, writeZeros } from '../fs/positional-io.js';
import { FreeRanges, type ByteRange } from '../memory/free-ranges.js';

export type TierMedium = 'dram' | 'flash' | 'volume';

/** One part of a segment, on one device and medium. */
export interface Piece {
  readonly device: string;
  readonly medium: TierMedium;
  readonly length: number;
  /** Where the bytes are on the device, in order (the mapping table's physical ranges). */
  readonly physical: readonly ByteRange[];
  read(offset: number, target: Buffer): Promise<void>;
  write(offset: number, data: Buffer): Promise<void>;
  /** Gives the space back; the caller has stopped all I/O on the piece first. */
  release(): Promise<void>;
  /** Why the piece's memory is gone (its node was lost), or undefined while it is there. */
  failure(): MemstrataError | undefined;
}

/** Where a range tier keeps its bytes: positional reads and writes, and zeroing. */
export interface RangeStore {
  read(at: number, target: Buffer): Promise<void>;
  write(at: number, data: Buffer): Promise<void>;
  zero(at: number, length: number): Promise<void>;
}

/** Space a tier takes from a FreeRanges and serves by physical offset through its store. */
export class RangeTier {
  readonly device: string;
  readonly medium: TierMedium;
  readonly capacity: number;
  private readonly store: RangeStore;
  private readonly free: FreeRanges;
  /** Ranges of released pieces whose zeroing failed: not free until zeroed. */
  private unzeroed: ByteRange[];

  constructor(device: string, medium: TierMedium, capacity: number, store: RangeStore) {
    this.device = device;
    this.medium = medium;
    this.capacity = capacity;
    this.store = store;
    this.free = new FreeRanges();
    this.unzeroed = [];
    if (capacity > 0) this.free.add(0, capacity);
  }

  get available(): number {
    return this.free.total;
  }

  get assigned(): number {
    return this.capacity - this.free.total;
  }

  /** Bytes given back whose zeroing failed, waiting for `rezero`. */
  get unzeroedBytes(): number {
    return this.unzeroed.reduce((sum, r) => sum + r.length, 0);
  }

  /**
   * Zeroes again the ranges whose zeroing failed when they were released, and frees those
   * that succeed; the others wait for the next call. Rejects with the first failure.
   */
  async rezero(): Promise<void> {
    const pending = this.unzeroed;
    if (pending.length === 0) return;
    this.unzeroed = []; // taken as a whole, so two calls never zero and free one range twice
    await this.zeroAndFree(pending);
  }

  /** A piece of `length` bytes, or undefined when the tier has not that much free. */
  take(length: number): Piece | undefined {
    const ranges = this.free.take(length);
    if (ranges === undefined) return undefined;
    let released = false;
    return {
      device: this.device,
      medium: this.medium,
      length,
      physical: ranges,
      read: (offset, target) => this.each(ranges, offset, target.length, (at, from, n) => this.store.read(at, target.subarray(from, from + n))),
      write: (offset, data) => this.each(ranges, offset, data.length, (at, from, n) => this.store.write(at, data.subarray(from, from + n))),
      release: async () => {
        if (released) return;
        released = true;
        await this.zeroAndFree(ranges);
      },
      failure: () => undefined,
    };
  }

  /**
   * Zeroes each range and frees it; a range whose zeroing fails is kept in `unzeroed`
   * (never lost, never handed out with old bytes). Rejects with the first failure.
   */
  private async zeroAndFree(ranges: readonly ByteRange[]): Promise<void> {
    let failure: { error: unknown } | undefined;
    for (const r of ranges) {
      try {
        await this.store.zero(r.start, r.length);
      } catch (error) {
        this.unzeroed.push(r);
        failure ??= { error };
        continue;
      }
      this.free.add(r.start, r.length);
    }
    if (failure !== undefined) throw failure.error;
  }

  /** Calls `fn` for each physical stretch of [offset, offset + length) of a piece, one after another. */
  private async each(ranges: readonly ByteRange[], offset: number, length: number, fn: (at: number, from: number, n: number) => Promise<void>): Promise<void> {
    let skip = offset;
    let done = 0;
    for (const r of ranges) {
      if (done === length) break;
      if (skip >= r.length) {
        skip -= r.length;
        continue;
      }
      const n = Math.min(r.length - skip, length - done);
      await fn(r.start + skip, done, n);
      done += n;
      skip = 0;
    }
  }
}

/** Local DRAM: one zero-filled Buffer (the kernel commits pages only as they are touched). */
export class BufferStore implements RangeStore {
  private readonly memory: Buffer;

  constructor(capacity: number) {
    this.memory = Buffer.alloc(capacity);
  }

  read(at: number, target: Buffer): Promise<void> {
    this.memory.copy(target, 0, at, at + target.length);
    return Promise.resolve();
  }

  write(at: number, data: Buffer): Promise<void> {
    data.copy(this.memory, at);
    return Promise.resolve();
  }

  zero(at: number, length: number): Promise<void> {
    this.memory.fill(0, at, at + length);
    return Promise.resolve();
  }
}

/** Local flash: a file of fixed size, positional I/O. */
export class FileStore implements RangeStore {
  readonly path: string;
  private handle: FileHandle | undefined;

  private constructor(path: string, handle: FileHandle) {
    this.path = path;
    this.handle = handle;
  }

  /** Creates (or empties) the file: what a previous run left there is not this run's memory. */
  static async create(path: string, size: number): Promise<FileStore> {
    let handle: FileHandle | undefined;
    try {
      handle = await open(path, 'w+', 0o600);
      await handle.truncate(size);
      return new FileStore(path, handle);
    } catch (error) {
      await handle?.close();
      throw new MisuseError('MS_HOST_INVALID', `cannot create the local flash file ${path}: ${(error as Error).message}`, { cause: error });
    }
  }

  async close(): Promise<void> {
    await this.handle?.close();
    this.handle = undefined;
  }

  async read(at: number, target: Buffer): Promise<void> {
    let done = 0;
    while (done < target.length) {
      const { bytesRead } = await this.file().read(target, done, target.length - done, at + done);
      if (bytesRead === 0) {
        target.fill(0, done);
        return;
      }
      done += bytesRead;
    }
  }

  async write(at: number, data: Buffer): Promise<void> {
    await writeAll(this.file(), data, at);
  }

  async zero(at: number, length: number): Promise<void> {
    await writeZeros(this.file(), at, length);
  }

  private file(): FileHandle {
    if (this.handle === undefined) throw new MisuseError('MS_HOST_INVALID', `the local flash file ${this.path} is not open`);
    return this.handle;
  }
}

/** The swap volume: a block device over NBD. */
export class VolumeStore implements RangeStore {
  readonly client: NbdClient;
  private readonly zeros: Buffer;

  constructor(client: NbdClient) {
    this.client = client;
    this.zeros = Buffer.alloc(1024 * 1024);
  }

  async read(at: number, target: Buffer): Promise<void> {
    (await this.client.read(at, target.length)).copy(target);
  }

  write(at: number, data: Buffer): Promise<void> {
    return this.client.write(at, data);
  }

  async zero(at: number, length: number): Promise<void> {
    for (let done = 0; done < length; done += this.zeros.length) {
      await this.client.write(at + done, this.zeros.subarray(0, Math.min(this.zeros.length, length - done)));
    }
  }
}
