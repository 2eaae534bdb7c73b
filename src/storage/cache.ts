// The storage cache (DESIGN 4.2, patent FIG. 20-21): write-back caching of volumes in
// the `cache` partition, DRAM first, flash second.
//
//   volume offset -> line (64 KiB) -> 16 sectors of 4 KiB, each with a valid and a dirty bit
//
//   DRAM level   slots in the cache extents of the dram medium; 2Q replacement:
//                  A1in  lines seen once (FIFO, a quarter of the slots)
//                  Am    lines seen again (LRU)
//                  A1out ghosts of lines that left A1in (keys only)
//                a one-pass scan goes through A1in and out again without touching Am
//   flash level  slots in the cache extents of the flash medium, holding clean lines
//                evicted from DRAM (LRU); a DRAM miss that finds its line here takes it
//                back (promotion)
//
// Reads stage only the sectors they miss from the data store (FIG. 21); writes land in
// the DRAM slot and are acknowledged (FIG. 20), staging a sector first only when they
// cover part of it. Dirty sectors go back to the data store in line order: by the
// destager when dirty bytes pass the high watermark or a line has been dirty for longer
// than the maximum age, before a dirty line is evicted, and all of a volume's on FLUSH
// (FUA: the lines the write touched), each followed by fdatasync of the store.
//
// Every operation on a line holds that line's lock, so staging, writing, destaging and
// eviction of one line never interleave. The partition table can take extents back:
// the reclaimer evicts (destaging first) every line in the extents it hands over.

import type { Logger } from '../logger.js';
import type { Extent } from '../protocol/nbd/codec.js';
import type { MediumName } from '../kinds.js';
import type { Medium } from '../memory/medium.js';
import type { PartitionTable } from '../memory/partition-table.js';
import type { VolumeIo } from './volume-io.js';
import type { Volume } from './volume-manager.js';
import type { CacheStats } from '../protocol/admin/api.js';
export type { CacheStats };

export const LINE_SIZE = 64 * 1024;
export const SECTOR_SIZE = 4096;
const SECTORS = LINE_SIZE / SECTOR_SIZE;
const ALL = (1 << SECTORS) - 1;
export const CACHE_OWNER = 'cache';

export interface CacheOptions {
  partition: PartitionTable;
  media: readonly Medium[];
  log: Logger;
  /** Dirty data older than this is destaged (ms). */
  maxDirtyAgeMs: number;
  /** Start destaging when dirty bytes pass this share of the DRAM level, down to the low mark. */
  highWatermark?: number;
  lowWatermark?: number;
}

type Queue = 'a1in' | 'am' | 'flash';

class Line {
  readonly volume: Volume;
  readonly index: number;
  readonly key: string;
  medium: MediumName;
  slot: number;
  valid: number;
  dirty: number;
  dirtySince: number;
  queue: Queue;

  constructor(volume: Volume, index: number, medium: MediumName, slot: number, queue: Queue) {
    this.volume = volume;
    this.index = index;
    this.key = lineKey(volume, index);
    this.medium = medium;
    this.slot = slot;
    this.valid = 0;
    this.dirty = 0;
    this.dirtySince = 0;
    this.queue = queue;
  }
}

interface Level {
  medium: Medium;
  free: number[];
  extents: Set<number>;
  slots: number;
}

function lineKey(volume: Volume, index: number): string {
  return `${volume.name}\u0000${index}`;
}

export class StorageCache implements VolumeIo {
  private readonly options: CacheOptions;
  private readonly levels: Map<MediumName, Level>;
  private readonly lines: Map<string, Line>;
  private readonly a1in: Map<string, Line>;
  private readonly am: Map<string, Line>;
  private readonly a1out: Map<string, true>;
  private readonly flashLru: Map<string, Line>;
  private readonly dirtyLines: Set<Line>;
  private readonly counters: Omit<CacheStats, 'dirtyBytes' | 'lines' | 'slots'>;
  /** Per (volume, line index) lock chains, whether or not the line is cached. */
  private readonly locks: Map<string, Promise<void>>;
  private timer: NodeJS.Timeout | undefined;
  private destaging: Promise<void> | undefined;

  constructor(options: CacheOptions) {
    this.options = options;
    this.levels = new Map();
    this.lines = new Map();
    this.a1in = new Map();
    this.am = new Map();
    this.a1out = new Map();
    this.flashLru = new Map();
    this.dirtyLines = new Set();
    this.counters = { hits: 0, misses: 0, stagedBytes: 0, destagedBytes: 0, evictions: 0, promotions: 0, demotions: 0 };
    this.locks = new Map();
    this.timer = undefined;
    this.destaging = undefined;
  }

  /** Takes the idle cache extents of each medium as line slots, registers the reclaimer, starts the destager. */
  start(): void {
    for (const medium of this.options.media) {
      this.levels.set(medium.name, { medium, free: [], extents: new Set(), slots: 0 });
      this.adopt(medium.name);
    }
    this.options.partition.setReclaimer(CACHE_OWNER, (request) => this.reclaim(request.medium, request.extents));
    this.timer = setInterval(() => {
      void this.destageDue();
    }, 200);
    this.timer.unref();
  }

  /** Destages everything and hands every extent back. */
  async stop(): Promise<void> {
    if (this.timer !== undefined) clearInterval(this.timer);
    this.options.partition.removeReclaimer(CACHE_OWNER);
    await this.destaging;
    const volumes = new Set([...this.dirtyLines].map((l) => l.volume));
    for (const volume of volumes) await this.flush(volume);
    for (const [name, level] of this.levels) {
      if (level.extents.size > 0) this.options.partition.release(name, [...level.extents], CACHE_OWNER);
      level.extents.clear();
      level.free.length = 0;
      level.slots = 0;
    }
    this.lines.clear();
    this.a1in.clear();
    this.am.clear();
    this.a1out.clear();
    this.flashLru.clear();
  }

  stats(): CacheStats {
    let dirty = 0;
    for (const line of this.dirtyLines) dirty += popcount(line.dirty) * SECTOR_SIZE;
    return {
      ...this.counters,
      dirtyBytes: dirty,
      lines: { dram: this.a1in.size + this.am.size, flash: this.flashLru.size },
      slots: { dram: this.levels.get('dram')?.slots ?? 0, flash: this.levels.get('flash')?.slots ?? 0 },
    };
  }

  // ---- VolumeIo ----

  async read(volume: Volume, offset: number, target: Buffer): Promise<void> {
    if (!this.usable()) return volume.store.read(offset, target);
    await Promise.all(
      this.pieces(offset, target.length).map(({ index, within, length, at }) =>
        this.withLine(volume, index, (line) => this.readLine(line, within, target.subarray(at, at + length))),
      ),
    );
  }

  async write(volume: Volume, offset: number, data: Buffer, fua: boolean): Promise<void> {
    if (!this.usable()) {
      await volume.store.write(offset, data);
      if (fua) await volume.store.sync();
      return;
    }
    const pieces = this.pieces(offset, data.length);
    await Promise.all(pieces.map(({ index, within, length, at }) => this.withLine(volume, index, (line) => this.writeLine(line, within, data.subarray(at, at + length)))));
    if (fua) {
      for (const { index } of pieces) {
        const line = this.lines.get(lineKey(volume, index));
        if (line !== undefined) await this.locked(line, () => this.destageLine(line));
      }
      await volume.store.sync();
    }
  }

  async flush(volume: Volume): Promise<void> {
    const dirty = [...this.dirtyLines].filter((l) => l.volume === volume).sort((a, b) => a.index - b.index);
    for (const line of dirty) await this.locked(line, () => this.destageLine(line));
    await volume.store.sync();
  }

  async zero(volume: Volume, offset: number, length: number, options: { fua: boolean; allocate: boolean }): Promise<void> {
    // Cached sectors wholly inside the range are dropped (clean and dirty alike: the
    // zeros supersede them); sectors covered in part get zeros written like any write.
    const head = Math.min(length, (SECTOR_SIZE - (offset % SECTOR_SIZE)) % SECTOR_SIZE);
    const innerStart = offset + head;
    const innerEnd = Math.max(innerStart, offset + length - ((offset + length) % SECTOR_SIZE));
    if (head > 0) await this.write(volume, offset, Buffer.alloc(head), false);
    if (offset + length > innerEnd && innerEnd >= innerStart) await this.write(volume, innerEnd, Buffer.alloc(offset + length - innerEnd), false);
    if (innerEnd > innerStart) {
      // Each line's part is dropped and zeroed in the store under that line's lock, so a
      // read cannot stage the old bytes in between and keep them after the zeroing.
      await Promise.all(
        this.pieces(innerStart, innerEnd - innerStart).map(({ index, within, length: n }) =>
          this.lockKey(lineKey(volume, index), async () => {
            const line = this.lines.get(lineKey(volume, index));
            if (line !== undefined) {
              const mask = sectorMask(within, n);
              line.valid &= ~mask;
              line.dirty &= ~mask;
              if (line.dirty === 0) this.dirtyLines.delete(line);
              if (line.valid === 0) this.drop(line);
            }
            await volume.store.zeroRange(index * LINE_SIZE + within, n, options.allocate);
          }),
        ),
      );
    }
    if (options.fua) await this.flush(volume);
  }

  async prefetch(volume: Volume, offset: number, length: number): Promise<void> {
    if (!this.usable()) return;
    for (const { index, within, length: n } of this.pieces(offset, length)) {
      await this.withLine(volume, index, (line) => this.stage(line, sectorMask(within, n)));
    }
  }

  blockStatus(volume: Volume, offset: number, length: number): Extent[] {
    // Dirty cached data makes a hole in the store data: report those chunks as data.
    const extents = volume.store.blockStatus(offset, length);
    if (![...this.dirtyLines].some((l) => l.volume === volume)) return extents;
    const result: Extent[] = [];
    let at = offset;
    for (const extent of extents) {
      let pos = at;
      const end = at + extent.length;
      while (pos < end) {
        const index = Math.floor(pos / LINE_SIZE);
        const n = Math.min((index + 1) * LINE_SIZE, end) - pos;
        const line = this.lines.get(lineKey(volume, index));
        const flags = line !== undefined && line.dirty !== 0 ? 0 : extent.flags;
        const last = result[result.length - 1];
        if (last !== undefined && last.flags === flags) last.length += n;
        else result.push({ length: n, flags });
        pos += n;
      }
      at = end;
    }
    return result;
  }

  /** Drops every cached line of a volume without writing it back (volume removed or shrunk). */
  async forget(volume: Volume, fromOffset = 0): Promise<void> {
    const first = Math.floor(fromOffset / LINE_SIZE);
    for (const line of [...this.lines.values()]) {
      if (line.volume !== volume || line.index < first) continue;
      await this.locked(line, async () => {
        this.dirtyLines.delete(line);
        this.drop(line);
        return Promise.resolve();
      });
    }
  }

  // ---- lines ----

  private usable(): boolean {
    return (this.levels.get('dram')?.slots ?? 0) > 0;
  }

  private pieces(offset: number, length: number): { index: number; within: number; length: number; at: number }[] {
    const pieces = [];
    let at = 0;
    while (at < length) {
      const pos = offset + at;
      const index = Math.floor(pos / LINE_SIZE);
      const within = pos - index * LINE_SIZE;
      const n = Math.min(LINE_SIZE - within, length - at);
      pieces.push({ index, within, length: n, at });
      at += n;
    }
    return pieces;
  }

  /** Finds or makes the DRAM line for (volume, index) and runs `fn` under its lock. */
  private async withLine(volume: Volume, index: number, fn: (line: Line) => Promise<void>): Promise<void> {
    for (;;) {
      let line = this.lines.get(lineKey(volume, index));
      if (line === undefined) {
        line = await this.admit(volume, index);
      } else if (line.queue === 'flash') {
        // Take the DRAM slot before the flash line's lock: evicting for it may need other
        // locks, and nothing may wait on another lock while holding this one.
        const slot = await this.takeSlot('dram');
        const flashLine = line;
        await this.locked(flashLine, () => this.promote(flashLine, slot));
      } else {
        this.touch(line);
      }
      const current = line;
      let stale = false;
      await this.locked(current, async () => {
        // The line may have been evicted or demoted while we waited for its lock.
        if (this.lines.get(current.key) !== current || current.queue === 'flash') {
          stale = true;
          return;
        }
        await fn(current);
      });
      if (!stale) return;
    }
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
    const full = fullSectorMask(within, data.length);
    const partial = mask & ~full & ~line.valid;
    if (partial !== 0) await this.stage(line, partial);
    await this.level(line.medium).medium.write(line.slot + within, data);
    line.valid |= mask;
    if (line.dirty === 0) line.dirtySince = Date.now();
    line.dirty |= mask;
    this.dirtyLines.add(line);
  }

  /** Reads the sectors of `mask` that are not valid from the data store into the slot (FIG. 21). */
  private async stage(line: Line, mask: number): Promise<void> {
    const missing = mask & ~line.valid;
    if (missing === 0) return;
    const first = lowestBit(missing);
    const last = highestBit(missing);
    const length = Math.min((last - first + 1) * SECTOR_SIZE, Math.max(0, line.volume.size - line.index * LINE_SIZE - first * SECTOR_SIZE));
    if (length <= 0) return;
    const buf = Buffer.allocUnsafe(length);
    await line.volume.store.read(line.index * LINE_SIZE + first * SECTOR_SIZE, buf);
    // Sectors already valid inside the span (possibly dirty) keep their cached bytes.
    const medium = this.level(line.medium).medium;
    for (let s = first; s <= last; s++) {
      if ((missing & (1 << s)) === 0) continue;
      const from = (s - first) * SECTOR_SIZE;
      if (from >= length) break;
      await medium.write(line.slot + s * SECTOR_SIZE, buf.subarray(from, Math.min(from + SECTOR_SIZE, length)));
    }
    line.valid |= missing;
    this.counters.stagedBytes += length;
  }

  /** Writes the dirty sectors of a line back to its volume's data store, in runs. */
  private async destageLine(line: Line): Promise<void> {
    if (line.dirty === 0 || this.lines.get(line.key) !== line) return;
    const medium = this.level(line.medium).medium;
    const base = line.index * LINE_SIZE;
    let s = 0;
    while (s < SECTORS) {
      if ((line.dirty & (1 << s)) === 0) {
        s++;
        continue;
      }
      let e = s;
      while (e + 1 < SECTORS && (line.dirty & (1 << (e + 1))) !== 0) e++;
      const length = Math.min((e - s + 1) * SECTOR_SIZE, line.volume.size - base - s * SECTOR_SIZE);
      if (length > 0) {
        const buf = Buffer.allocUnsafe(length);
        await medium.read(line.slot + s * SECTOR_SIZE, buf);
        await line.volume.store.write(base + s * SECTOR_SIZE, buf);
        this.counters.destagedBytes += length;
      }
      s = e + 1;
    }
    line.dirty = 0;
    this.dirtyLines.delete(line);
  }

  // ---- admission, replacement, levels ----

  private async admit(volume: Volume, index: number): Promise<Line> {
    const slot = await this.takeSlot('dram');
    // Another caller may have admitted the same line while we waited for a slot.
    const existing = this.lines.get(lineKey(volume, index));
    if (existing !== undefined) {
      this.level('dram').free.push(slot);
      return existing;
    }
    const key = lineKey(volume, index);
    const queue: Queue = this.a1out.delete(key) ? 'am' : 'a1in';
    const line = new Line(volume, index, 'dram', slot, queue);
    this.lines.set(key, line);
    (queue === 'am' ? this.am : this.a1in).set(key, line);
    return line;
  }

  /**
   * A hit. In A1in (seen once) the line moves to Am: it is now known to be reused. In Am
   * it becomes the most recent. Am is kept to three quarters of the slots by moving its
   * least recent line back to A1in, so new lines always have room to prove themselves.
   */
  private touch(line: Line): void {
    if (line.queue === 'a1in') {
      this.a1in.delete(line.key);
      line.queue = 'am';
    } else if (line.queue === 'am') {
      this.am.delete(line.key);
    } else {
      return;
    }
    this.am.set(line.key, line);
    const limit = Math.max(1, Math.floor((this.level('dram').slots * 3) / 4));
    if (this.am.size > limit) {
      const oldest = this.am.values().next().value;
      if (oldest !== undefined) {
        this.am.delete(oldest.key);
        oldest.queue = 'a1in';
        this.a1in.set(oldest.key, oldest);
      }
    }
  }

  /**
   * A free slot of a level, evicting lines until one is free. Every eviction frees a slot
   * for someone, so concurrent callers all make progress; only a level with no slots
   * and no lines at all has nothing to give.
   */
  private async takeSlot(medium: MediumName): Promise<number> {
    const level = this.level(medium);
    for (let idle = 0; ; ) {
      const slot = level.free.pop();
      if (slot !== undefined) return slot;
      if (this.adopt(medium) > 0) continue;
      const victim = medium === 'dram' ? this.dramVictim() : this.flashLru.values().next().value;
      if (victim !== undefined) {
        await this.locked(victim, () => this.evict(victim));
        continue;
      }
      // Every slot is between its taker and its line: let them settle, then look again.
      if (level.slots === 0 || ++idle > 10_000) throw new Error(`the ${medium} cache level has no slot to give`);
      await new Promise((resolve) => setImmediate(resolve));
    }
  }

  private dramVictim(): Line | undefined {
    const kin = Math.max(1, Math.floor(this.level('dram').slots / 4));
    const source = this.a1in.size > kin || this.am.size === 0 ? this.a1in : this.am;
    return source.values().next().value ?? this.a1in.values().next().value;
  }

  /** Evicts a line: destage if dirty; a clean DRAM line moves to flash where there is a flash level. */
  private async evict(line: Line): Promise<void> {
    if (this.lines.get(line.key) !== line) return;
    await this.destageLine(line);
    if (line.queue !== 'flash' && this.levels.has('flash') && (this.levels.get('flash')?.slots ?? 0) > 0 && line.valid !== 0) {
      const slot = await this.takeSlot('flash');
      if (this.lines.get(line.key) === line) {
        await copySlot(this.level('dram').medium, line.slot, this.level('flash').medium, slot);
        this.unlink(line);
        this.level('dram').free.push(line.slot);
        line.medium = 'flash';
        line.slot = slot;
        line.queue = 'flash';
        this.lines.set(line.key, line);
        this.flashLru.set(line.key, line);
        this.counters.demotions++;
        this.counters.evictions++;
        return;
      }
      this.level('flash').free.push(slot);
    }
    if (line.queue === 'a1in') {
      this.a1out.set(line.key, true);
      if (this.a1out.size > this.level('dram').slots / 2) {
        const oldest = this.a1out.keys().next().value;
        if (oldest !== undefined) this.a1out.delete(oldest);
      }
    }
    this.drop(line);
    this.counters.evictions++;
  }

  /** Brings a flash line back to DRAM (into `slot`), as a hot line. */
  private async promote(line: Line, slot: number): Promise<void> {
    if (this.lines.get(line.key) !== line || line.queue !== 'flash') {
      this.level('dram').free.push(slot);
      return;
    }
    await copySlot(this.level('flash').medium, line.slot, this.level('dram').medium, slot);
    this.flashLru.delete(line.key);
    this.level('flash').free.push(line.slot);
    line.medium = 'dram';
    line.slot = slot;
    line.queue = 'am';
    this.am.set(line.key, line);
    this.counters.promotions++;
  }

  private unlink(line: Line): void {
    this.a1in.delete(line.key);
    this.am.delete(line.key);
    this.flashLru.delete(line.key);
  }

  private drop(line: Line): void {
    if (this.lines.get(line.key) !== line) return;
    this.unlink(line);
    this.lines.delete(line.key);
    this.level(line.medium).free.push(line.slot);
  }

  private level(medium: MediumName): Level {
    const level = this.levels.get(medium);
    if (level === undefined) throw new Error(`no ${medium} cache level`);
    return level;
  }

  /** Takes every idle cache extent of a medium as slots; returns how many slots were added. */
  private adopt(medium: MediumName): number {
    const level = this.levels.get(medium);
    const map = this.options.partition.extents(medium);
    const idle = map.idleOf('cache');
    if (level === undefined || idle === 0) return 0;
    const extentSize = this.options.partition.extentSize(medium);
    const extents = this.options.partition.assign(medium, 'cache', CACHE_OWNER, idle * extentSize);
    const perExtent = Math.floor(extentSize / LINE_SIZE);
    for (const e of extents) {
      level.extents.add(e);
      for (let k = perExtent - 1; k >= 0; k--) level.free.push(e * extentSize + k * LINE_SIZE);
    }
    level.slots += extents.length * perExtent;
    return extents.length * perExtent;
  }

  /** The partition table wants `count` extents of `medium` back: empty them and hand them over. */
  private async reclaim(medium: MediumName, count: number): Promise<number[]> {
    const level = this.levels.get(medium);
    if (level === undefined) return [];
    const extentSize = this.options.partition.extentSize(medium);
    const perExtent = Math.floor(extentSize / LINE_SIZE);
    // Highest extents first: they tend to be the ones the partition table gives away.
    const chosen = [...level.extents].sort((a, b) => b - a).slice(0, count);
    const inChosen = (slot: number): boolean => chosen.includes(Math.floor(slot / extentSize));
    for (const line of [...this.lines.values()]) {
      if (line.medium !== medium || !inChosen(line.slot)) continue;
      await this.locked(line, async () => {
        if (this.lines.get(line.key) !== line || line.medium !== medium || !inChosen(line.slot)) return;
        await this.destageLine(line);
        this.drop(line);
        this.counters.evictions++;
      });
    }
    const keep = level.free.filter((slot) => !inChosen(slot));
    level.free.length = 0;
    level.free.push(...keep);
    for (const e of chosen) level.extents.delete(e);
    level.slots -= chosen.length * perExtent;
    this.options.log.info({ medium, extents: chosen.length }, 'cache gave extents back to the partition table');
    return chosen;
  }

  /** Destages lines past the age limit, and enough others to get below the low watermark. */
  private destageDue(): Promise<void> {
    if (this.destaging !== undefined) return this.destaging;
    this.destaging = (async () => {
      try {
        const slots = this.level('dram').slots;
        const high = (this.options.highWatermark ?? 0.5) * slots * LINE_SIZE;
        const low = (this.options.lowWatermark ?? 0.25) * slots * LINE_SIZE;
        const now = Date.now();
        const ordered = [...this.dirtyLines].sort((a, b) => (a.volume.name < b.volume.name ? -1 : a.volume.name > b.volume.name ? 1 : a.index - b.index));
        let dirty = this.stats().dirtyBytes;
        const flushVolumes = new Set<Volume>();
        for (const line of ordered) {
          const old = now - line.dirtySince >= this.options.maxDirtyAgeMs;
          if (!old && dirty <= (flushVolumes.size > 0 || dirty > high ? low : high)) continue;
          const bytes = popcount(line.dirty) * SECTOR_SIZE;
          await this.locked(line, () => this.destageLine(line));
          dirty -= bytes;
          flushVolumes.add(line.volume);
        }
        for (const volume of flushVolumes) await volume.store.sync();
      } catch (error) {
        this.options.log.error({ err: error }, 'destage failed; will retry');
      } finally {
        this.destaging = undefined;
      }
    })();
    return this.destaging;
  }

  private locked(line: Line, fn: () => Promise<void>): Promise<void> {
    return this.lockKey(line.key, fn);
  }

  private lockKey(key: string, fn: () => Promise<void>): Promise<void> {
    const run = (this.locks.get(key) ?? Promise.resolve()).then(fn);
    const tail = run.catch(() => undefined);
    this.locks.set(key, tail);
    void tail.then(() => {
      if (this.locks.get(key) === tail) this.locks.delete(key);
    });
    return run;
  }
}

async function copySlot(from: Medium, fromSlot: number, to: Medium, toSlot: number): Promise<void> {
  const buf = Buffer.allocUnsafe(LINE_SIZE);
  await from.read(fromSlot, buf);
  await to.write(toSlot, buf);
}

/** Sectors touched by [within, within + length) of a line. */
function sectorMask(within: number, length: number): number {
  if (length <= 0) return 0;
  const first = Math.floor(within / SECTOR_SIZE);
  const last = Math.floor((within + length - 1) / SECTOR_SIZE);
  return (ALL >>> (SECTORS - (last - first + 1))) << first;
}

/** Sectors wholly covered by [within, within + length). */
function fullSectorMask(within: number, length: number): number {
  const first = Math.ceil(within / SECTOR_SIZE);
  const end = Math.floor((within + length) / SECTOR_SIZE);
  if (end <= first) return 0;
  return (ALL >>> (SECTORS - (end - first))) << first;
}

function popcount(x: number): number {
  let n = 0;
  for (let v = x; v !== 0; v &= v - 1) n++;
  return n;
}

function lowestBit(x: number): number {
  return 31 - Math.clz32(x & -x);
}

function highestBit(x: number): number {
  return 31 - Math.clz32(x);
}
