// A journal file: the `local` persistence of an NVRAM device, and the vault format.
//
//   header (64 bytes): "MSJOURN1", u32 version 1, u32 header size 64, u64 device size,
//                      u64 created (ms), u32 CRC-32 of bytes 0..35, zero padding
//   records back to back (record.ts), appended only
//
// Group commit: appends queue up; one writer takes everything queued, writes it with one
// positional write and one fdatasync, and only then releases each of those appenders.
// When nothing unsynced precedes the batch, the write goes through a second descriptor
// opened O_DSYNC instead: written and durable in one trip to libuv's thread pool, not two
// (a test wrapping the sink to watch or break syncs sees write and fdatasync as before).
// Deferred records (a write log's plain WRITEs) wait in the queue for the next batch.
// An append that arrives during a sync waits for the next one, so no appender is ever
// released by a sync that did not cover its record. A `mirrored` device appends without
// waiting for a sync (its partner holds the record); the file is written in order, so the
// next sync, or `flush`, covers those records as well.
//
// Space ahead of the tail is written with zeros in advance (PREALLOCATE at a time), so an
// append overwrites blocks that already exist and its fdatasync has data to flush but no
// block allocation or file size to journal; that made syncs several times cheaper here.
//
// A failed write or sync fences the file: the batch that failed and every append queued
// after it are refused, and so is every later one, until `replace` has rewritten the
// whole file from what the device holds in memory and synced it. Nothing is cut back:
// after a failed fdatasync the kernel may have dropped the pages it could not write, so
// neither the failed batch nor anything before it in the file can be trusted until the
// file is written anew (PostgreSQL's "fsyncgate").
//
// Recovery reads records from the start and stops at the first one that is incomplete,
// fails its checksum, or does not continue the sequence (zeros of the preallocated tail
// end it the same way). When nothing valid follows, that is a torn tail: a crash can
// only tear what was written last (records are appended, never rewritten), and the file
// is cut there, keeping every record whose append was acknowledged, in order. When a
// valid record follows (`validAfter`), the damage is in the middle of the file: nothing
// is cut, and the device manager takes the device offline (MS_NVRAM_DAMAGED).

import { constants, fdatasync as fsFdatasync } from 'node:fs';
import { open, readFile, rename, rm, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { crc32 } from 'node:zlib';
import { RuntimeError, StorageError, asError } from '../errors.js';
import { CREATE_NEW_FLAGS } from '../fs/meta-file.js';
import { writeAllFd } from '../fs/positional-io.js';
import { InFlight } from '../settle.js';
import { MAX_PAYLOAD, MAX_TARGET_NAME, RECORD_FLAG, RECORD_HEADER, RECORD_MAGIC, decodeRecord, encodeRecord, recordSize, type JournalRecord } from '../protocol/journal/record.js';

export const FILE_MAGIC = Buffer.from('MSJOURN1');
export const FILE_HEADER = 64;
/** Zeros written ahead of the tail at a time. */
export const PREALLOCATE = 4 * 1024 * 1024;

/** What a journal file needs from the file system; tests wrap it to watch or break syncs. */
export interface JournalSink {
  write(buf: Buffer, position: number): Promise<void>;
  datasync(): Promise<void>;
  truncate(length: number): Promise<void>;
  close(): Promise<void>;
}

/** Writes `buf` at `position` and returns once it is durable: a write and a datasync in one. */
type DurableWrite = (buf: Buffer, position: number) => Promise<void>;

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
    datasync: () => inflight.track(new Promise<void>((resolve, reject) => { fsFdatasync(handle.fd, (error) => { if (error === null) resolve(); else reject(error); }); })),
    truncate: (length) => handle.truncate(length),
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
 * instead of a write and an fdatasync (the space is preallocated, so no metadata waits).
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

export function encodeFileHeader(deviceSize: number, created: number): Buffer {
  const buf = Buffer.alloc(FILE_HEADER);
  FILE_MAGIC.copy(buf, 0);
  buf.writeUInt32BE(1, 8);
  buf.writeUInt32BE(FILE_HEADER, 12);
  buf.writeBigUInt64BE(BigInt(deviceSize), 16);
  buf.writeBigUInt64BE(BigInt(created), 24);
  buf.writeUInt32BE(crc32(buf.subarray(0, 32)), 32);
  return buf;
}

export interface Recovered {
  records: JournalRecord[];
  /** Bytes of valid journal (header included); anything after was cut. */
  validLength: number;
  /** Why reading stopped before the end of the file, if it did. */
  stoppedBecause: string | undefined;
  /**
   * Set when reading stopped at a record that fails its checks or breaks the sequence
   * and a valid record lies further on: damage in the middle of the file, not a torn
   * tail. Where the first such record begins.
   */
  validAfter: number | undefined;
}

/** Parses a whole journal file image. */
export function parseJournal(image: Buffer): Recovered {
  if (image.length < FILE_HEADER || !image.subarray(0, 8).equals(FILE_MAGIC) || image.readUInt32BE(32) !== crc32(image.subarray(0, 32))) {
    // An empty file is no journal; a damaged header with records after it is damage.
    return { records: [], validLength: 0, stoppedBecause: 'no valid journal header', validAfter: image.length === 0 ? undefined : nextValidRecord(image, -1) };
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
    const marker = (result.record.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) !== 0;
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
  return { records, validLength: at, stoppedBecause, validAfter: stoppedBecause === undefined ? undefined : jumped ? at : nextValidRecord(image, past(image, at)) };
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
  /** A rewrite instead of an append: the file becomes this header and these records. */
  replaceWith?: { deviceSize: number; records: Buffer };
}

export class JournalFile {
  readonly path: string;
  private sink: JournalSink;
  /** Write-and-sync in one (O_DSYNC), when the sink is not wrapped (openSink). */
  private durable: DurableWrite | undefined;
  private readonly wrap: (sink: JournalSink) => JournalSink;
  private length: number;
  /** Bytes of file that exist (header, records, and zeros written ahead). */
  private allocated: number;
  private zeros: Buffer | undefined;
  private queue: Waiter[];
  private running: Promise<void> | undefined;
  /** Bytes were written that no fdatasync has covered yet. */
  private unsynced: boolean;
  /** Syncs done; for tests and metrics. */
  syncs: number;
  /** Why the file is fenced (a write or sync failed), until `replace` rewrites it. */
  private fencedBy: Error | undefined;
  /** Set once `close` began: nothing more is queued. */
  private closing: boolean;

  constructor(path: string, sink: JournalSink, length: number, wrap: (sink: JournalSink) => JournalSink = (x) => x, durable?: DurableWrite) {
    this.path = path;
    this.sink = sink;
    this.durable = durable;
    this.wrap = wrap;
    this.length = length;
    this.allocated = length;
    this.zeros = undefined;
    this.queue = [];
    this.running = undefined;
    this.unsynced = false;
    this.syncs = 0;
    this.fencedBy = undefined;
    this.closing = false;
  }

  /** Creates a new, empty journal file (replacing any at `path`) and syncs it. */
  static async create(path: string, deviceSize: number, wrap: (sink: JournalSink) => JournalSink = (s) => s): Promise<JournalFile> {
    const tmp = `${path}.tmp`;
    const handle = await openTempFile(tmp);
    await handle.writeFile(encodeFileHeader(deviceSize, Date.now()));
    await handle.datasync();
    await handle.close();
    await rename(tmp, path);
    await syncDir(path);
    return JournalFile.openExisting(path, FILE_HEADER, wrap);
  }

  /** Opens a journal whose first `validLength` bytes are known good, cutting the rest. */
  static async openExisting(path: string, validLength: number, wrap: (sink: JournalSink) => JournalSink = (s) => s): Promise<JournalFile> {
    const { sink, durable } = await openSink(path, wrap);
    try {
      await sink.truncate(validLength);
      await sink.datasync();
    } catch (error) {
      await sink.close().catch(() => undefined);
      throw error;
    }
    return new JournalFile(path, sink, validLength, wrap, durable);
  }

  /**
   * Resolves once the record is durable: written and covered by an fdatasync. With
   * `sync` false it resolves once written (a `mirrored` device, whose partner holds the
   * record); a later sync, or `flush`, makes it durable, since the file is written in order.
   */
  append(record: Buffer, sync = true): Promise<void> {
    return this.enqueue({ buf: record, sync });
  }

  /** Queues a waiter and starts the writer (unless `start` is false); refused once `close` began. */
  private enqueue(w: Omit<Waiter, 'resolve' | 'reject'>, start = true): Promise<void> {
    if (this.closing) return Promise.reject(new RuntimeError('MS_SHUTTING_DOWN', `journal ${this.path} is closing`));
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ ...w, resolve, reject });
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
    return this.append(Buffer.alloc(0), true);
  }

  /** The failure that fenced the file, or undefined while it takes appends. */
  get fenced(): Error | undefined {
    return this.fencedBy;
  }

  /**
   * Rewrites the whole file as `records` (encoded, back to back) behind a new header, by
   * a new file synced and renamed over this one, and lifts a fence. It takes its turn in
   * the queue: appends queued before it are written (or refused) first.
   */
  replace(deviceSize: number, records: Buffer): Promise<void> {
    return this.enqueue({ buf: Buffer.alloc(0), sync: true, replaceWith: { deviceSize, records } });
  }

  /** Bytes of journal in the file (header and records; preallocated zeros not counted). */
  get size(): number {
    return this.length;
  }

  /**
   * Rewrites the file with only what is still needed: the latest epoch and trim markers
   * and the user records after `trimmedTo`. It takes its turn in the append queue, so
   * every append queued before it is in the old file (and so in the new one), and every
   * append queued after it goes to the new file. The new file replaces the old one by
   * rename, so a crash leaves one or the other, both whole.
   */
  compact(trimmedTo: number): Promise<void> {
    return this.enqueue({ buf: Buffer.alloc(0), sync: true, compactAfter: trimmedTo });
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

  private async rewrite(trimmedTo: number): Promise<void> {
    const image = await readFile(this.path);
    const parsed = parseJournal(image.subarray(0, this.length));
    // Everything up to this.length was written whole: a record that does not read back is
    // damage. Refuse, which fences the file, and the device rewrites it from memory.
    if (parsed.stoppedBecause !== undefined) {
      throw new StorageError('MS_MEDIUM_IO', `journal ${this.path}: compaction found the file damaged at byte ${parsed.validLength} (${parsed.stoppedBecause})`);
    }
    const { records } = parsed;
    let epoch: JournalRecord | undefined;
    let trim: JournalRecord | undefined;
    const keep: Buffer[] = [];
    for (const r of records) {
      if ((r.flags & RECORD_FLAG.EPOCH) !== 0) epoch = r;
      else if ((r.flags & RECORD_FLAG.TRIM) !== 0) trim = r;
      else if (r.seq > trimmedTo) keep.push(encodeRecord(r));
    }
    const markers = [epoch, trim].filter((r): r is JournalRecord => r !== undefined).map((r) => encodeRecord(r));
    await this.install(`${this.path}.compact`, Buffer.concat([encodeFileHeader(image.length >= 24 ? Number(image.readBigUInt64BE(16)) : 0, Date.now()), ...markers, ...keep]));
  }

  /**
   * Writes `body` to a new file at `tmp` and syncs it, then renames it over the journal,
   * syncs the directory and continues on it. Every write and sync goes through the sink
   * wrapper, so tests can fail them as they fail appends.
   */
  private async install(tmp: string, body: Buffer): Promise<void> {
    const out = this.wrap(fileSink(await openTempFile(tmp)));
    try {
      await out.write(body, 0);
      await out.datasync();
    } finally {
      await out.close();
    }
    await this.sink.close().catch(() => undefined); // a fenced file's handle may be broken
    await rename(tmp, this.path);
    await syncDir(this.path);
    ({ sink: this.sink, durable: this.durable } = await openSink(this.path, this.wrap));
    this.length = body.length;
    this.allocated = body.length;
    this.unsynced = false;
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

  /** Writes zeros from the allocated end to past `needed`, and makes them durable. */
  private async preallocate(needed: number): Promise<void> {
    const target = needed + PREALLOCATE;
    this.zeros ??= Buffer.alloc(1024 * 1024);
    while (this.allocated < target) {
      const n = Math.min(this.zeros.length, target - this.allocated);
      await this.sink.write(this.zeros.subarray(0, n), this.allocated);
      this.allocated += n;
    }
    await this.sink.datasync();
  }

  /** Writes a batch at the end, and makes it and everything before it durable when `sync`. */
  private async writeBatch(buf: Buffer, sync: boolean): Promise<void> {
    if (sync && buf.length > 0 && !this.unsynced && this.durable !== undefined) {
      // Nothing unsynced before it: the batch written durably covers all there is.
      await this.durable(buf, this.length);
      this.length += buf.length;
      this.syncs++;
      return;
    }
    if (buf.length > 0) await this.sink.write(buf, this.length);
    this.length += buf.length;
    if (sync && (buf.length > 0 || this.unsynced)) {
      await this.sink.datasync();
      this.syncs++;
      this.unsynced = false;
    } else if (buf.length > 0) {
      this.unsynced = true;
    }
  }

  private async drain(): Promise<void> {
    try {
      while (this.queue.length > 0) {
        const next = this.queue[0];
        if (next?.replaceWith !== undefined) {
          this.queue.shift();
          try {
            await this.install(`${this.path}.rebuild`, Buffer.concat([encodeFileHeader(next.replaceWith.deviceSize, Date.now()), next.replaceWith.records]));
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
        const buf = batch.length === 1 ? (batch[0]?.buf ?? Buffer.alloc(0)) : Buffer.concat(batch.map((w) => w.buf));
        const start = this.length;
        try {
          if (this.length + buf.length > this.allocated) await this.preallocate(this.length + buf.length);
          await this.writeBatch(buf, batch.some((w) => w.sync));
        } catch (error) {
          const failure = new StorageError('MS_MEDIUM_IO', `journal ${this.path}: write or sync failed: ${(error as Error).message}`, { cause: error });
          // Fence: what the file holds from here (and, after a failed sync, before) is
          // unknown until the device rewrites it from memory.
          this.fencedBy = failure;
          this.length = start;
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
