// Write-back of the storage cache: which lines are dirty, how a line's dirty sectors
// reach the data store, FLUSH, and the background destager (FIG. 20's "destaged later").
//
//   dirty lines, per volume  -- destage(line) --> store.write (runs of dirty sectors)
//   flush(volume): destage every dirty line of the volume, then store.sync()
//   destager: every tick, lines dirty for longer than maxDirtyAge, and while dirty bytes
//             are above the high watermark, others down to the low watermark, in
//             (volume, offset) order; then one sync per volume touched
//
// Honest failures (DESIGN "Guarantees first"):
//   - a line's dirty bits are cleared only for the runs the store accepted; a run whose
//     write failed (EIO, ENOSPC, short write) stays dirty and is written again later;
//   - flush() tries every dirty line even after a failure, then syncs only if all were
//     written, and rejects with the first error: a FLUSH never succeeds while data
//     written before it is not in the store and synced;
//   - a failed sync fences the store (volume-store.ts): every later flush rejects with
//     MS_VOLUME_FENCED, since the kernel may have dropped what it could not write.
//
// Every destage runs under the line's lock (taken through `lock`), so it never
// interleaves with a write, a stage or an eviction of the same line.

import { asError } from '../../errors.js';
import type { Logger } from '../../logger.js';
import type { Medium } from '../../memory/medium.js';
import type { Volume } from '../volume-manager.js';
import { LINE_SIZE, Line, SECTOR_SIZE, popcount, runsOf } from './line.js';

export interface WriteBackOptions {
  log: Logger;
  maxDirtyAgeMs: number;
  /** Start destaging when dirty bytes pass this share of the DRAM level, down to the low mark. */
  highWatermark: number;
  lowWatermark: number;
  /** Bytes the DRAM level holds (the watermarks are shares of it). */
  capacity(): number;
  mediumOf(line: Line): Medium;
  /** Runs `fn` under the line's lock. */
  lock(line: Line, fn: () => Promise<void>): Promise<void>;
  /** True while the line is still the cache's copy of its blocks. */
  live(line: Line): boolean;
}

export class WriteBack {
  private readonly options: WriteBackOptions;
  private readonly dirty: Map<Volume, Set<Line>>;
  private destaging: Promise<void> | undefined;
  private destagedBytes: number;
  private failures: number;
  private lastFailureLog: number;

  constructor(options: WriteBackOptions) {
    this.options = options;
    this.dirty = new Map();
    this.destaging = undefined;
    this.destagedBytes = 0;
    this.failures = 0;
    this.lastFailureLog = 0;
  }

  get bytesDestaged(): number {
    return this.destagedBytes;
  }

  /** Write-backs that failed (the data stayed dirty). */
  get failedWriteBacks(): number {
    return this.failures;
  }

  /** A write set dirty bits on the line (called under its lock, or in one synchronous step while nobody holds it: StorageCache.writeNow). */
  marked(line: Line): void {
    let set = this.dirty.get(line.volume);
    if (set === undefined) {
      set = new Set();
      this.dirty.set(line.volume, set);
    }
    set.add(line);
  }

  /** The caller changed the line's dirty bits without a write-back (zeroed, cut off, dropped): keep the sets true. */
  updated(line: Line): void {
    if (line.dirty === 0) this.unmark(line);
    else this.marked(line);
  }

  /** Indexes of the volume's dirty lines in [from, to), ascending. */
  dirtyIndexes(volume: Volume, from: number, to: number): number[] {
    const indexes: number[] = [];
    for (const line of this.dirty.get(volume) ?? []) if (line.index >= from && line.index < to && line.dirty !== 0) indexes.push(line.index);
    return indexes.sort((a, b) => a - b);
  }

  hasDirty(volume: Volume): boolean {
    return (this.dirty.get(volume)?.size ?? 0) > 0;
  }

  dirtyBytes(): number {
    let bytes = 0;
    for (const set of this.dirty.values()) for (const line of set) bytes += popcount(line.dirty) * SECTOR_SIZE;
    return bytes;
  }

  volumes(): Volume[] {
    return [...this.dirty.keys()];
  }

  /** Writes the dirty sectors of a line to its volume's store (caller holds the line's lock). */
  async destage(line: Line): Promise<void> {
    if (line.dirty === 0 || !this.options.live(line)) return;
    // A volume with a write log: its records first (Volume.logBarrier). Waits for I/O only.
    const barrier = line.volume.logBarrier;
    if (barrier !== undefined) await barrier(line.index * LINE_SIZE, LINE_SIZE);
    if (line.dirty === 0 || !this.options.live(line)) return;
    const medium = this.options.mediumOf(line);
    const base = line.index * LINE_SIZE;
    const size = line.volume.size;
    let failure: Error | undefined;
    for (const [s, e] of runsOf(line.dirty)) {
      const at = base + s * SECTOR_SIZE;
      const length = Math.min((e - s + 1) * SECTOR_SIZE, size - at);
      const mask = ((1 << (e - s + 1)) - 1) << s;
      if (length <= 0) {
        line.dirty &= ~mask; // past the end of a shrunk volume: nothing to keep
        continue;
      }
      try {
        const buf = Buffer.allocUnsafe(length);
        await medium.read(line.slot + s * SECTOR_SIZE, buf);
        await line.volume.store.write(at, buf);
        line.dirty &= ~mask;
        this.destagedBytes += length;
      } catch (error) {
        failure ??= asError(error);
      }
    }
    if (line.dirty === 0) this.unmark(line);
    if (failure !== undefined) {
      this.failures++;
      throw failure;
    }
  }

  /**
   * FLUSH (FIG. 20): every line of the volume dirty when flush was called is written,
   * then the store synced. Rejects with the first failure, after trying every line.
   */
  async flush(volume: Volume): Promise<void> {
    const lines = [...(this.dirty.get(volume) ?? [])].sort((a, b) => a.index - b.index);
    let failure: Error | undefined;
    for (const line of lines) {
      try {
        await this.options.lock(line, () => this.destage(line));
      } catch (error) {
        failure ??= asError(error);
      }
    }
    if (failure !== undefined) throw failure;
    await volume.store.sync();
  }

  /** Runs the destager once (one run at a time; a second caller shares the first's run). */
  destageDue(now: number): Promise<void> {
    if (this.destaging !== undefined) return this.destaging;
    this.destaging = this.destageNow(now).finally(() => {
      this.destaging = undefined;
    });
    return this.destaging;
  }

  /** Waits for a destager run in progress. */
  async idle(): Promise<void> {
    await this.destaging;
  }

  private async destageNow(now: number): Promise<void> {
    const capacity = this.options.capacity();
    const high = this.options.highWatermark * capacity;
    const low = this.options.lowWatermark * capacity;
    const ordered: Line[] = [];
    for (const set of this.dirty.values()) ordered.push(...set);
    ordered.sort((a, b) => (a.volume.name < b.volume.name ? -1 : a.volume.name > b.volume.name ? 1 : a.index - b.index));
    let dirty = this.dirtyBytes();
    let draining = dirty > high;
    const touched = new Set<Volume>();
    for (const line of ordered) {
      const old = now - line.dirtySince >= this.options.maxDirtyAgeMs;
      if (!old && !(draining && dirty > low)) continue;
      const bytes = popcount(line.dirty) * SECTOR_SIZE;
      try {
        await this.options.lock(line, () => this.destage(line));
        dirty -= bytes;
        touched.add(line.volume);
      } catch (error) {
        this.noteFailure(line.volume, error);
      }
      draining = draining && dirty > low;
    }
    for (const volume of touched) {
      if (volume.store.failure !== undefined) continue;
      try {
        await volume.store.sync();
      } catch (error) {
        this.noteFailure(volume, error);
      }
    }
  }

  private noteFailure(volume: Volume, error: unknown): void {
    // The data stays dirty and FLUSH reports the failure; the log says it once a second at most.
    const now = Date.now();
    if (now - this.lastFailureLog < 1000) return;
    this.lastFailureLog = now;
    this.options.log.error({ volume: volume.name, err: error }, 'write-back failed; the data stays dirty in the cache and FLUSH reports the error');
  }

  private unmark(line: Line): void {
    const set = this.dirty.get(line.volume);
    if (set === undefined) return;
    set.delete(line);
    if (set.size === 0) this.dirty.delete(line.volume);
  }
}
