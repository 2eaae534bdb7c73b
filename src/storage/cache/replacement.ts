// Replacement policy of the storage cache: 2Q for the DRAM level with a
// correlated-reference window, LRU for the flash level. Pure bookkeeping: no I/O, no
// locks, no slots; the cache asks it whom to evict and tells it what happened.
//
//   DRAM   A1in   lines referenced once (FIFO); its target size is a quarter of the slots
//          Am     lines referenced again (LRU); kept to three quarters of the slots
//          A1out  ghosts (keys only) of lines that left A1in; a miss that finds its
//                 ghost goes straight to Am
//   flash  LRU of clean lines demoted from DRAM
//
// Correlated references. A request smaller than a line touches the same line several
// times in a row (a sequential 4 KiB scan touches each 64 KiB line 16 times). Those
// accesses are one reference, not proof of reuse. The policy keeps a logical clock that
// ticks once per access; a hit on a line in A1in moves it to Am only if more than
// `window` accesses have passed since the line's first reference. Inside the window the
// hit changes nothing, so a one-pass scan of any request size leaves Am alone. A logical
// clock rather than wall time keeps the policy deterministic and independent of load.
//
// Lazy moves in Am. A hit on a line of Am moves it to the recent end only when more than
// a quarter of Am's size of lines have been put there since it last was (`amPuts`
// counts them): until then it is still among Am's most recent quarter, and moving it
// again would only churn the map (a delete and a set per hit, with the map's
// compactions: 4% of the node's CPU under 4k random I/O at QD32). So a line hit lately
// drifts at most a quarter of Am from the recent end; Am is evicted and trimmed from
// the least recent end. One approximation remains: a shrink of the DRAM level that trims
// Am by more than three quarters at once (resize) may send such a line to A1in, where
// it stays cached and a hit after the window brings it back. The flash LRU moves every
// hit line (its hits are reads from flash, whose cost dwarfs the map's).
//
// Invariants (test/unit/storage/cache/replacement.test.ts):
//   - each line is in at most one of A1in, Am, flash; ghosts are never live lines;
//   - A1out holds at most half as many keys as there are DRAM slots;
//   - victim() prefers A1in while it is over its target, so Am is evicted only when
//     A1in is small.

import type { Queue } from './line.js';

/** What the policy needs to know of a line. */
export interface Replaceable {
  readonly key: string;
  queue: Queue;
  firstRef: number;
  /** `amPuts` when the line was last put at the recent end of Am (lazy moves). */
  movedAt: number;
}

export class Replacement<L extends Replaceable> {
  private readonly a1in: Map<string, L>;
  private readonly am: Map<string, L>;
  private readonly a1out: Map<string, true>;
  private readonly flashLru: Map<string, L>;
  private readonly window: number;
  private dramSlots: number;
  private clock: number;
  /** Lines put at the recent end of Am so far (see lazy moves). */
  private amPuts: number;

  /** `window`: accesses within which repeated hits on a line count as one reference. */
  constructor(window: number) {
    this.a1in = new Map();
    this.am = new Map();
    this.a1out = new Map();
    this.flashLru = new Map();
    this.window = window;
    this.dramSlots = 0;
    this.clock = 0;
    this.amPuts = 0;
  }

  /** The DRAM level's size in slots, which sets the targets of A1in, Am and A1out. */
  resize(dramSlots: number): void {
    this.dramSlots = dramSlots;
    while (this.a1out.size > this.ghostLimit()) this.dropOldestGhost();
  }

  get dramLines(): number {
    return this.a1in.size + this.am.size;
  }

  get flashLines(): number {
    return this.flashLru.size;
  }

  /** A line newly placed in DRAM after a miss: Am if its ghost was seen, A1in otherwise. */
  admitted(line: L): void {
    this.clock++;
    line.firstRef = this.clock;
    if (this.a1out.delete(line.key)) {
      this.toAm(line);
    } else {
      line.queue = 'a1in';
      this.a1in.set(line.key, line);
    }
  }

  /** A hit on a DRAM line. */
  hit(line: L): void {
    this.clock++;
    if (line.queue === 'a1in') {
      if (this.clock - line.firstRef <= this.window) return; // correlated: the same reference
      this.a1in.delete(line.key);
      this.toAm(line);
    } else if (line.queue === 'am' && this.amPuts - line.movedAt > this.am.size >> 2) {
      this.am.delete(line.key);
      this.toAm(line);
    }
  }

  /** The DRAM line to evict next, or undefined when DRAM holds none. */
  dramVictim(skip?: (line: L) => boolean): L | undefined {
    const kin = Math.max(1, Math.floor(this.dramSlots / 4));
    const order = this.a1in.size > kin || this.am.size === 0 ? [this.a1in, this.am] : [this.am, this.a1in];
    for (const queue of order) {
      for (const line of queue.values()) if (skip === undefined || !skip(line)) return line;
    }
    return undefined;
  }

  /** The flash line to evict next (least recently used). */
  flashVictim(skip?: (line: L) => boolean): L | undefined {
    for (const line of this.flashLru.values()) if (skip === undefined || !skip(line)) return line;
    return undefined;
  }

  /** A DRAM line left the cache; a line that leaves A1in leaves a ghost behind. */
  evictedFromDram(line: L): void {
    if (line.queue === 'a1in' && this.a1in.delete(line.key)) {
      this.a1out.set(line.key, true);
      if (this.a1out.size > this.ghostLimit()) this.dropOldestGhost();
    } else {
      this.am.delete(line.key);
    }
  }

  /** A DRAM line moved to flash (demotion). */
  demoted(line: L): void {
    this.evictedFromDram(line);
    line.queue = 'flash';
    this.flashLru.set(line.key, line);
  }

  /** A read served by a flash line where it is: it becomes the most recent of the flash LRU. */
  flashHit(line: L): void {
    this.clock++;
    if (this.flashLru.delete(line.key)) this.flashLru.set(line.key, line);
  }

  /** A hit on a flash line, which comes back to DRAM as a line known to be reused. */
  promoted(line: L): void {
    this.clock++;
    this.flashLru.delete(line.key);
    line.firstRef = this.clock;
    this.toAm(line);
  }

  /** A line left the cache without a trace (dropped: zeroed, forgotten, reclaimed). */
  removed(line: L): void {
    this.a1in.delete(line.key);
    this.am.delete(line.key);
    this.flashLru.delete(line.key);
  }

  /** Forgets every line and ghost. */
  clear(): void {
    this.a1in.clear();
    this.am.clear();
    this.a1out.clear();
    this.flashLru.clear();
  }

  /** Where the policy holds `key` now (tests). */
  where(key: string): Queue | 'ghost' | undefined {
    if (this.a1in.has(key)) return 'a1in';
    if (this.am.has(key)) return 'am';
    if (this.flashLru.has(key)) return 'flash';
    return this.a1out.has(key) ? 'ghost' : undefined;
  }

  /** Puts a line at the recent end of Am (taken out of wherever it was by the caller). */
  private toAm(line: L): void {
    line.queue = 'am';
    line.movedAt = ++this.amPuts;
    this.am.set(line.key, line);
    this.trimAm();
  }

  /** Am is kept to three quarters of the slots: its least recent line goes back to A1in. */
  private trimAm(): void {
    const limit = Math.max(1, Math.floor((this.dramSlots * 3) / 4));
    while (this.am.size > limit) {
      const oldest = this.am.values().next().value;
      if (oldest === undefined) return;
      this.am.delete(oldest.key);
      oldest.queue = 'a1in';
      oldest.firstRef = this.clock;
      this.a1in.set(oldest.key, oldest);
    }
  }

  private ghostLimit(): number {
    return Math.floor(this.dramSlots / 2);
  }

  private dropOldestGhost(): void {
    const oldest = this.a1out.keys().next().value;
    if (oldest !== undefined) this.a1out.delete(oldest);
  }
}
