// The host's local page cache for segments that live on nodes or the swap volume: a
// share of the local DRAM budget holding 4 KiB pages, write-back.
//
//   every access to a page      counted in a frequency sketch (frequency-sketch.ts)
//   access to page p (not cached):
//     a slot is free            promoted: fetched into the cache (or made from a
//                               whole-page write), on its first access
//     cache full, p hot         promoted when p was accessed at least twice lately and
//                               more often than the page it would push out (TinyLFU)
//     otherwise                 served from its tier directly
//   room for a promotion        the least recently used page that no request holds is
//                               demoted: written back if dirty, then dropped; this runs
//                               while p is fetched, not after
//
// A write-back that fails (not a lost node: the swap volume's I/O error, a dropped NBD
// connection) belongs to the page, not to the request that needed the slot, which may be
// on another segment and another tier: the page stays cached and dirty, marked failed,
// and that page of the request is served from its tier directly (one failed write-back
// per page a request would promote, at most). Failed pages leave the LRU order for a list
// of their own, so eviction never walks past them and a broken tier does not slow the
// others. A demotion tries one of them, the least recently tried, when no other page may
// be taken, and once every RETRY_FAILING demotions anyway; once one is written back, the
// next demotions take the others: so a tier that works again gets its pages back without
// a flush(). flush() tries every dirty page again and reports the failure.
//
// So a one-pass scan over far memory never pushes the hot set out once the cache is full:
// its pages are each accessed once. Under a skewed workload the cache keeps the pages
// accessed most often lately rather than those accessed last: a page enters only if it
// beats the one it replaces, so few pages churn through the cache and few write-backs
// are paid (bench/host: promotions fell from about 10% of far accesses to about 3%).
//
// Every request locks the pages it touches for its whole run; a page being demoted is
// locked too. So a read never sees a page half written back, and two requests on the same
// page take turns. A request joins the queues of all its pages in the turn it is made; a
// lock no one holds is taken at once (no promise, no turn of the event loop, so a hit
// costs none), and a held one is handed to its waiters in the order they asked. So
// requests take effect in the order they were made on every page they share, and a
// request only ever waits for earlier ones (no deadlock). A victim is only taken when no
// request holds it, so eviction never waits on a lock.
//
// Seams with the segment (PageSource):
//   - lost source (its node was lost): a request that gets its locks after the loss fails
//     with the source's error, no page of it is admitted after the loss, and every page of
//     it leaves the cache without a write-back; dirty ones are counted as lost on the
//     source (`noteLost`), each exactly once, when it leaves. The cache never serves a lost
//     page to a request that started after the loss.
//   - freed source: the caller waits on the source's gate for its requests first, then
//     drops its pages; a write-back enters the gate too, so none starts after the free
//     began and none is still running when the gate has drained. A dirty page of a freed
//     source is dropped, never written into memory that may have a new owner.
//   - a request waits for all of its page operations before it lets its locks go, even
//     when one of them failed (settleAll).

import type { MemstrataError } from '../errors.js';
import type { IoGate } from './io-gate.js';
import { settleAll } from '../settle.js';
import { FrequencySketch } from './frequency-sketch.js';

export const CACHE_PAGE = 4096;
/** Accesses a page needs lately to enter a full cache: a one-pass scan never does. */
const ADMIT_MIN = 2;
/** Demotions between two tries of a failed page while others could be taken. */
const RETRY_FAILING = 64;

/** One page's part of a request. */
interface Part {
  /** Virtual page number. */
  page: number;
  /** Offset in the segment where the part starts. */
  pageOffset: number;
  /** Offset in the request's buffer. */
  from: number;
  n: number;
}

/** Where a cached page lives: the segment's own tiers. */
export interface PageSource {
  readonly address: number;
  /** Counts the segment's I/O; closed once it is being freed. */
  readonly gate: IoGate;
  /** Reads [offset, offset + target.length) of the segment from its tiers. */
  readPieces(offset: number, target: Buffer): Promise<void>;
  writePieces(offset: number, data: Buffer): Promise<void>;
  /** Why the segment's memory is gone (its node was lost), or undefined. */
  failure(): MemstrataError | undefined;
  /** Takes note of dirty bytes the cache dropped because the segment's memory is gone. */
  noteLost(bytes: number): void;
}

export interface PageCacheStats {
  /** Pages the cache can hold. */
  capacityPages: number;
  cachedPages: number;
  dirtyPages: number;
  /** Page accesses served from the cache, and those that went to a tier. */
  hits: number;
  misses: number;
  /** Pages brought into the cache (hot), and pages dropped from it (cold). */
  promotions: number;
  demotions: number;
  /** Dirty pages written back to their tier. */
  writeBacks: number;
  /** Dirty pages dropped because their node was lost (never written back). */
  lostPages: number;
  /** Write-backs that failed otherwise; each page stays dirty, and flush() reports it while it still fails. */
  failedWriteBacks: number;
}

interface Entry {
  data: Buffer;
  /** The hit clock when the entry last moved to the recent end. */
  moved: number;
  dirty: boolean;
  /** Its last write-back failed (it is dirty, and in `failing`); cleared when one succeeds. */
  failed: boolean;
  source: PageSource;
}

export class PageCache {
  readonly capacityPages: number;
  /**
   * Cached pages by virtual page number, least recently moved first. A hit moves its page
   * to the recent end only when it last moved more than a quarter of the cache's hits ago:
   * the order is LRU to within that, and a hot page costs no Map churn on every hit.
   */
  private readonly entries: Map<number, Entry>;
  /**
   * Cached pages whose last write-back failed (all dirty), least recently tried first:
   * out of the LRU order, so that finding a victim never walks past them. makeRoom tries
   * one when `entries` has no victim, every RETRY_FAILING demotions, and right after one
   * was written back.
   */
  private readonly failing: Map<number, Entry>;
  /** Hits so far: the clock of `moved`. */
  private clock: number;
  /** Hits after which a hit moves its page again. */
  private readonly moveAfter: number;
  /** How often each far page was accessed lately: the admission filter. */
  private readonly sketch: FrequencySketch;
  /**
   * Pages held by a request or a write-back, each with the acquisitions waiting for it in
   * arrival order (null: none). A lock is handed over to the next waiter, never free in between.
   */
  private readonly locks: Map<number, (() => void)[] | null>;
  /** Slots promised to promotions in progress. */
  private reserved: number;
  /** `demotions` when a failed page was last tried. */
  private failingTriedAt: number;
  /** The last failed page tried was written back: its tier works, try the next at once. */
  private failingRecovered: boolean;
  private readonly counters: Omit<PageCacheStats, 'capacityPages' | 'cachedPages' | 'dirtyPages'>;

  constructor(capacityBytes: number) {
    this.capacityPages = Math.floor(capacityBytes / CACHE_PAGE);
    this.entries = new Map();
    this.failing = new Map();
    this.clock = 0;
    this.moveAfter = this.capacityPages >> 2;
    this.sketch = new FrequencySketch(this.capacityPages);
    this.locks = new Map();
    this.reserved = 0;
    this.failingTriedAt = 0;
    this.failingRecovered = false;
    this.counters = { hits: 0, misses: 0, promotions: 0, demotions: 0, writeBacks: 0, lostPages: 0, failedWriteBacks: 0 };
  }

  stats(): PageCacheStats {
    let dirty = this.failing.size;
    for (const e of this.entries.values()) if (e.dirty) dirty++;
    return { capacityPages: this.capacityPages, cachedPages: this.cached(), dirtyPages: dirty, ...this.counters };
  }

  /** Reads [offset, offset + target.length) of a segment through the cache. */
  async read(source: PageSource, offset: number, target: Buffer): Promise<void> {
    const parts = this.partsOf(source, offset, target.length);
    const wait = this.lockAll(parts);
    if (wait !== undefined) await wait;
    try {
      assertServable(source);
      if (parts.length === 1 && parts[0] !== undefined) {
        const pending = this.readPart(source, parts[0], target);
        if (pending !== undefined) await pending;
      } else {
        await settleAll(parts.map((part) => this.readPart(source, part, target) ?? Promise.resolve()));
      }
    } finally {
      for (const { page } of parts) this.unlock(page);
    }
  }

  /** Writes `data` at `offset` of a segment through the cache (write-back for cached pages). */
  async write(source: PageSource, offset: number, data: Buffer): Promise<void> {
    const parts = this.partsOf(source, offset, data.length);
    const wait = this.lockAll(parts);
    if (wait !== undefined) await wait;
    try {
      assertServable(source);
      if (parts.length === 1 && parts[0] !== undefined) {
        const pending = this.writePart(source, parts[0], data);
        if (pending !== undefined) await pending;
      } else {
        await settleAll(parts.map((part) => this.writePart(source, part, data) ?? Promise.resolve()));
      }
    } finally {
      for (const { page } of parts) this.unlock(page);
    }
  }

  /**
   * Serves a read within one cached page in the caller's turn, when no request holds
   * the page and its source is servable: true when done (a hit). False when the caller
   * must take `read`, which then counts the access: a miss, a page held by a request or
   * a write-back, a read over two pages, a lost source.
   */
  readNow(source: PageSource, offset: number, target: Buffer): boolean {
    const entry = this.hitNow(source, offset, target.length);
    if (entry === undefined) return false;
    const at = offset % CACHE_PAGE;
    entry.data.copy(target, 0, at, at + target.length);
    return true;
  }

  /** As readNow, for a write within one cached page: applied to the page, which becomes dirty. */
  writeNow(source: PageSource, offset: number, data: Buffer): boolean {
    const entry = this.hitNow(source, offset, data.length);
    if (entry === undefined) return false;
    data.copy(entry.data, offset % CACHE_PAGE);
    entry.dirty = true;
    return true;
  }

  /**
   * Writes every dirty page back to its tier. A page of a lost source is dropped and
   * counted as lost instead; a page whose write-back fails otherwise stays dirty, the
   * others are still tried, and the first such failure is thrown at the end.
   */
  async flush(): Promise<void> {
    let failure: { error: unknown } | undefined;
    for (const [page, entry] of [...this.entries, ...this.failing]) {
      if (!entry.dirty) continue;
      const wait = this.acquire(page);
      if (wait !== undefined) await wait;
      try {
        if (entry.dirty && this.entryOf(page) === entry) {
          await this.writeBack(page, entry);
          if (entry.dirty) this.remove(page, entry); // its source is lost or freed
        }
      } catch (error) {
        failure ??= { error };
      } finally {
        this.unlock(page);
      }
    }
    if (failure !== undefined) throw failure.error;
  }

  /**
   * Drops every cached page of a source without writing it back: for a freed segment
   * (after its gate has drained), or a lost one (its dirty pages are counted as lost).
   */
  async drop(source: PageSource, size: number): Promise<void> {
    const first = source.address / CACHE_PAGE;
    const last = first + size / CACHE_PAGE;
    const pages = [...this.entries.keys(), ...this.failing.keys()].filter((p) => p >= first && p < last).map((page) => ({ page }));
    const wait = this.lockAll(pages);
    if (wait !== undefined) await wait;
    try {
      for (const { page } of pages) {
        const entry = this.entryOf(page);
        if (entry !== undefined) this.remove(page, entry);
      }
    } finally {
      for (const { page } of pages) this.unlock(page);
    }
  }

  // ---- internals ----

  /** Serves one page's part of a read: at once from the cache on a hit, else a promise. */
  private readPart(source: PageSource, part: Part, target: Buffer): Promise<void> | undefined {
    const entry = this.hit(part.page);
    if (entry === undefined) {
      // A page left out goes to its tier with no extra turn through promote.
      if (!this.admits(part.page)) return source.readPieces(part.pageOffset, target.subarray(part.from, part.from + part.n));
      return this.readMiss(source, part, target);
    }
    const at = part.pageOffset % CACHE_PAGE;
    entry.data.copy(target, part.from, at, at + part.n);
    return undefined;
  }

  private async readMiss(source: PageSource, { page, pageOffset, from, n }: Part, target: Buffer): Promise<void> {
    const entry = await this.promote(source, page, pageOffset, null);
    if (entry !== undefined) {
      const at = pageOffset % CACHE_PAGE;
      entry.data.copy(target, from, at, at + n);
      return;
    }
    await source.readPieces(pageOffset, target.subarray(from, from + n));
  }

  /** Applies one page's part of a write: at once to the cache on a hit, else a promise. */
  private writePart(source: PageSource, part: Part, data: Buffer): Promise<void> | undefined {
    const entry = this.hit(part.page);
    if (entry === undefined) {
      if (!this.admits(part.page)) return source.writePieces(part.pageOffset, data.subarray(part.from, part.from + part.n));
      return this.writeMiss(source, part, data);
    }
    data.copy(entry.data, part.pageOffset % CACHE_PAGE, part.from, part.from + part.n);
    entry.dirty = true;
    return undefined;
  }

  private async writeMiss(source: PageSource, { page, pageOffset, from, n }: Part, data: Buffer): Promise<void> {
    const whole = n === CACHE_PAGE ? data.subarray(from, from + n) : null;
    const entry = await this.promote(source, page, pageOffset, whole);
    if (entry !== undefined) {
      data.copy(entry.data, pageOffset % CACHE_PAGE, from, from + n);
      entry.dirty = true;
      return;
    }
    await source.writePieces(pageOffset, data.subarray(from, from + n));
  }

  /**
   * The entry of the one page [offset, offset + length) of a source lies in, counted as
   * a hit, when it is cached, no request holds it (so none made before this one is still
   * on it: the order of requests on a page is kept) and the source is servable.
   * Undefined otherwise, with nothing counted. (A lost segment's purge takes its pages'
   * locks in the turn of the loss, so the lock check covers a loss too; the source's own
   * check stands for a failure that comes any other way.)
   */
  private hitNow(source: PageSource, offset: number, length: number): Entry | undefined {
    const within = offset % CACHE_PAGE;
    if (within + length > CACHE_PAGE || length === 0) return undefined;
    const page = (source.address + offset - within) / CACHE_PAGE;
    if (this.locks.has(page) || this.entryOf(page) === undefined || source.failure() !== undefined) return undefined;
    return this.hit(page);
  }

  /** Counts an access to a page and returns its entry when it is cached. */
  private hit(page: number): Entry | undefined {
    if (this.capacityPages > 0) this.sketch.record(page); // with no slot, nothing is ever admitted
    const entry = this.entries.get(page);
    if (entry === undefined) {
      const failed = this.failing.get(page);
      if (failed !== undefined) this.counters.hits++;
      else this.counters.misses++;
      return failed;
    }
    this.counters.hits++;
    this.clock++;
    if (this.clock - entry.moved > this.moveAfter) {
      entry.moved = this.clock;
      this.entries.delete(page);
      this.entries.set(page, entry);
    }
    return entry;
  }

  /**
   * Brings a page that missed, and that admission let in, into the cache; undefined when
   * no slot could be made (the caller goes to the tier directly). `whole` is a full page
   * about to be written (no fetch needed); null otherwise.
   */
  private async promote(source: PageSource, page: number, pageOffset: number, whole: Buffer | null): Promise<Entry | undefined> {
    // The demotion that makes room (a write-back when its victim is dirty) runs beside the
    // fetch, not after it. makeRoom never throws; a slot it reserved is given back if the
    // fetch fails.
    const room = this.makeRoom();
    const data = Buffer.alloc(CACHE_PAGE);
    try {
      if (whole !== null) whole.copy(data);
      else await source.readPieces(pageOffset - (pageOffset % CACHE_PAGE), data);
    } catch (error) {
      if (await room) this.reserved--;
      throw error;
    }
    if (!(await room)) return undefined;
    this.reserved--;
    // Lost while this request waited: admit nothing of it (a drop may be past this page).
    assertServable(source);
    const entry: Entry = { data, moved: this.clock, dirty: false, failed: false, source };
    this.entries.set(page, entry);
    this.counters.promotions++;
    return entry;
  }

  /**
   * Whether a page that missed enters the cache: always while a slot is free; once the
   * cache is full, only when it was accessed at least ADMIT_MIN times lately and more
   * often than the page eviction would take now.
   */
  private admits(page: number): boolean {
    if (this.capacityPages === 0) return false;
    if (this.cached() + this.reserved < this.capacityPages) return true;
    const frequency = this.sketch.estimate(page);
    if (frequency < ADMIT_MIN) return false;
    // The victim makeRoom would take now: the least recently used page no request holds,
    // a failed one only when there is no other (so a tier that works again gets its pages back).
    const victim = this.unlocked(this.entries) ?? this.unlocked(this.failing);
    return victim !== undefined && frequency > this.sketch.estimate(victim[0]);
  }

  /**
   * Demotes least recently used pages no request holds until a slot is free, and reserves
   * it (promotions of one request run side by side). A failed page is a victim when no
   * other is left, when RETRY_FAILING demotions have passed since one was last tried, or
   * when the last one tried was written back (its tier works again: the rest follow).
   * At most one write-back fails per call: its page stays (in `failing`, dirty, for
   * flush() to try again and report), and the call gives up, so a broken tier costs a
   * promotion one failed write-back at most, not one per page the cache holds. False when
   * no slot was made: the caller then serves its page directly. Never throws.
   */
  private async makeRoom(): Promise<boolean> {
    while (this.cached() + this.reserved >= this.capacityPages) {
      let victim: [number, Entry] | undefined;
      if (this.failing.size > 0 && (this.failingRecovered || this.counters.demotions - this.failingTriedAt >= RETRY_FAILING)) victim = this.unlocked(this.failing);
      victim ??= this.unlocked(this.entries) ?? this.unlocked(this.failing);
      if (victim === undefined) return false; // every page is in use: serve this one directly
      // Take it out of reach of other evictions before the write-back yields.
      const [page, entry] = victim;
      const retry = entry.failed;
      if (retry) this.failingTriedAt = this.counters.demotions;
      this.locks.set(page, null);
      try {
        if (entry.dirty) await this.writeBack(page, entry);
        this.remove(page, entry);
        this.counters.demotions++;
        if (retry) this.failingRecovered = true;
      } catch {
        if (retry) this.failingRecovered = false;
        return false; // its tier refused the bytes: writeBack moved the page to `failing`
      } finally {
        this.unlock(page);
      }
    }
    this.reserved++;
    return true;
  }

  /** The first page of `pages` (least recently used or tried) that no request holds. */
  private unlocked(pages: Map<number, Entry>): [number, Entry] | undefined {
    for (const e of pages) if (!this.locks.has(e[0])) return e;
    return undefined;
  }

  private cached(): number {
    return this.entries.size + this.failing.size;
  }

  private entryOf(page: number): Entry | undefined {
    return this.entries.get(page) ?? this.failing.get(page);
  }

  /**
   * Writes a dirty page back to its source. Leaves it dirty, without I/O, when the source
   * is lost or being freed: `remove` then drops it (counting it lost for a lost source).
   */
  private async writeBack(page: number, entry: Entry): Promise<void> {
    const { source } = entry;
    if (source.failure() !== undefined || !source.gate.enter()) return;
    try {
      await source.writePieces(page * CACHE_PAGE - source.address, entry.data);
      entry.dirty = false;
      this.counters.writeBacks++;
      if (entry.failed) {
        // Its tier works again: back in the LRU order, as the most recent.
        entry.failed = false;
        if (this.failing.delete(page)) this.entries.set(page, entry);
      }
    } catch (error) {
      if (source.failure() !== undefined) return; // its node was lost meanwhile: nothing to write back to
      entry.failed = true;
      this.counters.failedWriteBacks++;
      // Out of the LRU order, to the end of the failing ones: the last tried.
      if (this.entryOf(page) === entry) {
        this.entries.delete(page);
        this.failing.delete(page);
        this.failing.set(page, entry);
      }
      throw error;
    } finally {
      source.gate.leave();
    }
  }

  /** Takes a page out of the cache; a dirty page of a lost source is counted as lost, once. */
  private remove(page: number, entry: Entry): void {
    if (this.entryOf(page) !== entry) return;
    this.entries.delete(page);
    this.failing.delete(page);
    if (entry.dirty && entry.source.failure() !== undefined) {
      entry.source.noteLost(CACHE_PAGE);
      this.counters.lostPages++;
    }
  }

  private partsOf(source: PageSource, offset: number, length: number): Part[] {
    const out: Part[] = [];
    let at = offset;
    while (at < offset + length) {
      const within = at % CACHE_PAGE;
      const n = Math.min(CACHE_PAGE - within, offset + length - at);
      out.push({ page: (source.address + at - within) / CACHE_PAGE, pageOffset: at, from: at - offset, n });
      at += n;
    }
    return out;
  }

  /**
   * Joins the queue of every page of a request in this one turn, so that requests keep the
   * order they were made on every page they share (and wait only for earlier ones: no
   * cycle, no deadlock). Undefined when every page was free and is now held.
   */
  private lockAll(parts: readonly { page: number }[]): Promise<void> | undefined {
    let waits: Promise<void>[] | undefined;
    for (const { page } of parts) {
      const wait = this.acquire(page);
      if (wait !== undefined) (waits ??= []).push(wait);
    }
    if (waits === undefined) return undefined;
    return waits.length === 1 ? waits[0] : Promise.all(waits).then(() => undefined);
  }

  /** Takes a page's lock: at once (undefined) when no one holds it, else once it is handed over. */
  private acquire(page: number): Promise<void> | undefined {
    if (!this.locks.has(page)) {
      this.locks.set(page, null);
      return undefined;
    }
    let waiters = this.locks.get(page);
    if (waiters === undefined || waiters === null) {
      waiters = [];
      this.locks.set(page, waiters);
    }
    const queue = waiters;
    return new Promise<void>((resolve) => queue.push(resolve));
  }

  /** Hands a page's lock to its next waiter, or frees it. */
  private unlock(page: number): void {
    const next = this.locks.get(page)?.shift();
    if (next === undefined) this.locks.delete(page);
    else next();
  }
}

function assertServable(source: PageSource): void {
  const failure = source.failure();
  if (failure !== undefined) throw failure;
}
