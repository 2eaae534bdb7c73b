// NBD encoders and option-payload decoders, with no I/O.
//
// Every encoder sizes its message first and writes it into one buffer. READ payloads are
// not copied in: a reply header and its data go out as two buffers in one corked write.
// Decoders of option payloads check every length against the payload and throw
// MS_NBD_PROTOCOL so the session can answer NBD_REP_ERR_INVALID.

import { MisuseError } from '../../errors.js';
import {
  IHAVEOPT,
  INFO,
  REQUEST_MAGIC,
  REQUEST_SIZE,
  MAX_MESSAGE,
  MAX_STRING,
  NBDMAGIC,
  OPTION_REPLY_HEADER_SIZE,
  OPTION_REPLY_MAGIC,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  SIMPLE_REPLY_MAGIC,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_HEADER_SIZE,
  STRUCTURED_REPLY_MAGIC,
} from './spec.js';

const TWO_32 = 4294967296;

/** The 8-byte cookie (handle) of a request, echoed in its reply. */
export interface Cookie {
  hi: number;
  lo: number;
}

export interface Extent {
  length: number;
  flags: number;
}

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

export function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * TWO_32 + buf.readUInt32BE(at + 4);
}

// ---- the client's side (NbdClient) ----

/** An option request: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Buffer): Buffer {
  const buf = Buffer.allocUnsafe(16 + data.length);
  buf.writeBigUInt64BE(IHAVEOPT, 0);
  buf.writeUInt32BE(option, 8);
  buf.writeUInt32BE(data.length, 12);
  data.copy(buf, 16);
  return buf;
}

/** A transmission request header; a WRITE's data follows it as a buffer of its own. */
export function encodeRequestHeader(type: number, flags: number, cookie: Cookie, offset: number, length: number): Buffer {
  const buf = Buffer.allocUnsafe(REQUEST_SIZE);
  buf.writeUInt32BE(REQUEST_MAGIC, 0);
  buf.writeUInt16BE(flags, 4);
  buf.writeUInt16BE(type, 6);
  buf.writeUInt32BE(cookie.hi, 8);
  buf.writeUInt32BE(cookie.lo, 12);
  writeU64(buf, offset, 16);
  buf.writeUInt32BE(length, 24);
  return buf;
}

// ---- handshake ----

/** NBDMAGIC, IHAVEOPT, handshake flags. */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const buf = Buffer.allocUnsafe(18);
  buf.writeBigUInt64BE(NBDMAGIC, 0);
  buf.writeBigUInt64BE(IHAVEOPT, 8);
  buf.writeUInt16BE(handshakeFlags, 16);
  return buf;
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const buf = Buffer.allocUnsafe(OPTION_REPLY_HEADER_SIZE + data.length);
  buf.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  buf.writeUInt32BE(option, 8);
  buf.writeUInt32BE(type, 12);
  buf.writeUInt32BE(data.length, 16);
  data.copy(buf, OPTION_REPLY_HEADER_SIZE);
  return buf;
}

/**
 * The longest prefix of `text` that fits in `maxBytes` bytes of UTF-8, cut between
 * characters: a string on the wire is measured in bytes, and a cut inside a character
 * would leave invalid UTF-8.
 */
export function utf8Prefix(text: string, maxBytes: number): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  if (bytes.length <= maxBytes) return bytes;
  let end = maxBytes;
  // Back up over continuation bytes (10xxxxxx) to the start of the character cut in two.
  while (end > 0 && (bytes.readUInt8(end) & 0xc0) === 0x80) end--;
  return bytes.subarray(0, end);
}

/** An option error reply with a message for people (at most MAX_MESSAGE bytes). */
export function encodeOptionError(option: number, type: number, message: string): Buffer {
  return encodeOptionReply(option, type, utf8Prefix(message, MAX_MESSAGE));
}

/** NBD_REP_SERVER payload: name, then a description for people. */
export function serverPayload(name: string, description: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8');
  const buf = Buffer.allocUnsafe(4 + n.length + d.length);
  buf.writeUInt32BE(n.length, 0);
  n.copy(buf, 4);
  d.copy(buf, 4 + n.length);
  return buf;
}

export function infoExportPayload(size: number, flags: number): Buffer {
  const buf = Buffer.allocUnsafe(12);
  buf.writeUInt16BE(INFO.EXPORT, 0);
  writeU64(buf, size, 2);
  buf.writeUInt16BE(flags, 10);
  return buf;
}

export function infoStringPayload(type: number, text: string): Buffer {
  const s = Buffer.from(text, 'utf8');
  const buf = Buffer.allocUnsafe(2 + s.length);
  buf.writeUInt16BE(type, 0);
  s.copy(buf, 2);
  return buf;
}

export function infoBlockSizePayload(min: number, preferred: number, max: number): Buffer {
  const buf = Buffer.allocUnsafe(14);
  buf.writeUInt16BE(INFO.BLOCK_SIZE, 0);
  buf.writeUInt32BE(min, 2);
  buf.writeUInt32BE(preferred, 6);
  buf.writeUInt32BE(max, 10);
  return buf;
}

export function metaContextPayload(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const buf = Buffer.allocUnsafe(4 + n.length);
  buf.writeUInt32BE(id, 0);
  n.copy(buf, 4);
  return buf;
}

/** Reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zero bytes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const buf = Buffer.alloc(10 + (noZeroes ? 0 : 124));
  writeU64(buf, size, 0);
  buf.writeUInt16BE(flags, 8);
  return buf;
}

function string(data: Buffer, at: number, length: number, what: string): string {
  if (length > MAX_STRING) throw invalid(`${what} is ${length} bytes, more than ${MAX_STRING}`);
  if (at + length > data.length) throw invalid(`${what} runs past the option payload`);
  const text = data.toString('utf8', at, at + length);
  if (text.includes('\0')) throw invalid(`${what} contains NUL`);
  return text;
}

function invalid(message: string): MisuseError {
  return new MisuseError('MS_NBD_PROTOCOL', message);
}

/** NBD_OPT_INFO / NBD_OPT_GO payload: export name and the info types asked for. */
export function decodeInfoRequest(data: Buffer): { name: string; infos: number[] } {
  if (data.length < 6) throw invalid('INFO/GO payload shorter than 6 bytes');
  const nameLength = data.readUInt32BE(0);
  const name = string(data, 4, nameLength, 'export name');
  const at = 4 + nameLength;
  if (at + 2 > data.length) throw invalid('INFO/GO payload lacks the info count');
  const count = data.readUInt16BE(at);
  if (at + 2 + count * 2 !== data.length) throw invalid(`INFO/GO payload is ${data.length} bytes, its fields say ${at + 2 + count * 2}`);
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(at + 2 + i * 2));
  return { name, infos };
}

/** NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT payload: export name and queries. */
export function decodeMetaContextRequest(data: Buffer): { name: string; queries: string[] } {
  if (data.length < 8) throw invalid('meta context payload shorter than 8 bytes');
  const nameLength = data.readUInt32BE(0);
  const name = string(data, 4, nameLength, 'export name');
  let at = 4 + nameLength;
  if (at + 4 > data.length) throw invalid('meta context payload lacks the query count');
  const count = data.readUInt32BE(at);
  at += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) throw invalid(`meta context query ${i} runs past the payload`);
    const length = data.readUInt32BE(at);
    queries.push(string(data, at + 4, length, `query ${i}`));
    at += 4 + length;
  }
  if (at !== data.length) throw invalid('meta context payload has trailing bytes');
  return { name, queries };
}

// ---- transmission replies ----

/** Simple reply header; a successful READ's data follows it. */
export function encodeSimpleReply(cookie: Cookie, error: number): Buffer {
  const buf = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
  buf.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  buf.writeUInt32BE(error, 4);
  buf.writeUInt32BE(cookie.hi, 8);
  buf.writeUInt32BE(cookie.lo, 12);
  return buf;
}

function structuredHeader(buf: Buffer, cookie: Cookie, flags: number, type: number, length: number): void {
  buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  buf.writeUInt16BE(flags, 4);
  buf.writeUInt16BE(type, 6);
  buf.writeUInt32BE(cookie.hi, 8);
  buf.writeUInt32BE(cookie.lo, 12);
  buf.writeUInt32BE(length, 16);
}

/** NBD_REPLY_TYPE_NONE with DONE: success with no payload. */
export function encodeStructuredDone(cookie: Cookie): Buffer {
  const buf = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE);
  structuredHeader(buf, cookie, REPLY_FLAG_DONE, REPLY_TYPE.NONE, 0);
  return buf;
}

/** OFFSET_DATA chunk header plus its offset; `dataLength` bytes of data follow. */
export function encodeOffsetDataHead(cookie: Cookie, offset: number, dataLength: number, done: boolean): Buffer {
  const buf = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + 8);
  structuredHeader(buf, cookie, done ? REPLY_FLAG_DONE : 0, REPLY_TYPE.OFFSET_DATA, 8 + dataLength);
  writeU64(buf, offset, STRUCTURED_HEADER_SIZE);
  return buf;
}

export function encodeOffsetHole(cookie: Cookie, offset: number, size: number, done: boolean): Buffer {
  const buf = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + 12);
  structuredHeader(buf, cookie, done ? REPLY_FLAG_DONE : 0, REPLY_TYPE.OFFSET_HOLE, 12);
  writeU64(buf, offset, STRUCTURED_HEADER_SIZE);
  buf.writeUInt32BE(size, STRUCTURED_HEADER_SIZE + 8);
  return buf;
}

export function encodeBlockStatus(cookie: Cookie, contextId: number, extents: readonly Extent[], done: boolean): Buffer {
  const length = 4 + extents.length * 8;
  const buf = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + length);
  structuredHeader(buf, cookie, done ? REPLY_FLAG_DONE : 0, REPLY_TYPE.BLOCK_STATUS, length);
  buf.writeUInt32BE(contextId, STRUCTURED_HEADER_SIZE);
  extents.forEach((e, i) => {
    buf.writeUInt32BE(e.length, STRUCTURED_HEADER_SIZE + 4 + i * 8);
    buf.writeUInt32BE(e.flags, STRUCTURED_HEADER_SIZE + 8 + i * 8);
  });
  return buf;
}

/** NBD_REPLY_TYPE_ERROR chunk (always final here): errno and a message for people (at most MAX_MESSAGE bytes). */
export function encodeStructuredError(cookie: Cookie, errno: number, message: string): Buffer {
  const text = utf8Prefix(message, MAX_MESSAGE);
  const buf = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + 6 + text.length);
  structuredHeader(buf, cookie, REPLY_FLAG_DONE, REPLY_TYPE.ERROR, 6 + text.length);
  buf.writeUInt32BE(errno, STRUCTURED_HEADER_SIZE);
  buf.writeUInt16BE(text.length, STRUCTURED_HEADER_SIZE + 4);
  text.copy(buf, STRUCTURED_HEADER_SIZE + 6);
  return buf;
}

