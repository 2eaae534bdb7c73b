// `memstrata/client`: programmatic clients of a memstrata node.
//
// RmemClient borrows memory from a node over the rmem protocol (docs/rmem-protocol.md);
// NbdClient reads and writes a volume (or any NBD export); AdminClient reads a node's
// admin API. Everything thrown is a coded MemstrataError.

export { RmemClient } from './rmem-client.js';
export type { BindWhere, CapacityEntry, Journal, JournalInfo, JournalRecord, MediumName, PerformanceClass, Region, RmemClientEvents, RmemClientOptions, WireRange } from './rmem-client.js';
export { MultipathJournal } from './multipath-journal.js';
export type { JournalPath, MultipathJournalEvents, MultipathJournalOptions, PathState, PathStatus } from './multipath-journal.js';
export { AdminClient, DEFAULT_ADMIN_URL } from './admin-client.js';
export type { AdminClientOptions } from './admin-client.js';
export { NbdClient } from './nbd-client.js';
export type { BlockSizes, NbdClientOptions } from './nbd-client.js';
export type {
  AllocationRowJson,
  AllocationTableJson,
  ErrorResponse,
  MediumInfo,
  NodeInfo,
  PartitionRowJson,
  PartitionTableJson,
  ResizeRequest,
  ResizeResponse,
  RmemSessionJson,
  ServersJson,
} from '../protocol/admin/api.js';
export { ERRORS, MemstrataError, MisuseError, NetworkError, RuntimeError, StorageError, isMemstrataError } from '../errors.js';
export type { Category, ErrorCode } from '../errors.js';
