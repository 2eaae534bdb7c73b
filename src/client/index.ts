// `memstrata/client`: programmatic clients of a memstrata node.
//
// Today that is the admin API client; the remote-memory client (RmemClient) joins it
// with the rmem service. Everything thrown is a coded MemstrataError.

export { AdminClient, DEFAULT_ADMIN_URL } from './admin-client.js';
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
} from '../admin/api.js';
export { ERRORS, MemstrataError, MisuseError, NetworkError, RuntimeError, StorageError, isMemstrataError } from '../errors.js';
export type { Category, ErrorCode } from '../errors.js';
