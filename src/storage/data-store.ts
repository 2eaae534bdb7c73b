// The data store of one volume (patent "data store 28"): a sparse file, plus a zero
// map that says which 64 KiB chunks read as zeros.
//
//   <name>.img    the volume's bytes at their offsets (sparse: ftruncate to the size)
//   <name>.zmap   "MSZMAP01", u64 size, u32 chunk size, u32 crc32 of the bitmap, bitmap
//
// Node.js cannot punch holes, so TRIM and WRITE_ZEROES over whole chunks only set the
// chunk's bit: reads of it return zeros without touching the file, and BLOCK_STATUS
// reports it as a hole that reads as zeros. A write into a zero chunk first writes
// zeros over the rest of that chunk, then clears the bit. Known limit: trimmed space is
// not returned to the file system.
//
// Durability: sync() fdatasyncs the data file and then, if the map changed, replaces
// the map file atomically (write, fsync, rename, fsync of the directory). Data reaches
// the disk before any map that points at it, so after a crash a chunk reads either as it
// was at the last sync or as zeros it was told to be, never as bytes from an older life.
// A sync that fails fences the store (volume-store.ts): the kernel may have dropped the
// pages it could not write and would report the next fsync as clean, so nothing written
// since the last good sync can be promised any more.
//
// Concurrency: a chunk's zero bit and its bytes in the file change together under that
// chunk's lock (writes into zero chunks, every zeroRange); writes to chunks that hold
// data take no lock. Every operation checks its range: nothing grows the file but resize.

import { open, readFile, rm, type FileHandle } from 'node:fs/promises';
import { replaceFile } from '../fs/meta-file.js';
import { crc32 } from 'node:zlib';
import { MisuseError, StorageError, asError } from '../errors.js';
import { writeAll, writeZeros } from '../fs/positional-io.js';
import { InFlight } from '../settle.js';
import type { Extent } from '../protocol/nbd/codec.js';
import { STATE } from '../protocol/nbd/spec.js';
import { KeyedLock } from './keyed-lock.js';
import type { VolumeStore } from './volume-store.js';

export const ZERO_CHUNK = 64 * 1024;
const MAP_MAGIC = Buffer.from('MSZMAP01');
const MAP_HEADER = 24;

/** The calls the data store makes on its data file: node's FileHandle, or a wrapper (fault injection). */
export type StoreFile = Pick<FileHandle, 'read' | 'write' | 'datasync' | 'truncate' | 'close'>;

/** Opens the data file; the default is node's `open`. */
export type StoreFileOpener = (path: string, flags: string, mode: number) => Promise<StoreFile>;

export class DataStore implements VolumeStore {
  readonly path: string;
  private readonly mapPath: string;
  private readonly openFile: StoreFileOpener;
  private handle: StoreFile | undefined;
  private sizeBytes: number;
  /** One bit per chunk: set means the chunk reads as zeros. */
  private zero: Uint8Array;
  /** Bumped at every change of the zero map; the map on disk is as of `persistedGen`. */
  private mapGen: number;
  private persistedGen: number;
  private mapWrites: Promise<void> = Promise.resolve();
  /** Held while a chunk's zero bit and its bytes in the file change together. */
  private readonly chunks: KeyedLock<number>;
  private fenced: Error | undefined;
  /** Writes and zeroings under way; a resize waits for them (`changing`). */
  private readonly changes: InFlight;
  /** Set while a resize runs: writes and zeroings that come meanwhile wait for it. */
  private resizing: Promise<void> | undefined;

  constructor(path: string, size: number, openFile: StoreFileOpener = open) {
    this.path = path;
    this.mapPath = path.replace(/\.img$/, '') + '.zmap';
    this.openFile = openFile;
    this.handle = undefined;
    this.sizeBytes = size;
    this.zero = new Uint8Array(0);
    this.mapGen = 0;
    this.persistedGen = 0;
    this.chunks = new KeyedLock();
    this.fenced = undefined;
    this.changes = new InFlight();
    this.resizing = undefined;
  }

  /**
   * Runs a write or zeroing once no resize runs, counted so a resize can wait for it: a
   * write that landed after a shrink's truncate would grow the file past the new end.
   */
  private async changing<T>(fn: () => Promise<T>): Promise<T> {
    while (this.resizing !== undefined) await this.resizing;
    return this.changes.track(fn());
  }

  get size(): number {
    return this.sizeBytes;
  }

  get failure(): Error | undefined {
    return this.fenced;
  }

  /** Opens (creating if need be) the data file and loads the zero map. */
  async open(create: boolean): Promise<void> {
    try {
      this.handle = await this.openFile(this.path, create ? 'wx+' : 'r+', 0o600);
      if (create) await this.handle.truncate(this.sizeBytes);
    } catch (error) {
      throw new StorageError('MS_DATA_DIR', `cannot open volume file ${this.path}: ${(error as Error).message}`, { cause: error });
    }
    this.fenced = undefined;
    const chunks = this.chunkCount(this.sizeBytes);
    this.zero = new Uint8Array(Math.ceil(chunks / 8));
    if (create) {
      this.markZero(0, this.sizeBytes);
      this.mapGen++;
      await this.sync();
      return;
    }
    const loaded = await this.loadMap();
    // Without a readable map every chunk is read from the file, which is always safe.
    if (loaded !== undefined) this.zero.set(loaded.subarray(0, this.zero.length));
  }

  async close(): Promise<void> {
    const handle = this.handle;
    this.handle = undefined;
    if (handle === undefined) return;
    try {
      // A clean stop leaves data and map durable, like a FLUSH; a fenced store has
      // nothing it could promise, and says so through `failure` until then.
      if (this.fenced === undefined) await this.syncWith(handle);
    } finally {
      await handle.close();
    }
  }

  async read(offset: number, target: Buffer): Promise<void> {
    this.checkRange(offset, target.length);
    const handle = this.file();
    let done = 0;
    while (done < target.length) {
      const at = offset + done;
      const chunk = Math.floor(at / ZERO_CHUNK);
      const n = Math.min((chunk + 1) * ZERO_CHUNK - at, target.length - done);
      if (this.isZero(chunk)) {
        target.fill(0, done, done + n);
      } else {
        let got = 0;
        while (got < n) {
          const { bytesRead } = await handle.read(target, done + got, n - got, at + got);
          if (bytesRead === 0) {
            target.fill(0, done + got, done + n); // past a short file: reads as zeros
            break;
          }
          got += bytesRead;
        }
      }
      done += n;
    }
  }

  /**
   * Writes outside zero chunks go straight to the file. A write that touches zero
   * chunks holds those chunks' locks (ascending) for its whole length: a chunk it covers
   * in part is first filled with zeros in the file, and the bits of every zero chunk it
   * touches are cleared only once the data has landed, so a reader sees either zeros or
   * the new bytes, never older bytes from the file, and no fill can wipe a neighbour's
   * landed data.
   */
  write(offset: number, data: Buffer): Promise<void> {
    return this.changing(() => this.writeNow(offset, data));
  }

  private async writeNow(offset: number, data: Buffer): Promise<void> {
    this.checkRange(offset, data.length);
    this.writable();
    if (data.length === 0) return;
    const handle = this.file();
    const first = Math.floor(offset / ZERO_CHUNK);
    const last = Math.floor((offset + data.length - 1) / ZERO_CHUNK);
    const zeroChunks: number[] = [];
    for (let chunk = first; chunk <= last; chunk++) if (this.isZero(chunk) || this.chunks.held(chunk)) zeroChunks.push(chunk);
    if (zeroChunks.length === 0) return writeAll(handle, data, offset);
    return this.withChunks(zeroChunks, async () => {
      const cleared: number[] = [];
      for (const chunk of zeroChunks) {
        if (!this.isZero(chunk)) continue;
        const start = chunk * ZERO_CHUNK;
        const end = Math.min(start + ZERO_CHUNK, this.sizeBytes);
        if (offset > start || offset + data.length < end) await writeZeros(handle, start, end - start);
        cleared.push(chunk);
      }
      await writeAll(handle, data, offset);
      for (const chunk of cleared) this.setZero(chunk, false);
    });
  }

  /**
   * Makes the range read as zeros. Whole chunks only change the map, unless `allocate`
   * (NBD_CMD_FLAG_NO_HOLE) asks for zeros to be written; partial chunks get zeros written.
   * Each chunk is changed under its lock, like a write that touches a zero chunk.
   */
  zeroRange(offset: number, length: number, allocate = false): Promise<void> {
    return this.changing(() => this.zeroRangeNow(offset, length, allocate));
  }

  private async zeroRangeNow(offset: number, length: number, allocate: boolean): Promise<void> {
    this.checkRange(offset, length);
    this.writable();
    const handle = this.file();
    let at = offset;
    const end = offset + length;
    while (at < end) {
      const chunk = Math.floor(at / ZERO_CHUNK);
      const chunkStart = chunk * ZERO_CHUNK;
      const chunkEnd = Math.min(chunkStart + ZERO_CHUNK, this.sizeBytes);
      const from = at;
      const n = Math.min(chunkEnd, end) - at;
      at += n;
      // Already zero and nobody changing it: nothing to do, no lock to take. A long range
      // gives the event loop a turn now and then.
      if (!allocate && this.isZero(chunk) && !this.chunks.held(chunk)) {
        if (chunk % 1024 === 1023) await new Promise((resolve) => setImmediate(resolve));
        continue;
      }
      await this.chunks.run(chunk, async () => {
        if (this.isZero(chunk)) {
          if (!allocate) return;
          // NO_HOLE over a zero chunk: it becomes allocated zeros.
          await writeZeros(handle, chunkStart, chunkEnd - chunkStart);
          this.setZero(chunk, false);
        } else if (from === chunkStart && n === chunkEnd - chunkStart && !allocate) {
          this.setZero(chunk, true);
        } else {
          await writeZeros(handle, from, n);
        }
      });
    }
  }

  /** Extents of [offset, offset + length): holes that read as zeros, and data. */
  blockStatus(offset: number, length: number): Extent[] {
    const extents: Extent[] = [];
    let at = offset;
    const end = offset + length;
    while (at < end) {
      const chunk = Math.floor(at / ZERO_CHUNK);
      let n = Math.min((chunk + 1) * ZERO_CHUNK, end) - at;
      const flags = this.isZero(chunk) ? STATE.HOLE | STATE.ZERO : 0;
      // Eight chunks of one byte of the map that agree are one step.
      if (chunk % 8 === 0 && at === chunk * ZERO_CHUNK && end - at >= 8 * ZERO_CHUNK) {
        const byte = this.zero[chunk >> 3] ?? 0;
        if (byte === 0 || byte === 0xff) n = 8 * ZERO_CHUNK;
      }
      const last = extents[extents.length - 1];
      if (last !== undefined && last.flags === flags && last.length + n <= 0xffffffff) last.length += n;
      else extents.push({ length: n, flags });
      at += n;
    }
    return extents;
  }

  /**
   * Durable: data first, then the zero map as it was when the sync began. A failure
   * fences the store (see volume-store.ts), and so does a failure of any sync this one
   * overlapped: the kernel reports a lost write-back to one fsync caller only, so the
   * other one's success proves nothing.
   */
  async sync(): Promise<void> {
    this.writable();
    try {
      await this.syncWith(this.file());
    } catch (error) {
      this.fence(error);
      throw this.fencedError();
    }
    if (this.fenced !== undefined) throw this.fencedError();
  }

  /**
   * The map is taken before the fdatasync: a chunk's bit clears only after its data
   * landed, so every "data" bit in the snapshot points at bytes the fdatasync covers. A
   * bit that changes during the fdatasync waits for the next sync.
   */
  private async syncWith(handle: StoreFile): Promise<void> {
    const gen = this.mapGen;
    const snapshot = Buffer.from(this.zero);
    const size = this.sizeBytes;
    await handle.datasync();
    await this.persistMap(snapshot, size, gen);
  }

  /**
   * Grows or shrinks the volume; new space reads as zeros. Waits for the writes and
   * zeroings under way (those that come meanwhile wait for it, and are then checked
   * against the new size), so none lands past a shrink's new end.
   */
  async resize(size: number): Promise<void> {
    while (this.resizing !== undefined) await this.resizing;
    let done = (): void => undefined;
    this.resizing = new Promise<void>((resolve) => (done = resolve));
    try {
      await this.changes.settled();
      await this.resizeNow(size);
    } finally {
      this.resizing = undefined;
      done();
    }
  }

  private async resizeNow(size: number): Promise<void> {
    this.writable();
    const handle = this.file();
    const old = this.sizeBytes;
    // The file first: a failed truncate leaves the store as it was.
    await handle.truncate(size);
    const map = new Uint8Array(Math.ceil(this.chunkCount(size) / 8));
    map.set(this.zero.subarray(0, Math.min(map.length, this.zero.length)));
    this.zero = map;
    this.sizeBytes = size;
    if (size > old) {
      // The old last chunk may have been partial; its new tail is zero in the file (truncate
      // extends with zeros), so only whole new chunks need their bit.
      const firstNew = Math.ceil(old / ZERO_CHUNK);
      for (let c = firstNew; c < this.chunkCount(size); c++) this.setZero(c, true);
    }
    this.mapGen++;
    await this.sync();
  }

  /** Removes the files of a closed store. */
  async destroy(): Promise<void> {
    await rm(this.path, { force: true });
    await rm(this.mapPath, { force: true });
  }

  private file(): StoreFile {
    if (this.handle === undefined) throw new StorageError('MS_MEDIUM_IO', `volume file ${this.path} is not open`);
    return this.handle;
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new MisuseError('MS_VOLUME_RANGE', `offset ${offset} length ${length} lies outside the volume (${this.sizeBytes} bytes)`, {
        details: { offset, length, size: this.sizeBytes },
      });
    }
  }

  private writable(): void {
    if (this.fenced !== undefined) throw this.fencedError();
  }

  private fence(error: unknown): void {
    if (this.fenced !== undefined) return;
    this.fenced = asError(error);
  }

  private fencedError(): StorageError {
    const reason = this.fenced?.message ?? 'unknown';
    return new StorageError('MS_VOLUME_FENCED', `volume file ${this.path} is fenced: a sync failed (${reason}), so writes since the last good sync may be lost`, {
      cause: this.fenced,
    });
  }

  /** Runs `fn` holding the locks of `chunks` (ascending, so holders never wait in a cycle). */
  private withChunks<T>(chunks: readonly number[], fn: () => Promise<T>, from = 0): Promise<T> {
    const chunk = chunks[from];
    if (chunk === undefined) return fn();
    return this.chunks.run(chunk, () => this.withChunks(chunks, fn, from + 1));
  }

  private chunkCount(size: number): number {
    return Math.ceil(size / ZERO_CHUNK);
  }

  private isZero(chunk: number): boolean {
    return ((this.zero[chunk >> 3] ?? 0) & (1 << (chunk & 7))) !== 0;
  }

  private setZero(chunk: number, zero: boolean): void {
    const byte = this.zero[chunk >> 3] ?? 0;
    const next = zero ? byte | (1 << (chunk & 7)) : byte & ~(1 << (chunk & 7));
    if (next !== byte) {
      this.zero[chunk >> 3] = next;
      this.mapGen++;
    }
  }

  /**
   * Marks every chunk that [offset, offset + length) touches as zero: whole bytes of the
   * map in one fill, only the chunks at either end one bit at a time (a 16 TiB volume has
   * 256 Mi chunks; a bit at a time held the event loop for a second).
   */
  private markZero(offset: number, length: number): void {
    const end = Math.ceil((offset + length) / ZERO_CHUNK);
    let chunk = Math.floor(offset / ZERO_CHUNK);
    for (; chunk < end && (chunk & 7) !== 0; chunk++) this.setZero(chunk, true);
    const bytes = (end - chunk) >> 3;
    if (bytes > 0) {
      this.zero.fill(0xff, chunk >> 3, (chunk >> 3) + bytes);
      this.mapGen++;
      chunk += bytes * 8;
    }
    for (; chunk < end; chunk++) this.setZero(chunk, true);
  }

  private async loadMap(): Promise<Uint8Array | undefined> {
    let raw: Buffer;
    try {
      raw = await readFile(this.mapPath);
    } catch {
      return undefined;
    }
    if (raw.length < MAP_HEADER || !raw.subarray(0, 8).equals(MAP_MAGIC)) return undefined;
    const bitmap = raw.subarray(MAP_HEADER);
    if (raw.readUInt32BE(16) !== ZERO_CHUNK || raw.readUInt32BE(20) !== crc32(bitmap)) return undefined;
    const mapSize = Number(raw.readBigUInt64BE(8));
    if (mapSize !== this.sizeBytes) {
      // Size changed without the map (a crash during resize): keep only what both agree on.
      const common = Math.floor(Math.min(mapSize, this.sizeBytes) / ZERO_CHUNK / 8);
      return bitmap.subarray(0, common);
    }
    return bitmap;
  }

  /**
   * Writes a snapshot of the zero map if it is newer than the one on disk. Calls run one
   * after another: a caller must not return while an earlier write of the map, one that
   * covers its change, is still on its way, and an older snapshot never replaces a newer.
   */
  private persistMap(bitmap: Buffer, size: number, gen: number): Promise<void> {
    const run = this.mapWrites.then(() => (gen > this.persistedGen ? this.writeMap(bitmap, size, gen) : undefined));
    this.mapWrites = run.catch(() => undefined);
    return run;
  }

  private async writeMap(bitmap: Buffer, size: number, gen: number): Promise<void> {
    const file = Buffer.allocUnsafe(MAP_HEADER + bitmap.length);
    MAP_MAGIC.copy(file, 0);
    file.writeBigUInt64BE(BigInt(size), 8);
    file.writeUInt32BE(ZERO_CHUNK, 16);
    file.writeUInt32BE(crc32(bitmap), 20);
    bitmap.copy(file, MAP_HEADER);
    try {
      await replaceFile(this.mapPath, file);
    } catch (error) {
      throw new StorageError('MS_MEDIUM_IO', `cannot write zero map ${this.mapPath}: ${(error as Error).message}`, { cause: error });
    }
    this.persistedGen = gen;
  }
}
