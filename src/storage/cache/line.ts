// A cache line and the sector masks every cache module shares.
//
//   volume offset -> line index (64 KiB) -> 16 sectors of 4 KiB
//   valid  bit s: sector s of the slot holds the volume's current bytes
//   dirty  bit s: ... and they are not yet in the data store (dirty implies valid)
//
// A line lives in one slot of one level at a time (`medium`, `slot`); `queue` says where
// the replacement policy keeps it. Fields are set in the constructor so every line has
// the same shape.

import type { MediumName } from '../../kinds.js';
import type { Volume } from '../volume-manager.js';

export const LINE_SIZE = 64 * 1024;
export const SECTOR_SIZE = 4096;
export const SECTORS = LINE_SIZE / SECTOR_SIZE;
export const ALL_SECTORS = (1 << SECTORS) - 1;

/** Where the replacement policy holds a line: DRAM's A1in or Am, or the flash LRU. */
export type Queue = 'a1in' | 'am' | 'flash';

export class Line {
  readonly volume: Volume;
  readonly index: number;
  /** Unique per (volume object, index): the key of the line's lock. */
  readonly key: string;
  medium: MediumName;
  slot: number;
  valid: number;
  dirty: number;
  /** Date.now() when the line last went from clean to dirty. */
  dirtySince: number;
  queue: Queue;
  /** Replacement clock at the line's first reference in A1in (correlated-reference window). */
  firstRef: number;
  /** The replacement list the line is in, and its neighbours there (replacement.ts). */
  chain: object | undefined;
  older: Line | undefined;
  newer: Line | undefined;

  constructor(volume: Volume, index: number, key: string, medium: MediumName, slot: number) {
    this.volume = volume;
    this.index = index;
    this.key = key;
    this.medium = medium;
    this.slot = slot;
    this.valid = 0;
    this.dirty = 0;
    this.dirtySince = 0;
    this.queue = 'a1in';
    this.firstRef = 0;
    this.chain = undefined;
    this.older = undefined;
    this.newer = undefined;
  }
}

/** A piece of a request that falls in one line. */
export interface Piece {
  index: number;
  /** Offset of the piece within its line. */
  within: number;
  length: number;
  /** Offset of the piece within the request's buffer. */
  at: number;
}

/** Cuts [offset, offset + length) at line boundaries. */
export function pieces(offset: number, length: number): Piece[] {
  const result: Piece[] = [];
  let at = 0;
  while (at < length) {
    const pos = offset + at;
    const index = Math.floor(pos / LINE_SIZE);
    const within = pos - index * LINE_SIZE;
    const n = Math.min(LINE_SIZE - within, length - at);
    result.push({ index, within, length: n, at });
    at += n;
  }
  return result;
}

/** Sectors touched by [within, within + length) of a line. */
export function sectorMask(within: number, length: number): number {
  if (length <= 0) return 0;
  const first = Math.floor(within / SECTOR_SIZE);
  const last = Math.floor((within + length - 1) / SECTOR_SIZE);
  return (ALL_SECTORS >>> (SECTORS - (last - first + 1))) << first;
}

/** Sectors wholly covered by [within, within + length). */
export function fullSectorMask(within: number, length: number): number {
  const first = Math.ceil(within / SECTOR_SIZE);
  const end = Math.floor((within + length) / SECTOR_SIZE);
  if (end <= first) return 0;
  return (ALL_SECTORS >>> (SECTORS - (end - first))) << first;
}

export function popcount(x: number): number {
  let n = 0;
  for (let v = x; v !== 0; v &= v - 1) n++;
  return n;
}

export function lowestBit(x: number): number {
  return 31 - Math.clz32(x & -x);
}

export function highestBit(x: number): number {
  return 31 - Math.clz32(x);
}

/** Runs of consecutive set bits of `mask`, as [first, last] sector pairs in order. */
export function runsOf(mask: number): [number, number][] {
  const runs: [number, number][] = [];
  let s = 0;
  while (s < SECTORS) {
    if ((mask & (1 << s)) === 0) {
      s++;
      continue;
    }
    let e = s;
    while (e + 1 < SECTORS && (mask & (1 << (e + 1))) !== 0) e++;
    runs.push([s, e]);
    s = e + 1;
  }
  return runs;
}
