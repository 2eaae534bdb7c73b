// A set of free byte ranges on one medium, kept sorted and coalesced.
//
//   [0x0000, +0x3000) [0x8000, +0x1000) [0x20000, +0x100000)
//
// Used by server memory to hand out pages inside the extents a server holds. Ranges
// never overlap and never touch (touching ranges are merged on insert), so `total` is
// the exact free byte count and a run of free bytes is always one entry.
//
// Known limit: inserts and removals splice a sorted array, O(ranges). A server's free
// list stays short because whole free extents are handed back to the partition table.

export interface ByteRange {
  start: number;
  length: number;
}

export class FreeRanges {
  private readonly ranges: ByteRange[];
  private bytes: number;

  constructor() {
    this.ranges = [];
    this.bytes = 0;
  }

  get total(): number {
    return this.bytes;
  }

  list(): readonly ByteRange[] {
    return this.ranges;
  }

  /** Adds a range that must not overlap anything already free. */
  add(start: number, length: number): void {
    if (length <= 0) return;
    const i = this.firstEndingAfter(start);
    const next = this.ranges[i];
    if (next !== undefined && next.start < start + length) {
      throw new Error(`free range [${start}, +${length}) overlaps [${next.start}, +${next.length})`);
    }
    const prev = this.ranges[i - 1];
    const mergePrev = prev !== undefined && prev.start + prev.length === start;
    const mergeNext = next !== undefined && next.start === start + length;
    if (mergePrev && mergeNext) {
      prev.length += length + next.length;
      this.ranges.splice(i, 1);
    } else if (mergePrev) {
      prev.length += length;
    } else if (mergeNext) {
      next.start = start;
      next.length += length;
    } else {
      this.ranges.splice(i, 0, { start, length });
    }
    this.bytes += length;
  }

  /**
   * Takes `length` bytes in at most `maxPieces` pieces: from the first range that holds
   * them all, or else from the lowest ranges in address order, or, if that takes too
   * many pieces, from the largest ranges (the fewest pieces there can be). Returns the
   * pieces in address order, or undefined (nothing taken) if not enough is free in that
   * many pieces.
   */
  take(length: number, maxPieces = Infinity): ByteRange[] | undefined {
    if (length > this.bytes) return undefined;
    if (length === 0) return [];
    const fit = this.ranges.find((r) => r.length >= length);
    if (fit !== undefined) {
      const start = fit.start;
      this.remove(start, length);
      return [{ start, length }];
    }
    let pieces = piecesOf(this.ranges, length, maxPieces);
    if (pieces === undefined) {
      pieces = piecesOf([...this.ranges].sort((a, b) => b.length - a.length), length, maxPieces);
      if (pieces === undefined) return undefined;
      pieces.sort((a, b) => a.start - b.start);
    }
    for (const p of pieces) this.remove(p.start, p.length);
    return pieces;
  }

  /** True if every byte of the range is free. */
  contains(start: number, length: number): boolean {
    const r = this.ranges[this.firstEndingAfter(start)];
    return r !== undefined && r.start <= start && start + length <= r.start + r.length;
  }

  /** Removes a range that must be wholly free. */
  remove(start: number, length: number): void {
    if (length <= 0) return;
    const i = this.firstEndingAfter(start);
    const r = this.ranges[i];
    if (r === undefined || r.start > start || start + length > r.start + r.length) {
      throw new Error(`range [${start}, +${length}) is not wholly free`);
    }
    const before = start - r.start;
    const after = r.start + r.length - (start + length);
    if (before > 0 && after > 0) {
      r.length = before;
      this.ranges.splice(i + 1, 0, { start: start + length, length: after });
    } else if (before > 0) {
      r.length = before;
    } else if (after > 0) {
      r.start = start + length;
      r.length = after;
    } else {
      this.ranges.splice(i, 1);
    }
    this.bytes -= length;
  }

  /** Index of the first range whose end lies beyond `at` (binary search). */
  private firstEndingAfter(at: number): number {
    let lo = 0;
    let hi = this.ranges.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const r = this.ranges[mid];
      if (r !== undefined && r.start + r.length <= at) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}

/** `length` bytes from `ranges` in their order, or undefined if that takes more than `maxPieces` pieces. */
function piecesOf(ranges: readonly ByteRange[], length: number, maxPieces: number): ByteRange[] | undefined {
  const pieces: ByteRange[] = [];
  let left = length;
  for (const r of ranges) {
    if (left === 0) break;
    if (pieces.length === maxPieces) return undefined;
    const n = Math.min(r.length, left);
    pieces.push({ start: r.start, length: n });
    left -= n;
  }
  return left === 0 ? pieces : undefined;
}
