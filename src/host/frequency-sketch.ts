// How often each far page was accessed lately, in a fixed amount of memory: the page
// cache's admission filter (TinyLFU). A count-min sketch of four rows of counters up to
// 15, one byte each:
//
//   record    each row's counter for the page + 1 (saturating at 15); every `sample`
//             records all counters are halved (aging), so a page hot long ago does not
//             outweigh one hot now
//   estimate  the smallest of the page's four counters: never below the page's records
//             since the last halving (up to 15), above them only when another page
//             shares its counter in every row
//
// Size: each row has at least 32 counters for each page cached, rounded up to a power of
// two (128 to 256 bytes per 4 KiB page, 3 to 6% of the cache; at least 4 KiB in all, at
// most 64 MiB), against a sample of ten records per page cached. So between two halvings
// a counter takes about 0.3 records of other pages, and a page accessed once is estimated
// at 2 or more (ADMIT_MIN in page-cache.ts) about 0.5% of the time. Past 64 MiB (caches
// over 8 GiB) the sample shrinks instead, to keep that load per counter: the counts then
// age faster than ten records per page. Halving walks the counters four at a time; at
// 64 MiB it takes tens of milliseconds, once per sample. The rows are independent hashes over the whole row: with the four counters of a
// page packed in one 64-byte block instead, a few hot pages sharing a block covered every
// counter of the other pages there, and pages of a one-pass scan got in.

const ROWS = 4;
const MAX = 15;
/** Counters per row for each page cached. */
const COUNTERS_PER_PAGE = 32;
/** Records per page cached between two halvings. */
const SAMPLE_PER_PAGE = 10;
/** log2 of the largest row: 4 rows of 16 Mi counters, 64 MiB. */
const MAX_BITS = 24;
/** Odd multipliers, one per row: each row reads the top bits of its product with the page's hash. */
const SEEDS = [0x9e3779b1, 0x85ebca77, 0xc2b2ae3d, 0x27d4eb2f] as const;

export class FrequencySketch {
  private readonly counters: Uint8Array;
  /** The same bytes four at a time, for halving. */
  private readonly words: Uint32Array;
  /** log2 of a row's width. */
  private readonly bits: number;
  /** A row's width, 2 ** bits. */
  private readonly width: number;
  private readonly sample: number;
  private records: number;

  /** For a cache of `capacity` entries. */
  constructor(capacity: number) {
    this.bits = Math.min(MAX_BITS, Math.ceil(Math.log2(Math.max(1024, COUNTERS_PER_PAGE * capacity))));
    this.width = 2 ** this.bits;
    this.counters = new Uint8Array(ROWS * this.width);
    this.words = new Uint32Array(this.counters.buffer);
    this.sample = Math.max(64, Math.min(SAMPLE_PER_PAGE * capacity, (this.width * SAMPLE_PER_PAGE) / COUNTERS_PER_PAGE));
    this.records = 0;
  }

  record(page: number): void {
    const h = spread(page);
    for (let row = 0; row < ROWS; row++) {
      const at = this.index(h, row);
      const count = this.counters[at] ?? MAX;
      if (count < MAX) this.counters[at] = count + 1;
    }
    if (++this.records >= this.sample) this.halve();
  }

  estimate(page: number): number {
    const h = spread(page);
    let least = MAX;
    for (let row = 0; row < ROWS; row++) least = Math.min(least, this.counters[this.index(h, row)] ?? 0);
    return least;
  }

  private index(h: number, row: number): number {
    return row * this.width + (Math.imul(h, SEEDS[row] ?? 1) >>> (32 - this.bits));
  }

  private halve(): void {
    this.records = 0;
    // Each byte shifted right by one: the bit that crosses into the byte below is masked off.
    for (let i = 0; i < this.words.length; i++) this.words[i] = ((this.words[i] ?? 0) >>> 1) & 0x7f7f7f7f;
  }
}

/** A page number (up to 2^53) spread over 32 bits, its high part included. */
function spread(page: number): number {
  let h = (page ^ Math.imul(Math.floor(page / 0x1_0000_0000), 0x7feb352d)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x7feb352d);
  h = Math.imul(h ^ (h >>> 15), 0x846ca68b);
  return (h ^ (h >>> 16)) >>> 0;
}
