// Mirror protocol, version 1: node to node, for mirrored NVRAM devices. The normative
// description is docs/mirror-protocol.md; names here follow it.
//
//   request header, 20 bytes               response header, 20 bytes
//   0  u32 magic  0x4d534d51 "MSMQ"        0  u32 magic  0x4d534d50 "MSMP"
//   4  u16 op                              4  u16 op (echoed)
//   6  u16 flags (0 in v1)                 6  u16 status (0 = OK)
//   8  u64 tag                             8  u64 tag (echoed)
//   16 u32 body length                     16 u32 body length
//
// The header is the rmem header with other magics, so the rmem frame parser reads it.
// The primary's node sends requests and its partner answers them in order; every
// integer is big-endian; a device name is a u8 length and that many bytes of UTF-8.

import { MisuseError } from '../../errors.js';
import { decodeRecord, MAX_PAYLOAD, type JournalRecord } from '../journal/record.js';
import { POLICIES, isDeviceName, type Policy, type Role } from '../journal/policy.js';

export const MIRROR_VERSION = 1;
export const MIRROR_REQUEST_MAGIC = 0x4d534d51;
export const MIRROR_RESPONSE_MAGIC = 0x4d534d50;
export const MIRROR_HEADER = 20;
/** Largest body: one rmem JAPPEND's records and the fields in front of them. */
export const MIRROR_MAX_BODY = MAX_PAYLOAD + 1024 * 1024;
/** Records per APPEND or FETCH reply during a resync. */
export const MIRROR_CHUNK = 4 * 1024 * 1024;

export const MOP = { HELLO: 1, STATE: 2, RESET: 3, APPEND: 4, TRIM: 5, EPOCH: 6, DROP: 7, FETCH: 8 } as const;
export const MOP_NAME: Readonly<Record<number, string>> = Object.fromEntries(Object.entries(MOP).map(([name, code]) => [code, name]));

export const MSTATUS = {
  OK: 0,
  PROTOCOL: 1,
  VERSION: 2,
  AUTH: 3,
  NOT_FOUND: 4,
  FENCED: 5,
  NO_CAPACITY: 6,
  CONFLICT: 7,
  GAP: 8,
  FULL: 9,
  RECOVERING: 10,
  SHUTDOWN: 11,
  IO: 12,
} as const;
export const MSTATUS_NAME: Readonly<Record<number, string>> = Object.fromEntries(Object.entries(MSTATUS).map(([name, code]) => [code, name]));

const ROLES: readonly Role[] = ['primary', 'replica'];
const MEDIA = ['dram', 'flash'] as const;

export interface Hello {
  version: number;
  nodeId: string;
  token: string;
}

/** What the partner holds of a device (STATE reply). */
export interface DeviceState {
  role: Role;
  policy: Policy;
  recovering: boolean;
  size: number;
  epoch: number;
  trimmedTo: number;
  lastSeq: number;
}

export interface Reset {
  name: string;
  policy: Policy;
  medium: (typeof MEDIA)[number];
  size: number;
  epoch: number;
  trimmedTo: number;
  firstSeq: number;
  /** The device is a write log on the primary node: no client may open the replica. */
  nodeOwned?: boolean;
}

/** RESET flag bits (an optional trailing byte; absent means 0). */
export const RESET_FLAG = { NODE_OWNED: 1 << 0 } as const;

// ---- framing ----

export function frame(magic: number, op: number, word: number, tag: number, body: Buffer): Buffer {
  const header = frameHead(magic, op, word, tag, body.length);
  return body.length === 0 ? header : Buffer.concat([header, body]);
}

/** A frame's header, for a body of `length` bytes sent after it. */
function frameHead(magic: number, op: number, word: number, tag: number, length: number): Buffer {
  const header = Buffer.allocUnsafe(MIRROR_HEADER);
  header.writeUInt32BE(magic, 0);
  header.writeUInt16BE(op, 4);
  header.writeUInt16BE(word, 6);
  header.writeUInt32BE(0, 8);
  header.writeUInt32BE(tag, 12);
  header.writeUInt32BE(length, 16);
  return header;
}

export function request(op: number, tag: number, body: Buffer): Buffer {
  return frame(MIRROR_REQUEST_MAGIC, op, 0, tag, body);
}

/** A request whose body is `parts` back to back: its header, then the parts as they are (not copied). */
export function requestParts(op: number, tag: number, parts: readonly Buffer[]): Buffer[] {
  return [frameHead(MIRROR_REQUEST_MAGIC, op, 0, tag, parts.reduce((n, p) => n + p.length, 0)), ...parts];
}

export function reply(op: number, status: number, tag: number, body: Buffer = Buffer.alloc(0)): Buffer {
  return frame(MIRROR_RESPONSE_MAGIC, op, status, tag, body);
}

export function errorReply(op: number, status: number, tag: number, message: string): Buffer {
  const text = Buffer.from(message.slice(0, 1024));
  const body = Buffer.allocUnsafe(2 + text.length);
  body.writeUInt16BE(text.length, 0);
  text.copy(body, 2);
  return reply(op, status, tag, body);
}

export function errorMessage(body: Buffer): string {
  if (body.length < 2) return '';
  return body.subarray(2, 2 + body.readUInt16BE(0)).toString();
}

// ---- a small writer and reader; every read is bounds-checked ----

class Writer {
  private readonly parts: Buffer[] = [];
  u8(v: number): this {
    const b = Buffer.allocUnsafe(1);
    b.writeUInt8(v, 0);
    this.parts.push(b);
    return this;
  }
  u16(v: number): this {
    const b = Buffer.allocUnsafe(2);
    b.writeUInt16BE(v, 0);
    this.parts.push(b);
    return this;
  }
  u32(v: number): this {
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32BE(v, 0);
    this.parts.push(b);
    return this;
  }
  u64(v: number): this {
    const b = Buffer.allocUnsafe(8);
    b.writeBigUInt64BE(BigInt(v), 0);
    this.parts.push(b);
    return this;
  }
  str8(v: string): this {
    const b = Buffer.from(v);
    if (b.length > 255) throw new MisuseError('MS_MIRROR_PROTOCOL', `mirror: string too long (${b.length} bytes)`);
    return this.u8(b.length).raw(b);
  }
  str16(v: string): this {
    const b = Buffer.from(v);
    return this.u16(b.length).raw(b);
  }
  raw(b: Buffer): this {
    this.parts.push(b);
    return this;
  }
  done(): Buffer {
    return Buffer.concat(this.parts);
  }
}

export class Reader {
  private at = 0;
  constructor(private readonly body: Buffer, private readonly what: string) {}
  private need(n: number): void {
    if (this.at + n > this.body.length) throw malformed(`${this.what}: body ends early`);
  }
  u8(): number {
    this.need(1);
    return this.body.readUInt8(this.at++);
  }
  u16(): number {
    this.need(2);
    const v = this.body.readUInt16BE(this.at);
    this.at += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.body.readUInt32BE(this.at);
    this.at += 4;
    return v;
  }
  u64(): number {
    this.need(8);
    const v = this.body.readBigUInt64BE(this.at);
    this.at += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw malformed(`${this.what}: value too large`);
    return Number(v);
  }
  /** A device name; anything else (a path, a slash, "..") makes the body malformed. */
  deviceName(): string {
    const name = this.str8();
    if (!isDeviceName(name)) throw malformed(`${this.what}: invalid device name ${JSON.stringify(name.slice(0, 80))}`);
    return name;
  }

  str8(): string {
    const n = this.u8();
    this.need(n);
    const v = this.body.toString('utf8', this.at, this.at + n);
    this.at += n;
    return v;
  }
  str16(): string {
    const n = this.u16();
    this.need(n);
    const v = this.body.toString('utf8', this.at, this.at + n);
    this.at += n;
    return v;
  }
  rest(): Buffer {
    const v = this.body.subarray(this.at);
    this.at = this.body.length;
    return v;
  }
  end(): void {
    if (this.at !== this.body.length) throw malformed(`${this.what}: ${this.body.length - this.at} bytes left over`);
  }
}

function malformed(what: string): MisuseError {
  return new MisuseError('MS_MIRROR_PROTOCOL', `malformed mirror frame: ${what}`);
}

function pick<T>(values: readonly T[], code: number, what: string): T {
  const v = values[code];
  if (v === undefined) throw malformed(`unknown ${what} ${code}`);
  return v;
}

// ---- bodies ----

export function encodeHello(hello: Hello): Buffer {
  return new Writer().u16(hello.version).str8(hello.nodeId).str16(hello.token).done();
}

export function decodeHello(body: Buffer): Hello {
  const r = new Reader(body, 'HELLO');
  const hello = { version: r.u16(), nodeId: r.str8(), token: r.str16() };
  r.end();
  return hello;
}

export function encodeName(name: string): Buffer {
  return new Writer().str8(name).done();
}

export function encodeState(state: DeviceState | undefined): Buffer {
  if (state === undefined) return new Writer().u8(0).done();
  return new Writer()
    .u8(1)
    .u8(ROLES.indexOf(state.role))
    .u8(POLICIES.indexOf(state.policy))
    .u8(state.recovering ? 1 : 0)
    .u64(state.size)
    .u64(state.epoch)
    .u64(state.trimmedTo)
    .u64(state.lastSeq)
    .done();
}

export function decodeState(body: Buffer): DeviceState | undefined {
  const r = new Reader(body, 'STATE reply');
  if (r.u8() === 0) return undefined;
  const state: DeviceState = {
    role: pick(ROLES, r.u8(), 'role'),
    policy: pick(POLICIES, r.u8(), 'policy'),
    recovering: r.u8() !== 0,
    size: r.u64(),
    epoch: r.u64(),
    trimmedTo: r.u64(),
    lastSeq: r.u64(),
  };
  r.end();
  return state;
}

export function encodeReset(reset: Reset): Buffer {
  return new Writer()
    .str8(reset.name)
    .u8(POLICIES.indexOf(reset.policy))
    .u8(MEDIA.indexOf(reset.medium))
    .u64(reset.size)
    .u64(reset.epoch)
    .u64(reset.trimmedTo)
    .u64(reset.firstSeq)
    // The flags byte only when a flag is set: a RESET without flags is what older nodes read.
    .raw(reset.nodeOwned === true ? Buffer.from([RESET_FLAG.NODE_OWNED]) : Buffer.alloc(0))
    .done();
}

export function decodeReset(body: Buffer): Reset {
  const r = new Reader(body, 'RESET');
  const reset: Reset = {
    name: r.deviceName(),
    policy: pick(POLICIES, r.u8(), 'policy'),
    medium: pick(MEDIA, r.u8(), 'medium'),
    size: r.u64(),
    epoch: r.u64(),
    trimmedTo: r.u64(),
    firstSeq: r.u64(),
  };
  // The flags byte came later: a RESET without it has none.
  const flags = r.rest();
  if (flags.length > 1) throw malformed(`RESET: ${flags.length - 1} bytes left over`);
  const bits = flags[0] ?? 0;
  if ((bits & ~RESET_FLAG.NODE_OWNED) !== 0) throw malformed(`RESET: unknown flags 0x${bits.toString(16)}`);
  if ((bits & RESET_FLAG.NODE_OWNED) !== 0) reset.nodeOwned = true;
  if (reset.firstSeq < 1) throw malformed('RESET: first sequence number must be at least 1');
  return reset;
}

/** `epoch` is the primary's epoch now; the records keep the epochs they were written with. */
export function encodeAppend(name: string, epoch: number, records: Buffer): Buffer {
  return Buffer.concat(encodeAppendParts(name, epoch, records));
}

/** An APPEND's body as parts: the name and epoch, then the records as they are (not copied). */
export function encodeAppendParts(name: string, epoch: number, records: Buffer): Buffer[] {
  return [new Writer().str8(name).u64(epoch).done(), records];
}

/**
 * Device name, the primary's epoch, and the records, each checked (magic, length,
 * checksum). The records are views of `body` (no copy): the caller keeps `body` as it is
 * until it is done with them (the mirror service, until the replica has placed them).
 */
export function decodeAppend(body: Buffer): { name: string; epoch: number; records: JournalRecord[]; encoded: Buffer[] } {
  const r = new Reader(body, 'APPEND');
  const name = r.deviceName();
  const epoch = r.u64();
  const { records, encoded } = splitRecords(r.rest(), 'APPEND', false);
  if (records.length === 0) throw malformed('APPEND: no records');
  return { name, epoch, records, encoded };
}

/**
 * Splits back-to-back records; each must be whole and pass its checksum. Each is a copy
 * of its bytes, or with `copy` false a view of `bytes`.
 */
export function splitRecords(bytes: Buffer, what: string, copy = true): { records: JournalRecord[]; encoded: Buffer[] } {
  const records: JournalRecord[] = [];
  const encoded: Buffer[] = [];
  let at = 0;
  while (at < bytes.length) {
    const result = decodeRecord(bytes, at);
    if ('incomplete' in result) throw malformed(`${what}: record ${records.length} is cut short`);
    if ('corrupt' in result) throw malformed(`${what}: record ${records.length}: ${result.corrupt}`);
    if (copy) {
      const own = Buffer.from(bytes.subarray(at, at + result.size));
      encoded.push(own);
      records.push({ ...result.record, payload: own.subarray(own.length - result.record.payload.length) });
    } else {
      // The decoded record's payload is already a view of `bytes`.
      encoded.push(bytes.subarray(at, at + result.size));
      records.push(result.record);
    }
    at += result.size;
  }
  return { records, encoded };
}

export function encodeTrim(name: string, epoch: number, upTo: number): Buffer {
  return new Writer().str8(name).u64(epoch).u64(upTo).done();
}

export function decodeTrim(body: Buffer): { name: string; epoch: number; upTo: number } {
  const r = new Reader(body, 'TRIM');
  const v = { name: r.deviceName(), epoch: r.u64(), upTo: r.u64() };
  r.end();
  return v;
}

export function encodeEpoch(name: string, epoch: number): Buffer {
  return new Writer().str8(name).u64(epoch).done();
}

export function decodeEpoch(body: Buffer): { name: string; epoch: number } {
  const r = new Reader(body, 'EPOCH');
  const v = { name: r.deviceName(), epoch: r.u64() };
  r.end();
  return v;
}

export function decodeName(body: Buffer, what: string): string {
  const r = new Reader(body, what);
  const name = r.deviceName();
  r.end();
  return name;
}

export function encodeFetch(name: string, fromSeq: number, maxBytes: number): Buffer {
  return new Writer().str8(name).u64(fromSeq).u32(maxBytes).done();
}

export function decodeFetch(body: Buffer): { name: string; fromSeq: number; maxBytes: number } {
  const r = new Reader(body, 'FETCH');
  const v = { name: r.deviceName(), fromSeq: r.u64(), maxBytes: r.u32() };
  r.end();
  return v;
}

// ---- limits: what a request may make the node hold, before it is served ----

/**
 * Largest body the mirror service accepts before HELLO has succeeded (a HELLO is about
 * 1.1 KiB): a peer that has not been admitted cannot make the node hold more.
 */
export const MIRROR_HANDSHAKE_MAX_BODY = 4096;

/** An error reply: header, length and the longest message (1024 characters of UTF-8). */
export const MIRROR_ERROR_REPLY_SIZE = MIRROR_HEADER + 2 + 4 * 1024;

/**
 * The largest reply a request read before HELLO has succeeded can get, whatever its op:
 * a HELLO reply (a node id of at most 64 bytes) or an error. Such a request is priced at
 * its body plus this, never at what its op could get once the peer is admitted.
 */
export const MIRROR_HANDSHAKE_REPLY_SIZE = Math.max(MIRROR_ERROR_REPLY_SIZE, MIRROR_HEADER + 1 + 64);

/**
 * The largest reply any request of `op` can get, from the op alone: FETCH returns up to
 * its maxBytes of records, and at least one record however large; the rest answer a
 * few fields or an error.
 */
export function maxMirrorReplySize(op: number): number {
  return op === MOP.FETCH ? MIRROR_HEADER + MIRROR_MAX_BODY : MIRROR_ERROR_REPLY_SIZE;
}

/** The most of a service budget one request can hold: the largest body and the largest reply. */
export const MIRROR_LARGEST_REQUEST_COST = MIRROR_HEADER + MIRROR_MAX_BODY + MIRROR_HEADER + MIRROR_MAX_BODY;
