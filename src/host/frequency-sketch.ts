// How often each far page was accessed lately, in a fixed amount of memory: the page
// cache's admission filter (TinyLFU). A count-min sketch of four rows of counters up to
// 15, one byte each, laid out so that a page's four counters share one 64-byte block
// (one cache line, the way Caffeine lays out its sketch):
//
//   block   64 bytes = 4 rows x 16 counters; the page's hash picks the block, and four
//           4-bit slices of a second hash pick one counter in each row
//   record  each of the page's counters + 1 (saturating at 15); every `sample` records
//           all counters are halved (aging), so a page hot long ago does not outweigh
//           one hot now
//   estimate  the smallest of the page's counters: never below the true count since the
//           last halving, above it only by collisions
//
// Size: about four counters per page cached (at least 4 KiB), the sample ten times the
// pages cached.

const ROW = 16;
const BLOCK = 4 * ROW;
const MAX = 15;

export class FrequencySketch {
  private readonly counters: Uint8Array;
  /** Blocks - 1; the block count is a power of two. */
  private readonly mask: number;
  private readonly sample: number;
  private records: number;

  /** For a cache of `capacity` entries. */
  constructor(capacity: number) {
    const blocks = 2 ** Math.ceil(Math.log2(Math.max(64, capacity / ROW)));
    this.counters = new Uint8Array(blocks * BLOCK);
    this.mask = blocks - 1;
    this.sample = Math.max(64, 10 * capacity);
    this.records = 0;
  }

  record(page: number): void {
    const h = spread(page);
    const base = (h & this.mask) * BLOCK;
    const slices = Math.imul(h, 0x9e3779b1) >>> 16;
    for (let row = 0; row < 4; row++) {
      const at = base + row * ROW + ((slices >>> (row * 4)) & (ROW - 1));
      const count = this.counters[at] ?? MAX;
      if (count < MAX) this.counters[at] = count + 1;
    }
    if (++this.records >= this.sample) this.halve();
  }

  estimate(page: number): number {
    const h = spread(page);
    const base = (h & this.mask) * BLOCK;
    const slices = Math.imul(h, 0x9e3779b1) >>> 16;
    let least = MAX;
    for (let row = 0; row < 4; row++) least = Math.min(least, this.counters[base + row * ROW + ((slices >>> (row * 4)) & (ROW - 1))] ?? 0);
    return least;
  }

  private halve(): void {
    this.records = 0;
    for (let i = 0; i < this.counters.length; i++) this.counters[i] = (this.counters[i] ?? 0) >>> 1;
  }
}

/** A page number (up to 2^53) spread over 32 bits, its high part included. */
function spread(page: number): number {
  let h = (page ^ Math.imul(Math.floor(page / 0x1_0000_0000), 0x7feb352d)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x7feb352d);
  h = Math.imul(h ^ (h >>> 15), 0x846ca68b);
  return (h ^ (h >>> 16)) >>> 0;
}
