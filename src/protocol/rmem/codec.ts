// rmem codec: encoders and decoders for every frame body, with no I/O.
//
// Encoders compute the frame's length first and write into one buffer; data payloads
// (WRITE, READ replies) are left as separate buffers so they go out with the header in
// one corked write instead of being copied. Decoders check every length before they
// read and throw MS_RMEM_PROTOCOL for anything malformed, so a session can answer that
// one request with an error and carry on.
//
// 64-bit integers: tags travel as two u32 halves (hi, lo) so neither side allocates a
// BigInt per frame; sizes, offsets and region ids are read as numbers (a value at or
// above 2^53 stays above 2^53 and so fails every range check); keys are BigInts.

import { MisuseError } from '../../errors.js';
import {
  BODY,
  HEADER_SIZE,
  HELLO_RESUMED,
  MAX_BODY,
  MAX_DATA,
  MAX_ERROR_MESSAGE,
  MAX_RANGES,
  MAX_SERVER_ID,
  MAX_TOKEN,
  MAX_VECTOR,
  OP,
  PERFORMANCE_CLASS,
  PERFORMANCE_CLASS_NAME,
  PLACEMENT,
  REQUEST_MAGIC,
  RESPONSE_MAGIC,
  SESSION_SECRET_SIZE,
  STATUS,
  VERSION,
  WIRE_MEDIUM,
  WIRE_MEDIUM_NAME,
  WIRE_POLICY,
  WIRE_POLICY_NAME,
  type PerformanceClass,
  type WireMediumName,
} from './spec.js';

const TWO_32 = 4294967296;

// ---- types ----

export interface Tag {
  hi: number;
  lo: number;
}

export interface HelloRequest {
  version: number;
  serverId: string;
  token: string;
  /** The secret of the session to resume (SESSION_SECRET_SIZE bytes); absent to open a new one. */
  secret?: Buffer;
}

export interface HelloReply {
  version: number;
  resumed: boolean;
  leaseMs: number;
  maxBody: number;
  sessionId: bigint;
  nodeId: string;
  /** The session's secret: a later HELLO that resumes the session must present it. */
  secret: Buffer;
}

export interface CapacityEntry {
  medium: WireMediumName;
  /** Capacity of the medium. */
  total: number;
  /** Bytes in the node's server partition on this medium. */
  partition: number;
  /** Bytes a bind can have now without the partition growing. */
  available: number;
  /** Bytes the server partition can still grow by, from free and cache extents, within its bounds. */
  growable: number;
  /** Bytes this server holds on this medium. */
  used: number;
}

export type Placement =
  | { kind: 'medium'; medium: WireMediumName }
  | { kind: 'class'; class: PerformanceClass }
  | { kind: 'address'; medium: WireMediumName; address: number };

export interface BindRequest {
  size: number;
  placement: Placement;
}

export interface WireRange {
  medium: WireMediumName;
  start: number;
  length: number;
}

export interface BindReply {
  regionId: number;
  key: bigint;
  size: number;
  ranges: WireRange[];
}

export interface RegionAccess {
  regionId: number;
  key: bigint;
  offset: number;
  length: number;
}

export interface WriteRequest {
  regionId: number;
  key: bigint;
  offset: number;
  data: Buffer;
}

export interface WritevRequest {
  entries: RegionAccess[];
  /** The entries' data, concatenated in entry order. */
  data: Buffer;
}

export interface FreeRequest {
  regionId: number;
  key: bigint;
}

// ---- headers ----

export function writeRequestHeader(buf: Buffer, op: number, tag: Tag, bodyLength: number): void {
  buf.writeUInt32BE(REQUEST_MAGIC, 0);
  buf.writeUInt16BE(op, 4);
  buf.writeUInt16BE(0, 6);
  buf.writeUInt32BE(tag.hi, 8);
  buf.writeUInt32BE(tag.lo, 12);
  buf.writeUInt32BE(bodyLength, 16);
}

export function writeResponseHeader(buf: Buffer, op: number, status: number, tag: Tag, bodyLength: number): void {
  buf.writeUInt32BE(RESPONSE_MAGIC, 0);
  buf.writeUInt16BE(op, 4);
  buf.writeUInt16BE(status, 6);
  buf.writeUInt32BE(tag.hi, 8);
  buf.writeUInt32BE(tag.lo, 12);
  buf.writeUInt32BE(bodyLength, 16);
}

// ---- small readers that check bounds ----

function malformed(what: string): MisuseError {
  return new MisuseError('MS_RMEM_PROTOCOL', `malformed ${what}`);
}

function need(body: Buffer, at: number, n: number, what: string): void {
  if (at + n > body.length) throw malformed(`${what}: body too short`);
}

/** A u64 field as a number; one beyond 2^53 - 1 (no offset, size, id or number here is) is an invalid argument. */
function u64(body: Buffer, at: number): number {
  const high = body.readUInt32BE(at);
  if (high > 0x1fffff) throw new MisuseError('MS_RMEM_INVALID', `a 64-bit field at byte ${at} is ${body.readBigUInt64BE(at)}, beyond 2^53 - 1`);
  return high * TWO_32 + body.readUInt32BE(at + 4);
}

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

function medium(code: number | undefined, what: string): WireMediumName {
  const name = code === undefined ? undefined : WIRE_MEDIUM_NAME[code];
  if (name === undefined) throw new MisuseError('MS_RMEM_INVALID', `${what}: unknown medium ${String(code)}`);
  return name;
}

function exact(body: Buffer, n: number, what: string): void {
  if (body.length !== n) throw malformed(`${what}: body is ${body.length} bytes, expected ${n}`);
}

// ---- HELLO ----

/** HELLO (version 2): u16 version, u16 flags, u8 + server id, u16 + token, u8 + session secret (0 or 32 bytes). */
export function encodeHelloRequest(tag: Tag, hello: HelloRequest): Buffer {
  const id = Buffer.from(hello.serverId, 'utf8');
  const token = Buffer.from(hello.token, 'utf8');
  const secret = hello.secret ?? Buffer.alloc(0);
  const length = 2 + 2 + 1 + id.length + 2 + token.length + 1 + secret.length;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + length);
  writeRequestHeader(buf, OP.HELLO, tag, length);
  let at = HEADER_SIZE;
  at = buf.writeUInt16BE(hello.version, at);
  at = buf.writeUInt16BE(0, at);
  at = buf.writeUInt8(id.length, at);
  at += id.copy(buf, at);
  at = buf.writeUInt16BE(token.length, at);
  at += token.copy(buf, at);
  at = buf.writeUInt8(secret.length, at);
  secret.copy(buf, at);
  return buf;
}

/** Decodes a HELLO of this protocol version; another version is MS_RMEM_VERSION, whatever follows it. */
export function decodeHelloRequest(body: Buffer): HelloRequest {
  need(body, 0, 2, 'HELLO');
  const version = body.readUInt16BE(0);
  if (version !== VERSION) throw new MisuseError('MS_RMEM_VERSION', `protocol version ${version} is not supported; this node speaks version ${VERSION}`);
  need(body, 0, 5, 'HELLO');
  const idLength = body.readUInt8(4);
  if (idLength === 0 || idLength > MAX_SERVER_ID) throw malformed(`HELLO: server id length ${idLength} (1 to ${MAX_SERVER_ID})`);
  need(body, 5, idLength + 2, 'HELLO');
  const serverId = body.toString('utf8', 5, 5 + idLength);
  const tokenLength = body.readUInt16BE(5 + idLength);
  if (tokenLength > MAX_TOKEN) throw malformed(`HELLO: token length ${tokenLength} (at most ${MAX_TOKEN})`);
  const secretAt = 7 + idLength + tokenLength;
  need(body, secretAt, 1, 'HELLO');
  const secretLength = body.readUInt8(secretAt);
  if (secretLength !== 0 && secretLength !== SESSION_SECRET_SIZE) throw malformed(`HELLO: session secret of ${secretLength} bytes (0 or ${SESSION_SECRET_SIZE})`);
  exact(body, secretAt + 1 + secretLength, 'HELLO');
  const token = body.toString('utf8', 7 + idLength, secretAt);
  if (secretLength === 0) return { version, serverId, token };
  return { version, serverId, token, secret: Buffer.from(body.subarray(secretAt + 1)) };
}

/** HELLO reply (version 2): u16 version, u16 flags, u32 lease, u32 max body, u64 session id, u8 + node id, u8 + session secret. */
export function encodeHelloReply(tag: Tag, reply: HelloReply): Buffer {
  const node = Buffer.from(reply.nodeId, 'utf8');
  const length = 2 + 2 + 4 + 4 + 8 + 1 + node.length + 1 + reply.secret.length;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + length);
  writeResponseHeader(buf, OP.HELLO, STATUS.OK, tag, length);
  let at = HEADER_SIZE;
  at = buf.writeUInt16BE(reply.version, at);
  at = buf.writeUInt16BE(reply.resumed ? HELLO_RESUMED : 0, at);
  at = buf.writeUInt32BE(reply.leaseMs, at);
  at = buf.writeUInt32BE(reply.maxBody, at);
  at = buf.writeBigUInt64BE(reply.sessionId, at);
  at = buf.writeUInt8(node.length, at);
  at += node.copy(buf, at);
  at = buf.writeUInt8(reply.secret.length, at);
  reply.secret.copy(buf, at);
  return buf;
}

export function decodeHelloReply(body: Buffer): HelloReply {
  need(body, 0, 21, 'HELLO reply');
  const nodeLength = body.readUInt8(20);
  need(body, 21 + nodeLength, 1, 'HELLO reply');
  const secretLength = body.readUInt8(21 + nodeLength);
  if (secretLength !== SESSION_SECRET_SIZE) throw malformed(`HELLO reply: session secret of ${secretLength} bytes (${SESSION_SECRET_SIZE})`);
  exact(body, 22 + nodeLength + secretLength, 'HELLO reply');
  return {
    version: body.readUInt16BE(0),
    resumed: (body.readUInt16BE(2) & HELLO_RESUMED) !== 0,
    leaseMs: body.readUInt32BE(4),
    maxBody: body.readUInt32BE(8),
    sessionId: body.readBigUInt64BE(12),
    nodeId: body.toString('utf8', 21, 21 + nodeLength),
    secret: Buffer.from(body.subarray(22 + nodeLength)),
  };
}

// ---- CAPACITY ----

export function encodeEmptyRequest(op: number, tag: Tag): Buffer {
  const buf = Buffer.allocUnsafe(HEADER_SIZE);
  writeRequestHeader(buf, op, tag, 0);
  return buf;
}

export function decodeEmpty(body: Buffer, what: string): void {
  exact(body, 0, what);
}

export function encodeCapacityReply(tag: Tag, entries: readonly CapacityEntry[]): Buffer {
  const length = 1 + entries.length * BODY.CAPACITY_ENTRY;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + length);
  writeResponseHeader(buf, OP.CAPACITY, STATUS.OK, tag, length);
  let at = buf.writeUInt8(entries.length, HEADER_SIZE);
  for (const e of entries) {
    at = buf.writeUInt8(WIRE_MEDIUM[e.medium], at);
    for (const value of [e.total, e.partition, e.available, e.growable, e.used]) {
      writeU64(buf, value, at);
      at += 8;
    }
  }
  return buf;
}

export function decodeCapacityReply(body: Buffer): CapacityEntry[] {
  need(body, 0, 1, 'CAPACITY reply');
  const count = body.readUInt8(0);
  exact(body, 1 + count * BODY.CAPACITY_ENTRY, 'CAPACITY reply');
  const entries: CapacityEntry[] = [];
  for (let i = 0, at = 1; i < count; i++, at += BODY.CAPACITY_ENTRY) {
    entries.push({
      medium: medium(body.readUInt8(at), 'CAPACITY reply'),
      total: u64(body, at + 1),
      partition: u64(body, at + 9),
      available: u64(body, at + 17),
      growable: u64(body, at + 25),
      used: u64(body, at + 33),
    });
  }
  return entries;
}

// ---- BIND ----

export function encodeBindRequest(tag: Tag, bind: BindRequest): Buffer {
  const buf = Buffer.allocUnsafe(HEADER_SIZE + BODY.BIND);
  writeRequestHeader(buf, OP.BIND, tag, BODY.BIND);
  writeU64(buf, bind.size, HEADER_SIZE);
  const p = bind.placement;
  const placement = p.kind === 'medium' ? PLACEMENT.MEDIUM : p.kind === 'class' ? PLACEMENT.CLASS : PLACEMENT.ADDRESS;
  const which = p.kind === 'class' ? PERFORMANCE_CLASS[p.class] : WIRE_MEDIUM[p.medium];
  buf.writeUInt8(placement, HEADER_SIZE + 8);
  buf.writeUInt8(which, HEADER_SIZE + 9);
  writeU64(buf, p.kind === 'address' ? p.address : 0, HEADER_SIZE + 10);
  return buf;
}

export function decodeBindRequest(body: Buffer): BindRequest {
  exact(body, BODY.BIND, 'BIND');
  const size = u64(body, 0);
  const placement = body.readUInt8(8);
  const which = body.readUInt8(9);
  const address = u64(body, 10);
  switch (placement) {
    case PLACEMENT.MEDIUM:
      return { size, placement: { kind: 'medium', medium: medium(which, 'BIND') } };
    case PLACEMENT.CLASS: {
      const cls = PERFORMANCE_CLASS_NAME[which];
      if (cls === undefined) throw new MisuseError('MS_RMEM_INVALID', `BIND: unknown performance class ${which}`);
      return { size, placement: { kind: 'class', class: cls } };
    }
    case PLACEMENT.ADDRESS:
      return { size, placement: { kind: 'address', medium: medium(which, 'BIND'), address } };
    default:
      throw new MisuseError('MS_RMEM_INVALID', `BIND: unknown placement ${placement}`);
  }
}

export function encodeBindReply(tag: Tag, reply: BindReply): Buffer {
  const length = 8 + 8 + 8 + 2 + reply.ranges.length * BODY.RANGE;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + length);
  writeResponseHeader(buf, OP.BIND, STATUS.OK, tag, length);
  let at = HEADER_SIZE;
  writeU64(buf, reply.regionId, at);
  at = buf.writeBigUInt64BE(reply.key, at + 8);
  writeU64(buf, reply.size, at);
  at = buf.writeUInt16BE(reply.ranges.length, at + 8);
  for (const r of reply.ranges) {
    at = buf.writeUInt8(WIRE_MEDIUM[r.medium], at);
    writeU64(buf, r.start, at);
    writeU64(buf, r.length, at + 8);
    at += 16;
  }
  return buf;
}

export function decodeBindReply(body: Buffer): BindReply {
  need(body, 0, 26, 'BIND reply');
  const count = body.readUInt16BE(24);
  exact(body, 26 + count * BODY.RANGE, 'BIND reply');
  const ranges: WireRange[] = [];
  for (let i = 0, at = 26; i < count; i++, at += BODY.RANGE) {
    ranges.push({ medium: medium(body.readUInt8(at), 'BIND reply'), start: u64(body, at + 1), length: u64(body, at + 9) });
  }
  return { regionId: u64(body, 0), key: body.readBigUInt64BE(8), size: u64(body, 16), ranges };
}

// ---- READ / WRITE ----

export function encodeReadRequest(tag: Tag, read: RegionAccess): Buffer {
  const buf = Buffer.allocUnsafe(HEADER_SIZE + BODY.READ);
  writeRequestHeader(buf, OP.READ, tag, BODY.READ);
  writeAccess(buf, HEADER_SIZE, read);
  return buf;
}

export function decodeReadRequest(body: Buffer): RegionAccess {
  exact(body, BODY.READ, 'READ');
  return readAccess(body, 0);
}

/** Header and the fixed fields of a WRITE; the data follows as its own buffer. */
export function encodeWriteHead(tag: Tag, write: { regionId: number; key: bigint; offset: number }, dataLength: number): Buffer {
  const buf = Buffer.allocUnsafe(HEADER_SIZE + BODY.WRITE_PREFIX);
  writeRequestHeader(buf, OP.WRITE, tag, BODY.WRITE_PREFIX + dataLength);
  writeU64(buf, write.regionId, HEADER_SIZE);
  buf.writeBigUInt64BE(write.key, HEADER_SIZE + 8);
  writeU64(buf, write.offset, HEADER_SIZE + 16);
  return buf;
}

export function decodeWriteRequest(body: Buffer): WriteRequest {
  need(body, 0, BODY.WRITE_PREFIX, 'WRITE');
  return { regionId: u64(body, 0), key: body.readBigUInt64BE(8), offset: u64(body, 16), data: body.subarray(BODY.WRITE_PREFIX) };
}

// ---- READV / WRITEV ----

export function encodeReadvRequest(tag: Tag, entries: readonly RegionAccess[]): Buffer {
  const length = 2 + entries.length * BODY.VECTOR_ENTRY;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + length);
  writeRequestHeader(buf, OP.READV, tag, length);
  buf.writeUInt16BE(entries.length, HEADER_SIZE);
  entries.forEach((e, i) => {
    writeAccess(buf, HEADER_SIZE + 2 + i * BODY.VECTOR_ENTRY, e);
  });
  return buf;
}

export function decodeReadvRequest(body: Buffer): RegionAccess[] {
  const entries = decodeVector(body, 'READV');
  exact(body, 2 + entries.length * BODY.VECTOR_ENTRY, 'READV');
  return entries;
}

/** Header and entry table of a WRITEV; the data of all entries follows, concatenated. */
export function encodeWritevHead(tag: Tag, entries: readonly RegionAccess[]): Buffer {
  const table = 2 + entries.length * BODY.VECTOR_ENTRY;
  const data = entries.reduce((sum, e) => sum + e.length, 0);
  const buf = Buffer.allocUnsafe(HEADER_SIZE + table);
  writeRequestHeader(buf, OP.WRITEV, tag, table + data);
  buf.writeUInt16BE(entries.length, HEADER_SIZE);
  entries.forEach((e, i) => {
    writeAccess(buf, HEADER_SIZE + 2 + i * BODY.VECTOR_ENTRY, e);
  });
  return buf;
}

export function decodeWritevRequest(body: Buffer): WritevRequest {
  const entries = decodeVector(body, 'WRITEV');
  const table = 2 + entries.length * BODY.VECTOR_ENTRY;
  const total = entries.reduce((sum, e) => sum + e.length, 0);
  exact(body, table + total, 'WRITEV');
  return { entries, data: body.subarray(table) };
}

function decodeVector(body: Buffer, what: string): RegionAccess[] {
  need(body, 0, 2, what);
  const count = body.readUInt16BE(0);
  if (count === 0 || count > MAX_VECTOR) throw malformed(`${what}: ${count} entries (1 to ${MAX_VECTOR})`);
  need(body, 2, count * BODY.VECTOR_ENTRY, what);
  const entries: RegionAccess[] = [];
  for (let i = 0; i < count; i++) entries.push(readAccess(body, 2 + i * BODY.VECTOR_ENTRY));
  return entries;
}

function writeAccess(buf: Buffer, at: number, access: RegionAccess): void {
  writeU64(buf, access.regionId, at);
  buf.writeBigUInt64BE(access.key, at + 8);
  writeU64(buf, access.offset, at + 16);
  buf.writeUInt32BE(access.length, at + 24);
}

function readAccess(body: Buffer, at: number): RegionAccess {
  return { regionId: u64(body, at), key: body.readBigUInt64BE(at + 8), offset: u64(body, at + 16), length: body.readUInt32BE(at + 24) };
}

// ---- FREE ----

export function encodeFreeRequest(tag: Tag, free: FreeRequest): Buffer {
  const buf = Buffer.allocUnsafe(HEADER_SIZE + BODY.FREE);
  writeRequestHeader(buf, OP.FREE, tag, BODY.FREE);
  writeU64(buf, free.regionId, HEADER_SIZE);
  buf.writeBigUInt64BE(free.key, HEADER_SIZE + 8);
  return buf;
}

export function decodeFreeRequest(body: Buffer): FreeRequest {
  exact(body, BODY.FREE, 'FREE');
  return { regionId: u64(body, 0), key: body.readBigUInt64BE(8) };
}

// ---- replies with no fields, errors ----

export function encodeEmptyReply(op: number, tag: Tag): Buffer {
  const buf = Buffer.allocUnsafe(HEADER_SIZE);
  writeResponseHeader(buf, op, STATUS.OK, tag, 0);
  return buf;
}

export function encodeErrorReply(op: number, status: number, tag: Tag, message: string): Buffer {
  const text = Buffer.from(message.slice(0, MAX_ERROR_MESSAGE), 'utf8').subarray(0, MAX_ERROR_MESSAGE);
  const buf = Buffer.allocUnsafe(HEADER_SIZE + text.length);
  writeResponseHeader(buf, op, status, tag, text.length);
  text.copy(buf, HEADER_SIZE);
  return buf;
}


// ---- journal operations (NVRAM devices) ----

export interface JournalInfo {
  epoch: number;
  size: number;
  used: number;
  /** 0 when the journal is empty. */
  firstSeq: number;
  /** 0 before the first append. */
  lastSeq: number;
  policy: keyof typeof WIRE_POLICY;
}

export interface JournalEntry {
  payload: Buffer;
  target: { volume: string; offset: number } | undefined;
}

export function encodeJopenRequest(tag: Tag, name: string, epoch: number): Buffer {
  const n = Buffer.from(name, 'utf8');
  const length = 1 + n.length + 8;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + length);
  writeRequestHeader(buf, OP.JOPEN, tag, length);
  buf.writeUInt8(n.length, HEADER_SIZE);
  n.copy(buf, HEADER_SIZE + 1);
  writeU64(buf, epoch, HEADER_SIZE + 1 + n.length);
  return buf;
}

/** JCREATE: u8 name length, name, u64 size, u8 policy (WIRE_POLICY). The reply is empty. */
export function encodeJcreateRequest(tag: Tag, name: string, size: number, policy: keyof typeof WIRE_POLICY): Buffer {
  const n = Buffer.from(name, 'utf8');
  if (n.length > 255) throw new MisuseError('MS_RMEM_INVALID', 'device name longer than 255 bytes');
  const length = 1 + n.length + 8 + 1;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + length);
  writeRequestHeader(buf, OP.JCREATE, tag, length);
  buf.writeUInt8(n.length, HEADER_SIZE);
  n.copy(buf, HEADER_SIZE + 1);
  writeU64(buf, size, HEADER_SIZE + 1 + n.length);
  buf.writeUInt8(WIRE_POLICY[policy], HEADER_SIZE + 1 + n.length + 8);
  return buf;
}

export function decodeJcreateRequest(body: Buffer): { name: string; size: number; policy: keyof typeof WIRE_POLICY } {
  need(body, 0, 1, 'JCREATE');
  const n = body.readUInt8(0);
  exact(body, 1 + n + 8 + 1, 'JCREATE');
  const policy = WIRE_POLICY_NAME[body.readUInt8(1 + n + 8)];
  if (policy === undefined) throw malformed(`JCREATE: unknown policy ${body.readUInt8(1 + n + 8)}`);
  return { name: body.toString('utf8', 1, 1 + n), size: u64(body, 1 + n), policy };
}

/** JREMOVE: u8 name length, name. The reply is empty. */
export function encodeJremoveRequest(tag: Tag, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  if (n.length > 255) throw new MisuseError('MS_RMEM_INVALID', 'device name longer than 255 bytes');
  const buf = Buffer.allocUnsafe(HEADER_SIZE + 1 + n.length);
  writeRequestHeader(buf, OP.JREMOVE, tag, 1 + n.length);
  buf.writeUInt8(n.length, HEADER_SIZE);
  n.copy(buf, HEADER_SIZE + 1);
  return buf;
}

export function decodeJremoveRequest(body: Buffer): { name: string } {
  need(body, 0, 1, 'JREMOVE');
  const n = body.readUInt8(0);
  exact(body, 1 + n, 'JREMOVE');
  return { name: body.toString('utf8', 1, 1 + n) };
}

export function decodeJopenRequest(body: Buffer): { name: string; epoch: number } {
  need(body, 0, 1, 'JOPEN');
  const n = body.readUInt8(0);
  exact(body, 1 + n + 8, 'JOPEN');
  return { name: body.toString('utf8', 1, 1 + n), epoch: u64(body, 1 + n) };
}

function writeJournalInfo(buf: Buffer, at: number, info: JournalInfo): void {
  writeU64(buf, info.epoch, at);
  writeU64(buf, info.size, at + 8);
  writeU64(buf, info.used, at + 16);
  writeU64(buf, info.firstSeq, at + 24);
  writeU64(buf, info.lastSeq, at + 32);
  buf.writeUInt8(WIRE_POLICY[info.policy], at + 40);
}

function readJournalInfo(body: Buffer, at: number): JournalInfo {
  const policy = WIRE_POLICY_NAME[body.readUInt8(at + 40)];
  if (policy === undefined) throw malformed('journal info: unknown policy');
  return { epoch: u64(body, at), size: u64(body, at + 8), used: u64(body, at + 16), firstSeq: u64(body, at + 24), lastSeq: u64(body, at + 32), policy };
}

export function encodeJopenReply(tag: Tag, handle: number, info: JournalInfo): Buffer {
  const length = 4 + BODY.JOURNAL_INFO;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + length);
  writeResponseHeader(buf, OP.JOPEN, STATUS.OK, tag, length);
  buf.writeUInt32BE(handle, HEADER_SIZE);
  writeJournalInfo(buf, HEADER_SIZE + 4, info);
  return buf;
}

export function decodeJopenReply(body: Buffer): { handle: number; info: JournalInfo } {
  exact(body, 4 + BODY.JOURNAL_INFO, 'JOPEN reply');
  return { handle: body.readUInt32BE(0), info: readJournalInfo(body, 4) };
}

export function encodeJinfoReply(tag: Tag, info: JournalInfo): Buffer {
  const buf = Buffer.allocUnsafe(HEADER_SIZE + BODY.JOURNAL_INFO);
  writeResponseHeader(buf, OP.JINFO, STATUS.OK, tag, BODY.JOURNAL_INFO);
  writeJournalInfo(buf, HEADER_SIZE, info);
  return buf;
}

export function decodeJinfoReply(body: Buffer): JournalInfo {
  exact(body, BODY.JOURNAL_INFO, 'JINFO reply');
  return readJournalInfo(body, 0);
}

export function encodeHandleRequest(op: number, tag: Tag, handle: number, value?: number): Buffer {
  const length = value === undefined ? 4 : 12;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + length);
  writeRequestHeader(buf, op, tag, length);
  buf.writeUInt32BE(handle, HEADER_SIZE);
  if (value !== undefined) writeU64(buf, value, HEADER_SIZE + 4);
  return buf;
}

/** JINFO (handle) and JTRIM (handle, u64 up-to sequence). */
export function decodeHandleRequest(body: Buffer, withValue: boolean, what: string): { handle: number; value: number } {
  exact(body, withValue ? 12 : 4, what);
  return { handle: body.readUInt32BE(0), value: withValue ? u64(body, 4) : 0 };
}

/** The writer of a JAPPENDW: its 8-byte id (16 hex digits) and the writer sequence number of the first entry. */
export interface JournalWriter {
  id: string;
  firstSeq: number;
}

/** Bytes a JAPPENDW adds before the count: the 8-byte writer id and the u64 first writer sequence number. */
const WRITER_PREFIX = 16;

/**
 * JAPPEND: u32 handle, u16 count, then per entry u32 length, u8 target name length, name,
 * u64 target offset, payload. JAPPENDW: u32 handle, 8-byte writer id, u64 first writer
 * sequence number, then as JAPPEND from the count; entry i carries writer seq first + i.
 */
export function encodeJappendRequest(tag: Tag, handle: number, entries: readonly JournalEntry[], writer?: JournalWriter): Buffer[] {
  const body = encodeJappendEntries(entries);
  return [encodeJappendHead(tag, handle, entries.length, body.length, writer), ...body.parts];
}

/**
 * The entries of a JAPPEND, from after its count: per entry the fixed fields and the
 * payload (not copied). Throws (RangeError) for a target offset or name that does not fit.
 */
export function encodeJappendEntries(entries: readonly JournalEntry[]): { parts: Buffer[]; length: number } {
  const parts: Buffer[] = [];
  let length = 0;
  for (const e of entries) {
    const name = Buffer.from(e.target?.volume ?? '', 'utf8');
    const fixed = Buffer.allocUnsafe(4 + 1 + name.length + 8);
    fixed.writeUInt32BE(e.payload.length, 0);
    fixed.writeUInt8(name.length, 4);
    name.copy(fixed, 5);
    writeU64(fixed, e.target?.offset ?? 0, 5 + name.length);
    parts.push(fixed, e.payload);
    length += fixed.length + e.payload.length;
  }
  return { parts, length };
}

/** The header, handle (writer) and count of a JAPPEND whose encoded entries take `entriesLength` bytes. */
export function encodeJappendHead(tag: Tag, handle: number, count: number, entriesLength: number, writer?: JournalWriter): Buffer {
  const prefix = writer === undefined ? 0 : WRITER_PREFIX;
  const head = Buffer.allocUnsafe(HEADER_SIZE + 6 + prefix);
  writeRequestHeader(head, writer === undefined ? OP.JAPPEND : OP.JAPPENDW, tag, 6 + prefix + entriesLength);
  head.writeUInt32BE(handle, HEADER_SIZE);
  if (writer !== undefined) {
    if (!/^[0-9a-f]{16}$/.test(writer.id)) throw new MisuseError('MS_RMEM_INVALID', 'a writer id is 16 lowercase hex digits');
    head.write(writer.id, HEADER_SIZE + 4, 8, 'hex');
    writeU64(head, writer.firstSeq, HEADER_SIZE + 12);
  }
  head.writeUInt16BE(count, HEADER_SIZE + 4 + prefix);
  return head;
}

export function decodeJappendRequest(body: Buffer, withWriter = false): { handle: number; entries: JournalEntry[]; writer: JournalWriter | undefined } {
  const prefix = withWriter ? WRITER_PREFIX : 0;
  const op = withWriter ? 'JAPPENDW' : 'JAPPEND';
  need(body, 0, 6 + prefix, op);
  const handle = body.readUInt32BE(0);
  const writer = withWriter ? { id: body.toString('hex', 4, 12), firstSeq: u64(body, 12) } : undefined;
  const count = body.readUInt16BE(4 + prefix);
  if (count === 0 || count > MAX_VECTOR) throw malformed(`${op}: ${count} entries (1 to ${MAX_VECTOR})`);
  const entries: JournalEntry[] = [];
  let at = 6 + prefix;
  for (let i = 0; i < count; i++) {
    need(body, at, 5, op);
    const length = body.readUInt32BE(at);
    const nameLength = body.readUInt8(at + 4);
    need(body, at + 5, nameLength + 8 + length, op);
    const volume = body.toString('utf8', at + 5, at + 5 + nameLength);
    const offset = u64(body, at + 5 + nameLength);
    const payload = body.subarray(at + 5 + nameLength + 8, at + 5 + nameLength + 8 + length);
    entries.push({ payload, target: nameLength > 0 ? { volume, offset } : undefined });
    at += 5 + nameLength + 8 + length;
  }
  exact(body, at, op);
  return { handle, entries, writer };
}

export function encodeJappendReply(tag: Tag, appended: readonly { seq: number; timestamp: number }[], op: number = OP.JAPPEND): Buffer {
  const length = 2 + appended.length * 16;
  const buf = Buffer.allocUnsafe(HEADER_SIZE + length);
  writeResponseHeader(buf, op, STATUS.OK, tag, length);
  buf.writeUInt16BE(appended.length, HEADER_SIZE);
  appended.forEach((a, i) => {
    writeU64(buf, a.seq, HEADER_SIZE + 2 + i * 16);
    writeU64(buf, a.timestamp, HEADER_SIZE + 10 + i * 16);
  });
  return buf;
}

export function decodeJappendReply(body: Buffer): { seq: number; timestamp: number }[] {
  need(body, 0, 2, 'JAPPEND reply');
  const count = body.readUInt16BE(0);
  exact(body, 2 + count * 16, 'JAPPEND reply');
  return Array.from({ length: count }, (_, i) => ({ seq: u64(body, 2 + i * 16), timestamp: u64(body, 10 + i * 16) }));
}

/** JREAD: u32 handle, u64 from sequence, u32 most records, u32 most bytes. */
export function encodeJreadRequest(tag: Tag, handle: number, fromSeq: number, maxRecords: number, maxBytes: number): Buffer {
  const buf = Buffer.allocUnsafe(HEADER_SIZE + 20);
  writeRequestHeader(buf, OP.JREAD, tag, 20);
  buf.writeUInt32BE(handle, HEADER_SIZE);
  writeU64(buf, fromSeq, HEADER_SIZE + 4);
  buf.writeUInt32BE(maxRecords, HEADER_SIZE + 12);
  buf.writeUInt32BE(maxBytes, HEADER_SIZE + 16);
  return buf;
}

export function decodeJreadRequest(body: Buffer): { handle: number; fromSeq: number; maxRecords: number; maxBytes: number } {
  exact(body, 20, 'JREAD');
  return { handle: body.readUInt32BE(0), fromSeq: u64(body, 4), maxRecords: body.readUInt32BE(12), maxBytes: body.readUInt32BE(16) };
}

/** JREAD reply: u32 count, then the records in journal record format, back to back. */
export function encodeJreadReply(tag: Tag, records: readonly Buffer[]): Buffer[] {
  const length = 4 + records.reduce((s, r) => s + r.length, 0);
  const head = Buffer.allocUnsafe(HEADER_SIZE + 4);
  writeResponseHeader(head, OP.JREAD, STATUS.OK, tag, length);
  head.writeUInt32BE(records.length, HEADER_SIZE);
  return [head, ...records];
}

// ---- reply sizes: what a request may make the node hold, before it is served ----

/** An error reply: header and the longest message. */
export const ERROR_REPLY_SIZE = HEADER_SIZE + MAX_ERROR_MESSAGE;

/** The longest HELLO reply: fixed fields, a node id of at most 64 bytes, the session secret. */
const HELLO_REPLY_SIZE = HEADER_SIZE + 2 + 2 + 4 + 4 + 8 + 1 + 64 + 1 + SESSION_SECRET_SIZE;

/**
 * The largest reply a request read before HELLO has succeeded can get, whatever its op:
 * a HELLO reply or an error (anything but HELLO is refused with NO_SESSION). Such a
 * request is priced at its body plus this, never at what its op could get in a session.
 */
export const HANDSHAKE_REPLY_SIZE = Math.max(ERROR_REPLY_SIZE, HELLO_REPLY_SIZE);

/**
 * The largest reply any request of `op` can get, known from the op alone (before its
 * body has arrived): for budgeting a body that spans socket chunks.
 */
export function maxReplySize(op: number): number {
  switch (op) {
    case OP.READ:
    case OP.READV:
      return HEADER_SIZE + MAX_DATA;
    case OP.JREAD:
      // One record is returned even when it is larger than maxBytes.
      return HEADER_SIZE + 4 + MAX_BODY;
    case OP.BIND:
      return HEADER_SIZE + 8 + 8 + 8 + 2 + MAX_RANGES * BODY.RANGE;
    case OP.JAPPEND:
    case OP.JAPPENDW:
      return Math.max(ERROR_REPLY_SIZE, HEADER_SIZE + 2 + MAX_VECTOR * 16);
    default:
      return ERROR_REPLY_SIZE;
  }
}

/** The most of a service budget one request can hold: the largest body and the largest reply. */
export const LARGEST_REQUEST_COST = HEADER_SIZE + MAX_BODY + Math.max(...Array.from({ length: 256 }, (_, op) => maxReplySize(op)));

/**
 * The largest reply this request can get, read from its body where the body names it
 * (READ, READV); a body too malformed to say gets an error reply at most.
 */
export function replySize(op: number, body: Buffer): number {
  if (op === OP.READ) {
    if (body.length !== BODY.READ) return ERROR_REPLY_SIZE;
    const length = body.readUInt32BE(24);
    return length > MAX_DATA ? ERROR_REPLY_SIZE : Math.max(ERROR_REPLY_SIZE, HEADER_SIZE + length);
  }
  if (op === OP.READV) {
    if (body.length < 2) return ERROR_REPLY_SIZE;
    const count = body.readUInt16BE(0);
    if (body.length !== 2 + count * BODY.VECTOR_ENTRY) return ERROR_REPLY_SIZE;
    let total = 0;
    for (let i = 0; i < count; i++) total += body.readUInt32BE(2 + i * BODY.VECTOR_ENTRY + 24);
    return total > MAX_DATA ? ERROR_REPLY_SIZE : Math.max(ERROR_REPLY_SIZE, HEADER_SIZE + total);
  }
  return maxReplySize(op);
}
