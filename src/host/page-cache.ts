// The host's local page cache for segments that live on nodes or the swap volume: a
// share of the local DRAM budget holding 4 KiB pages, write-back.
//
//   access to page p (not cached):
//     first time (cold)   served from its tier directly; p is remembered as seen once
//     again (hot)         promoted: fetched into the cache (or made from a whole-page write)
//   cache full            the least recently used page that no request holds is demoted:
//                         written back if dirty, then dropped
//
// A write-back that fails (not a lost node: the swap volume's I/O error, a dropped NBD
// connection) belongs to the page, not to the request that needed the slot, which may be
// on another segment and another tier: the page stays cached and dirty, marked failed,
// and the next victim is tried. Eviction passes failed pages over while it has another
// victim, so a broken tier does not slow the others; only when every page it may take
// is a failed one does it try each of those once (a tier that works again gets its pages
// back), and with none left the request is served from its tier directly. flush() tries
// every dirty page again and reports the failure.
//
// So a one-pass scan over far memory never pushes the hot set out: pages enter only on
// their second access within the memory of the "seen once" list (four times the cache).
//
// Every request locks the pages it touches, in ascending order, for its whole run; a page
// being demoted is locked too. So a read never sees a page half written back, and two
// requests on the same page take turns. A victim is only taken when no request holds it,
// so eviction never waits on a lock and cannot deadlock.
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

export const CACHE_PAGE = 4096;
/** Pages remembered as seen once, as a multiple of the pages cached. */
const SEEN_FACTOR = 4;

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
  dirty: boolean;
  /** Its last write-back failed (it is dirty); cleared when one succeeds. */
  failed: boolean;
  source: PageSource;
}

export class PageCache {
  readonly capacityPages: number;
  /** Cached pages by virtual page number, least recently used first. */
  private readonly entries: Map<number, Entry>;
  /** Pages seen once and not cached, oldest first; at most SEEN_FACTOR times the cache. */
  private readonly seen: Set<number>;
  private readonly locks: Map<number, Promise<void>>;
  /** Slots promised to promotions in progress. */
  private reserved: number;
  private readonly counters: Omit<PageCacheStats, 'capacityPages' | 'cachedPages' | 'dirtyPages'>;

  constructor(capacityBytes: number) {
    this.capacityPages = Math.floor(capacityBytes / CACHE_PAGE);
    this.entries = new Map();
    this.seen = new Set();
    this.locks = new Map();
    this.reserved = 0;
    this.counters = { hits: 0, misses: 0, promotions: 0, demotions: 0, writeBacks: 0, lostPages: 0, failedWriteBacks: 0 };
  }

  stats(): PageCacheStats {
    let dirty = 0;
    for (const e of this.entries.values()) if (e.dirty) dirty++;
    return { capacityPages: this.capacityPages, cachedPages: this.entries.size, dirtyPages: dirty, ...this.counters };
  }

  /** Reads [offset, offset + target.length) of a segment through the cache. */
  async read(source: PageSource, offset: number, target: Buffer): Promise<void> {
    const release = await this.lock(source, offset, target.length);
    try {
      assertServable(source);
      await settleAll(this.pagesOf(source, offset, target.length).map(async ({ page, pageOffset, from, n }) => {
        const entry = await this.lookup(source, page, pageOffset, null);
        if (entry !== undefined) {
          entry.data.copy(target, from, pageOffset % CACHE_PAGE, (pageOffset % CACHE_PAGE) + n);
          return;
        }
        await source.readPieces(pageOffset, target.subarray(from, from + n));
      }));
    } finally {
      release();
    }
  }

  /** Writes `data` at `offset` of a segment through the cache (write-back for cached pages). */
  async write(source: PageSource, offset: number, data: Buffer): Promise<void> {
    const release = await this.lock(source, offset, data.length);
    try {
      assertServable(source);
      await settleAll(this.pagesOf(source, offset, data.length).map(async ({ page, pageOffset, from, n }) => {
        const whole = n === CACHE_PAGE ? data.subarray(from, from + n) : undefined;
        const entry = await this.lookup(source, page, pageOffset, whole ?? null);
        if (entry !== undefined) {
          data.copy(entry.data, pageOffset % CACHE_PAGE, from, from + n);
          entry.dirty = true;
          return;
        }
        await source.writePieces(pageOffset, data.subarray(from, from + n));
      }));
    } finally {
      release();
    }
  }

  /**
   * Writes every dirty page back to its tier. A page of a lost source is dropped and
   * counted as lost instead; a page whose write-back fails otherwise stays dirty, the
   * others are still tried, and the first such failure is thrown at the end.
   */
  async flush(): Promise<void> {
    let failure: { error: unknown } | undefined;
    for (const [page, entry] of [...this.entries]) {
      if (!entry.dirty) continue;
      const release = await this.lockPages([page]);
      try {
        if (entry.dirty && this.entries.get(page) === entry) {
          await this.writeBack(page, entry);
          if (entry.dirty) this.remove(page, entry); // its source is lost or freed
        }
      } catch (error) {
        failure ??= { error };
      } finally {
        release();
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
    const pages = [...this.entries.keys()].filter((p) => p >= first && p < last);
    const release = await this.lockPages(pages);
    try {
      for (const p of pages) {
        const entry = this.entries.get(p);
        if (entry !== undefined) this.remove(p, entry);
      }
    } finally {
      release();
    }
    for (const p of [...this.seen]) if (p >= first && p < last) this.seen.delete(p);
  }

  // ---- internals ----

  /**
   * The cached entry for a page, promoting it when it is hot; undefined to go to the tier
   * directly. `whole` is a full page about to be written (no fetch needed); null otherwise.
   */
  private async lookup(source: PageSource, page: number, pageOffset: number, whole: Buffer | null): Promise<Entry | undefined> {
    const hit = this.entries.get(page);
    if (hit !== undefined) {
      this.counters.hits++;
      this.entries.delete(page);
      this.entries.set(page, hit);
      return hit;
    }
    this.counters.misses++;
    if (this.capacityPages === 0) return undefined;
    if (!this.seen.has(page)) {
      this.seen.add(page);
      if (this.seen.size > SEEN_FACTOR * this.capacityPages) {
        const oldest = this.seen.values().next().value;
        if (oldest !== undefined) this.seen.delete(oldest);
      }
      return undefined;
    }
    this.seen.delete(page);
    const data = Buffer.alloc(CACHE_PAGE);
    const base = pageOffset - (pageOffset % CACHE_PAGE);
    if (whole !== null) whole.copy(data);
    else await source.readPieces(base, data);
    if (!(await this.makeRoom())) return undefined;
    this.reserved--;
    // Lost while this request waited: admit nothing of it (a drop may be past this page).
    assertServable(source);
    const entry: Entry = { data, dirty: false, failed: false, source };
    this.entries.set(page, entry);
    this.counters.promotions++;
    return entry;
  }

  /**
   * Demotes least recently used pages no request holds until a slot is free, and reserves
   * it (promotions of one request run side by side). False when every page is in use or
   * failed its write-back again: the caller then serves its page directly. Never throws.
   */
  private async makeRoom(): Promise<boolean> {
    // Failed pages this call has tried already: each once at most.
    const tried = new Set<number>();
    while (this.entries.size + this.reserved >= this.capacityPages) {
      // The least recently used page no request holds, passing over failed pages while there is another.
      let victim: [number, Entry] | undefined;
      let fallback: [number, Entry] | undefined;
      for (const e of this.entries) {
        if (this.locks.has(e[0])) continue;
        if (!e[1].failed) {
          victim = e;
          break;
        }
        if (fallback === undefined && !tried.has(e[0])) fallback = e;
      }
      victim ??= fallback;
      if (victim === undefined) return false; // every page is in use, or failed again: serve this one directly
      // Take it out of reach of other evictions before the write-back yields.
      const [page, entry] = victim;
      const release = this.lockFree(page);
      try {
        if (entry.dirty) await this.writeBack(page, entry);
        this.remove(page, entry);
        this.counters.demotions++;
      } catch {
        // Its tier refused the bytes (writeBack marked it failed): they stay here, dirty,
        // for flush() to try again and report; this request goes on with another victim.
        tried.add(page);
      } finally {
        release();
      }
    }
    this.reserved++;
    return true;
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
      entry.failed = false;
      this.counters.writeBacks++;
    } catch (error) {
      if (source.failure() !== undefined) return; // its node was lost meanwhile: nothing to write back to
      entry.failed = true;
      this.counters.failedWriteBacks++;
      throw error;
    } finally {
      source.gate.leave();
    }
  }

  /** Takes a page out of the cache; a dirty page of a lost source is counted as lost, once. */
  private remove(page: number, entry: Entry): void {
    if (this.entries.get(page) !== entry) return;
    this.entries.delete(page);
    if (entry.dirty && entry.source.failure() !== undefined) {
      entry.source.noteLost(CACHE_PAGE);
      this.counters.lostPages++;
    }
  }

  private pagesOf(source: PageSource, offset: number, length: number): { page: number; pageOffset: number; from: number; n: number }[] {
    const out: { page: number; pageOffset: number; from: number; n: number }[] = [];
    let at = offset;
    while (at < offset + length) {
      const within = at % CACHE_PAGE;
      const n = Math.min(CACHE_PAGE - within, offset + length - at);
      out.push({ page: (source.address + at - within) / CACHE_PAGE, pageOffset: at, from: at - offset, n });
      at += n;
    }
    return out;
  }

  private lock(source: PageSource, offset: number, length: number): Promise<() => void> {
    return this.lockPages(this.pagesOf(source, offset, length).map((p) => p.page));
  }

  /** Locks pages in ascending order, waiting for holders; returns the release. */
  private async lockPages(pages: readonly number[]): Promise<() => void> {
    const releases: (() => void)[] = [];
    for (const page of [...pages].sort((a, b) => a - b)) {
      for (let held = this.locks.get(page); held !== undefined; held = this.locks.get(page)) await held;
      releases.push(this.lockFree(page));
    }
    return () => {
      for (const r of releases) r();
    };
  }

  /** Locks a page that no one holds. */
  private lockFree(page: number): () => void {
    let release = (): void => undefined;
    this.locks.set(page, new Promise<void>((resolve) => (release = resolve)));
    return () => {
      this.locks.delete(page);
      release();
    };
  }
}

function assertServable(source: PageSource): void {
  const failure = source.failure();
  if (failure !== undefined) throw failure;
}
