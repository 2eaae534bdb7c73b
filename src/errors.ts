// The one registry of coded errors. Every error memstrata raises on purpose carries a
// stable `code` from ERRORS; `docs/errors.md` lists the same codes and a unit test
// checks the two against each other in both directions.
//
// Categories decide the subclass and how the admin API answers:
//   misuse   the caller asked for something invalid (HTTP 4xx, CLI exit 2)
//   runtime  a valid request that cannot be served in the current state (HTTP 409/503)
//   network  a peer could not be reached or answered badly
//   storage  a file or medium failed underneath us

export const ERRORS = {
  MS_CONFIG_INVALID: { category: 'misuse', status: 400, summary: 'a configuration value is invalid; the message names the field, the value and the accepted form' },
  MS_CONFIG_FILE: { category: 'misuse', status: 400, summary: 'the configuration file cannot be read or is not valid YAML' },
  MS_SIZE_INVALID: { category: 'misuse', status: 400, summary: 'a size is not of the form 4096, 512KiB, 512MiB, 1GiB' },
  MS_BAD_REQUEST: { category: 'misuse', status: 400, summary: 'an admin API request body or query is invalid' },
  MS_NOT_FOUND: { category: 'misuse', status: 404, summary: 'the admin API has no such route' },
  MS_ADMIN_UNAUTHORIZED: { category: 'misuse', status: 401, summary: 'the admin API requires Authorization: Bearer <admin.token>; the token was missing or wrong' },
  MS_ADMIN_TOKEN_REQUIRED: { category: 'misuse', status: 403, summary: 'running programs through the node (guests) needs admin.token: without one, any local user who reaches the admin API could run commands as the node\'s user' },
  MS_ADMIN_TOKEN_INVALID: { category: 'misuse', status: 400, summary: 'the admin token given to the CLI or AdminClient is not visible ASCII without spaces, so it cannot be sent; it is not shown' },
  MS_ADMIN_BODY_TOO_LARGE: { category: 'misuse', status: 413, summary: 'an admin API request body is larger than admin.bodyLimit' },
  MS_ADMIN_REQUEST_TIMEOUT: { category: 'misuse', status: 408, summary: 'an admin client did not send its request headers within admin.headersTimeout, or the whole request within admin.requestTimeout; the connection is closed' },
  MS_MEDIUM_RANGE: { category: 'misuse', status: 400, summary: 'an I/O request lies outside the capacity of a medium' },
  MS_EXTENT_NOT_OWNED: { category: 'misuse', status: 409, summary: 'extents were handed back by an owner that does not hold them' },
  MS_PARTITION_ALIGN: { category: 'misuse', status: 400, summary: 'a partition size is not a whole number of extents' },
  MS_PARTITION_BOUND: { category: 'misuse', status: 409, summary: 'a partition change would break a configured minimum or maximum' },
  MS_ALLOC_OVERLAP: { category: 'misuse', status: 409, summary: 'an allocation table entry overlaps a range that is already allocated' },
  MS_ALLOC_UNKNOWN_REGION: { category: 'misuse', status: 404, summary: 'no region with that id is allocated to that server' },
  MS_RMEM_PROTOCOL: { category: 'misuse', status: 400, summary: 'an rmem frame or body is malformed (wire status PROTOCOL)' },
  MS_RMEM_VERSION: { category: 'misuse', status: 400, summary: 'the rmem protocol version is not supported (wire status VERSION)' },
  MS_RMEM_NO_SESSION: { category: 'misuse', status: 400, summary: 'an rmem request came before HELLO, or HELLO came twice (wire status NO_SESSION)' },
  MS_RMEM_AUTH: { category: 'misuse', status: 403, summary: 'the rmem token was refused at HELLO (wire status AUTH)' },
  MS_RMEM_SECRET: { category: 'misuse', status: 403, summary: 'a HELLO named a server id that has a session but did not present that session\'s secret, or a wrong one; the session is untouched (wire status SECRET)' },
  MS_RMEM_VIOLATION: { category: 'misuse', status: 403, summary: 'memory violation: the region is not allocated to this server or the key is wrong (wire status VIOLATION, FIG. 17 S164)' },
  MS_RMEM_RANGE: { category: 'misuse', status: 400, summary: 'an rmem read or write reaches outside its region (wire status RANGE)' },
  MS_RMEM_INVALID: { category: 'misuse', status: 400, summary: 'an rmem argument is invalid: unknown medium or class, zero size, unaligned or busy address (wire status INVALID)' },
  MS_RMEM_TOO_BIG: { category: 'misuse', status: 413, summary: 'an rmem request or its reply would exceed the frame limit (wire status TOO_BIG)' },
  MS_RMEM_UNSUPPORTED: { category: 'misuse', status: 400, summary: 'the rmem operation is unknown to this node (wire status UNSUPPORTED)' },
  MS_NBD_PROTOCOL: { category: 'misuse', status: 400, summary: 'an NBD client sent a malformed handshake, option or request (the connection is closed where framing is lost)' },
  MS_NBD_UNSUPPORTED: { category: 'misuse', status: 400, summary: 'an NBD command or flag this export does not offer (wire EINVAL or ENOTSUP)' },
  MS_VOLUME_NOT_FOUND: { category: 'misuse', status: 404, summary: 'no volume (NBD export) has that name' },
  MS_VOLUME_EXISTS: { category: 'misuse', status: 409, summary: 'a volume with that name already exists' },
  MS_VOLUME_INVALID: { category: 'misuse', status: 400, summary: 'a volume name or size is invalid' },
  MS_VOLUME_READ_ONLY: { category: 'misuse', status: 403, summary: 'a write, trim or zero was sent to a read-only volume (wire EPERM)' },
  MS_VOLUME_RANGE: { category: 'misuse', status: 400, summary: 'an I/O request reaches past the end of the volume (wire EINVAL)' },
  MS_VOLUME_BUSY: { category: 'runtime', status: 409, summary: 'the volume has clients connected; disconnect them first' },
  MS_VOLUME_RECOVERING: { category: 'runtime', status: 503, summary: 'the volume waits for its mirrored write log to get back from the mirror partner what this node lost in a crash, then replays it; it is not served, resized or removed until then' },
  MS_VOLUME_FENCED: { category: 'storage', status: 503, summary: 'a sync of the volume failed, so data may be lost; it is read-only until the node restarts (wire EIO)' },
  MS_GUEST_INVALID: { category: 'misuse', status: 400, summary: 'a guest definition is invalid: its name, command, restart policy or environment' },
  MS_GUEST_EXISTS: { category: 'misuse', status: 409, summary: 'a guest with that name already exists' },
  MS_GUEST_NOT_FOUND: { category: 'misuse', status: 404, summary: 'no guest has that name' },
  MS_GUEST_BUSY: { category: 'runtime', status: 409, summary: 'the guest is running or booting; stop it first' },
  MS_GUEST_ATTACHED: { category: 'runtime', status: 409, summary: 'the volume or NVRAM device is attached to a guest: it cannot be removed, attached to another guest or made a write log until it is detached' },
  MS_GUEST_NVRAM_QUOTA: { category: 'runtime', status: 409, summary: 'an NVRAM device a guest allocates would bring its own devices past its --nvram-quota (wire status NO_CAPACITY)' },
  MS_GUEST_ATTACH_BUSY: { category: 'runtime', status: 409, summary: 'the volume or NVRAM device is being removed or claimed as a write log, so it cannot be attached to a guest now' },
  MS_GUEST_CPU_BUDGET: { category: 'misuse', status: 409, summary: 'the CPU shares of the guests that are to run would add up to more than the machine\'s cores less guests.reserveCpu' },
  MS_GUEST_LIMIT_FAILED: { category: 'runtime', status: 409, summary: 'the kernel refused a guest\'s new limit (such as a memory limit below what it uses now); its limits are as they were' },
  MS_NVRAM_NOT_FOUND: { category: 'misuse', status: 404, summary: 'no NVRAM device has that name' },
  MS_NVRAM_EXISTS: { category: 'misuse', status: 409, summary: 'an NVRAM device with that name already exists' },
  MS_NVRAM_INVALID: { category: 'misuse', status: 400, summary: 'an NVRAM request or record is invalid: bad name, size, policy, checksum or length' },
  MS_NVRAM_FENCED: { category: 'runtime', status: 409, summary: 'the journal was opened with a newer epoch; this handle may no longer append or trim' },
  MS_NVRAM_FULL: { category: 'runtime', status: 507, summary: 'the journal has no room for the records until older ones are trimmed' },
  MS_NVRAM_NO_CAPACITY: { category: 'runtime', status: 409, summary: 'the nvram partition has no room for a device of that size' },
  MS_NVRAM_PARTNER_DOWN: { category: 'runtime', status: 503, summary: 'a mirrored device refuses appends: its mirror partner is unreachable and mirror.onPartnerDown is refuse (wire status UNAVAILABLE)' },
  MS_NVRAM_RECOVERING: { category: 'runtime', status: 503, summary: 'a mirrored device is recovering after a crash and waits for its partner, which may hold records this node lost (wire status RECOVERING)' },
  MS_NVRAM_DAMAGED: { category: 'runtime', status: 409, summary: 'an NVRAM journal or vault file has a record that fails its checks, or a gap in its numbers, with valid records after it: the device is offline and the file is kept as it is' },
  MS_NVRAM_REPLICA: { category: 'runtime', status: 409, summary: 'the device is a replica of the mirror partner; open it there, or here with a newer epoch to take it over (wire status REPLICA)' },
  MS_MIRROR_PROTOCOL: { category: 'misuse', status: 400, summary: 'a mirror frame or body is malformed, or its version is not supported' },
  MS_MIRROR_AUTH: { category: 'misuse', status: 403, summary: 'the mirror partner presented the wrong token' },
  MS_MIRROR_CONFLICT: { category: 'runtime', status: 409, summary: 'the partner holds a device of that name that is not a replica of this one (another policy, or a primary at the same epoch)' },
  MS_MIRROR_GAP: { category: 'runtime', status: 409, summary: 'mirrored records do not continue the replica\'s sequence; the primary resyncs it' },
  MS_NBD_HANDSHAKE: { category: 'network', status: 502, summary: 'the NBD client could not negotiate an export: not a fixed-newstyle NBD server, or it refused NBD_OPT_GO, or it broke the protocol' },
  MS_NBD_REQUEST: { category: 'network', status: 502, summary: 'an NBD server answered a request of the NBD client with an error (the message names the command and errno)' },
  MS_NBD_DISCONNECTED: { category: 'network', status: 502, summary: 'the NBD client could not connect, or its connection ended with requests in flight' },
  MS_HOST_INVALID: { category: 'misuse', status: 400, summary: 'a host library option or argument is invalid: a size, class, medium, node name, or the local flash file' },
  MS_HOST_VIOLATION: { category: 'misuse', status: 403, summary: 'memory violation in the host library: the address is not allocated, already freed, or the access reaches past its segment (FIG. 17)' },
  MS_NODE_STARTED: { category: 'misuse', status: 409, summary: 'a StorageNode starts once: start() was called on one that has already started, or stopped; make a new StorageNode' },
  MS_HOST_NO_CAPACITY: { category: 'runtime', status: 409, summary: 'no tier can hold the allocation: local memory, every node and the swap volume are full or excluded' },
  MS_HOST_NODE_LOST: { category: 'network', status: 502, summary: 'the node that holds this memory is lost: it did not answer within the retries, its connection stayed down past the grace period, or it lost this host\'s session; the message names it, and from flush() `details.lostBytes` counts the dirty bytes that never reached it' },
  MS_MIRROR_UNREACHABLE: { category: 'network', status: 503, summary: 'the mirror partner cannot be reached or did not answer in time' },
  MS_RMEM_NO_CAPACITY: { category: 'runtime', status: 409, summary: 'lack of capacity: the node cannot bind that much memory, even after growing its server partition (wire status NO_CAPACITY, FIG. 14)' },
  MS_NVRAM_NO_PATH: { category: 'network', status: 502, summary: 'a multipath journal found no path to its NVRAM device that worked within its failover time; its pending appends fail' },
  MS_RMEM_TIMEOUT: { category: 'network', status: 504, summary: 'an rmem request got no reply within its timeout' },
  MS_RMEM_DISCONNECTED: { category: 'network', status: 502, summary: 'the rmem connection closed with the request in flight, or the session could not be resumed within the lease' },
  MS_RMEM_UNREACHABLE: { category: 'network', status: 502, summary: 'the rmem service of a node could not be reached' },
  MS_PARTITION_NO_CAPACITY: { category: 'runtime', status: 409, summary: 'a partition cannot grow: the free extents and the reclaimable ones of other kinds are not enough' },
  MS_PARTITION_BUSY: { category: 'runtime', status: 409, summary: 'the owners of a partition could not give back enough extents to shrink it' },
  MS_EXTENTS_EXHAUSTED: { category: 'runtime', status: 409, summary: 'a kind has no idle extents left to assign to an owner' },
  MS_NODE_LOCKED: { category: 'runtime', status: 409, summary: 'another running node holds the data directory' },
  MS_META_DAMAGED: { category: 'runtime', status: 409, summary: 'a volume or NVRAM device of that name was not loaded at start (damaged metadata); its files are kept as they were until they are repaired or moved away and the node restarts' },
  MS_MEDIUM_CLOSED: { category: 'runtime', status: 503, summary: 'I/O was attempted on a medium that is not open' },
  MS_READ_DECLINED: { category: 'runtime', status: 503, summary: 'a medium declined a synchronous read (flash, while such reads are slow); the caller reads asynchronously instead, so no client sees it' },
  MS_SHUTTING_DOWN: { category: 'runtime', status: 503, summary: 'the node is stopping and takes no new work' },
  MS_INTERNAL: { category: 'runtime', status: 500, summary: 'an unexpected failure; the log has the cause' },
  MS_ADMIN_UNREACHABLE: { category: 'network', status: 502, summary: 'the admin API of a node could not be reached' },
  MS_ADMIN_RESPONSE: { category: 'network', status: 502, summary: 'the admin API answered with something that is not a valid response' },
  MS_LISTEN_FAILED: { category: 'network', status: 500, summary: 'a service could not listen on its configured address' },
  MS_DATA_DIR: { category: 'storage', status: 500, summary: 'the data directory cannot be created, read or written' },
  MS_META_INVALID: { category: 'storage', status: 500, summary: 'a volume or NVRAM metadata file is malformed, fails validation, is not a regular file or is larger than 64 KiB; the message names the file and the field' },
  MS_NODE_ID_INVALID: { category: 'storage', status: 500, summary: 'the node-id file in the data directory does not hold a valid node id, or is not a regular file; the node does not start' },
  MS_FLASH_SIZE: { category: 'storage', status: 500, summary: 'the flash file is larger than the configured flash size; shrinking it would lose data' },
  MS_MEDIUM_IO: { category: 'storage', status: 500, summary: 'a read or write on a medium failed' },
} as const satisfies Record<string, { category: Category; status: number; summary: string }>;

export type Category = 'misuse' | 'runtime' | 'network' | 'storage';
export type ErrorCode = keyof typeof ERRORS;
type CodeOf<C extends Category> = {
  [K in ErrorCode]: (typeof ERRORS)[K]['category'] extends C ? K : never;
}[ErrorCode];

export interface ErrorOptions {
  cause?: unknown;
  /** Machine-readable facts about the failure (field names, values, limits). */
  details?: Record<string, unknown>;
}

/** Base of every coded error; `code` is stable and documented in docs/errors.md. */
export class MemstrataError extends Error {
  readonly code: ErrorCode;
  readonly details: Record<string, unknown> | undefined;

  constructor(code: ErrorCode, message: string, options: ErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.details = options.details;
  }

  override get name(): string {
    return this.constructor.name;
  }

  get category(): Category {
    return ERRORS[this.code].category;
  }

  /** HTTP status the admin API answers with for this error. */
  get status(): number {
    return ERRORS[this.code].status;
  }

  toJSON(): { code: ErrorCode; message: string; details?: Record<string, unknown> } {
    return this.details === undefined
      ? { code: this.code, message: this.message }
      : { code: this.code, message: this.message, details: this.details };
  }
}

/** The caller asked for something invalid. */
export class MisuseError extends MemstrataError {
  constructor(code: CodeOf<'misuse'>, message: string, options?: ErrorOptions) {
    super(code, message, options);
  }
}

/** A valid request that cannot be served in the present state. */
export class RuntimeError extends MemstrataError {
  constructor(code: CodeOf<'runtime'>, message: string, options?: ErrorOptions) {
    super(code, message, options);
  }
}

/** A peer could not be reached or answered badly. */
export class NetworkError extends MemstrataError {
  constructor(code: CodeOf<'network'>, message: string, options?: ErrorOptions) {
    super(code, message, options);
  }
}

/** A file or medium failed underneath us. */
export class StorageError extends MemstrataError {
  constructor(code: CodeOf<'storage'>, message: string, options?: ErrorOptions) {
    super(code, message, options);
  }
}

export function isMemstrataError(value: unknown): value is MemstrataError {
  return value instanceof MemstrataError;
}

/** Wraps anything thrown into a coded error, keeping coded ones as they are. */
export function toMemstrataError(value: unknown): MemstrataError {
  if (value instanceof MemstrataError) return value;
  const message = value instanceof Error ? value.message : String(value);
  return new RuntimeError('MS_INTERNAL', message, { cause: value });
}

/** `error` as an Error: thrown values that are not Errors are wrapped, so they can be thrown again and logged. */
export function asError(error: unknown): Error {
  return error instanceof Error ? error : new Error(String(error));
}
