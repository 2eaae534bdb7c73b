// Flash medium: a preallocated sparse file on local SSD, positional I/O through one
// FileHandle.
//
// The file is extended to `capacity` with ftruncate, so blocks are taken on disk only as
// they are written. Contents survive a restart of the medium (the NVRAM vault relies on
// that). A file larger than the configured capacity is refused instead of truncated,
// since cutting it would drop data. I/O in flight is counted so that `close` waits for
// it; I/O that starts after `close` fails with MS_MEDIUM_CLOSED.
//
// Reads also come synchronously (readSync), for the read-hit paths that answer in the
// tick a request arrived: a 4 KiB pread the OS page cache answers costs a few
// microseconds on the event loop, where a trip through libuv's thread pool costs the
// loop 15 us or so of wake-ups and callbacks, and the reply the same again in latency.
// One that reaches the device would stall every client for the device's latency, so
// the medium watches how long its synchronous reads hold the loop beyond what a page
// cache hit takes (SyncIoGauge) and declines them while that is more than a small
// share of the time, trying one again now and then to see whether they are fast again.
// Reads over 256 KiB always take the thread pool.

import { mkdir, open, type FileHandle } from 'node:fs/promises';
import { constants, read as readCallback, readSync as readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { dirname } from 'node:path';
import { RuntimeError, StorageError, isMemstrataError } from '../errors.js';
import { formatSize } from '../units.js';
import { writeAll, writeZeros } from '../fs/positional-io.js';
import { SyncIoGauge } from '../fs/sync-io-gauge.js';
import type { MediumName } from '../kinds.js';
import { checkRange, type Medium, type MediumCapabilities } from './medium.js';

/** Thrown by readSync to decline: made once, since a decline is routine and asks for no stack. */
const DECLINED = new RuntimeError('MS_READ_DECLINED', 'flash: synchronous reads are declined while they are slow; read asynchronously');

export class FlashMedium implements Medium {
  readonly name: MediumName = 'flash';
  readonly capacity: number;
  readonly extentSize: number;
  readonly path: string;
  readonly capabilities: MediumCapabilities = { persistent: true, lazy: true };
  private handle: FileHandle | undefined;
  private inFlight: number;
  private drained: (() => void) | undefined;
  /** How synchronous reads have fared (readSync). */
  readonly syncReads: SyncIoGauge;

  constructor(options: { path: string; capacity: number; extentSize: number; clock?: () => number }) {
    this.path = options.path;
    this.capacity = options.capacity;
    this.extentSize = options.extentSize;
    this.handle = undefined;
    this.inFlight = 0;
    this.drained = undefined;
    this.syncReads = new SyncIoGauge(options.clock);
  }

  async open(): Promise<void> {
    try {
      await mkdir(dirname(this.path), { recursive: true });
      const handle = await open(this.path, constants.O_RDWR | constants.O_CREAT, 0o600);
      const { size } = await handle.stat();
      if (size > this.capacity) {
        await handle.close();
        throw new StorageError(
          'MS_FLASH_SIZE',
          `flash file ${this.path} is ${formatSize(size)} but media.flash.size is ${formatSize(this.capacity)}; shrinking it would lose data, so raise the size or remove the file`,
          { details: { path: this.path, fileSize: size, capacity: this.capacity } },
        );
      }
      if (size < this.capacity) await handle.truncate(this.capacity);
      this.handle = handle;
    } catch (error) {
      if (isMemstrataError(error)) throw error;
      throw new StorageError('MS_DATA_DIR', `cannot open flash file ${this.path}: ${(error as Error).message}`, { cause: error });
    }
  }

  async read(offset: number, target: Uint8Array): Promise<void> {
    const handle = this.begin(offset, target.length);
    // Timed while synchronous reads are declined: fast ones show the device is fast again.
    const started = this.syncReads.slow ? performance.now() : undefined;
    try {
      let done = 0;
      while (done < target.length) {
        const bytesRead = await readAt(handle.fd, target, done, target.length - done, offset + done);
        // The file is never shorter than capacity, so a short read means it was cut under us.
        if (bytesRead === 0) throw new Error(`unexpected end of file at ${offset + done}`);
        done += bytesRead;
      }
      if (started !== undefined) this.syncReads.pooled(performance.now() - started);
    } catch (error) {
      throw this.ioError('read', offset, target.length, error);
    } finally {
      this.end();
    }
  }

  /**
   * `read`, on the event loop, while such reads have been fast (see SyncIoGauge). Throws
   * to decline: while they are slow, when the medium is not open, and on any error of
   * the read, which `read` will then report.
   */
  readSync(offset: number, target: Uint8Array): void {
    const handle = this.handle;
    if (handle === undefined) throw DECLINED;
    checkRange(this, offset, target.length);
    const start = this.syncReads.begin(target.length);
    if (start === undefined) throw DECLINED;
    let done = 0;
    try {
      while (done < target.length) {
        const bytesRead = readFileSync(handle.fd, target, done, target.length - done, offset + done);
        if (bytesRead === 0) throw DECLINED;
        done += bytesRead;
      }
    } finally {
      this.syncReads.end(start, done);
    }
  }

  async write(offset: number, source: Uint8Array): Promise<void> {
    const handle = this.begin(offset, source.length);
    try {
      await writeAll(handle, source, offset);
    } catch (error) {
      throw this.ioError('write', offset, source.length, error);
    } finally {
      this.end();
    }
  }

  async zero(offset: number, length: number): Promise<void> {
    const handle = this.begin(offset, length);
    try {
      await writeZeros(handle, offset, length);
    } catch (error) {
      throw this.ioError('zero', offset, length, error);
    } finally {
      this.end();
    }
  }

  async sync(): Promise<void> {
    const handle = this.begin(0, 0);
    try {
      await handle.datasync();
    } catch (error) {
      throw this.ioError('sync', 0, 0, error);
    } finally {
      this.end();
    }
  }

  async close(): Promise<void> {
    const handle = this.handle;
    if (handle === undefined) return;
    this.handle = undefined;
    if (this.inFlight > 0) await new Promise<void>((resolve) => { this.drained = resolve; });
    await handle.close();
  }

  async resident(): Promise<number> {
    const handle = this.begin(0, 0);
    try {
      const { blocks } = await handle.stat();
      return blocks * 512;
    } finally {
      this.end();
    }
  }

  private begin(offset: number, length: number): FileHandle {
    const handle = this.handle;
    if (handle === undefined) throw new RuntimeError('MS_MEDIUM_CLOSED', `flash: medium ${this.path} is not open`);
    checkRange(this, offset, length);
    this.inFlight++;
    return handle;
  }

  private end(): void {
    this.inFlight--;
    if (this.inFlight === 0 && this.drained !== undefined) {
      const drained = this.drained;
      this.drained = undefined;
      drained();
    }
  }

  private ioError(op: string, offset: number, length: number, error: unknown): Error {
    if (isMemstrataError(error)) return error;
    return new StorageError('MS_MEDIUM_IO', `flash: ${op} at ${offset} length ${length} failed: ${(error as Error).message}`, {
      cause: error,
      details: { path: this.path, op, offset, length },
    });
  }
}

/**
 * One pread through fs.read's callback form: the promise API (FileHandle.read) costs the
 * event loop several microseconds more per call, which a 4 KiB read from the flash level
 * pays on every hit.
 */
function readAt(fd: number, target: Uint8Array, at: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    readCallback(fd, target, at, length, position, (error, bytesRead) => {
      if (error === null) resolve(bytesRead);
      else reject(error);
    });
  });
}
