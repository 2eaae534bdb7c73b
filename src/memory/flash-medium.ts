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
// cache hit takes (SyncReadGauge) and declines them while that is more than a small
// share of the time, trying one again now and then to see whether they are fast again.
// Reads over 256 KiB always take the thread pool.

import { mkdir, open, type FileHandle } from 'node:fs/promises';
import { constants, read as readCallback, readSync as readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { dirname } from 'node:path';
import { RuntimeError, StorageError, isMemstrataError } from '../errors.js';
import { formatSize } from '../units.js';
import { writeAll, writeZeros } from '../fs/positional-io.js';
import type { MediumName } from '../kinds.js';
import { checkRange, type Medium, type MediumCapabilities } from './medium.js';

/** A synchronous read's budget in microseconds: this much, plus one per SYNC_BYTES_PER_US bytes of its length. */
const SYNC_BASE_US = 30;
/** The copy rate of a read the page cache answers is several GB/s; a device's is less. */
const SYNC_BYTES_PER_US = 4096;
/** The window (ms) over which synchronous reads are weighed: what they took decays by e in this time. */
const SYNC_WINDOW_MS = 1000;
/**
 * The rules, each on the time synchronous reads took beyond their budgets (the excess),
 * as shares of the window. Reads are declined while any rule holds, and made again once
 * none holds at twice its threshold:
 *   - the excess is more than 0.5% of the time and more than a quarter of the reads'
 *     budgets together (reads that reach a device, at any rate that shows);
 *   - the excess of reads each more than SYNC_LONG_MS over budget is more than 1% of the
 *     time (a preemption or an interrupt holds a read up a few milliseconds at most; a
 *     device stall, longer);
 *   - the excess is more than 20% of the time, whatever the budgets.
 */
const SYNC_SLOW_SHARE = 0.005;
const SYNC_SLOW_RATIO = 0.25;
const SYNC_LONG_MS = 6;
const SYNC_LONG_SHARE = 0.01;
const SYNC_MAX_SHARE = 0.2;
/**
 * While synchronous reads are declined, one is tried again this long after the last one
 * ended, or nine times as long as that one took if longer: probes never hold the event
 * loop more than a tenth of the time, however slow the device. A read through the thread
 * pool that comes back within SYNC_FAST_POOL_MS brings the next probe to within
 * SYNC_PROBE_SOON_MS, so a device slow for seconds once is not waited out nine times.
 */
const SYNC_PROBE_MS = 10;
const SYNC_FAST_POOL_MS = 1;
const SYNC_PROBE_SOON_MS = 1000;
/** Reads longer than this always go through the thread pool (rmem reads reach 16 MiB). */
export const SYNC_READ_MAX = 256 * 1024;

/**
 * Whether synchronous reads are fast enough to make on the event loop. What a read
 * costs the other clients is the time it holds the loop beyond what a read the page
 * cache answers takes (its budget). The gauge keeps that excess, the part of it from
 * reads held up long, and the budgets of the reads made, all decaying over about a
 * second, and declines reads by the rules at SYNC_SLOW_SHARE: all reads at 80 us, one in
 * six at 20 ms, one in a thousand at 20 ms, or a 200 ms stall among 50,000 fast reads a
 * second turn it on; a fast read the scheduler preempts, or one a network interrupt
 * lands in, now and then, does not. While declining, a probe now and then
 * (SYNC_PROBE_MS) adds what it takes; once reads are fast again, the excess decays and
 * they are made again.
 */
export class SyncReadGauge {
  /** Time (ms) synchronous reads took beyond their budgets, that of reads held up long, and their budgets (ms), decayed to `at`. */
  private excess: number;
  private longExcess: number;
  private budgets: number;
  private at: number;
  private declining: boolean;
  private nextProbe: number;
  /** Synchronous reads made, and reads declined, since the medium was made. */
  made: number;
  declined: number;

  constructor(private readonly clock: () => number = () => performance.now()) {
    this.excess = 0;
    this.longExcess = 0;
    this.budgets = 0;
    this.at = 0;
    this.declining = false;
    this.nextProbe = 0;
    this.made = 0;
    this.declined = 0;
  }

  /** The clock (ms) when a read of `length` bytes may be made now, or undefined: decline it. */
  begin(length: number): number | undefined {
    if (length > SYNC_READ_MAX) {
      this.declined++;
      return undefined;
    }
    const now = this.clock();
    if (this.declining && now < this.nextProbe) {
      this.declined++;
      return undefined;
    }
    return now;
  }

  /** A read of `length` bytes that began at `start` (ms) is done. */
  end(start: number, length: number): void {
    this.made++;
    const now = this.clock();
    const budget = (SYNC_BASE_US + length / SYNC_BYTES_PER_US) / 1000;
    // performance.now() is monotonic and finite; a clock that is not must not grow what decays.
    const elapsed = now - this.at;
    const decay = elapsed > 0 ? Math.exp(-elapsed / SYNC_WINDOW_MS) : 1;
    const took = now - start;
    const over = took - budget > 0 ? took - budget : 0;
    this.excess = this.excess * decay + over;
    this.longExcess = this.longExcess * decay + (over > SYNC_LONG_MS ? over : 0);
    this.budgets = this.budgets * decay + budget;
    if (!Number.isFinite(this.excess + this.longExcess + this.budgets)) {
      this.excess = 0;
      this.longExcess = 0;
      this.budgets = 0;
    }
    if (Number.isFinite(now)) this.at = now;
    const pressure = Math.max(
      Math.min(this.excess / (SYNC_SLOW_SHARE * SYNC_WINDOW_MS), this.excess / (SYNC_SLOW_RATIO * this.budgets)),
      this.longExcess / (SYNC_LONG_SHARE * SYNC_WINDOW_MS),
      this.excess / (SYNC_MAX_SHARE * SYNC_WINDOW_MS),
    );
    if (pressure > 1) this.declining = true;
    else if (pressure < 0.5) this.declining = false;
    if (this.declining) this.nextProbe = Number.isFinite(now) && took >= 0 ? now + Math.max(SYNC_PROBE_MS, 9 * took) : 0;
  }

  /** A read through the thread pool took `ms`: one that came back fast brings the next probe near. */
  pooled(ms: number): void {
    if (!this.declining || !(ms < SYNC_FAST_POOL_MS)) return;
    const soon = this.clock() + SYNC_PROBE_SOON_MS;
    if (soon < this.nextProbe) this.nextProbe = soon;
  }

  /** True while synchronous reads are declined (they have been slow). */
  get slow(): boolean {
    return this.declining;
  }
}

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
  readonly syncReads: SyncReadGauge;

  constructor(options: { path: string; capacity: number; extentSize: number; clock?: () => number }) {
    this.path = options.path;
    this.capacity = options.capacity;
    this.extentSize = options.extentSize;
    this.handle = undefined;
    this.inFlight = 0;
    this.drained = undefined;
    this.syncReads = new SyncReadGauge(options.clock);
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
   * `read`, on the event loop, while such reads have been fast (see SyncReadGauge). Throws
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
