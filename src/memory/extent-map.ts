// The extent allocator of one medium: which kind each extent is in and who owns it.
//
//   index:   0      1      2      3      4      5    ...  count-1
//   kind:    cache  cache  server server nvram  free ...
//   owner:   cache  -      srv-a  -      j1     -
//
// An extent is in exactly one kind at a time (one slot per extent makes that true by
// construction). Within a kind, an extent is either idle (owner null) or assigned to one
// owner. Only idle extents change kind, so nothing an owner holds is ever moved under it.
// Per-kind counts are kept alongside so totals never need a scan.
//
// Known limit: picking extents scans the map, O(extents). With the default 1 MiB extents
// that is 1024 slots per GiB, and allocation here is a control-plane operation.

import { KINDS, KIND_CODE, type Kind } from '../kinds.js';
import { MisuseError, RuntimeError } from '../errors.js';

export interface ExtentRun {
  first: number;
  count: number;
  kind: Kind;
  owner: string | null;
}

export class ExtentMap {
  readonly count: number;
  private readonly kinds: Uint8Array;
  private readonly owners: (string | null)[];
  private readonly total: Int32Array;
  private readonly idle: Int32Array;

  /** Starts with every extent idle in `free`. */
  constructor(count: number) {
    this.count = count;
    this.kinds = new Uint8Array(count);
    this.owners = new Array<string | null>(count).fill(null);
    this.total = new Int32Array(KINDS.length);
    this.idle = new Int32Array(KINDS.length);
    this.total[KIND_CODE.free] = count;
    this.idle[KIND_CODE.free] = count;
  }

  kindOf(index: number): Kind {
    return KINDS[this.kinds[index] ?? 0] ?? 'free';
  }

  ownerOf(index: number): string | null {
    return this.owners[index] ?? null;
  }

  /** Extents in `kind`, idle or assigned. */
  countOf(kind: Kind): number {
    return this.total[KIND_CODE[kind]] ?? 0;
  }

  /** Extents in `kind` that no owner holds. */
  idleOf(kind: Kind): number {
    return this.idle[KIND_CODE[kind]] ?? 0;
  }

  /** Extents of `kind` held by `owner`. */
  ownedBy(kind: Kind, owner: string): number[] {
    const code = KIND_CODE[kind];
    const result: number[] = [];
    for (let i = 0; i < this.count; i++) if (this.kinds[i] === code && this.owners[i] === owner) result.push(i);
    return result;
  }

  /** Owners holding extents of `kind`, with how many each holds, most first. */
  ownersOf(kind: Kind): { owner: string; extents: number }[] {
    const code = KIND_CODE[kind];
    const held = new Map<string, number>();
    for (let i = 0; i < this.count; i++) {
      const owner = this.owners[i];
      if (this.kinds[i] === code && owner != null) held.set(owner, (held.get(owner) ?? 0) + 1);
    }
    return [...held].map(([owner, extents]) => ({ owner, extents })).sort((a, b) => b.extents - a.extents || a.owner.localeCompare(b.owner));
  }

  /**
   * Moves `count` idle extents from one kind to another, choosing those nearest to the
   * extents already in `to` so kinds stay in few contiguous runs. All or nothing.
   */
  convert(from: Kind, to: Kind, count: number): number[] {
    if (count === 0 || from === to) return [];
    if (this.idleOf(from) < count) {
      throw new RuntimeError('MS_EXTENTS_EXHAUSTED', `only ${this.idleOf(from)} idle ${from} extents, ${count} needed`);
    }
    const fromCode = KIND_CODE[from];
    const toCode = KIND_CODE[to];
    const distance = this.distanceTo(toCode);
    const candidates: number[] = [];
    for (let i = 0; i < this.count; i++) if (this.kinds[i] === fromCode && this.owners[i] === null) candidates.push(i);
    candidates.sort((a, b) => (distance[a] ?? 0) - (distance[b] ?? 0) || a - b);
    const chosen = candidates.slice(0, count).sort((a, b) => a - b);
    for (const i of chosen) this.kinds[i] = toCode;
    this.shift(fromCode, toCode, chosen.length);
    return chosen;
  }

  /**
   * Gives `count` idle extents of `kind` to `owner`: the lowest contiguous run that fits,
   * else the lowest idle extents wherever they are. All or nothing.
   */
  assign(kind: Kind, owner: string, count: number): number[] {
    if (count === 0) return [];
    const code = KIND_CODE[kind];
    if (this.idleOf(kind) < count) {
      throw new RuntimeError('MS_EXTENTS_EXHAUSTED', `only ${this.idleOf(kind)} idle ${kind} extents, ${count} needed for ${owner}`, {
        details: { kind, owner, idle: this.idleOf(kind), needed: count },
      });
    }
    let chosen: number[] | undefined;
    let runStart = -1;
    for (let i = 0; i < this.count && chosen === undefined; i++) {
      if (this.kinds[i] === code && this.owners[i] === null) {
        if (runStart < 0) runStart = i;
        if (i - runStart + 1 === count) chosen = range(runStart, count);
      } else {
        runStart = -1;
      }
    }
    if (chosen === undefined) {
      chosen = [];
      for (let i = 0; i < this.count && chosen.length < count; i++) if (this.kinds[i] === code && this.owners[i] === null) chosen.push(i);
    }
    for (const i of chosen) this.owners[i] = owner;
    this.idle[code] = (this.idle[code] ?? 0) - count;
    return chosen;
  }

  /** Gives the named extents to `owner`; each must be idle in `kind`. All or nothing. */
  assignExact(kind: Kind, owner: string, indexes: readonly number[]): void {
    const code = KIND_CODE[kind];
    const unique = [...new Set(indexes)];
    for (const i of unique) {
      if (!Number.isInteger(i) || i < 0 || i >= this.count || this.kinds[i] !== code || this.owners[i] !== null) {
        throw new RuntimeError('MS_EXTENTS_EXHAUSTED', `extent ${i} is not an idle ${kind} extent`, { details: { extent: i, kind, owner } });
      }
    }
    for (const i of unique) this.owners[i] = owner;
    this.idle[code] = (this.idle[code] ?? 0) - unique.length;
  }

  /** Hands the named extents from one owner to another without their passing through idle. */
  transfer(indexes: readonly number[], from: string, to: string): void {
    for (const i of indexes) {
      if (!Number.isInteger(i) || i < 0 || i >= this.count || this.owners[i] !== from) {
        throw new MisuseError('MS_EXTENT_NOT_OWNED', `extent ${i} is not held by ${from}`, { details: { extent: i, owner: from } });
      }
    }
    for (const i of indexes) this.owners[i] = to;
  }

  /** Moves the named extents, each idle in `from`, to kind `to`. All or nothing. */
  convertExact(indexes: readonly number[], from: Kind, to: Kind): void {
    const fromCode = KIND_CODE[from];
    const unique = [...new Set(indexes)];
    for (const i of unique) {
      if (!Number.isInteger(i) || i < 0 || i >= this.count || this.kinds[i] !== fromCode || this.owners[i] !== null) {
        throw new RuntimeError('MS_EXTENTS_EXHAUSTED', `extent ${i} is not an idle ${from} extent`, { details: { extent: i, kind: from } });
      }
    }
    if (from === to) return;
    for (const i of unique) this.kinds[i] = KIND_CODE[to];
    this.shift(fromCode, KIND_CODE[to], unique.length);
  }

  /** Takes extents back from `owner`; they stay in their kind, idle. */
  release(indexes: readonly number[], owner: string): void {
    for (const i of indexes) {
      if (!Number.isInteger(i) || i < 0 || i >= this.count || this.owners[i] !== owner) {
        throw new MisuseError('MS_EXTENT_NOT_OWNED', `extent ${i} is not held by ${owner}`, { details: { extent: i, owner } });
      }
    }
    for (const i of new Set(indexes)) {
      this.owners[i] = null;
      const code = this.kinds[i] ?? 0;
      this.idle[code] = (this.idle[code] ?? 0) + 1;
    }
  }

  /** Adjacent extents of the same kind and owner, merged, in address order. */
  runs(): ExtentRun[] {
    const result: ExtentRun[] = [];
    let current: ExtentRun | undefined;
    for (let i = 0; i < this.count; i++) {
      const kind = this.kindOf(i);
      const owner = this.ownerOf(i);
      if (current !== undefined && current.kind === kind && current.owner === owner) {
        current.count++;
      } else {
        current = { first: i, count: 1, kind, owner };
        result.push(current);
      }
    }
    return result;
  }

  private shift(fromCode: number, toCode: number, n: number): void {
    this.total[fromCode] = (this.total[fromCode] ?? 0) - n;
    this.idle[fromCode] = (this.idle[fromCode] ?? 0) - n;
    this.total[toCode] = (this.total[toCode] ?? 0) + n;
    this.idle[toCode] = (this.idle[toCode] ?? 0) + n;
  }

  /** For each extent, how far the nearest extent of `code` is (count when there is none). */
  private distanceTo(code: number): Int32Array {
    const distance = new Int32Array(this.count).fill(this.count);
    let last = -1;
    for (let i = 0; i < this.count; i++) {
      if (this.kinds[i] === code) last = i;
      if (last >= 0) distance[i] = i - last;
    }
    last = -1;
    for (let i = this.count - 1; i >= 0; i--) {
      if (this.kinds[i] === code) last = i;
      if (last >= 0) distance[i] = Math.min(distance[i] ?? this.count, last - i);
    }
    return distance;
  }
}

function range(first: number, count: number): number[] {
  return Array.from({ length: count }, (_, k) => first + k);
}
