// A journal file: the persistence of a `local` (or mirrored primary's) NVRAM device, and
// the vault format.
//
//   version 2 (journals): a ring that reuses trimmed space
//     block 0     header: "MSJOURN1", u32 version 2, u32 ring start 12288, u64 device
//                 size, u64 created (ms), u64 ring size, u32 key, u32 CRC-32 of bytes 0..43
//     blocks 1-2  two pointer slots (the valid one of the higher generation counts):
//                 where reading starts, the number of the first user record there, and
//                 the epoch and trim point of every marker before it
//     12288...    the ring: records back to back (record.ts), each tagged in its reserved
//                 bytes 52..55 with the key and its place (ringTag); where the next one
//                 would not leave room for a wrap marker before the ring's end, a wrap
//                 marker, and on from the ring's start, over records that were trimmed
//   version 1 (vaults, and journals of earlier versions, read and rewritten as version 2):
//     a 64-byte header, then records back to back
//
// A place in the ring is a logical offset that only grows (ring offset = logical mod ring
// size). The writer never writes past the pointer plus the ring size, so everything from
// the pointer to the head is intact. When a batch would, the pointer moves first, to the
// oldest record not trimmed, written to the other slot and made durable; so a torn slot
// write leaves the older slot, whose records are all still there. When even that leaves
// no room (the ring holds too much that is not trimmed), the file is rewritten with the
// live records into a ring with room, by a new file renamed over it (a compaction). Zeros
// are written ahead of the head in the first lap only (PREALLOCATE at a time), so an
// append overwrites blocks that exist and its fdatasync has no block allocation or file
// size to journal; after the first lap nothing is written but records and pointers.
//
// Group commit: appends queue up; one writer takes everything queued, writes it with one
// positional write (two across a wrap) and one fdatasync, and only then releases each of
// those appenders. When nothing unsynced precedes the batch, the write goes through a
// second descriptor opened O_DSYNC instead: written and durable in one trip to libuv's
// thread pool, not two (a test wrapping the sink to watch or break syncs sees write and
// fdatasync as before). Deferred records (a write log's plain WRITEs) wait in the queue
// for the next batch. An append that arrives during a sync waits for the next one, so no
// appender is ever released by a sync that did not cover its record. A `mirrored` device
// appends without waiting for a sync (its partner holds the record); the file is written
// in order, so the next sync, or `flush`, covers those records as well. While the writer
// is idle and nothing is queued, such an append is written in the appender's own turn
// (writeNow: a positional write into the OS's cache, padded with zeros to its page's
// end, no thread pool), so it is in the file before append returns; otherwise, and while
// such writes are slow, it queues behind the writer.
//
// A failed write or sync fences the file: the batch that failed and every append queued
// after it are refused, and so is every later one, until `replace` has rewritten the
// whole file from what the device holds in memory and synced it. Nothing is cut back:
// after a failed fdatasync the kernel may have dropped the pages it could not write, so
// neither the failed batch nor anything before it in the file can be trusted until the
// file is written anew (PostgreSQL's "fsyncgate").
//
// Recovery reads records from the pointer and stops at the first one that is not whole,
// fails its checksum, does not continue the numbers, or is a wrap marker of another lap.
// What lies beyond is records of earlier laps (numbered lower) or a torn tail: a crash
// can only tear what was written last. A user record elsewhere in the ring numbered
// beyond the last one read (`validAfter`) means damage in the middle: nothing is cut, and
// the device manager takes the device offline (MS_NVRAM_DAMAGED). docs/journal-format.md
// is the normative description.

import { constants, fdatasync as fsFdatasync } from 'node:fs';
import { open, rename, rm, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { MisuseError, RuntimeError, StorageError, asError } from '../errors.js';
import { CREATE_NEW_FLAGS } from '../fs/meta-file.js';
import { writeAllFd, writeAllFdSync } from '../fs/positional-io.js';
import { SyncIoGauge } from '../fs/sync-io-gauge.js';
import { InFlight } from '../settle.js';
import type { JournalFileInfo } from '../protocol/admin/api.js';
import { MAX_PAYLOAD, MAX_TARGET_NAME, RECORD_FLAG, RECORD_HEADER, RECORD_MAGIC, decodeRecord, encodeRecord, nowMicros, recordSize, type JournalRecord } from '../protocol/journal/record.js';

export const FILE_MAGIC = Buffer.from('MSJOURN1');
/** The header of a version 1 file: vaults, and journals written before version 2. */
export const FILE_HEADER = 64;
/** Where a version 2 file's ring begins: a block for the header, then one per pointer slot. */
export const RING_START = 3 * 4096;
const SLOTS = [4096, 8192] as const;
const SLOT_BYTES = 48;
/** The least ring a journal gets; a device's ring holds at least twice its size. */
export const RING_MIN = 16 * 1024 * 1024;
/** The largest ring a file may declare (a journal is read into memory whole). */
const MAX_RING = 4 * 1024 * 1024 * 1024 - 2 * RING_START;
/** Zeros written ahead of the tail at a time, during a ring's first lap. */
export const PREALLOCATE = 4 * 1024 * 1024;
/** A wrap marker: a record header and the u64 lap it ends. */
const WRAP_BYTES = recordSize(8, 0);
/** Where the pointer may move to is noted once per run of about this many bytes of records (a 16th of a smaller ring). */
const RUN = 64 * 1024;
const MARKERS = RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM | RECORD_FLAG.WRAP;
const EMPTY = Buffer.alloc(0);
/** The largest batch assembled in the reused scratch buffer; larger ones get their own. */
const SCRATCH_MAX = 4 * 1024 * 1024;
/** Pages of the file: a write in the appender's turn ends on one (see writeNow). */
const PAGE = 4096;

/** The ring a new journal gets: at least `least`, and twice the device's size. */
export function ringCapacity(deviceSize: number, least = RING_MIN): number {
  return Math.ceil(Math.max(least, 2 * deviceSize) / 4096) * 4096;
}

/** The largest device with a journal file: its ring (twice its size) stays readable whole. */
export const MAX_JOURNALED_DEVICE = 1024 * 1024 * 1024;

/** What a journal file needs from the file system; tests wrap it to watch or break syncs. */
export interface JournalSink {
  write(buf: Buffer, position: number): Promise<void>;
  /**
   * Writes `buf` at `position` in the caller's turn (into the OS's cache, no sync), done
   * with `buf` when it returns; throws what the write throws. Optional: a sink without it
   * gets every write through `write`.
   */
  writeSync?(buf: Buffer, position: number): void;
  datasync(): Promise<void>;
  close(): Promise<void>;
}

/** Writes `buf` at `position` and returns once it is durable: a write and a datasync in one. */
type DurableWrite = (buf: Buffer, position: number) => Promise<void>;

export interface JournalOptions {
  /** Wraps every sink of the file: the fault-injection seam for tests. */
  wrap?: (sink: JournalSink) => JournalSink;
  /** The least ring of a new file (RING_MIN); tests make it small so that it wraps often. */
  ring?: number;
  /** Told how long each batch's write and sync took, in seconds (the latency figures). */
  onSync?: (seconds: number) => void;
  /** The clock (ms) that times writes in the appender's turn; tests give a fake one. */
  clock?: () => number;
}

/**
 * A sink on `handle` through libuv's callback API on its descriptor (cheaper than
 * FileHandle's promises). A FileHandle keeps itself open until its own promises finish,
 * not raw I/O on its `fd`: `inflight` makes close wait for those, so a late write never
 * reaches a descriptor number reused since.
 */
export function fileSink(handle: FileHandle): JournalSink {
  return sinkOn(handle, new InFlight());
}

function sinkOn(handle: FileHandle, inflight: InFlight): JournalSink {
  return {
    write: (buf, position) => inflight.track(writeAllFd(handle.fd, buf, position)),
    writeSync: (buf, position) => {
      writeAllFdSync(handle.fd, buf, position);
    },
    datasync: () => inflight.track(new Promise<void>((resolve, reject) => { fsFdatasync(handle.fd, (error) => { if (error === null) resolve(); else reject(error); }); })),
    close: async () => {
      await inflight.settled();
      await handle.close();
    },
  };
}

/**
 * Opens the journal at `path` for appends. Unwrapped (no test watching its writes and
 * syncs), it also gets a second descriptor opened O_DSYNC: a batch that must be durable
 * and follows nothing unsynced is written through it, one trip to the thread pool
 * instead of a write and an fdatasync (the space exists, so no metadata waits).
 */
async function openSink(path: string, wrap: (sink: JournalSink) => JournalSink): Promise<{ sink: JournalSink; durable: DurableWrite | undefined }> {
  const handle = await open(path, 'r+');
  const inflight = new InFlight();
  const base = sinkOn(handle, inflight);
  const sink = wrap(base);
  if (sink !== base) return { sink, durable: undefined };
  const dsync = await open(path, constants.O_RDWR | constants.O_DSYNC).catch(() => undefined);
  if (dsync === undefined) return { sink, durable: undefined };
  return {
    sink: {
      ...base,
      close: async () => {
        await inflight.settled();
        await dsync.close().catch(() => undefined);
        await handle.close();
      },
    },
    durable: (buf, position) => inflight.track(writeAllFd(dsync.fd, buf, position)),
  };
}

/** The fields both versions' headers begin with: magic, version, the u32 at 12, device size, created. */
function headerStart(version: number, at12: number, deviceSize: number, created: number): Buffer {
  const buf = Buffer.alloc(FILE_HEADER);
  FILE_MAGIC.copy(buf, 0);
  buf.writeUInt32BE(version, 8);
  buf.writeUInt32BE(at12, 12);
  writeU64(buf, deviceSize, 16);
  writeU64(buf, created, 24);
  return buf;
}

/** The header of a version 1 file (vaults). */
export function encodeFileHeader(deviceSize: number, created: number): Buffer {
  const buf = headerStart(1, FILE_HEADER, deviceSize, created);
  buf.writeUInt32BE(crc32(buf.subarray(0, 32)), 32);
  return buf;
}

function encodeRingHeader(deviceSize: number, created: number, capacity: number, key: number): Buffer {
  const buf = headerStart(2, RING_START, deviceSize, created);
  writeU64(buf, capacity, 32);
  buf.writeUInt32BE(key, 40);
  buf.writeUInt32BE(crc32(buf.subarray(0, 44)), 44);
  return buf;
}

/**
 * What a version 2 file writes in a record's reserved bytes 52..55 (outside its
 * checksum): the file's random key mixed with the record's offset in the ring. A record
 * is read from the ring only with its own place's tag, so bytes a client journaled (a
 * record image in a payload, a copy of a journal file) are never taken for one of the
 * ring's records when reading runs into stale payloads of earlier laps: a client knows
 * neither the key nor, for a copy, where it will lie.
 */
function ringTag(key: number, at: number): number {
  return (key ^ Math.imul(at, 0x9e3779b1)) >>> 0;
}

/** Whether the record at ring offset `at` carries its place's tag (cheap: no checksum). */
function tagged(ring: Buffer, key: number, at: number): boolean {
  return ring.length - at >= RECORD_HEADER && ring.readUInt32BE(at) === RECORD_MAGIC && ring.readUInt32BE(at + 52) === ringTag(key, at);
}

/**
 * A pointer slot of a version 2 file: reading starts at logical offset `at`, where the
 * first user record has number `seq` (0: any); `epoch` and `trimmedTo` stand for every
 * epoch and trim marker written before `at`. `gen` orders the two slots.
 */
interface Pointer {
  gen: number;
  at: number;
  seq: number;
  epoch: number;
  trimmedTo: number;
}

function encodePointer(p: Pointer): Buffer {
  const buf = Buffer.alloc(SLOT_BYTES);
  writeU64(buf, p.gen, 0);
  writeU64(buf, p.at, 8);
  writeU64(buf, p.seq, 16);
  writeU64(buf, p.epoch, 24);
  writeU64(buf, p.trimmedTo, 32);
  buf.writeUInt32BE(crc32(buf.subarray(0, 40)), 40);
  return buf;
}

function decodePointer(image: Buffer, at: number): Pointer | undefined {
  if (image.length < at + SLOT_BYTES) return undefined;
  const view = image.subarray(at, at + SLOT_BYTES);
  if (view.readUInt32BE(40) !== crc32(view.subarray(0, 40))) return undefined;
  const fields = [0, 8, 16, 24, 32].map((o) => view.readBigUInt64BE(o));
  // Every field must be an exact number (a slot that checks but says 2^60 is no pointer).
  if (fields.some((f) => f > BigInt(Number.MAX_SAFE_INTEGER))) return undefined;
  const [gen, ptr, seq, epoch, trimmedTo] = fields.map(Number) as [number, number, number, number, number];
  return gen >= 1 ? { gen, at: ptr, seq, epoch, trimmedTo } : undefined;
}

/** Where records are, by runs: the pointer may move to a run's start. */
interface Run {
  at: number;
  /** Number of the run's first user record (0: none yet). */
  first: number;
  /** Number of its last user record (0: none). */
  last: number;
}

function noteRun(runs: Run[], capacity: number, at: number, seq: number): void {
  const run = runs.at(-1);
  if (run === undefined || at - run.at >= Math.min(RUN, capacity >> 4)) {
    runs.push({ at, first: seq, last: seq });
    return;
  }
  if (seq === 0) return;
  if (run.first === 0) run.first = seq;
  run.last = seq;
}

/** What a writer needs to go on with a version 2 file. */
export interface RingState {
  deviceSize: number;
  capacity: number;
  /** The file's key (see ringTag). */
  key: number;
  pointer: Pointer;
  /** Which slot holds `pointer`. */
  slot: number;
  /** Logical offset where the next record goes. */
  head: number;
  /** Number of the next user record (0: not known, any). */
  expect: number;
  epoch: number;
  trimmedTo: number;
  runs: Run[];
  /** Bytes of file that exist. */
  allocated: number;
  /** File offsets of records beyond the last one read (damage): made unreadable before writing. */
  ahead: number[];
}

export interface Recovered {
  /** The file's format version; 0 without a valid header. */
  version: number;
  records: JournalRecord[];
  /** The epoch and trim point of the markers a version 2 file's pointer stands for (zero otherwise). */
  base: { epoch: number; trimmedTo: number };
  /** Version 1: bytes of valid journal (header included). Version 2: where reading stopped. */
  validLength: number;
  /** Why reading stopped before the end (version 2: only when it is damage). */
  stoppedBecause: string | undefined;
  /**
   * Set when a valid record lies beyond where reading stopped: damage in the middle of
   * the file, not a torn tail. Where the first such record begins.
   */
  validAfter: number | undefined;
  /** Version 2: where a writer goes on. */
  ring: RingState | undefined;
}

/** Parses a whole journal or vault file image, of either version. */
export function parseJournal(image: Buffer): Recovered {
  if (image.length >= 12 && image.subarray(0, 8).equals(FILE_MAGIC)) {
    const version = image.readUInt32BE(8);
    if (version === 2) return parseRing(image);
    if (version !== 1) return { version, records: [], base: { epoch: 0, trimmedTo: 0 }, validLength: 0, stoppedBecause: `journal format version ${version} is newer than this node reads`, validAfter: 0, ring: undefined };
  }
  return parseLinear(image);
}

/** Version 1: records back to back from offset 64. */
function parseLinear(image: Buffer): Recovered {
  const base = { epoch: 0, trimmedTo: 0 };
  if (image.length < FILE_HEADER || !image.subarray(0, 8).equals(FILE_MAGIC) || image.readUInt32BE(32) !== crc32(image.subarray(0, 32))) {
    // An empty file is no journal; a damaged header with records after it is damage.
    return { version: 0, records: [], base, validLength: 0, stoppedBecause: 'no valid journal header', validAfter: image.length === 0 ? undefined : nextValidRecord(image, -1), ring: undefined };
  }
  const records: JournalRecord[] = [];
  let at = FILE_HEADER;
  let stoppedBecause: string | undefined;
  let lastSeq: number | undefined;
  while (at < image.length) {
    const result = decodeRecord(image, at);
    if ('incomplete' in result) {
      stoppedBecause = 'torn record at the end';
      break;
    }
    if ('corrupt' in result && image.readUInt32BE(at) === 0) {
      // Preallocated zeros: the end of the journal, not damage.
      break;
    }
    if ('corrupt' in result) {
      stoppedBecause = result.corrupt;
      break;
    }
    // Markers (epoch, trim) carry no sequence number of their own; user records must follow on.
    const marker = (result.record.flags & MARKERS) !== 0;
    if (!marker) {
      if (lastSeq !== undefined && result.record.seq !== lastSeq + 1) {
        stoppedBecause = `sequence jumps from ${lastSeq} to ${result.record.seq}`;
        break;
      }
      lastSeq = result.record.seq;
    }
    // Keep a copy: the image buffer is not ours to hold on to.
    records.push({ ...result.record, payload: Buffer.from(result.record.payload) });
    at += result.size;
  }
  // A record out of sequence is itself a valid record after the stop.
  const jumped = stoppedBecause?.startsWith('sequence jumps') === true;
  const validAfter = stoppedBecause === undefined ? undefined : jumped ? at : nextValidRecord(image, past(image, at));
  return { version: 1, records, base, validLength: at, stoppedBecause, validAfter, ring: undefined };
}

/**
 * Version 2: from the newer valid pointer slot, records in order (across wrap markers)
 * until one is not whole, fails its checks, does not continue the numbers, or is a wrap
 * marker of another lap. What lies beyond is records of earlier laps (lower numbers,
 * trimmed) or a torn tail; a user record anywhere else in the ring numbered beyond the
 * last one read is damage.
 */
function parseRing(image: Buffer): Recovered {
  const base = { epoch: 0, trimmedTo: 0 };
  const whole = image.length >= FILE_HEADER && image.readUInt32BE(44) === crc32(image.subarray(0, 44));
  const capacity = whole ? Number(image.readBigUInt64BE(32)) : 0;
  if (!whole || image.readUInt32BE(12) !== RING_START || capacity < 2 * 4096 || capacity % 4096 !== 0 || capacity > MAX_RING) {
    return { version: 2, records: [], base, validLength: 0, stoppedBecause: 'no valid journal header', validAfter: nextValidRecord(image, -1), ring: undefined };
  }
  const slots = SLOTS.map((at) => decodePointer(image, at));
  const slot = (slots[1]?.gen ?? 0) > (slots[0]?.gen ?? 0) ? 1 : 0;
  const pointer = slots[slot];
  const key = image.readUInt32BE(40);
  const ring = image.subarray(RING_START, RING_START + capacity);
  if (pointer === undefined) {
    const first = recordsBeyond(ring, key, [], 0).find((b) => b.valid);
    return { version: 2, records: [], base, validLength: 0, stoppedBecause: 'no valid ring pointer', validAfter: first === undefined ? undefined : RING_START + first.at, ring: undefined };
  }
  const records: JournalRecord[] = [];
  const runs: Run[] = [];
  // Ring offsets read, [from, to): a wrap leaves the rest of its lap unread.
  const read: [number, number][] = [];
  let at = pointer.at;
  let from = at % capacity;
  let to = from;
  let expect = pointer.seq;
  let epoch = pointer.epoch;
  let trimmedTo = pointer.trimmedTo;
  let stop: string | undefined;
  while (at < pointer.at + capacity) {
    const x = at % capacity;
    const lap = Math.floor(at / capacity);
    // Zeros written ahead in the first lap, or the end of the file: nothing more was written.
    if (ring.length - x < 4 || ring.readUInt32BE(x) === 0) break;
    if (ring.length - x >= RECORD_HEADER && ring.readUInt32BE(x) === RECORD_MAGIC && !tagged(ring, key, x)) {
      stop = 'a record image without its place\'s tag (payload bytes of an earlier lap)';
      break;
    }
    const result = decodeRecord(ring, x);
    if (!('record' in result)) {
      stop = 'incomplete' in result ? 'torn record' : result.corrupt;
      break;
    }
    const { record, size } = result;
    if ((record.flags & RECORD_FLAG.WRAP) !== 0) {
      if (record.payload.length !== 8 || readU64(record.payload, 0) !== lap) {
        stop = 'a wrap marker of an earlier lap';
        break;
      }
      read.push([from, x + size]);
      at = (lap + 1) * capacity;
      from = 0;
      to = 0;
      continue;
    }
    const user = (record.flags & MARKERS) === 0;
    if (user) {
      if (expect !== 0 && record.seq !== expect) {
        stop = record.seq < expect ? `a record of an earlier lap (${record.seq} where ${expect} was next)` : `sequence jumps from ${expect - 1} to ${record.seq}`;
        break;
      }
      expect = record.seq + 1;
    } else if ((record.flags & RECORD_FLAG.EPOCH) !== 0) {
      epoch = Math.max(epoch, markerValue(record));
    } else {
      trimmedTo = Math.max(trimmedTo, markerValue(record));
    }
    records.push({ ...record, payload: Buffer.from(record.payload) });
    noteRun(runs, capacity, at, user ? record.seq : 0);
    at += size;
    to = x + size;
  }
  if (to > from) read.push([from, to]);
  // Records beyond the last one read: user records there are damage; every record there
  // (markers too) is made unreadable before a writer goes on, so none is ever read as new.
  // A pointer that takes any first number (a new file's first slot) gives no floor for
  // what lies beyond: then any record there is beyond what was read. (Reading from it
  // after the newer slot was lost, the records of the lap before, numbered lower, are
  // damage, not stale: they are the ones that would be lost.)
  const beyond = recordsBeyond(ring, key, read, pointer.seq === 0 ? 0 : expect);
  const damage = beyond.filter((b) => b.user && b.valid).map((b) => RING_START + b.at);
  const ahead = beyond.map((b) => RING_START + b.at);
  return {
    version: 2,
    records,
    base: { epoch: pointer.epoch, trimmedTo: pointer.trimmedTo },
    validLength: RING_START + (at % capacity),
    stoppedBecause: damage.length === 0 ? undefined : (stop ?? 'a gap of zeros'),
    validAfter: damage[0], // found in increasing order
    ring: { deviceSize: readU64(image, 16), capacity, key, pointer, slot, head: at, expect, epoch, trimmedTo, runs, allocated: image.length, ahead },
  };
}

/**
 * Ring offsets of the records outside `read` numbered from `next` on (any, when `next` is
 * 0): what a batch left when a later part of it reached the disk and an earlier part did
 * not. Records of earlier laps are numbered lower. Only places with their tag are looked
 * at (no checksum is computed for anything else), and a valid record is stepped over
 * whole. A torn record (its tag and header whole, its checksum not) numbered from `next`
 * on is found too, as not `valid`: it is no damage, but it is made unreadable with the
 * rest, or a later power cut that kept its payload and lost a new header over it could
 * bring it back whole.
 */
function recordsBeyond(ring: Buffer, key: number, read: readonly [number, number][], next: number): { at: number; user: boolean; valid: boolean }[] {
  const found: { at: number; user: boolean; valid: boolean }[] = [];
  let y = ring.indexOf(RECORD_MAGIC_BYTES);
  while (y >= 0) {
    const span = read.find(([a, b]) => y >= a && y < b);
    let after = y + 1;
    if (span !== undefined) {
      after = span[1];
    } else if (tagged(ring, key, y)) {
      const result = decodeRecord(ring, y);
      if ('record' in result) {
        if (result.record.seq >= next) found.push({ at: y, user: (result.record.flags & MARKERS) === 0, valid: true });
        after = y + result.size;
      } else if (readU64(ring, y + 8) >= next) {
        found.push({ at: y, user: (ring.readUInt16BE(y + 6) & MARKERS) === 0, valid: false });
      }
    }
    y = after >= ring.length ? -1 : ring.indexOf(RECORD_MAGIC_BYTES, after);
  }
  return found;
}

function markerValue(record: JournalRecord): number {
  return record.payload.length >= 8 ? readU64(record.payload, 0) : 0;
}

const RECORD_MAGIC_BYTES = Buffer.from([0x4d, 0x53, 0x4a, 0x52]);

/**
 * Where to look for valid records after the one at `at` that failed: past its declared
 * end when its header is whole, its lengths are in range and that end is inside the
 * file, so a record embedded in its payload (a client may journal anything) is not taken
 * for one of the journal's own. (A torn tail is followed by preallocated zeros, so its
 * declared end is inside the file; an end past the file may be a damaged length field,
 * and then every later byte is searched.)
 */
function past(image: Buffer, at: number): number {
  if (image.length - at < RECORD_HEADER || image.readUInt32BE(at) !== RECORD_MAGIC) return at;
  const length = image.readUInt32BE(at + 32);
  const nameLength = image.readUInt16BE(at + 36);
  if (length > MAX_PAYLOAD || nameLength > MAX_TARGET_NAME) return at;
  const end = at + recordSize(length, nameLength);
  return end > image.length ? at : end - 1;
}

/** Where the first record that passes its checks begins after `from`, if one does. */
function nextValidRecord(image: Buffer, from: number): number | undefined {
  for (let i = image.indexOf(RECORD_MAGIC_BYTES, from + 1); i >= 0; i = image.indexOf(RECORD_MAGIC_BYTES, i + 1)) {
    if ('record' in decodeRecord(image, i)) return i;
  }
  return undefined;
}

/**
 * A new version 2 file holding `records` (encoded, back to back): epoch and trim markers
 * go into the pointer, user records not trimmed into the ring, at its start. `carried`
 * is what the markers may not say (a v1 file's trim point is in its markers).
 */
function ringFile(deviceSize: number, least: number, records: Buffer, extra = 0): { image: Buffer; state: RingState } {
  let epoch = 0;
  let trimmedTo = 0;
  let next = 0;
  const users: { seq: number; bytes: Buffer }[] = [];
  for (let at = 0; at < records.length; ) {
    const result = decodeRecord(records, at);
    if (!('record' in result)) throw new RuntimeError('MS_INTERNAL', `journal rewrite: record at ${at} does not decode (${'corrupt' in result ? result.corrupt : 'incomplete'})`);
    const { record, size } = result;
    if ((record.flags & RECORD_FLAG.EPOCH) !== 0) epoch = Math.max(epoch, markerValue(record));
    else if ((record.flags & RECORD_FLAG.TRIM) !== 0) trimmedTo = Math.max(trimmedTo, markerValue(record));
    if ((record.flags & MARKERS) !== 0) {
      // A marker's number is the next user record's when it was written.
      next = Math.max(next, record.seq);
    } else {
      next = Math.max(next, record.seq + 1);
      users.push({ seq: record.seq, bytes: records.subarray(at, at + size) });
    }
    at += size;
  }
  const kept = users.filter((u) => u.seq > trimmedTo);
  const bodyLength = kept.reduce((n, u) => n + u.bytes.length, 0);
  const capacity = ringCapacity(Math.max(deviceSize, bodyLength + extra + WRAP_BYTES), least);
  if (capacity > MAX_RING) throw new RuntimeError('MS_NVRAM_FULL', `journal rewrite: ${bodyLength} bytes of records not trimmed need a ring larger than ${MAX_RING} bytes`);
  const key = randomBytes(4).readUInt32BE(0);
  const pointer: Pointer = { gen: 1, at: 0, seq: kept[0]?.seq ?? (next === 0 ? 0 : Math.max(next, trimmedTo + 1)), epoch, trimmedTo };
  const image = Buffer.alloc(RING_START + bodyLength);
  encodeRingHeader(deviceSize, Date.now(), capacity, key).copy(image, 0);
  encodePointer(pointer).copy(image, SLOTS[0]);
  const runs: Run[] = [];
  let at = 0;
  for (const u of kept) {
    u.bytes.copy(image, RING_START + at);
    image.writeUInt32BE(ringTag(key, at), RING_START + at + 52);
    noteRun(runs, capacity, at, u.seq);
    at += u.bytes.length;
  }
  const expect = kept.length > 0 ? (kept.at(-1)?.seq ?? 0) + 1 : pointer.seq;
  return { image, state: { deviceSize, capacity, key, pointer, slot: 0, head: bodyLength, expect, epoch, trimmedTo, runs, allocated: image.length, ahead: [] } };
}

/** Where each record of a batch goes: contiguous pieces of the ring, with wrap markers. */
interface Layout {
  /** `records`: where each record begins in the piece (its tag goes at 52 from there). */
  pieces: { at: number; parts: Buffer[]; length: number; records: number[] }[];
  end: number;
  /** Every record, for the runs, the numbers and the markers once written. */
  notes: { at: number; flags: number; seq: number; value: number }[];
}

interface Waiter {
  buf: Buffer;
  /** Released only after an fdatasync that covers the record (false: once written). */
  sync: boolean;
  /** Not written until something else needs the writer (see `defer`). */
  deferred?: boolean;
  resolve: () => void;
  reject: (error: Error) => void;
  /** A compaction instead of an append: keep user records after this sequence number. */
  compactAfter?: number;
  /** A rewrite instead of an append: the file becomes these records (markers into its pointer). */
  replaceWith?: Buffer;
}

export class JournalFile {
  readonly path: string;
  private sink: JournalSink;
  /** Write-and-sync in one (O_DSYNC), when the sink is not wrapped (openSink). */
  private durable: DurableWrite | undefined;
  private readonly wrap: (sink: JournalSink) => JournalSink;
  private readonly least: number;
  private readonly onSync: ((seconds: number) => void) | undefined;
  private ring: RingState;
  /** First run in `ring.runs` still needed. */
  private runsFrom: number;
  private zeros: Buffer | undefined;
  /** Where the pieces of a batch are assembled on the file's own sink (see writeBatch). */
  private scratch: Buffer | undefined;
  private queue: Waiter[];
  private running: Promise<void> | undefined;
  /** Bytes were written that no fdatasync has covered yet. */
  private unsynced: boolean;
  /** Syncs done; for tests and metrics. */
  syncs: number;
  /** Times the pointer moved on (the ring reused trimmed space); for tests and metrics. */
  pointerMoves: number;
  /** Times the file was rewritten into a new ring; for tests and metrics. */
  rewrites: number;
  /** Why the file is fenced (a write or sync failed), until `replace` rewrites it. */
  private fencedBy: Error | undefined;
  /** Set once `close` began: nothing more is queued. */
  private closing: boolean;
  /** How writes in the appender's turn have fared: they are declined while slow (see writeNow). */
  readonly syncWrites: SyncIoGauge;

  private constructor(path: string, sink: JournalSink, durable: DurableWrite | undefined, options: JournalOptions, ring: RingState) {
    this.path = path;
    this.sink = sink;
    this.durable = durable;
    this.wrap = options.wrap ?? ((s) => s);
    this.least = options.ring ?? RING_MIN;
    this.onSync = options.onSync;
    this.ring = ring;
    this.runsFrom = 0;
    this.zeros = undefined;
    this.scratch = undefined;
    this.queue = [];
    this.running = undefined;
    this.unsynced = false;
    this.syncs = 0;
    this.pointerMoves = 0;
    this.rewrites = 0;
    this.fencedBy = undefined;
    this.closing = false;
    this.syncWrites = new SyncIoGauge(options.clock);
  }

  /**
   * Creates a new journal file (replacing any at `path`, by rename) holding `records`
   * (encoded, back to back; epoch and trim markers go into its pointer), synced.
   */
  static async create(path: string, deviceSize: number, options: JournalOptions & { records?: Buffer } = {}): Promise<JournalFile> {
    const wrap = options.wrap ?? ((s) => s);
    const { image, state } = ringFile(deviceSize, options.ring ?? RING_MIN, options.records ?? EMPTY);
    await writeNew(`${path}.tmp`, image, wrap);
    await rename(`${path}.tmp`, path);
    await syncDir(path);
    const { sink, durable } = await openSink(path, wrap);
    return new JournalFile(path, sink, durable, options, state);
  }

  /**
   * Goes on with the journal at `path` after recovery (`recovered` is parseJournal of its
   * contents). A version 2 file goes on where reading stopped; records beyond it (damage
   * the caller accepted) are made unreadable first, so they never pass for new ones. Any
   * other file (version 1, or none) is rewritten as version 2 holding what was recovered.
   */
  static async open(path: string, recovered: Recovered, deviceSize: number, options: JournalOptions = {}): Promise<JournalFile> {
    const ring = recovered.ring;
    if (ring === undefined) return JournalFile.create(path, deviceSize, { ...options, records: Buffer.concat(recovered.records.map((r) => encodeRecord(r))) });
    const { sink, durable } = await openSink(path, options.wrap ?? ((s) => s));
    try {
      if (ring.ahead.length > 0) {
        for (const at of ring.ahead) await sink.write(Buffer.alloc(4), at);
        await sink.datasync();
      }
    } catch (error) {
      await sink.close().catch(() => undefined);
      throw error;
    }
    return new JournalFile(path, sink, durable, options, { ...ring, ahead: [] });
  }

  /**
   * Resolves once the record is durable: written and covered by an fdatasync. With
   * `sync` false it resolves once written (a `mirrored` device, whose partner holds the
   * record); a later sync, or `flush`, makes it durable, since the file is written in order.
   */
  append(record: Buffer, sync = true): Promise<void> {
    if (!sync) {
      const written = this.writeNow(record);
      if (written !== undefined) return written;
    }
    return this.enqueue({ buf: record, sync });
  }

  /**
   * An append without sync, written in the caller's turn through the sink's `writeSync`
   * when nothing is queued or being written before it (so the file keeps the order of
   * appends) and the ring has room for it where it stands (no pointer move, rewrite or
   * preallocation, which are the writer's): the record is in the OS's cache before
   * append returns, and a `mirrored` device's append costs no trip through libuv's thread
   * pool (a hand-off to a worker thread and a wake-up back, about 40 us per SQLite write
   * on two cores). Undefined when it does not apply: the caller queues the record for
   * the writer.
   *
   * What such a write holds the event loop for: a copy into the OS's cache, up to
   * SYNC_IO_MAX bytes. Each piece written is padded with zeros to the end of its page
   * (free space, beyond the head), so the kernel never has to read that page from the
   * disk first; a write's first page is the one the last write ended in, cached since.
   * Writes the kernel holds anyway (it throttles writers while it writes dirty pages
   * back, or the disk hangs) are timed (SyncIoGauge), and appends go to the writer while
   * they are slow, one tried again now and then. A failed write fences the file as a
   * failed batch does.
   */
  private writeNow(record: Buffer): Promise<void> | undefined {
    const sink = this.sink;
    if (sink.writeSync === undefined || this.running !== undefined || this.queue.length > 0 || this.fencedBy !== undefined || this.closing) return undefined;
    const layout = this.layout([record]);
    if (layout === undefined || layout.end > this.ring.pointer.at + this.ring.capacity) return undefined;
    // Each piece is padded to the end of its page: after a wrap, the wrap marker's up to
    // the ring's end (free: the layout goes on beyond it), the record's at the ring's start.
    const pads = layout.pieces.map((p) => (PAGE - ((this.physical(p.at) + p.length) % PAGE)) % PAGE);
    const padded = layout.pieces.reduce((n, p, i) => Math.max(n, this.physical(p.at) + p.length + (pads[i] ?? 0)), 0);
    const lastPad = pads.at(-1) ?? 0;
    if (padded > this.ring.allocated || layout.end + lastPad > this.ring.pointer.at + this.ring.capacity) return undefined;
    const bytes = record.length + pads.reduce((n, pad) => n + pad, 0);
    const start = this.syncWrites.begin(bytes);
    if (start === undefined) return undefined;
    try {
      for (const [i, p] of layout.pieces.entries()) sink.writeSync(this.assemble(p, true, pads[i] ?? 0), this.physical(p.at));
    } catch (error) {
      // What reached the file is unknown: fenced until the device rewrites it from memory.
      const failure = new StorageError('MS_MEDIUM_IO', `journal ${this.path}: write failed: ${(error as Error).message}`, { cause: error });
      this.fencedBy = failure;
      return Promise.reject(failure);
    } finally {
      this.syncWrites.end(start, bytes);
    }
    this.unsynced = true;
    this.advance(layout);
    return Promise.resolve();
  }

  /** Queues a waiter and starts the writer (unless `start` is false); refused once `close` began. */
  private enqueue(w: Omit<Waiter, 'resolve' | 'reject'>, start = true): Promise<void> {
    if (this.closing) return Promise.reject(new RuntimeError('MS_SHUTTING_DOWN', `journal ${this.path} is closing`));
    return new Promise<void>((resolve, reject) => {
      // Field by field, not spread: the spread was about a tenth of what a deferred
      // record (a write log's plain WRITE) costs in process, 0.8 of 7.6 us.
      this.queue.push({ buf: w.buf, sync: w.sync, deferred: w.deferred, compactAfter: w.compactAfter, replaceWith: w.replaceWith, resolve, reject });
      if (start) this.kick();
    });
  }

  /**
   * Queues a record that is written only together with the next append, flush, trim
   * marker, compaction or close, and synced with it: a write log's plain WRITE, whose
   * record the device already holds in memory. So unsynced bytes are in the file only
   * while a batch is being written and synced, as for synced appends, and a power cut
   * tears at most that batch. Resolves once written.
   */
  defer(record: Buffer): Promise<void> {
    return this.enqueue({ buf: record, sync: false, deferred: true }, false);
  }

  /** Resolves once everything appended so far is covered by an fdatasync. */
  flush(): Promise<void> {
    return this.append(EMPTY, true);
  }

  /** The failure that fenced the file, or undefined while it takes appends. */
  get fenced(): Error | undefined {
    return this.fencedBy;
  }

  /** The ring's size in bytes. */
  get capacity(): number {
    return this.ring.capacity;
  }

  /** What the file has done, for `memstrata nvram list` and the metrics. */
  info(): JournalFileInfo {
    return { ringBytes: this.ring.capacity, spanBytes: this.ring.head - this.ring.pointer.at, syncs: this.syncs, pointerMoves: this.pointerMoves, rewrites: this.rewrites };
  }

  /**
   * Rewrites the whole file as `records` (encoded, back to back; markers go into the
   * pointer), by a new file synced and renamed over this one, and lifts a fence. It takes
   * its turn in the queue: appends queued before it are written (or refused) first.
   */
  replace(records: Buffer): Promise<void> {
    return this.enqueue({ buf: EMPTY, sync: true, replaceWith: records });
  }

  /**
   * Rewrites the file with only what is still needed: the user records after
   * `trimmedTo`, the epoch and trim point in the pointer. The ring does this by itself
   * when it holds too much that is not trimmed to take a batch; it takes its turn in the
   * append queue, so every append queued before it is in the old file (and so in the new
   * one), and every append queued after it goes to the new file. The new file replaces
   * the old one by rename, so a crash leaves one or the other, both whole.
   */
  compact(trimmedTo: number): Promise<void> {
    return this.enqueue({ buf: EMPTY, sync: true, compactAfter: trimmedTo });
  }

  /**
   * Waits for queued appends, makes everything written durable, and closes the file.
   * Rejects when deferred records still queued could not be written and synced (the
   * file is closed all the same): they were acknowledged, so the caller must know.
   */
  async close(): Promise<void> {
    let failure: Error | undefined;
    // Deferred records go out with one last synced batch, queued before the door shuts.
    const last = this.queue.some((w) => w.deferred === true) ? this.flush() : undefined;
    this.closing = true;
    if (last !== undefined) {
      await last.catch((error: unknown) => {
        failure = asError(error);
      });
    }
    while (this.running !== undefined) await this.running;
    if (this.unsynced && this.fencedBy === undefined) await this.sink.datasync().catch(() => undefined);
    await this.sink.close().catch(() => undefined);
    if (failure !== undefined) throw failure;
  }

  /** Reads the file back and rewrites it with the user records after `trimmedTo`, in a ring with room for `extra` more bytes. */
  private async rewrite(trimmedTo: number, extra = 0): Promise<void> {
    const parsed = parseJournal((await readJournalFile(this.path)) ?? EMPTY);
    // Everything up to the head was written whole: a record that does not read back is
    // damage. Refuse, which fences the file, and the device rewrites it from memory.
    // (Reading may go on past the head over an epoch or trim marker of an earlier lap, which
    // markers' numbers are not checked for: its value is one the pointer already stands for.)
    if (parsed.ring === undefined || parsed.ring.head < this.ring.head || parsed.validAfter !== undefined) {
      throw new StorageError('MS_MEDIUM_IO', `journal ${this.path}: compaction found the file damaged at byte ${parsed.validLength} (${parsed.stoppedBecause ?? 'records end before the head'})`);
    }
    const trim = Math.max(trimmedTo, this.ring.trimmedTo, parsed.ring.trimmedTo);
    const keep = parsed.records.filter((r) => (r.flags & MARKERS) === 0 && r.seq > trim).map((r) => encodeRecord(r));
    const markers = [this.marker(RECORD_FLAG.EPOCH, Math.max(this.ring.epoch, parsed.ring.epoch)), this.marker(RECORD_FLAG.TRIM, trim)];
    await this.install(`${this.path}.compact`, Buffer.concat([...markers, ...keep]), extra);
  }

  /** A marker record for a rewrite, numbered as the next user record. */
  private marker(flag: number, value: number): Buffer {
    const payload = Buffer.alloc(8);
    writeU64(payload, value, 0);
    return encodeRecord({ seq: this.ring.expect, timestamp: nowMicros(), epoch: this.ring.epoch, flags: flag, target: undefined, payload });
  }

  /**
   * Writes `records` as a new file at `tmp` and syncs it, then renames it over the
   * journal, syncs the directory and continues on it. Every write and sync goes through
   * the sink wrapper, so tests can fail them as they fail appends.
   */
  private async install(tmp: string, records: Buffer, extra = 0): Promise<void> {
    const { image, state } = ringFile(this.ring.deviceSize, Math.max(this.least, this.ring.capacity), records, extra);
    await writeNew(tmp, image, this.wrap);
    await this.sink.close().catch(() => undefined); // a fenced file's handle may be broken
    await rename(tmp, this.path);
    await syncDir(this.path);
    ({ sink: this.sink, durable: this.durable } = await openSink(this.path, this.wrap));
    // A record without a number of its own (the file had none yet) keeps what was known.
    this.ring = { ...state, expect: state.expect === 0 ? this.ring.expect : state.expect };
    this.runsFrom = 0;
    this.unsynced = false;
    this.rewrites++;
  }

  private fenceError(): StorageError {
    return new StorageError('MS_MEDIUM_IO', `journal ${this.path} is fenced since a write or sync failed (${this.fencedBy?.message ?? 'unknown'}); it takes no appends until it is rewritten`, {
      cause: this.fencedBy,
    });
  }

  /** Starts the writer unless it runs; always from a later tick, so its `finally` runs after this assignment. */
  private kick(): void {
    this.running ??= Promise.resolve().then(() => this.drain());
  }

  /** Where the records of `bufs` go from the head on; undefined if one could never fit in the ring. */
  private layout(bufs: readonly Buffer[]): Layout | undefined {
    const { capacity } = this.ring;
    const pieces: Layout['pieces'] = [];
    const notes: Layout['notes'] = [];
    let at = this.ring.head;
    let expect = this.ring.expect;
    const put = (buf: Buffer): void => {
      const piece = pieces.at(-1);
      // A piece never runs past the ring's end: what follows a wrap is a piece of its own.
      if (piece !== undefined && piece.at + piece.length === at && at % capacity !== 0) {
        piece.records.push(piece.length);
        piece.parts.push(buf);
        piece.length += buf.length;
      } else {
        pieces.push({ at, parts: [buf], length: buf.length, records: [0] });
      }
      at += buf.length;
    };
    for (const buf of bufs) {
      for (let o = 0; o < buf.length; ) {
        const size = recordSize(buf.readUInt32BE(o + 32), buf.readUInt16BE(o + 36));
        if (size + WRAP_BYTES > capacity) return undefined;
        const lap = Math.floor(at / capacity);
        if ((at % capacity) + size + WRAP_BYTES > capacity) {
          // Not room for the record and a wrap marker after it: go on at the ring's start.
          const payload = Buffer.alloc(8);
          writeU64(payload, lap, 0);
          put(encodeRecord({ seq: expect, timestamp: nowMicros(), epoch: this.ring.epoch, flags: RECORD_FLAG.WRAP, target: undefined, payload }));
          at = (lap + 1) * capacity;
        }
        const flags = buf.readUInt16BE(o + 6);
        const seq = readU64(buf, o + 8);
        const marker = (flags & MARKERS) !== 0;
        notes.push({ at, flags, seq, value: marker && size >= RECORD_HEADER + 8 ? readU64(buf, o + RECORD_HEADER) : 0 });
        if (!marker) expect = seq + 1;
        put(buf.subarray(o, o + size));
        o += size;
      }
    }
    return { pieces, end: at, notes };
  }

  /** Moves the pointer to the oldest record not trimmed, if that makes room up to `end`. */
  private async makeRoom(end: number): Promise<boolean> {
    const { runs } = this.ring;
    while (this.runsFrom < runs.length && (runs[this.runsFrom]?.last ?? 0) <= this.ring.trimmedTo) this.runsFrom++;
    if (this.runsFrom === runs.length) {
      // Every run let go of: the next record starts a new one (none may join a run let go of).
      this.ring.runs = [];
      this.runsFrom = 0;
    } else if (this.runsFrom > 1024 && this.runsFrom * 2 > runs.length) {
      this.ring.runs = runs.slice(this.runsFrom);
      this.runsFrom = 0;
    }
    const run = this.ring.runs[this.runsFrom];
    const at = run?.at ?? this.ring.head;
    if (end > at + this.ring.capacity) return false;
    const pointer: Pointer = { gen: this.ring.pointer.gen + 1, at, seq: run?.first ?? this.ring.expect, epoch: this.ring.epoch, trimmedTo: this.ring.trimmedTo };
    const slot = this.ring.slot === 0 ? 1 : 0;
    const buf = encodePointer(pointer);
    // Durable before any byte of what it lets go of is written over.
    if (this.durable !== undefined) {
      await this.durable(buf, SLOTS[slot]);
    } else {
      await this.sink.write(buf, SLOTS[slot]);
      await this.sink.datasync();
      this.unsynced = false;
    }
    this.ring.pointer = pointer;
    this.ring.slot = slot;
    this.pointerMoves++;
    return true;
  }

  /** Writes zeros from the allocated end to past `needed` (within the ring), and makes them durable. */
  private async preallocate(needed: number): Promise<void> {
    const target = Math.min(RING_START + this.ring.capacity, needed + PREALLOCATE);
    this.zeros ??= Buffer.alloc(1024 * 1024);
    while (this.ring.allocated < target) {
      const n = Math.min(this.zeros.length, target - this.ring.allocated);
      await this.sink.write(this.zeros.subarray(0, n), this.ring.allocated);
      this.ring.allocated += n;
    }
    await this.sink.datasync();
  }

  /** Writes a batch at the head, and makes it and everything before it durable when `sync`. */
  private async writeBatch(bufs: readonly Buffer[], sync: boolean): Promise<void> {
    let layout = this.layout(bufs);
    if (layout === undefined || layout.end > this.ring.pointer.at + this.ring.capacity) {
      if (layout === undefined || !(await this.makeRoom(layout.end))) {
        // The ring holds too much that is not trimmed: a new file, with room.
        await this.rewrite(this.ring.trimmedTo, bufs.reduce((n, b) => n + b.length, 0) * 2);
      }
      layout = this.layout(bufs);
      if (layout === undefined || layout.end > this.ring.pointer.at + this.ring.capacity) throw new RuntimeError('MS_INTERNAL', `journal ${this.path}: no room in the ring after a rewrite`);
    }
    const reach = this.reach(layout);
    if (reach > this.ring.allocated) await this.preallocate(reach);
    // On the file's own sink (not wrapped: `durable` is set), pieces are assembled in the
    // file's scratch buffer; a wrapped sink (a test's) may keep what it is given.
    const own = this.durable !== undefined;
    const one = layout.pieces.length === 1 ? layout.pieces[0] : undefined;
    const started = performance.now();
    if (sync && one !== undefined && !this.unsynced && this.durable !== undefined) {
      // Nothing unsynced before it: the batch written durably covers all there is.
      await this.durable(this.assemble(one, own), this.physical(one.at));
      this.synced(started);
    } else {
      for (const p of layout.pieces) await this.sink.write(this.assemble(p, own), this.physical(p.at));
      // While writes in the appender's turn are declined, a fast one here brings the next try near.
      if (!sync && this.syncWrites.slow) this.syncWrites.pooled(performance.now() - started);
      if (layout.pieces.length > 0) this.unsynced = true;
      if (sync && this.unsynced) {
        await this.sink.datasync();
        this.synced(started);
        this.unsynced = false;
      }
    }
    this.advance(layout);
  }

  /** Where a logical place of the ring lies in the file. */
  private physical(at: number): number {
    return RING_START + (at % this.ring.capacity);
  }

  /** The end in the file of the furthest piece of a layout. */
  private reach(layout: Layout): number {
    let reach = 0;
    for (const p of layout.pieces) reach = Math.max(reach, this.physical(p.at) + p.length);
    return reach;
  }

  /**
   * A piece as one buffer (the records' buffers are the device's and the partner's too),
   * every record tagged with its place, assembled right before it is written. With
   * `scratch`, in the file's scratch buffer, reused from piece to piece and batch to batch
   * (pieces are written one at a time, and a write is done when it returns or its promise
   * settles): a fresh buffer per batch is garbage the size of everything appended.
   * `pad` zero bytes follow the piece.
   */
  private assemble(p: Layout['pieces'][number], scratch: boolean, pad = 0): Buffer {
    const { capacity, key } = this.ring;
    const length = p.length + pad;
    const buf = scratch && length <= SCRATCH_MAX ? this.scratchOf(length) : Buffer.allocUnsafe(length);
    let o = 0;
    for (const part of p.parts) o += part.copy(buf, o);
    for (const r of p.records) buf.writeUInt32BE(ringTag(key, (p.at + r) % capacity), r + 52);
    if (pad > 0) buf.fill(0, p.length);
    return buf;
  }

  /** Takes note of a layout once written: the numbers, epoch and trim point of its markers, its runs, the head. */
  private advance(layout: Layout): void {
    for (const n of layout.notes) {
      if ((n.flags & MARKERS) === 0) {
        this.ring.expect = n.seq + 1;
      } else {
        // A marker's number is the next user record's when it was written.
        this.ring.expect = Math.max(this.ring.expect, n.seq);
        if ((n.flags & RECORD_FLAG.EPOCH) !== 0) this.ring.epoch = Math.max(this.ring.epoch, n.value);
        else this.ring.trimmedTo = Math.max(this.ring.trimmedTo, n.value);
      }
      noteRun(this.ring.runs, this.ring.capacity, n.at, (n.flags & MARKERS) === 0 ? n.seq : 0);
    }
    this.ring.head = layout.end;
  }

  /** The first `length` bytes of the scratch buffer, grown to hold them. */
  private scratchOf(length: number): Buffer {
    if (this.scratch === undefined || this.scratch.length < length) this.scratch = Buffer.allocUnsafeSlow(Math.min(SCRATCH_MAX, Math.max(length, 2 * (this.scratch?.length ?? 64 * 1024))));
    return this.scratch.subarray(0, length);
  }

  private synced(started: number): void {
    this.syncs++;
    this.onSync?.((performance.now() - started) / 1000);
  }

  private async drain(): Promise<void> {
    try {
      while (this.queue.length > 0) {
        const next = this.queue[0];
        if (next?.replaceWith !== undefined) {
          this.queue.shift();
          try {
            await this.install(`${this.path}.rebuild`, next.replaceWith);
            this.fencedBy = undefined;
            next.resolve();
          } catch (error) {
            this.fencedBy ??= asError(error);
            next.reject(new StorageError('MS_MEDIUM_IO', `journal ${this.path}: rewriting it failed: ${(error as Error).message}`, { cause: error }));
          }
          continue;
        }
        if (next !== undefined && this.fencedBy !== undefined) {
          // Fenced: refuse everything up to the next rewrite.
          this.queue.shift();
          next.reject(this.fenceError());
          continue;
        }
        if (next?.compactAfter !== undefined) {
          this.queue.shift();
          try {
            await this.rewrite(next.compactAfter);
            next.resolve();
          } catch (error) {
            // The old file may be closed or replaced half way: trust neither until rewritten.
            this.fencedBy ??= asError(error);
            next.reject(asError(error));
          }
          continue;
        }
        // Appends up to the next compaction or rewrite go out as one batch.
        const cut = this.queue.findIndex((w) => w.compactAfter !== undefined || w.replaceWith !== undefined);
        const batch = cut < 0 ? this.queue : this.queue.slice(0, cut);
        // Only deferred records are queued: they wait for whatever comes next.
        if (cut < 0 && batch.every((w) => w.deferred === true)) break;
        this.queue = cut < 0 ? [] : this.queue.slice(cut);
        try {
          await this.writeBatch(batch.map((w) => w.buf), batch.some((w) => w.sync));
        } catch (error) {
          const failure = new StorageError('MS_MEDIUM_IO', `journal ${this.path}: write or sync failed: ${(error as Error).message}`, { cause: error });
          // Fence: what the file holds from here (and, after a failed sync, before) is
          // unknown until the device rewrites it from memory.
          this.fencedBy = failure;
          for (const w of batch) w.reject(failure);
          continue;
        }
        for (const w of batch) w.resolve();
        // Appenders released together come back together: give them one turn of the event
        // loop to queue their next records, so they join the next batch instead of
        // splitting into groups that take turns (a sync of 16 records, then of the other
        // 16, where one of 32 costs hardly more). One appender alone does not wait.
        if (batch.length > 1) await new Promise<void>((resolve) => { setImmediate(resolve); });
      }
    } finally {
      this.running = undefined;
    }
  }
}

/** Writes `image` to a new file at `path` (see openTempFile) and makes it durable. */
async function writeNew(path: string, image: Buffer, wrap: (sink: JournalSink) => JournalSink): Promise<void> {
  const out = wrap(fileSink(await openTempFile(path)));
  try {
    await out.write(image, 0);
    await out.datasync();
  } finally {
    await out.close();
  }
}

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeBigUInt64BE(BigInt(value), at);
}

function readU64(buf: Buffer, at: number): number {
  return Number(buf.readBigUInt64BE(at));
}

/**
 * Drops what a damaged journal holds beyond where reading stops (what MS_NVRAM_DAMAGED
 * reports), so that a node loads the records before it: an operator's decision, with the
 * node stopped. Version 1 is cut there; version 2 has the magic of every record beyond
 * the last one read written over with zeros. With `dryRun`, only says what it would do.
 * Refuses a file with no valid header, and a version 2 file one of whose pointer slots is
 * damaged: then the newest pointer may be the damaged one, and what lies beyond the older
 * one's records would be live records, not damage.
 */
export async function cutJournal(path: string, dryRun = false): Promise<{ version: number; kept: number; lastSeq: number | undefined; dropped: number }> {
  const image = await readJournalFile(path);
  if (image === undefined) throw new MisuseError('MS_NVRAM_NOT_FOUND', `${path}: no such file`);
  const recovered = parseJournal(image);
  if (recovered.version !== 1 && recovered.ring === undefined) {
    throw new RuntimeError('MS_NVRAM_DAMAGED', `${path}: ${recovered.stoppedBecause ?? 'not a journal file'}; there is nothing before the damage to keep`);
  }
  if (recovered.ring !== undefined && recovered.validAfter !== undefined && SLOTS.some((at) => decodePointer(image, at) === undefined) && image.subarray(SLOTS[1], SLOTS[1] + SLOT_BYTES).some((b) => b !== 0)) {
    throw new RuntimeError('MS_NVRAM_DAMAGED', `${path}: a pointer slot is damaged, so the records past the damage may be the live ones; not cut (keep the file and its device offline)`);
  }
  const users = recovered.records.filter((r) => (r.flags & MARKERS) === 0);
  const dropped = recovered.ring !== undefined ? recovered.ring.ahead.length : countRecords(image, recovered.validLength);
  if (!dryRun && (dropped > 0 || image.length > recovered.validLength || recovered.ring !== undefined)) {
    const handle = await open(path, 'r+');
    try {
      if (recovered.ring !== undefined) {
        for (const at of recovered.ring.ahead) await handle.write(Buffer.alloc(4), 0, 4, at);
      } else {
        await handle.truncate(recovered.validLength);
      }
      await handle.datasync();
    } finally {
      await handle.close();
    }
  }
  return { version: recovered.version, kept: users.length, lastSeq: users.at(-1)?.seq, dropped };
}

/** Valid records from `from` on (what cutting a version 1 file there drops). */
function countRecords(image: Buffer, from: number): number {
  let n = 0;
  for (let at = image.indexOf(RECORD_MAGIC_BYTES, from); at >= 0; at = image.indexOf(RECORD_MAGIC_BYTES, at + 1)) if ('record' in decodeRecord(image, at)) n++;
  return n;
}

/**
 * Reads a whole journal or vault file (up to 4 GiB, where fs.readFile stops at 2 GiB).
 * Undefined when there is none; any other error is thrown (an unreadable file is not a
 * missing one).
 */
export async function readJournalFile(path: string): Promise<Buffer | undefined> {
  let handle: FileHandle;
  try {
    handle = await open(path, 'r');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw error;
  }
  try {
    const { size } = await handle.stat();
    if (size > RING_START + MAX_RING) throw new StorageError('MS_MEDIUM_IO', `${path} is ${size} bytes, larger than any journal this node writes`);
    const image = Buffer.allocUnsafe(size);
    for (let done = 0; done < size; ) {
      const { bytesRead } = await handle.read(image, done, Math.min(size - done, 64 * 1024 * 1024), done);
      if (bytesRead === 0) return image.subarray(0, done);
      done += bytesRead;
    }
    return image;
  } finally {
    await handle.close();
  }
}

/**
 * Opens a temporary file to be renamed over a journal or vault: whatever holds the name
 * (a leftover of a crash, or a symlink planted there) is removed first, and the open
 * makes a new file or fails, so nothing is ever written through a symlink.
 */
export async function openTempFile(path: string): Promise<FileHandle> {
  await rm(path, { force: true });
  return open(path, CREATE_NEW_FLAGS, 0o600);
}

export async function syncDir(path: string): Promise<void> {
  const dir = await open(dirname(path), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}
