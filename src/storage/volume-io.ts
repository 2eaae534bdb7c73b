// What the NBD service asks of storage, in NBD's terms, behind one narrow interface so
// the write-back cache and the plain data store are interchangeable.
//
// Callers have validated every request (range, flags, read-only) before calling.

import type { Extent } from '../protocol/nbd/codec.js';
import type { Volume } from './volume-manager.js';

export interface VolumeIo {
  /**
   * True when written data reaches the data store only through a write-back that first
   * calls Volume.logBarrier (the cache): a write log may then acknowledge a plain WRITE
   * before its record is durable. False (straight to the store): it may not.
   */
  readonly writeAhead?: boolean;
  read(volume: Volume, offset: number, target: Buffer): Promise<void>;
  /**
   * Reads at once, without a promise, when the layer can (a read whose lines the cache
   * holds, valid, in DRAM or in a flash level whose reads are fast, while nobody is
   * changing them); false means `read` must be used (`target` may hold part of a copy).
   * Optional: layers without a fast path leave it out.
   */
  readNow?(volume: Volume, offset: number, target: Buffer): boolean;
  /**
   * A read answered at once with the storage's own memory, not copied into a buffer
   * (storage/cache/storage-cache.ts readViews), or undefined: then nothing happened, and
   * the caller reads another way. The caller only sends the buffers and calls `release`
   * once they are sent (or will never be). Optional: layers without memory of their own
   * leave it out.
   */
  readViews?(volume: Volume, offset: number, length: number): CacheViews | undefined;
  /** With `fua`, resolves only once the data is durable in the data store. */
  write(volume: Volume, offset: number, data: Buffer, fua: boolean): Promise<void>;
  /**
   * Writes at once, without a promise, when the layer can (a write, not FUA, whose lines
   * the cache holds in DRAM while nobody is changing them, and whose write log, if the
   * volume has one, takes its record in the same turn): true means `data` is stored as
   * `write` would have stored it, and the caller
   * may reuse it. False means `write` must be used: nothing was written (or, where the
   * medium failed part way, `write` writes the same bytes again). Optional: layers
   * without a fast path leave it out.
   */
  writeNow?(volume: Volume, offset: number, data: Buffer): boolean;
  /** Makes every write completed before it, on any connection, durable (FIG. 20, FLUSH). */
  flush(volume: Volume): Promise<void>;
  /** TRIM and WRITE_ZEROES: the range reads as zeros; `allocate` keeps it allocated (NO_HOLE). */
  zero(volume: Volume, offset: number, length: number, options: { fua: boolean; allocate: boolean }): Promise<void>;
  /** NBD_CMD_CACHE: bring the range close (into the cache, where there is one). */
  prefetch(volume: Volume, offset: number, length: number): Promise<void>;
  /** base:allocation extents of the range. */
  blockStatus(volume: Volume, offset: number, length: number): Extent[];
}

const SCRATCH = Buffer.allocUnsafe(1024 * 1024);

/** A read's bytes lent out of the storage's memory (VolumeIo.readViews). */
export interface CacheViews {
  /** The bytes of the range, in order; read them, never write them. */
  readonly buffers: Buffer[];
  /** Ends the loan; once is enough, more are harmless. */
  release(): void;
}

/** Straight to the data store: every write goes to the file, FLUSH and FUA fdatasync it. */
export class DirectVolumeIo implements VolumeIo {
  read(volume: Volume, offset: number, target: Buffer): Promise<void> {
    return volume.store.read(offset, target);
  }

  async write(volume: Volume, offset: number, data: Buffer, fua: boolean): Promise<void> {
    await volume.store.write(offset, data);
    if (fua) await volume.store.sync();
  }

  flush(volume: Volume): Promise<void> {
    return volume.store.sync();
  }

  async zero(volume: Volume, offset: number, length: number, options: { fua: boolean; allocate: boolean }): Promise<void> {
    await volume.store.zeroRange(offset, length, options.allocate);
    if (options.fua) await volume.store.sync();
  }

  async prefetch(volume: Volume, offset: number, length: number): Promise<void> {
    // Reading pulls the range into the kernel's page cache, the nearest cache there is.
    // The bytes are thrown away, so every prefetch reads into one shared scratch buffer:
    // CACHE requests cost no memory of their own, however many are in flight.
    for (let at = offset; at < offset + length; at += SCRATCH.length) {
      await volume.store.read(at, SCRATCH.subarray(0, Math.min(SCRATCH.length, offset + length - at)));
    }
  }

  blockStatus(volume: Volume, offset: number, length: number): Extent[] {
    return volume.store.blockStatus(offset, length);
  }
}
