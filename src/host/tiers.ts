// The places a host's memory can live (Hitachi US 9,304,828, FIG. 16), each handing out
// byte ranges and serving reads and writes of what it handed out:
//
//   local dram    one Buffer of the configured budget
//   local flash   a file of the configured size, positional I/O
//   node <name>   regions bound on a memstrata node over rmem (dram or flash)
//   swap          a block volume over NBD, the last resort
//
// A `Piece` is one part of a segment on one device; a segment is one or more pieces
// (an allocation spans nodes when no single node has room). Memory handed out reads as
// zeros: local and swap space is zeroed when it is freed, and nodes zero what they bind.

import { open, type FileHandle } from 'node:fs/promises';
import type { NbdClient } from '../client/nbd-client.js';
import type { Region, RmemClient } from '../client/rmem-client.js';
import { MisuseError, NetworkError, isMemstrataError } from '../errors.js';
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
  release(): Promise<void>;
}

/** Space a tier takes from a FreeRanges and serves by physical offset. */
abstract class RangeTier {
  readonly device: string;
  readonly medium: TierMedium;
  readonly capacity: number;
  protected readonly free: FreeRanges;

  constructor(device: string, medium: TierMedium, capacity: number) {
    this.device = device;
    this.medium = medium;
    this.capacity = capacity;
    this.free = new FreeRanges();
    this.free.add(0, capacity);
  }

  get available(): number {
    return this.free.total;
  }

  get assigned(): number {
    return this.capacity - this.free.total;
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
      read: (offset, target) => this.each(ranges, offset, target.length, (at, from, n) => this.readAt(at, target.subarray(from, from + n))),
      write: (offset, data) => this.each(ranges, offset, data.length, (at, from, n) => this.writeAt(at, data.subarray(from, from + n))),
      release: async () => {
        if (released) return;
        released = true;
        for (const r of ranges) await this.zero(r.start, r.length);
        for (const r of ranges) this.free.add(r.start, r.length);
      },
    };
  }

  protected abstract readAt(at: number, target: Buffer): Promise<void>;
  protected abstract writeAt(at: number, data: Buffer): Promise<void>;
  protected abstract zero(at: number, length: number): Promise<void>;

  /** Calls `fn` for each physical stretch of [offset, offset + length) of a piece. */
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

export class LocalDramTier extends RangeTier {
  private readonly memory: Buffer;

  constructor(capacity: number) {
    super('local', 'dram', capacity);
    // Zero-filled; the kernel commits pages only as they are touched.
    this.memory = Buffer.alloc(capacity);
  }

  protected readAt(at: number, target: Buffer): Promise<void> {
    this.memory.copy(target, 0, at, at + target.length);
    return Promise.resolve();
  }

  protected writeAt(at: number, data: Buffer): Promise<void> {
    data.copy(this.memory, at);
    return Promise.resolve();
  }

  protected zero(at: number, length: number): Promise<void> {
    this.memory.fill(0, at, at + length);
    return Promise.resolve();
  }
}

export class LocalFlashTier extends RangeTier {
  readonly path: string;
  private handle: FileHandle | undefined;

  constructor(path: string, capacity: number) {
    super('local', 'flash', capacity);
    this.path = path;
    this.handle = undefined;
  }

  /** Creates (or empties) the file: what a previous run left there is not this run's memory. */
  async open(): Promise<void> {
    try {
      this.handle = await open(this.path, 'w+', 0o600);
      await this.handle.truncate(this.capacity);
    } catch (error) {
      throw new MisuseError('MS_HOST_INVALID', `cannot create the local flash file ${this.path}: ${(error as Error).message}`, { cause: error });
    }
  }

  async close(): Promise<void> {
    await this.handle?.close();
    this.handle = undefined;
  }

  protected async readAt(at: number, target: Buffer): Promise<void> {
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

  protected writeAt(at: number, data: Buffer): Promise<void> {
    return writeAll(this.file(), data, at);
  }

  protected zero(at: number, length: number): Promise<void> {
    return writeZeros(this.file(), at, length);
  }

  private file(): FileHandle {
    if (this.handle === undefined) throw new MisuseError('MS_HOST_INVALID', `the local flash file ${this.path} is not open`);
    return this.handle;
  }
}

export class SwapTier extends RangeTier {
  readonly client: NbdClient;
  private readonly zeros: Buffer;

  constructor(client: NbdClient) {
    super('swap', 'volume', client.size - (client.size % 4096));
    this.client = client;
    this.zeros = Buffer.alloc(1024 * 1024);
  }

  protected async readAt(at: number, target: Buffer): Promise<void> {
    (await this.client.read(at, target.length)).copy(target);
  }

  protected writeAt(at: number, data: Buffer): Promise<void> {
    return this.client.write(at, data);
  }

  protected async zero(at: number, length: number): Promise<void> {
    for (let done = 0; done < length; done += this.zeros.length) {
      await this.client.write(at + done, this.zeros.subarray(0, Math.min(this.zeros.length, length - done)));
    }
  }
}

/** A region on a node, as a piece. Errors that mean the node is gone name the node. */
export function remotePiece(node: RemoteNode, medium: 'dram' | 'flash', region: Region): Piece {
  let released = false;
  return {
    device: node.name,
    medium,
    length: region.size,
    physical: region.ranges.map((r) => ({ start: r.start, length: r.length })),
    read: async (offset, target) => {
      node.check();
      await node.guard(() => node.client.readInto(region, offset, target));
    },
    write: async (offset, data) => {
      node.check();
      await node.guard(() => node.client.write(region, offset, data));
    },
    release: async () => {
      if (released) return;
      released = true;
      if (node.lost) return; // the node frees it itself after the lease
      await node.guard(() => node.client.free(region));
    },
  };
}

/** A memstrata node the host borrows memory from. */
export class RemoteNode {
  readonly name: string;
  readonly address: string;
  readonly client: RmemClient;
  lost: boolean;
  lostReason: string | undefined;

  constructor(name: string, address: string, client: RmemClient) {
    this.name = name;
    this.address = address;
    this.client = client;
    this.lost = false;
    this.lostReason = undefined;
    client.on('sessionLost', () => {
      this.markLost('the node no longer holds this host\'s session; its regions are gone');
    });
  }

  markLost(why: string): void {
    if (this.lost) return;
    this.lost = true;
    this.lostReason = why;
  }

  check(): void {
    if (this.lost) throw nodeLost(this, this.lostReason ?? 'lost');
  }

  /** Runs a request; a network failure marks the node lost and names it. */
  async guard<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (error) {
      if (isMemstrataError(error) && error.category === 'network') {
        this.markLost(error.message);
        throw nodeLost(this, error.message);
      }
      throw error;
    }
  }
}

export function nodeLost(node: RemoteNode, why: string): NetworkError {
  return new NetworkError('MS_HOST_NODE_LOST', `node ${node.name} (${node.address}) is lost: ${why}`, { details: { node: node.name, address: node.address } });
}
