// The storage cache (DESIGN 4.2, patent FIG. 20-21): write-back caching of volumes in
// the `cache` partition, DRAM first, flash second. This module joins four mechanisms,
// each in its own module with its invariants and tests:
//
//   line.ts         a line: 64 KiB of one volume, 16 sectors with valid and dirty bits
//   replacement.ts  whom to evict: 2Q with a correlated-reference window (DRAM), LRU (flash)
//   slots.ts        where lines live: slots of the cache's extents; draining extents
//   write-back.ts   dirty lines to the data store: destage, FLUSH, the destager
//
// The seams, explicitly:
//   - every operation on a line holds that line's lock (a KeyedLock on the line's key,
//     held whether or not the line is cached), so staging, writing, destaging, demotion
//     and eviction of one line never interleave. A holder of a line's lock waits only
//     for I/O: never for another line's lock that someone holds, never for a slot. Slots
//     are taken before a lock; a demotion (under its DRAM line's lock) takes a flash slot
//     only if one is free or a flash line nobody holds gives it up on the spot. So no
//     wait can close a cycle;
//   - a slot is taken before a line is put in it and given back only after the line's
//     last I/O; slot numbers never leave this module except as medium offsets;
//   - reclaim (the partition table wants extents back): the slot pool stops handing out
//     slots of the chosen extents, then every line living there is evicted under its lock
//     (a dirty line is destaged first), and only once no slot of them is taken (no line,
//     no taker, no I/O) are they zeroed and handed over. A line admitted into such an
//     extent just before the drain began is evicted like the others: memory changes owner
//     only when the cache has provably stopped using it (DESIGN 4.1, issue 10 item 1);
//   - reads stage only the sectors they miss from the data store (FIG. 21); writes land
//     in the DRAM slot and are acknowledged (FIG. 20), staging a sector first only when
//     they cover part of it. Clean DRAM lines are demoted to flash when evicted; a read
//     whose sectors a flash line holds is served from flash, while a write or a read of
//     sectors the flash line lacks promotes it;
//   - the DRAM level keeps a few slots free by evicting in the background (refill), so
//     a miss seldom waits for the eviction, write-back and demotion its slot costs.
//
// A request's pieces (one per line) run concurrently; the request reports only after
// every piece has settled (settle.ts), so no piece still uses its buffer when the caller
// hears of a failure. When the DRAM level cannot give a slot (its extents were all taken
// back, or every line it could evict holds dirty data the data store refuses), a piece
// goes to the data store directly, under the same line lock, dropping any flash copy a
// write makes stale.

import { asError } from '../../errors.js';
import type { Logger } from '../../logger.js';
import type { MediumName } from '../../kinds.js';
import type { Medium } from '../../memory/medium.js';
import type { PartitionTable } from '../../memory/partition-table.js';
import type { CacheStats } from '../../protocol/admin/api.js';
import type { Extent } from '../../protocol/nbd/codec.js';
import { KeyedLock } from '../keyed-lock.js';
import { settleAll } from '../../settle.js';
import type { CacheViews, VolumeIo } from '../volume-io.js';
import type { Volume } from '../volume-manager.js';
import { ALL_SECTORS, LINE_SIZE, Line, SECTOR_SIZE, fullSectorMask, highestBit, lowestBit, pieces, sectorMask } from './line.js';
import { Replacement } from './replacement.js';
import { SlotPool } from './slots.js';
import { WriteBack } from './write-back.js';

export type { CacheStats };
export const CACHE_OWNER = 'cache';
/** Lines a zeroing works on at once. */
const ZERO_BATCH = 64;
/** Lines a read may span and still take the synchronous hit path (readNow): 1 MiB. */
const READ_NOW_LINES = 16;
/** Contiguous bytes written before a run counts as a sequential stream (see streaming). */
const STREAM_MIN = 8 * 1024 * 1024;

export interface CacheOptions {
  partition: PartitionTable;
  media: readonly Medium[];
  log: Logger;
  /** Dirty data older than this is destaged (ms). */
  maxDirtyAgeMs: number;
  /** Start destaging when dirty bytes pass this share of the DRAM level, down to the low mark. */
  highWatermark?: number;
  lowWatermark?: number;
  /** Accesses within which repeated hits on a line count as one reference (replacement.ts). */
  correlationWindow?: number;
  /** How often the destager looks for due lines (ms); 0 leaves it to explicit destage() calls. */
  destageIntervalMs?: number;
  /** Contiguous bytes written before a run counts as a sequential stream (default 8 MiB; see streaming). */
  streamMinBytes?: number;
}

interface Level {
  medium: Medium;
  slots: SlotPool<Line>;
}

/** A piece's work on its cached line, and the same work when no DRAM slot exists. */
type OnLine = (line: Line) => Promise<void>;
type Direct = () => Promise<void>;

export class StorageCache implements VolumeIo {
  /** Dirty data reaches a store only through WriteBack.destage, which calls Volume.logBarrier first. */
  readonly writeAhead = true;
  private readonly options: CacheOptions;
  private readonly levels: Map<MediumName, Level>;
  private readonly lines: Map<string, Line>;
  private readonly policy: Replacement<Line>;
  private readonly writeBack: WriteBack;
  private readonly locks: KeyedLock<string>;
  private readonly ids: WeakMap<Volume, number>;
  private nextId: number;
  private readonly counters: { hits: number; flashHits: number; flashReadsNow: number; viewReads: number; writesNow: number; misses: number; stagedBytes: number; evictions: number; promotions: number; demotions: number };
  private timer: NodeJS.Timeout | undefined;
  /** The background eviction that keeps DRAM slots free ahead of misses, while it runs. */
  private refilling: Promise<void> | undefined;
  /** Scratch list of readNow (kept to avoid an allocation per read). */
  private readonly hitLines: Line[];
  /** Per volume, the end of its last write and the contiguous bytes that led up to it. */
  private readonly streams: WeakMap<Volume, { end: number; bytes: number }>;
  /** No background eviction before this time (Date.now()), after one failed. */
  private refillAfter: number;
  /** stop() has begun: no background eviction any more. */
  private stopping: boolean;

  constructor(options: CacheOptions) {
    this.options = options;
    this.levels = new Map();
    this.lines = new Map();
    this.policy = new Replacement(options.correlationWindow ?? 64);
    this.locks = new KeyedLock();
    this.ids = new WeakMap();
    this.nextId = 1;
    this.counters = { hits: 0, flashHits: 0, flashReadsNow: 0, viewReads: 0, writesNow: 0, misses: 0, stagedBytes: 0, evictions: 0, promotions: 0, demotions: 0 };
    this.timer = undefined;
    this.refilling = undefined;
    this.refillAfter = 0;
    this.stopping = false;
    this.hitLines = [];
    this.streams = new WeakMap();
    this.writeBack = new WriteBack({
      log: options.log,
      maxDirtyAgeMs: options.maxDirtyAgeMs,
      highWatermark: options.highWatermark ?? 0.5,
      lowWatermark: options.lowWatermark ?? 0.25,
      capacity: () => (this.levels.get('dram')?.slots.slots ?? 0) * LINE_SIZE,
      mediumOf: (line) => this.level(line.medium).medium,
      lock: (line, fn) => this.locks.run(line.key, fn),
      live: (line) => this.live(line),
    });
  }

  /** Takes the idle cache extents of each medium as line slots, registers the reclaimer, starts the destager. */
  start(): void {
    this.stopping = false;
    for (const medium of this.options.media) {
      this.levels.set(medium.name, { medium, slots: new SlotPool(medium.name, this.options.partition.extentSize(medium.name)) });
      this.adopt(medium.name);
    }
    this.options.partition.setReclaimer(CACHE_OWNER, (request) => this.reclaim(request.medium, request.extents));
    const interval = this.options.destageIntervalMs ?? 200;
    if (interval > 0) {
      this.timer = setInterval(() => {
        void this.destage();
      }, interval);
      this.timer.unref();
    }
  }

  /** Destages everything it can and hands every extent back. */
  async stop(): Promise<void> {
    if (this.timer !== undefined) clearInterval(this.timer);
    this.timer = undefined;
    this.options.partition.removeReclaimer(CACHE_OWNER);
    // No background eviction starts from here on (a request still running may take a slot).
    this.stopping = true;
    await this.refilling;
    await this.writeBack.idle();
    for (const volume of this.writeBack.volumes()) {
      try {
        await this.writeBack.flush(volume);
      } catch (error) {
        this.options.log.error({ volume: volume.name, err: error }, 'dirty cache data of the volume could not be written back at stop; it is lost');
      }
    }
    for (const [name, level] of this.levels) {
      const extents = level.slots.extents();
      if (extents.length > 0) this.options.partition.release(name, extents, CACHE_OWNER);
    }
    this.levels.clear();
    this.lines.clear();
    this.policy.clear();
  }

  /** Runs the destager once now (the timer does this every destageIntervalMs). */
  destage(now = Date.now()): Promise<void> {
    return this.writeBack.destageDue(now);
  }

  stats(): CacheStats {
    return {
      ...this.counters,
      destagedBytes: this.writeBack.bytesDestaged,
      writeBackFailures: this.writeBack.failedWriteBacks,
      dirtyBytes: this.writeBack.dirtyBytes(),
      lines: { dram: this.policy.dramLines, flash: this.policy.flashLines },
      slots: { dram: this.levels.get('dram')?.slots.slots ?? 0, flash: this.levels.get('flash')?.slots.slots ?? 0 },
      pinnedSlots: this.levels.get('dram')?.slots.pinnedSlots ?? 0,
    };
  }

  /** Where each cached line lives (tests and diagnostics): medium and slot offset. */
  residents(): { volume: string; index: number; medium: MediumName; slot: number; dirty: boolean }[] {
    return [...this.lines.values()].map((l) => ({ volume: l.volume.name, index: l.index, medium: l.medium, slot: l.slot, dirty: l.dirty !== 0 }));
  }

  // ---- VolumeIo ----

  read(volume: Volume, offset: number, target: Buffer): Promise<void> {
    return settleAll(
      pieces(offset, target.length).map(async ({ index, within, length, at }) => {
        const part = target.subarray(at, at + length);
        if (await this.readFromFlash(volume, index, within, part)) return;
        return this.withLine(
          volume,
          index,
          (line) => this.readLine(line, within, part),
          () => volume.store.read(index * LINE_SIZE + within, part),
        );
      }),
    );
  }

  /**
   * The read-hit path without a promise or a lock: a read of up to READ_NOW_LINES lines
   * whose copies in DRAM, or in flash where that medium reads synchronously now, hold
   * every sector it needs, valid, while nobody holds their locks. Every change of a
   * line's bytes, bits or slot (write, stage, destage, eviction, demotion, promotion,
   * zeroing, reclaim) runs under its lock, and a write to a slot has completed before
   * its lock is let go, so with the locks free the slots hold the lines' current bytes
   * for the whole copy, which is synchronous. False: use read() (nothing qualified, or
   * a medium declined part way: `target` may hold part of a copy).
   */
  readNow(volume: Volume, offset: number, target: Buffer): boolean {
    const dram = this.levels.get('dram')?.medium;
    const flash = this.levels.get('flash')?.medium;
    if (dram?.readSync === undefined) return false;
    // Every line first (nothing is copied unless all of them qualify), then the copies:
    // all synchronous, so nothing can change in between.
    const found = this.hitLines;
    if (!this.linesHit(volume, offset, target.length, flash?.readSync !== undefined)) return false;
    try {
      for (const line of found) {
        const start = Math.max(offset, line.index * LINE_SIZE);
        const end = Math.min(offset + target.length, (line.index + 1) * LINE_SIZE);
        const medium = line.medium === 'dram' ? dram : flash;
        medium?.readSync?.(line.slot + (start - line.index * LINE_SIZE), target.subarray(start - offset, end - offset));
      }
    } catch {
      // A medium declined (FlashMedium.readSync while its reads are slow): read() takes it.
      found.length = 0;
      return false;
    }
    this.countHits(found);
    return true;
  }

  /**
   * A read answered with the DRAM level's own memory instead of a copy: the views of the
   * lines the range covers whole, each line's slot pinned until `release` (so a slot
   * given back meanwhile is not handed to another line: slots.ts), and copies of the
   * parts of lines at its ends. So what a loan keeps alive is never more than the range
   * (a view keeps its chunk, one line, alive: dram-medium.ts). Undefined unless every
   * line of the range is in DRAM with the range's sectors valid and nobody holds its lock
   * (as readNow), and while clients that do not read their replies would keep more than
   * a quarter of the level's slots out of use. For a READ reply the socket sends as it
   * is: the bytes are the line's when the socket copies them, so a WRITE of the same
   * range that completes before that shows in it (NBD orders no two requests in
   * flight), and no other volume's bytes ever do.
   */
  readViews(volume: Volume, offset: number, length: number): CacheViews | undefined {
    const level = this.levels.get('dram');
    if (level?.medium.view === undefined || level.medium.readSync === undefined || !this.linesHit(volume, offset, length, false)) return undefined;
    const found = this.hitLines;
    const { slots, medium } = level;
    const whole = found.filter((line) => offset <= line.index * LINE_SIZE && (line.index + 1) * LINE_SIZE <= offset + length).length;
    if (whole === 0 || (slots.pinnedSlots + whole) * 4 > slots.activeSlots) {
      found.length = 0;
      return undefined;
    }
    const buffers: Buffer[] = [];
    const lent: Line[] = [];
    for (const line of found) {
      const start = Math.max(offset, line.index * LINE_SIZE);
      const end = Math.min(offset + length, (line.index + 1) * LINE_SIZE);
      const at = line.slot + (start - line.index * LINE_SIZE);
      if (end - start < LINE_SIZE) {
        const copy = Buffer.allocUnsafe(end - start);
        medium.readSync?.(at, copy);
        buffers.push(copy);
        continue;
      }
      const view = medium.view?.(at, LINE_SIZE);
      if (view === undefined) {
        found.length = 0;
        return undefined;
      }
      buffers.push(view);
      lent.push(line);
    }
    const pins = lent.map((line) => slots.pin(line.slot));
    this.countHits(found);
    this.counters.viewReads++;
    let held = true;
    return {
      buffers,
      release: () => {
        if (!held) return;
        held = false;
        for (const pin of pins) slots.release(pin);
      },
    };
  }

  /**
   * Fills `hitLines` with the lines of [offset, offset + length) when every one of them
   * can answer at once: cached in DRAM (or in flash with `flash`), nobody holding its
   * lock, and valid where the request needs it: every sector of the range for a read,
   * for a write (`writing`) the sectors it covers in part (nothing to stage first).
   * False (and `hitLines` empty) otherwise.
   */
  private linesHit(volume: Volume, offset: number, length: number, flash: boolean, writing = false): boolean {
    if (length === 0) return false;
    const first = Math.floor(offset / LINE_SIZE);
    const last = Math.floor((offset + length - 1) / LINE_SIZE);
    if (last - first >= READ_NOW_LINES) return false;
    const found = this.hitLines;
    found.length = 0;
    for (let index = first; index <= last; index++) {
      const key = this.keyOf(volume, index);
      const line = this.lines.get(key);
      const from = Math.max(offset, index * LINE_SIZE) - index * LINE_SIZE;
      const to = Math.min(offset + length, (index + 1) * LINE_SIZE) - index * LINE_SIZE;
      const mask = writing ? sectorMask(from, to - from) & ~fullSectorMask(from, to - from) : sectorMask(from, to - from);
      if (line === undefined || this.locks.held(key) || (line.medium !== 'dram' && !(flash && line.medium === 'flash')) || (line.valid & mask) !== mask) {
        found.length = 0;
        return false;
      }
      found.push(line);
    }
    return true;
  }

  /** Counts the hits of a read answered at once, and empties `hitLines`. */
  private countHits(found: Line[]): void {
    for (const line of found) {
      if (line.medium === 'dram') {
        this.policy.hit(line);
      } else {
        this.policy.flashHit(line);
        this.counters.flashHits++;
        this.counters.flashReadsNow++;
      }
      this.counters.hits++;
    }
    found.length = 0;
  }

  /**
   * The write-hit path without a promise or a lock, readNow's counterpart: a write of up
   * to READ_NOW_LINES lines that are all in DRAM, nobody holding their locks, none of
   * whose sectors it covers in part is invalid (so nothing must be staged first), to a
   * volume that is not fenced, is copied into the slots and marked valid and dirty in
   * this tick. A volume's write log is the layer above's (WriteLogIo.writeNow appends the
   * record in the same turn), as it is for write().
   * Every change of a line's bytes, bits or slot runs under its lock, and a lock is held
   * from the moment it is asked for (KeyedLock.held), so with the locks free nothing is
   * under way on these lines and nothing can start before this returns: the write is as
   * one that took the locks, in an order NBD allows for requests in flight together.
   * False: nothing was written, and write() takes it (also with FUA, which a caller
   * does not bring here).
   */
  writeNow(volume: Volume, offset: number, data: Buffer): boolean {
    const dram = this.levels.get('dram')?.medium;
    if (dram?.writeSync === undefined) return false;
    try {
      volume.checkWritable();
    } catch {
      return false; // write() reports it
    }
    if (!this.linesHit(volume, offset, data.length, false, true)) return false;
    const found = this.hitLines;
    try {
      for (const line of found) {
        const start = Math.max(offset, line.index * LINE_SIZE);
        const end = Math.min(offset + data.length, (line.index + 1) * LINE_SIZE);
        const within = start - line.index * LINE_SIZE;
        dram.writeSync(line.slot + within, data.subarray(start - offset, end - offset));
        const mask = sectorMask(within, end - start);
        line.valid |= mask;
        if (line.dirty === 0) line.dirtySince = Date.now();
        line.dirty |= mask;
        this.writeBack.marked(line);
        this.policy.hit(line);
      }
    } catch {
      // The medium refused (closed at stop): write() reports it, writing the same bytes
      // again over any line written here.
      return false;
    } finally {
      found.length = 0;
    }
    // The run a sequential stream is counted by goes on (for the writes after this one);
    // its verdict does not matter here, as DRAM holds every line.
    this.streaming(volume, offset, data.length);
    this.counters.writesNow++;
    return true;
  }

  /**
   * A read whose sectors a flash line holds is served from flash, without bringing the
   * line back to DRAM: a promotion costs a DRAM slot (an eviction, and a demotion of its
   * victim: 128 KiB of copies for a 4 KiB read), which pays off only for a line read
   * again and again, and such a line, once in DRAM, stays there in Am. Writes and reads
   * of sectors the flash line lacks promote it (withLine). False: not served here.
   */
  private async readFromFlash(volume: Volume, index: number, within: number, target: Buffer): Promise<boolean> {
    const key = this.keyOf(volume, index);
    const line = this.lines.get(key);
    const mask = sectorMask(within, target.length);
    if (line === undefined || line.queue !== 'flash' || (line.valid & mask) !== mask) return false;
    return this.locks.run(key, async () => {
      // The line may have been promoted, dropped or cut while we waited for its lock.
      if (!this.live(line) || line.queue !== 'flash' || (line.valid & mask) !== mask) return false;
      await this.level('flash').medium.read(line.slot + within, target);
      this.policy.flashHit(line);
      this.counters.hits++;
      this.counters.flashHits++;
      return true;
    });
  }

  async write(volume: Volume, offset: number, data: Buffer, fua: boolean): Promise<void> {
    volume.checkWritable();
    const parts = pieces(offset, data.length);
    const streaming = this.streaming(volume, offset, data.length);
    await settleAll(
      parts.map(({ index, within, length, at }) => {
        const part = data.subarray(at, at + length);
        return this.withLine(
          volume,
          index,
          (line) => this.writeLine(line, within, part),
          () => volume.store.write(index * LINE_SIZE + within, part),
          streaming,
        );
      }),
    );
    if (!fua) return;
    let failure: Error | undefined;
    for (const { index } of parts) {
      const line = this.lines.get(this.keyOf(volume, index));
      if (line === undefined) continue;
      try {
        await this.locks.run(line.key, () => this.writeBack.destage(line));
      } catch (error) {
        failure ??= asError(error);
      }
    }
    if (failure !== undefined) throw failure;
    await volume.store.sync();
  }

  flush(volume: Volume): Promise<void> {
    return this.writeBack.flush(volume);
  }

  async zero(volume: Volume, offset: number, length: number, options: { fua: boolean; allocate: boolean }): Promise<void> {
    volume.checkWritable();
    // Cached sectors wholly inside the range are dropped (clean and dirty alike: the
    // zeros supersede them); sectors covered in part get zeros written like any write.
    const head = Math.min(length, (SECTOR_SIZE - (offset % SECTOR_SIZE)) % SECTOR_SIZE);
    const innerStart = offset + head;
    const innerEnd = Math.max(innerStart, offset + length - ((offset + length) % SECTOR_SIZE));
    const work: Promise<void>[] = [];
    if (head > 0) work.push(this.write(volume, offset, Buffer.alloc(head), false));
    if (offset + length > innerEnd && innerEnd >= innerStart) work.push(this.write(volume, innerEnd, Buffer.alloc(offset + length - innerEnd), false));
    // Each line's part is dropped and zeroed in the store under that line's lock, so a
    // read cannot stage the old bytes in between and keep them after the zeroing. Lines
    // go ZERO_BATCH at a time, with a turn of the event loop between batches: a zeroing
    // of a whole volume neither holds a closure per line at once nor starves other work.
    const parts = pieces(innerStart, innerEnd - innerStart);
    let failure: Error | undefined;
    for (let first = 0; first < parts.length; first += ZERO_BATCH) {
      if (first > 0) await new Promise((resolve) => setImmediate(resolve));
      try {
        await settleAll(
          parts.slice(first, first + ZERO_BATCH).map(({ index, within, length: n }) =>
            this.locks.run(this.keyOf(volume, index), async () => {
              // The store first, then the cached sectors: dropped before, a dirty sector
              // would be neither in the cache nor zeroed in the store while the zeroing
              // ran, and a FLUSH meanwhile would sync a store holding older bytes than a
              // write it covers. A failed zeroing keeps the dirty data.
              await volume.store.zeroRange(index * LINE_SIZE + within, n, options.allocate);
              const line = this.lines.get(this.keyOf(volume, index));
              if (line !== undefined && this.live(line)) this.clearSectors(line, sectorMask(within, n));
            }),
          ),
        );
      } catch (error) {
        failure = asError(error);
        break;
      }
    }
    await settleAll(work);
    if (failure !== undefined) throw failure;
    if (options.fua) await this.flush(volume);
  }

  async prefetch(volume: Volume, offset: number, length: number): Promise<void> {
    for (const { index, within, length: n } of pieces(offset, length)) {
      await this.withLine(volume, index, (line) => this.stage(line, sectorMask(within, n)), () => Promise.resolve());
    }
  }

  blockStatus(volume: Volume, offset: number, length: number): Extent[] {
    // Dirty cached data makes a hole in the store data: report those lines as data. The
    // volume's dirty lines are few (they fit in the cache), so they are listed, not looked up.
    const extents = volume.store.blockStatus(offset, length);
    const dirty = this.writeBack.dirtyIndexes(volume, Math.floor(offset / LINE_SIZE), Math.ceil((offset + length) / LINE_SIZE));
    if (dirty.length === 0) return extents;
    const result: Extent[] = [];
    const push = (n: number, flags: number): void => {
      const last = result[result.length - 1];
      if (last !== undefined && last.flags === flags) last.length += n;
      else result.push({ length: n, flags });
    };
    let at = offset;
    let d = 0;
    for (const extent of extents) {
      let pos = at;
      const end = at + extent.length;
      while (pos < end) {
        while (d < dirty.length && ((dirty[d] ?? 0) + 1) * LINE_SIZE <= pos) d++;
        const next = dirty[d];
        if (next === undefined || next * LINE_SIZE >= end) {
          push(end - pos, extent.flags);
          pos = end;
        } else if (next * LINE_SIZE > pos) {
          push(next * LINE_SIZE - pos, extent.flags);
          pos = next * LINE_SIZE;
        } else {
          const n = Math.min((next + 1) * LINE_SIZE, end) - pos;
          push(n, 0);
          pos += n;
        }
      }
      at = end;
    }
    return result;
  }

  /**
   * Drops a volume's cached data from `fromOffset` on without writing it back (the volume
   * is removed, or shrunk to `fromOffset`). A line that straddles the new end keeps its
   * sectors below it, dirty ones included.
   */
  async forget(volume: Volume, fromOffset = 0): Promise<void> {
    const firstSector = Math.ceil(fromOffset / SECTOR_SIZE);
    for (const line of [...this.lines.values()]) {
      if (line.volume !== volume || (line.index + 1) * LINE_SIZE <= fromOffset) continue;
      await this.locks.run(line.key, () => {
        if (!this.live(line)) return Promise.resolve();
        const keep = Math.max(0, firstSector - line.index * (LINE_SIZE / SECTOR_SIZE));
        this.clearSectors(line, ALL_SECTORS & ~((1 << keep) - 1));
        return Promise.resolve();
      });
    }
  }

  // ---- lines ----

  private keyOf(volume: Volume, index: number): string {
    let id = this.ids.get(volume);
    if (id === undefined) {
      id = this.nextId++;
      this.ids.set(volume, id);
    }
    return `${id}:${index}`;
  }

  private live(line: Line): boolean {
    return this.lines.get(line.key) === line;
  }

  /**
   * Runs `onLine` on the DRAM line of (volume, index) under its lock, admitting or
   * promoting the line first in the same hold of the lock (so no other request can evict
   * it between its arrival in DRAM and this request's work); or `direct` under the same
   * lock when DRAM has no slot to give.
   */
  private async withLine(volume: Volume, index: number, onLine: OnLine, direct: Direct, stream = false): Promise<void> {
    const key = this.keyOf(volume, index);
    for (;;) {
      const line = this.lines.get(key);
      // A write of a sequential stream that would only churn the cache: straight to the
      // store, unless DRAM holds the line (then the cached copy takes the write).
      if (stream && (line === undefined || line.queue === 'flash')) return this.locks.run(key, () => this.directly(key, onLine, direct));
      if (line !== undefined && line.queue !== 'flash') {
        this.policy.hit(line);
        const ran = await this.locks.run(key, async () => {
          // The line may have been evicted or demoted while we waited for its lock.
          if (!this.live(line) || line.queue === 'flash') return false;
          await onLine(line);
          return true;
        });
        if (ran) return;
        continue;
      }
      // Take the DRAM slot before any line lock: evicting for it takes other locks.
      // Without one (no DRAM level, or every line it could evict holds dirty data the
      // store refuses), the piece goes to the data store, whose error is then the caller's.
      let slot: number | undefined;
      try {
        slot = await this.takeSlot('dram');
      } catch {
        slot = undefined;
      }
      if (slot === undefined) return this.locks.run(key, () => this.directly(key, onLine, direct));
      const taken = slot;
      return this.locks.run(key, async () => {
        const current = this.lines.get(key);
        if (current === undefined) {
          const fresh = new Line(volume, index, key, 'dram', taken);
          this.lines.set(key, fresh);
          this.level('dram').slots.home(taken, fresh);
          this.policy.admitted(fresh);
          return onLine(fresh);
        }
        if (current.queue === 'flash') {
          await this.promote(current, taken);
          return onLine(current);
        }
        // Another request brought the line to DRAM while this one waited.
        this.level('dram').slots.give(taken);
        this.policy.hit(current);
        return onLine(current);
      });
    }
  }

  /**
   * Whether a write continues a sequential stream longer than the DRAM level (and at
   * least STREAM_MIN) while that level is full (its lines take every slot but the few the
   * refill keeps free): such a stream would evict, destage and demote a line for every
   * line it writes, its own earlier lines first, and never be read from the cache. Its
   * writes go to the data store instead (the page cache bounds the dirty data; FLUSH and
   * FUA sync the store as for any write), at the cost of a miss if it is read back soon.
   * Volumes with a write log keep every write in the cache (their records must reach
   * the journal before their data reaches the store).
   */
  private streaming(volume: Volume, offset: number, length: number): boolean {
    let run = this.streams.get(volume);
    if (run === undefined) {
      run = { end: -1, bytes: 0 };
      this.streams.set(volume, run);
    }
    run.bytes = offset === run.end ? run.bytes + length : length;
    run.end = offset + length;
    const dram = this.levels.get('dram');
    if (dram === undefined || volume.writeLog !== undefined) return false;
    // Longer than the whole DRAM level: caching it would only evict itself. A shorter run
    // (a ring log rewritten in place, say) stays in the cache, however full.
    const level = dram.slots.slots * LINE_SIZE;
    if (run.bytes < Math.max(this.options.streamMinBytes ?? STREAM_MIN, level)) return false;
    return this.policy.dramLines + Math.min(64, dram.slots.slots >> 6) >= dram.slots.slots;
  }

  /**
   * The data-store path, under the line's lock. A DRAM line admitted meanwhile by another
   * request takes the work instead; a flash copy the work may make stale is dropped.
   */
  private async directly(key: string, onLine: OnLine, direct: Direct): Promise<void> {
    const line = this.lines.get(key);
    if (line !== undefined && line.queue !== 'flash') return onLine(line);
    if (line !== undefined) this.drop(line);
    await direct();
  }

  private async readLine(line: Line, within: number, target: Buffer): Promise<void> {
    const mask = sectorMask(within, target.length);
    if ((line.valid & mask) === mask) this.counters.hits++;
    else {
      this.counters.misses++;
      await this.stage(line, mask);
    }
    await this.level(line.medium).medium.read(line.slot + within, target);
  }

  private async writeLine(line: Line, within: number, data: Buffer): Promise<void> {
    const mask = sectorMask(within, data.length);
    // Sectors the write covers only in part must hold their other bytes first.
    const partial = mask & ~fullSectorMask(within, data.length) & ~line.valid;
    if (partial !== 0) await this.stage(line, partial);
    await this.level(line.medium).medium.write(line.slot + within, data);
    line.valid |= mask;
    if (line.dirty === 0) line.dirtySince = Date.now();
    line.dirty |= mask;
    this.writeBack.marked(line);
  }

  /** Reads the sectors of `mask` that are not valid from the data store into the slot (FIG. 21). */
  private async stage(line: Line, mask: number): Promise<void> {
    const missing = mask & ~line.valid;
    if (missing === 0) return;
    const first = lowestBit(missing);
    const last = highestBit(missing);
    const start = line.index * LINE_SIZE + first * SECTOR_SIZE;
    const span = (last - first + 1) * SECTOR_SIZE;
    const length = Math.min(span, Math.max(0, line.volume.size - start));
    // What lies past the end of the volume (its last partial sector, or a whole span when
    // the volume shrank while this request waited for a slot) is written as zeros, as the
    // store reads it after a grow: a sector marked valid never keeps what the slot held
    // before, another volume's bytes perhaps.
    const buf = Buffer.allocUnsafe(span);
    if (length > 0) await line.volume.store.read(start, buf.subarray(0, length));
    buf.fill(0, length);
    // Sectors already valid inside the span (possibly dirty) keep their cached bytes.
    const medium = this.level(line.medium).medium;
    for (let s = first; s <= last; s++) {
      if ((missing & (1 << s)) === 0) continue;
      const from = (s - first) * SECTOR_SIZE;
      await medium.write(line.slot + s * SECTOR_SIZE, buf.subarray(from, from + SECTOR_SIZE));
    }
    line.valid |= missing;
    this.counters.stagedBytes += length;
  }

  /** Drops sectors of a line without writing them back; a line left with none is dropped (caller holds its lock). */
  private clearSectors(line: Line, mask: number): void {
    line.valid &= ~mask;
    line.dirty &= ~mask;
    this.writeBack.updated(line);
    if (line.valid === 0) this.drop(line);
  }

  // ---- slots, eviction, levels ----

  /**
   * A free slot of a level, evicting lines until one is free; undefined when the level
   * has no slots at all. Every eviction frees a slot for someone, so concurrent callers
   * all make progress. A victim whose dirty data cannot be written back stays, and is
   * skipped; when nothing else can be evicted the write-back error is the caller's.
   */
  private async takeSlot(medium: MediumName): Promise<number | undefined> {
    const level = this.levels.get(medium);
    if (level === undefined) return undefined;
    let stuck: Set<Line> | undefined;
    let failure: Error | undefined;
    for (;;) {
      const slot = level.slots.take();
      if (slot !== undefined) {
        if (medium === 'dram') this.refill(level);
        return slot;
      }
      if (this.adopt(medium) > 0) continue;
      // Extents being drained hand out nothing: a level with only those has no slot.
      if (level.slots.activeSlots === 0) return undefined;
      const skip = stuck === undefined ? undefined : (line: Line): boolean => stuck?.has(line) === true;
      const victim = medium === 'dram' ? this.policy.dramVictim(skip) : this.policy.flashVictim(skip);
      if (victim !== undefined) {
        try {
          await this.locks.run(victim.key, () => this.evict(victim, medium));
        } catch (error) {
          failure ??= asError(error);
          (stuck ??= new Set()).add(victim);
        }
        continue;
      }
      if (failure !== undefined) throw failure;
      // Slots parked under replies still being sent (readViews) come back only when the
      // clients read: the piece goes to the data store rather than wait for them.
      if (level.slots.homeless === 0) return undefined;
      // Every other slot is between its taker and its line: wait for one to come back.
      await level.slots.changed();
    }
  }

  /**
   * Keeps a few DRAM slots free ahead of the misses that will need them: when the free
   * slots fall below a low mark, evicts (destaging and demoting, as takeSlot would) in
   * the background up to a high mark, so a miss does not wait behind the eviction its
   * slot costs. One refill runs at a time; a cache of fewer than 256 slots keeps none
   * (its every line counts). A victim that cannot be evicted (its write-back fails) ends
   * the refill, and none starts for a second: takeSlot then evicts inline and reports
   * the error to its caller.
   */
  private refill(level: Level): void {
    const high = Math.min(64, level.slots.slots >> 6);
    if (high < 4 || this.stopping || this.refilling !== undefined || level.slots.freeSlots >= high >> 1 || Date.now() < this.refillAfter) return;
    this.refilling = (async () => {
      while (level.slots.freeSlots < high && !this.stopping && this.levels.get('dram') === level) {
        const victim = this.policy.dramVictim((line) => this.locks.held(line.key));
        if (victim === undefined) return;
        await this.locks.run(victim.key, () => this.evict(victim, 'dram'));
      }
    })()
      .catch((error: unknown) => {
        // Most likely a write-back the store refuses: let misses evict (and report) for a second.
        this.refillAfter = Date.now() + 1000;
        this.options.log.debug({ err: error }, 'background eviction stopped; misses evict for themselves');
      })
      .finally(() => {
        this.refilling = undefined;
      });
  }

  /**
   * Evicts a line (caller holds its lock): destage if dirty; a clean DRAM line moves to
   * flash if a flash slot can be had at once, and is dropped otherwise. The holder of a
   * DRAM line's lock never waits on the flash level (a flash reclaim may be waiting for
   * that very lock), so demotion takes only a free slot or one a flash line whose lock
   * is free gives up on the spot.
   *
   * `from` is the level the caller evicts from. Takers racing for a slot often pick the
   * same victim; the first demotes it, and by the time the others hold its lock it lives
   * in flash, which is not theirs to empty (dropping it there emptied the flash level as
   * fast as it filled).
   */
  private async evict(line: Line, from: MediumName): Promise<void> {
    if (!this.live(line) || line.medium !== from) return;
    await this.writeBack.destage(line);
    if (line.medium === 'dram' && line.valid !== 0 && this.live(line)) {
      const slot = await this.flashSlotNow();
      if (slot !== undefined) {
        const dram = this.level('dram');
        const flash = this.level('flash');
        try {
          await copySlot(dram.medium, line.slot, flash.medium, slot);
        } catch (error) {
          flash.slots.give(slot);
          throw error;
        }
        this.policy.demoted(line);
        dram.slots.give(line.slot);
        line.medium = 'flash';
        line.slot = slot;
        flash.slots.home(slot, line);
        this.counters.demotions++;
        this.counters.evictions++;
        return;
      }
    }
    if (line.medium === 'dram') this.policy.evictedFromDram(line);
    else this.policy.removed(line);
    this.forgetLine(line);
    this.counters.evictions++;
  }

  /** A flash slot without waiting: a free one, an adopted one, or the slot of a flash line nobody holds. */
  private async flashSlotNow(): Promise<number | undefined> {
    const level = this.levels.get('flash');
    if (level === undefined || level.slots.activeSlots === 0) return undefined;
    for (;;) {
      const slot = level.slots.take();
      if (slot !== undefined) return slot;
      if (this.adopt('flash') > 0) continue;
      const victim = this.policy.flashVictim((l) => this.locks.held(l.key));
      if (victim === undefined) return undefined;
      // Nobody holds the victim's lock, so this run starts at once; dropping a clean flash line does no I/O.
      await this.locks.run(victim.key, () => {
        if (this.live(victim) && victim.queue === 'flash') {
          this.policy.removed(victim);
          this.forgetLine(victim);
          this.counters.evictions++;
        }
        return Promise.resolve();
      });
    }
  }

  /** Brings a flash line back to DRAM into `slot`, as a line known to be reused (caller holds its lock). */
  private async promote(line: Line, slot: number): Promise<void> {
    const dram = this.level('dram');
    if (!this.live(line) || line.queue !== 'flash') {
      dram.slots.give(slot);
      return;
    }
    const flash = this.level('flash');
    try {
      await copySlot(flash.medium, line.slot, dram.medium, slot);
    } catch (error) {
      dram.slots.give(slot);
      throw error;
    }
    flash.slots.give(line.slot);
    line.medium = 'dram';
    line.slot = slot;
    dram.slots.home(slot, line);
    this.policy.promoted(line);
    this.counters.promotions++;
  }

  /** Removes a line from the cache without a trace; its dirty data is discarded (caller holds its lock). */
  private drop(line: Line): void {
    if (!this.live(line)) return;
    line.dirty = 0;
    this.writeBack.updated(line);
    this.policy.removed(line);
    this.forgetLine(line);
  }

  private forgetLine(line: Line): void {
    this.lines.delete(line.key);
    this.level(line.medium).slots.give(line.slot);
  }

  private level(medium: MediumName): Level {
    const level = this.levels.get(medium);
    if (level === undefined) throw new Error(`no ${medium} cache level`);
    return level;
  }

  /** Takes every idle cache extent of a medium as slots; returns how many slots were added. */
  private adopt(medium: MediumName): number {
    const level = this.levels.get(medium);
    const idle = this.options.partition.extents(medium).idleOf('cache');
    if (level === undefined || idle === 0) return 0;
    const extentSize = this.options.partition.extentSize(medium);
    const extents = this.options.partition.assign(medium, 'cache', CACHE_OWNER, idle * extentSize);
    const added = level.slots.add(extents);
    if (medium === 'dram') this.policy.resize(level.slots.slots);
    return added;
  }

  /**
   * The partition table wants `count` extents of `medium` back. The chosen extents are
   * drained (see the top of this file), zeroed, and only then handed over. A dirty line
   * that cannot be written back fails the reclaim, and the extents stay the cache's.
   */
  private async reclaim(medium: MediumName, count: number): Promise<number[]> {
    const level = this.levels.get(medium);
    if (level === undefined) return [];
    const chosen = level.slots.pick(count);
    if (chosen.length === 0) return [];
    const inChosen = new Set(chosen);
    level.slots.startDrain(chosen);
    try {
      while (!level.slots.drained(chosen)) {
        const resident = level.slots.linesIn(chosen);
        for (const line of resident) {
          // A line that has moved since the list was made is not this reclaim's to wait for.
          if (!this.live(line) || line.medium !== medium || !inChosen.has(level.slots.extentOf(line.slot))) continue;
          await this.locks.run(line.key, async () => {
            if (!this.live(line) || line.medium !== medium || !inChosen.has(level.slots.extentOf(line.slot))) return;
            if (medium === 'dram') {
              await this.evict(line, medium);
            } else {
              this.policy.removed(line);
              this.forgetLine(line);
              this.counters.evictions++;
            }
          });
        }
        // Slots taken but not yet home to a line: wait until they are homed or given back.
        if (resident.length === 0 && !level.slots.drained(chosen)) await level.slots.changed();
      }
      const extentSize = this.options.partition.extentSize(medium);
      for (const e of chosen) await level.medium.zero(e * extentSize, extentSize);
    } catch (error) {
      level.slots.undrain(chosen);
      throw error;
    }
    level.slots.remove(chosen);
    if (medium === 'dram') this.policy.resize(level.slots.slots);
    this.options.log.info({ medium, extents: chosen.length }, 'cache gave extents back to the partition table');
    return chosen;
  }
}

async function copySlot(from: Medium, fromSlot: number, to: Medium, toSlot: number): Promise<void> {
  const buf = Buffer.allocUnsafe(LINE_SIZE);
  await from.read(fromSlot, buf);
  await to.write(toSlot, buf);
}
