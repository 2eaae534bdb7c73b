// `memstrata/host`: the host-side library, for a server managing its own memory
// hierarchy (local DRAM, local flash, remote memory on nodes, a swap volume).
//
// HierarchyMemory is the entry point: one virtual address space over local DRAM, local
// flash, memory borrowed from memstrata nodes, and a swap volume, with the discovery
// and mapping tables of the patent (FIG. 10-11). NbdClient is here too, for a host that
// drives a volume itself.

export { HierarchyMemory, Segment, PERFORMANCE_CLASSES, PAGE, VIRTUAL_BASE } from './hierarchy-memory.js';
export type { AllocOptions, DiscoveryRow, HierarchyEvents, HierarchyOptions, HierarchyStats, MappingRow, NodeAddress, PerformanceClass } from './hierarchy-memory.js';
export type { NodeLossPolicy, NodeState, NodeTransition } from './remote-node.js';
export type { PageCacheStats } from './page-cache.js';
export type { TierMedium } from './tiers.js';
export { NbdClient } from '../client/nbd-client.js';
export { ERRORS, MemstrataError, MisuseError, NetworkError, RuntimeError, StorageError, isMemstrataError } from '../errors.js';
export type { Category, ErrorCode } from '../errors.js';
export { GiB, KiB, MiB, TiB, formatSize, parseSize } from '../units.js';
