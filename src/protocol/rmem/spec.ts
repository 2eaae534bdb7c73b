// rmem protocol, version 2: every constant of the wire format in one place. The
// normative description is docs/rmem-protocol.md; names here follow it.
//
//   request header, 20 bytes               response header, 20 bytes
//   0  u32 magic  0x524d5131 "RMQ1"        0  u32 magic  0x524d5031 "RMP1"
//   4  u16 op                              4  u16 op (echoed)
//   6  u16 flags (0 in v1)                 6  u16 status (0 = OK)
//   8  u64 tag                             8  u64 tag (echoed)
//   16 u32 body length                     16 u32 body length
//
// All integers are big-endian.

/** Version 2 added the session secret to HELLO and its reply (docs/rmem-protocol.md, section 2). */
export const VERSION = 2;

export const REQUEST_MAGIC = 0x524d5131;
export const RESPONSE_MAGIC = 0x524d5031;
export const HEADER_SIZE = 20;

/** Largest data payload of one READ or WRITE, and of a READV/WRITEV total. */
export const MAX_DATA = 16 * 1024 * 1024;
/** Largest body either side accepts: the data plus room for the fields in front of it. */
export const MAX_BODY = MAX_DATA + 64 * 1024;
/**
 * Largest body a node accepts before HELLO has succeeded (a HELLO is about 1.1 KiB): a
 * peer that has not been admitted cannot make the node hold more.
 */
export const HANDSHAKE_MAX_BODY = 4096;
/** Largest number of entries in one READV or WRITEV. */
export const MAX_VECTOR = 1024;
/** Bind sizes and address binds are in pages of this size. */
export const PAGE_SIZE = 4096;
/**
 * Most physical ranges in one region, so in one BIND reply (about 68 KiB of ranges): a
 * bind that free memory can satisfy only in more pieces fails with NO_CAPACITY.
 */
export const MAX_RANGES = 4096;
export const MAX_SERVER_ID = 64;
export const MAX_TOKEN = 1024;
export const MAX_ERROR_MESSAGE = 1024;
/** Bytes of a session secret: returned by HELLO, presented by a HELLO that resumes. */
export const SESSION_SECRET_SIZE = 32;

export const OP = {
  HELLO: 1,
  CAPACITY: 2,
  BIND: 3,
  READ: 4,
  WRITE: 5,
  READV: 6,
  WRITEV: 7,
  FREE: 8,
  KEEPALIVE: 9,
  JOPEN: 10,
  JAPPEND: 11,
  JREAD: 12,
  JTRIM: 13,
  JINFO: 14,
  /** JAPPEND with a writer id and the writer's own sequence numbers: a retry is recognised, not appended twice. */
  JAPPENDW: 15,
  /** A guest allocates an NVRAM device of its own, within its quota (cut-through sockets only). */
  JCREATE: 16,
  /** A guest removes an NVRAM device it allocated (cut-through sockets only). */
  JREMOVE: 17,
} as const;
export type OpName = keyof typeof OP;
export type Op = (typeof OP)[OpName];
export const OP_NAME: Readonly<Record<number, OpName>> = Object.fromEntries(Object.entries(OP).map(([name, code]) => [code, name as OpName]));

export const STATUS = {
  OK: 0,
  PROTOCOL: 1,
  VERSION: 2,
  NO_SESSION: 3,
  AUTH: 4,
  NO_CAPACITY: 5,
  VIOLATION: 6,
  RANGE: 7,
  INVALID: 8,
  TOO_BIG: 9,
  UNSUPPORTED: 10,
  SHUTDOWN: 11,
  IO: 12,
  FENCED: 13,
  FULL: 14,
  NOT_FOUND: 15,
  UNAVAILABLE: 16,
  RECOVERING: 17,
  REPLICA: 18,
  SECRET: 19,
} as const;
export type StatusName = keyof typeof STATUS;
export type Status = (typeof STATUS)[StatusName];
export const STATUS_NAME: Readonly<Record<number, StatusName>> = Object.fromEntries(
  Object.entries(STATUS).map(([name, code]) => [code, name as StatusName]),
);

/** Media as numbered on the wire. */
export const WIRE_MEDIUM = { dram: 0, flash: 1 } as const;
export type WireMediumName = keyof typeof WIRE_MEDIUM;
export const WIRE_MEDIUM_NAME: Readonly<Record<number, WireMediumName>> = { 0: 'dram', 1: 'flash' };

/** How a BIND says where its memory should come from. */
export const PLACEMENT = { MEDIUM: 0, CLASS: 1, ADDRESS: 2 } as const;

/** Performance classes of BIND (FIG. 16): which medium is tried first. */
export const PERFORMANCE_CLASS = { highest: 0, capacity: 1 } as const;
export type PerformanceClass = keyof typeof PERFORMANCE_CLASS;
export const PERFORMANCE_CLASS_NAME: Readonly<Record<number, PerformanceClass>> = { 0: 'highest', 1: 'capacity' };

/** HELLO reply flag: the node resumed this server's earlier session and its regions. */
export const HELLO_RESUMED = 0x0001;

/** NVRAM device policies as numbered on the wire. */
export const WIRE_POLICY = { volatile: 0, local: 1, mirrored: 2, 'mirrored+local': 3 } as const;
export const WIRE_POLICY_NAME: Readonly<Record<number, keyof typeof WIRE_POLICY>> = { 0: 'volatile', 1: 'local', 2: 'mirrored', 3: 'mirrored+local' };

/** Fixed body sizes. */
export const BODY = {
  BIND: 18,
  READ: 28,
  WRITE_PREFIX: 24,
  FREE: 16,
  VECTOR_ENTRY: 28,
  CAPACITY_ENTRY: 41,
  RANGE: 17,
  JOURNAL_INFO: 41,
} as const;
