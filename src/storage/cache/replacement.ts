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
// Queues. A1in, Am and the flash LRU are doubly linked lists threaded through the lines
// themselves (each line holds its neighbours and the list it is in), so a hit moves its
// line to the recent end by a few pointer writes, without hashing its key: a Map delete
// and set per hit (and the map's compactions) was 4% of the node's CPU under 4k random
// I/O at QD32, the largest item in JavaScript. Only the ghosts, which are keys, are a Map.
//
// Invariants (test/unit/storage/cache/replacement.test.ts):
//   - each line is in at most one of A1in, Am, flash (push takes a line out of the list
//     it is in first, so a repeated call cannot link it twice);
//   - a ghost is the key of a line that left A1in: out of the cache, or demoted to
//     flash (where it is still cached, and may come back to Am; its ghost then stays
//     until it ages out, and `where` reports the line);
//   - A1out holds at most half as many keys as there are DRAM slots;
//   - victim() prefers A1in while it is over its target, so Am is evicted only when
//     A1in is small.

import type { Queue } from './line.js';

/** What the policy needs to know of a line, and the links it keeps in it. */
export interface Replaceable {
  readonly key: string;
  queue: Queue;
  firstRef: number;
  /** The list the line is in now (undefined: none), and its neighbours there (Chain). */
  chain: object | undefined;
  older: Replaceable | undefined;
  newer: Replaceable | undefined;
}

/** A list of lines threaded through the lines, least recent first. A line is in one list at most. */
class Chain<L extends Replaceable> {
  size: number;
  private oldest: L | undefined;
  private newest: L | undefined;

  constructor() {
    this.size = 0;
    this.oldest = undefined;
    this.newest = undefined;
  }

  /** The least recent line. */
  first(): L | undefined {
    return this.oldest;
  }

  /** The line after `line`, towards the recent end. */
  next(line: L): L | undefined {
    return line.newer as L | undefined;
  }

  /** Puts `line` at the recent end, out of the list it was in (its callers take it out first). */
  push(line: L): void {
    if (line.chain !== undefined) (line.chain as Chain<L>).remove(line);
    line.chain = this;
    line.older = this.newest;
    line.newer = undefined;
    if (this.newest === undefined) this.oldest = line;
    else this.newest.newer = line;
    this.newest = line;
    this.size++;
  }

  /** Takes `line` out; false if it is not in this list. */
  remove(line: L): boolean {
    if (line.chain !== this) return false;
    const { older, newer } = line;
    if (older === undefined) this.oldest = newer as L | undefined;
    else older.newer = newer;
    if (newer === undefined) this.newest = older as L | undefined;
    else newer.older = older;
    line.chain = undefined;
    line.older = undefined;
    line.newer = undefined;
    this.size--;
    return true;
  }

  has(key: string): boolean {
    for (let line = this.oldest; line !== undefined; line = this.next(line)) if (line.key === key) return true;
    return false;
  }

  clear(): void {
    while (this.oldest !== undefined) this.remove(this.oldest);
  }
}

export class Replacement<L extends Replaceable> {
  private readonly a1in: Chain<L>;
  private readonly am: Chain<L>;
  private readonly a1out: Map<string, true>;
  private readonly flashLru: Chain<L>;
  private readonly window: number;
  private dramSlots: number;
  private clock: number;

  /** `window`: accesses within which repeated hits on a line count as one reference. */
  constructor(window: number) {
    this.a1in = new Chain();
    this.am = new Chain();
    this.a1out = new Map();
    this.flashLru = new Chain();
    this.window = window;
    this.dramSlots = 0;
    this.clock = 0;
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
      this.a1in.push(line);
    }
  }

  /** A hit on a DRAM line. */
  hit(line: L): void {
    this.clock++;
    if (line.queue === 'a1in') {
      if (this.clock - line.firstRef <= this.window) return; // correlated: the same reference
      if (this.a1in.remove(line)) this.toAm(line);
    } else if (line.queue === 'am' && this.am.remove(line)) {
      this.am.push(line);
    }
  }

  /** The DRAM line to evict next, or undefined when DRAM holds none. */
  dramVictim(skip?: (line: L) => boolean): L | undefined {
    const kin = Math.max(1, Math.floor(this.dramSlots / 4));
    const order = this.a1in.size > kin || this.am.size === 0 ? [this.a1in, this.am] : [this.am, this.a1in];
    for (const queue of order) {
      for (let line = queue.first(); line !== undefined; line = queue.next(line)) if (skip === undefined || !skip(line)) return line;
    }
    return undefined;
  }

  /** The flash line to evict next (least recently used). */
  flashVictim(skip?: (line: L) => boolean): L | undefined {
    for (let line = this.flashLru.first(); line !== undefined; line = this.flashLru.next(line)) if (skip === undefined || !skip(line)) return line;
    return undefined;
  }

  /** A DRAM line left the cache; a line that leaves A1in leaves a ghost behind. */
  evictedFromDram(line: L): void {
    if (line.queue === 'a1in' && this.a1in.remove(line)) {
      this.a1out.set(line.key, true);
      if (this.a1out.size > this.ghostLimit()) this.dropOldestGhost();
    } else {
      this.am.remove(line);
    }
  }

  /** A DRAM line moved to flash (demotion). */
  demoted(line: L): void {
    this.evictedFromDram(line);
    line.queue = 'flash';
    this.flashLru.push(line);
  }

  /** A read served by a flash line where it is: it becomes the most recent of the flash LRU. */
  flashHit(line: L): void {
    this.clock++;
    if (this.flashLru.remove(line)) this.flashLru.push(line);
  }

  /** A hit on a flash line, which comes back to DRAM as a line known to be reused. */
  promoted(line: L): void {
    this.clock++;
    this.flashLru.remove(line);
    line.firstRef = this.clock;
    this.toAm(line);
  }

  /** A line left the cache without a trace (dropped: zeroed, forgotten, reclaimed). */
  removed(line: L): void {
    this.a1in.remove(line);
    this.am.remove(line);
    this.flashLru.remove(line);
  }

  /** Forgets every line and ghost. */
  clear(): void {
    this.a1in.clear();
    this.am.clear();
    this.a1out.clear();
    this.flashLru.clear();
  }

  /** Where the policy holds `key` now (tests: it walks the lists). */
  where(key: string): Queue | 'ghost' | undefined {
    if (this.a1in.has(key)) return 'a1in';
    if (this.am.has(key)) return 'am';
    if (this.flashLru.has(key)) return 'flash';
    return this.a1out.has(key) ? 'ghost' : undefined;
  }

  /** Puts a line (in no list: the caller took it out) at the recent end of Am. */
  private toAm(line: L): void {
    line.queue = 'am';
    this.am.push(line);
    this.trimAm();
  }

  /** Am is kept to three quarters of the slots: its least recent line goes back to A1in. */
  private trimAm(): void {
    const limit = Math.max(1, Math.floor((this.dramSlots * 3) / 4));
    while (this.am.size > limit) {
      const oldest = this.am.first();
      if (oldest === undefined) return;
      this.am.remove(oldest);
      oldest.queue = 'a1in';
      oldest.firstRef = this.clock;
      this.a1in.push(oldest);
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
