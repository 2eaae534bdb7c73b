// `memstrata/host`: the host-side library, for a server managing its own memory
// hierarchy (local DRAM, local flash, remote memory on nodes, a swap volume).
//
// The entry point is prepared so applications can depend on its path; HierarchyMemory
// lands here with the host issue. For now it carries what a host shares with the node:
// the coded errors and the size and address helpers.

export { ERRORS, MemstrataError, MisuseError, NetworkError, RuntimeError, StorageError, isMemstrataError } from '../errors.js';
export type { Category, ErrorCode } from '../errors.js';
export { GiB, KiB, MiB, TiB, formatSize, parseSize } from '../units.js';
