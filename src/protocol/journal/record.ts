// Journal records: one encoding in memory, in journal and vault files, and on the wire.
//
//   offset size  field
//   0      4     magic 0x4d534a52 ("MSJR")
//   4      2     version (1)
//   6      2     flags: bit 0 target present, bit 1 epoch marker, bit 2 trim marker,
//                bit 3 zero (a journaled TRIM or WRITE_ZEROES: payload is the u64 length),
//                bit 4 void (the number of an append that failed: no target, no payload),
//                bit 5 writer (the payload begins with 16 bytes: the writer's 8-byte id and
//                its u64 sequence number, which a retried append is recognised by),
//                bit 6 wrap (journal files of version 2 only: the ring goes on at its
//                start; payload is the u64 lap it ends)
//   8      8     sequence number
//   16     8     timestamp, microseconds since the Unix epoch
//   24     8     epoch of the writer
//   32     4     payload length
//   36     2     target volume name length (0 without a target)
//   38     2     reserved, 0
//   40     8     target offset
//   48     4     CRC-32 (zlib) of bytes 0..47, then the target name, then the payload
//   52     4     reserved, 0
//   56     ...   target name (UTF-8), payload
//
// docs/journal-format.md is the normative description; test/fixtures/journal holds
// frozen files that every later version must keep reading.

import { crc32 } from 'node:zlib';
import { MisuseError } from '../../errors.js';

export const RECORD_MAGIC = 0x4d534a52;
export const RECORD_VERSION = 1;
export const RECORD_HEADER = 56;
export const MAX_PAYLOAD = 16 * 1024 * 1024;
export const MAX_TARGET_NAME = 64;

export const RECORD_FLAG = { TARGET: 1 << 0, EPOCH: 1 << 1, TRIM: 1 << 2, ZERO: 1 << 3, VOID: 1 << 4, WRITER: 1 << 5, WRAP: 1 << 6 } as const;

/** Bytes of the writer fields at the start of a WRITER record's stored payload. */
export const WRITER_FIELDS = 16;
/** A writer id on the wire and in records: 8 bytes, shown as 16 hex digits. */
export const WRITER_ID_PATTERN = /^[0-9a-f]{16}$/;

/** Who appended a record and its number in that writer's own sequence (multipath retries). */
export interface RecordWriter {
  /** 16 lowercase hex digits. */
  id: string;
  seq: number;
}

export interface RecordTarget {
  volume: string;
  offset: number;
}

export interface JournalRecord {
  seq: number;
  /** Microseconds since the Unix epoch. */
  timestamp: number;
  epoch: number;
  flags: number;
  target: RecordTarget | undefined;
  payload: Buffer;
  /** Set on records appended with a writer id (flag WRITER). */
  writer?: RecordWriter | undefined;
}

const TWO_32 = 4294967296;

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * TWO_32 + buf.readUInt32BE(at + 4);
}

export function recordSize(payloadLength: number, targetNameLength: number): number {
  return RECORD_HEADER + targetNameLength + payloadLength;
}

/** The bytes `record` takes encoded. */
export function encodedSize(record: JournalRecord): number {
  const name = record.target === undefined ? 0 : Buffer.byteLength(record.target.volume, 'utf8');
  return recordSize(record.payload.length + (record.writer === undefined ? 0 : WRITER_FIELDS), name);
}

/** Encodes a record into one buffer of its own. */
export function encodeRecord(record: JournalRecord): Buffer {
  const buf = Buffer.allocUnsafe(encodedSize(record));
  encodeRecordInto(record, buf);
  return buf;
}

/**
 * Encodes a record into `into` from `at` (room for encodedSize(record) there); returns
 * the bytes written. Records appended together are encoded back to back into one buffer.
 */
export function encodeRecordInto(record: JournalRecord, into: Buffer, at = 0): number {
  // The name is written in place, not through a buffer of its own (one allocation per record).
  const nameLength = record.target === undefined ? 0 : Buffer.byteLength(record.target.volume, 'utf8');
  const writer = record.writer;
  const stored = record.payload.length + (writer === undefined ? 0 : WRITER_FIELDS);
  const size = recordSize(stored, nameLength);
  const buf = into.subarray(at, at + size);
  if (buf.length !== size) throw new RangeError(`encodeRecordInto: ${size} bytes do not fit at ${at} of ${into.length}`);
  buf.writeUInt32BE(RECORD_MAGIC, 0);
  buf.writeUInt16BE(RECORD_VERSION, 4);
  buf.writeUInt16BE((record.flags & ~RECORD_FLAG.WRITER) | (record.target === undefined ? 0 : RECORD_FLAG.TARGET) | (writer === undefined ? 0 : RECORD_FLAG.WRITER), 6);
  writeU64(buf, record.seq, 8);
  writeU64(buf, record.timestamp, 16);
  writeU64(buf, record.epoch, 24);
  buf.writeUInt32BE(stored, 32);
  buf.writeUInt16BE(nameLength, 36);
  buf.writeUInt16BE(0, 38);
  writeU64(buf, record.target?.offset ?? 0, 40);
  buf.writeUInt32BE(0, 48);
  buf.writeUInt32BE(0, 52);
  if (record.target !== undefined) buf.write(record.target.volume, RECORD_HEADER, nameLength, 'utf8');
  let o = RECORD_HEADER + nameLength;
  if (writer !== undefined) {
    buf.write(writer.id, o, 8, 'hex');
    writeU64(buf, writer.seq, o + 8);
    o += WRITER_FIELDS;
  }
  record.payload.copy(buf, o);
  buf.writeUInt32BE(checksum(buf), 48);
  return size;
}

function checksum(buf: Buffer): number {
  const head = crc32(buf.subarray(0, 48));
  return crc32(buf.subarray(RECORD_HEADER), head);
}

export type DecodeResult = { record: JournalRecord; size: number } | { incomplete: true } | { corrupt: string };

/**
 * Decodes the record at `at`. Incomplete means the buffer ends inside the record (a torn
 * tail when reading a file); corrupt means it can never be a valid record.
 */
export function decodeRecord(buf: Buffer, at = 0): DecodeResult {
  if (buf.length - at < RECORD_HEADER) return { incomplete: true };
  if (buf.readUInt32BE(at) !== RECORD_MAGIC) return { corrupt: 'bad record magic' };
  if (buf.readUInt16BE(at + 4) !== RECORD_VERSION) return { corrupt: `record version ${buf.readUInt16BE(at + 4)} is not supported` };
  const length = buf.readUInt32BE(at + 32);
  const nameLength = buf.readUInt16BE(at + 36);
  if (length > MAX_PAYLOAD || nameLength > MAX_TARGET_NAME) return { corrupt: 'record lengths out of range' };
  const size = recordSize(length, nameLength);
  if (buf.length - at < size) return { incomplete: true };
  const view = buf.subarray(at, at + size);
  if (view.readUInt32BE(48) !== checksum(view)) return { corrupt: 'record checksum mismatch' };
  const flags = view.readUInt16BE(6);
  const body = RECORD_HEADER + nameLength;
  const hasWriter = (flags & RECORD_FLAG.WRITER) !== 0;
  if (hasWriter && length < WRITER_FIELDS) return { corrupt: 'writer record shorter than its writer fields' };
  return {
    size,
    record: {
      seq: readU64(view, 8),
      timestamp: readU64(view, 16),
      epoch: readU64(view, 24),
      flags: flags & ~(RECORD_FLAG.TARGET | RECORD_FLAG.WRITER),
      target: (flags & RECORD_FLAG.TARGET) !== 0 ? { volume: view.toString('utf8', RECORD_HEADER, body), offset: readU64(view, 40) } : undefined,
      payload: view.subarray(hasWriter ? body + WRITER_FIELDS : body),
      // Present only on writer records, so records without one compare as before.
      ...(hasWriter ? { writer: { id: view.toString('hex', body, body + 8), seq: readU64(view, body + 8) } } : {}),
    },
  };
}

/** Decodes exactly one record or throws MS_NVRAM_INVALID (for input from clients). */
export function decodeOne(buf: Buffer): JournalRecord {
  const result = decodeRecord(buf);
  if ('record' in result && result.size === buf.length) return result.record;
  const reason = 'corrupt' in result ? result.corrupt : 'record incomplete or followed by extra bytes';
  throw new MisuseError('MS_NVRAM_INVALID', reason);
}

export function nowMicros(): number {
  return Math.round((performance.timeOrigin + performance.now()) * 1000);
}
