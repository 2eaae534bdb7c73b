// The narrow interface every medium implements, and the range check they share.
//
// A medium is a flat byte-addressed space of `capacity` bytes cut into extents of
// `extentSize`; physical addresses in the partition and allocation tables are offsets
// into it. I/O is asynchronous, also for DRAM, so callers see one behaviour; DRAM and
// flash also offer a synchronous read (readSync), and DRAM a synchronous write
// (writeSync), for the hit paths that answer in the tick a request arrived.
// Backends trust their callers except for the range, which is cheap to check and turns a
// stray offset into a coded error instead of a corrupted neighbour.

import { MisuseError } from '../errors.js';
import type { MediumName } from '../kinds.js';

export interface MediumCapabilities {
  /** Contents survive a restart of the process. */
  readonly persistent: boolean;
  /** Backing storage is taken only for extents that were written. */
  readonly lazy: boolean;
}

export interface Medium {
  readonly name: MediumName;
  readonly capacity: number;
  readonly extentSize: number;
  readonly capabilities: MediumCapabilities;
  open(): Promise<void>;
  /** Fills `target` with the bytes at `offset`. */
  read(offset: number, target: Uint8Array): Promise<void>;
  /**
   * The same, synchronously: the storage cache's and the rmem service's read paths use
   * it to answer without a promise. DRAM always reads; flash reads while its synchronous
   * reads have been fast (the OS page cache holds the bytes) and declines otherwise.
   * Absent where I/O always has to wait. It may throw to decline (after copying part of
   * `target` or none): callers then read with `read`, which reports errors.
   */
  readSync?(offset: number, target: Uint8Array): void;
  /**
   * The medium's own memory for a range within one extent that has been written, or
   * undefined: for a reader that sends those bytes without copying them (the storage
   * cache's NBD replies). The view's bytes change only by writes to its range; zeroing
   * its whole extent gives the extent new memory and leaves the view with the old
   * bytes, never anyone else's. The caller never writes to it. Absent where the medium
   * is not process memory.
   */
  view?(offset: number, length: number): Buffer | undefined;
  write(offset: number, source: Uint8Array): Promise<void>;
  /**
   * The same, synchronously: the storage cache's write-hit path (answered in the tick the
   * WRITE arrived) uses it. Absent where a write has to wait (flash). It throws only as
   * `write` would reject, before writing anything (range, closed medium).
   */
  writeSync?(offset: number, source: Uint8Array): void;
  /** Makes the range read as zeros, handing back backing storage of whole extents where the medium can. */
  zero(offset: number, length: number): Promise<void>;
  /** Makes completed writes durable (no-op for memory). */
  sync(): Promise<void>;
  /** Waits for I/O in flight, then releases the medium; later I/O fails with MS_MEDIUM_CLOSED. */
  close(): Promise<void>;
  /** Bytes of backing storage held now (memory buffers, or file blocks on disk). */
  resident(): Promise<number>;
}

export function checkRange(medium: Medium, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > medium.capacity) {
    throw new MisuseError(
      'MS_MEDIUM_RANGE',
      `${medium.name}: range offset ${offset} length ${length} lies outside the medium (capacity ${medium.capacity})`,
      { details: { medium: medium.name, offset, length, capacity: medium.capacity } },
    );
  }
}
