// The narrow interface of a volume's backing store (patent "data store 28"), so that
// the data store, test doubles and fault-injecting wrappers (in the manner of nbdkit's
// `error` and `delay` filters) are interchangeable under the cache and the direct path.
//
// Contract, shown for every implementation by test/unit/storage/volume-store-contract:
//   - read, write and zeroRange refuse ranges outside [0, size) with MS_VOLUME_RANGE;
//     they never grow the store;
//   - once sync() resolves, every write and zeroRange that resolved before sync() was
//     called survives a crash;
//   - a sync that fails may have lost any write since the last good sync (the kernel
//     may drop pages whose write-back failed and report the next fsync as clean), so the
//     store is then fenced: every later write, zeroRange, sync and resize rejects with
//     MS_VOLUME_FENCED, and `failure` says why, until the store is opened again. Reads
//     still work;
//   - a failed write or zeroRange leaves the store usable: what it covered is undefined,
//     everything else is unchanged.

import type { Extent } from '../protocol/nbd/codec.js';

export interface VolumeStore {
  readonly size: number;
  /** Why the store is fenced, or undefined while it is healthy. */
  readonly failure: Error | undefined;
  read(offset: number, target: Buffer): Promise<void>;
  write(offset: number, data: Buffer): Promise<void>;
  /** Makes the range read as zeros; `allocate` (NBD_CMD_FLAG_NO_HOLE) keeps it allocated. */
  zeroRange(offset: number, length: number, allocate?: boolean): Promise<void>;
  /** base:allocation extents of the range. */
  blockStatus(offset: number, length: number): Extent[];
  /** Makes every completed write durable. */
  sync(): Promise<void>;
  /** Grows or shrinks the store; new space reads as zeros. */
  resize(size: number): Promise<void>;
  close(): Promise<void>;
  /** Removes the files of a closed store. */
  destroy(): Promise<void>;
}
