// The memory partition table (patent FIG. 12): for every medium, which kind each extent
// serves (`cache`, `server`, `nvram`, `free`) and which owner holds it.
//
// Invariants, checked by the property tests:
//   - every extent is in exactly one kind, so the kinds of a medium add up to its capacity;
//   - the bytes in each used kind stay within its configured [min, max] on that medium
//     after every resize (the initial layout is validated against the same bounds);
//   - an extent held by an owner never changes kind; to take it back the table first asks
//     the owner through its reclaimer (the cache will evict or destage there) and moves
//     only what was handed back.
//
// Resizes run one at a time in a queue, since they may wait on reclaimers. A resize is all
// or nothing: either the kind reaches the requested size or nothing changes kind (extents
// an owner handed back in a failed attempt stay idle in their kind, which is harmless).
// Extents being moved are reserved from the moment they are found or handed back until
// they change kind, so an owner cannot take back what it just gave (the cache adopts
// idle cache extents whenever it runs out of slots), and exactly the extents an owner
// drained are the ones that change kind.
//
// Growth takes `free` extents first, then idle and reclaimable `cache` extents above the
// cache minimum. `server` and `nvram` extents hold data that cannot be evicted, so they
// are never donors.

import { MisuseError, RuntimeError } from '../errors.js';
import { formatSize } from '../units.js';
import { ExtentMap } from './extent-map.js';
import { MEDIA, USED_KINDS, type Kind, type MediumName, type UsedKind } from '../kinds.js';
import type { KindUsage, MediumUsage, ResizeResult } from '../protocol/admin/api.js';
export type { KindUsage, MediumUsage, ResizeResult };

export interface PartitionBounds {
  min: number;
  max: number;
}

export interface MediumLayout {
  name: MediumName;
  capacity: number;
  extentSize: number;
  /** Bytes of each used kind at start, laid out in the order cache, server, nvram from address 0. */
  initial: Record<UsedKind, number>;
  bounds: Record<UsedKind, PartitionBounds>;
}

export interface ReclaimRequest {
  medium: MediumName;
  kind: Kind;
  /** How many extents the table would like back. */
  extents: number;
}

/** Asked to hand back up to `extents` extents; resolves with the ones it no longer uses. */
export type Reclaimer = (request: ReclaimRequest) => Promise<readonly number[]>;

export interface PartitionRow {
  medium: MediumName;
  start: number;
  length: number;
  kind: Kind;
  owner: string | null;
}

interface MediumState {
  layout: MediumLayout;
  map: ExtentMap;
}

/** The owner of extents taken out of reach during a resize (never a real owner: not a valid name). */
const RESERVED = '\u0000resize';

/** Kinds that give up extents when another kind grows, in the order asked. */
const DONORS: readonly ('free' | 'cache')[] = ['free', 'cache'];

export class PartitionTable {
  private readonly media: Map<MediumName, MediumState>;
  private readonly reclaimers: Map<string, Reclaimer>;
  private queue: Promise<unknown>;

  constructor(layouts: readonly MediumLayout[]) {
    this.media = new Map();
    this.reclaimers = new Map();
    this.queue = Promise.resolve();
    for (const layout of layouts) {
      const map = new ExtentMap(Math.floor(layout.capacity / layout.extentSize));
      for (const kind of USED_KINDS) map.convert('free', kind, Math.floor(layout.initial[kind] / layout.extentSize));
      this.media.set(layout.name, { layout, map });
    }
  }

  mediumNames(): MediumName[] {
    return MEDIA.filter((name) => this.media.has(name));
  }

  extentSize(medium: MediumName): number {
    return this.state(medium).layout.extentSize;
  }

  /** The extent allocator of one medium, read-only use intended (tests, display). */
  extents(medium: MediumName): ExtentMap {
    return this.state(medium).map;
  }

  /** Registers the hook an owner is asked through before its extents are taken back. */
  setReclaimer(owner: string, reclaimer: Reclaimer): void {
    this.reclaimers.set(owner, reclaimer);
  }

  removeReclaimer(owner: string): void {
    this.reclaimers.delete(owner);
  }

  /**
   * Gives `owner` enough idle extents of `kind` to hold `bytes` (rounded up to extents).
   * Returns the extent indexes; fails with MS_EXTENTS_EXHAUSTED when the kind lacks them.
   */
  assign(medium: MediumName, kind: UsedKind, owner: string, bytes: number): number[] {
    const { layout, map } = this.state(medium);
    return map.assign(kind, owner, Math.ceil(bytes / layout.extentSize));
  }

  /** Gives `owner` the named extents, each idle in `kind`; fails with MS_EXTENTS_EXHAUSTED otherwise. */
  assignExact(medium: MediumName, kind: UsedKind, owner: string, extents: readonly number[]): void {
    this.state(medium).map.assignExact(kind, owner, extents);
  }

  /**
   * Bytes `kind` could still grow by on `medium`: up to its maximum, from free extents and
   * from cache extents above the cache minimum (those may first have to be reclaimed).
   */
  headroom(medium: MediumName, kind: UsedKind): number {
    const { layout, map } = this.state(medium);
    const toMax = Math.max(0, Math.floor(layout.bounds[kind].max / layout.extentSize) - map.countOf(kind));
    const donors = this.donorPlan(medium, kind, toMax).reduce((sum, step) => sum + step.extents, 0);
    return donors * layout.extentSize;
  }

  /** Takes extents back from `owner`; they stay idle in their kind. */
  release(medium: MediumName, extents: readonly number[], owner: string): void {
    this.state(medium).map.release(extents, owner);
  }

  /** Sets the size of one kind on one medium, moving extents to or from other kinds. */
  resize(medium: MediumName, kind: UsedKind, bytes: number): Promise<ResizeResult> {
    const run = this.queue.then(() => this.resizeNow(medium, kind, bytes));
    this.queue = run.catch(() => undefined);
    return run;
  }

  /** Adjacent extents of the same medium, kind and owner merged, in address order. */
  rows(): PartitionRow[] {
    const rows: PartitionRow[] = [];
    for (const name of this.mediumNames()) {
      const { layout, map } = this.state(name);
      for (const run of map.runs()) {
        rows.push({ medium: name, start: run.first * layout.extentSize, length: run.count * layout.extentSize, kind: run.kind, owner: run.owner });
      }
    }
    return rows;
  }

  usage(): MediumUsage[] {
    return this.mediumNames().map((name) => {
      const { layout, map } = this.state(name);
      const usageOf = (kind: Kind, bounds: PartitionBounds): KindUsage => ({
        bytes: map.countOf(kind) * layout.extentSize,
        idleBytes: map.idleOf(kind) * layout.extentSize,
        min: bounds.min,
        max: bounds.max,
      });
      return {
        medium: name,
        capacity: map.count * layout.extentSize,
        extentSize: layout.extentSize,
        kinds: {
          free: usageOf('free', { min: 0, max: map.count * layout.extentSize }),
          cache: usageOf('cache', layout.bounds.cache),
          server: usageOf('server', layout.bounds.server),
          nvram: usageOf('nvram', layout.bounds.nvram),
        },
      };
    });
  }

  private state(medium: MediumName): MediumState {
    const state = this.media.get(medium);
    if (state === undefined) throw new MisuseError('MS_BAD_REQUEST', `this node has no ${medium} medium`);
    return state;
  }

  private async resizeNow(medium: MediumName, kind: UsedKind, bytes: number): Promise<ResizeResult> {
    const { layout, map } = this.state(medium);
    const size = layout.extentSize;
    if (!Number.isSafeInteger(bytes) || bytes < 0 || bytes % size !== 0) {
      throw new MisuseError('MS_PARTITION_ALIGN', `${medium} ${kind}: ${bytes} bytes is not a whole number of ${formatSize(size)} extents`, {
        details: { medium, kind, bytes, extentSize: size },
      });
    }
    const bounds = layout.bounds[kind];
    if (bytes < bounds.min || bytes > bounds.max) {
      throw new MisuseError(
        'MS_PARTITION_BOUND',
        `${medium} ${kind} must stay between ${formatSize(bounds.min)} and ${formatSize(bounds.max)}; ${formatSize(bytes)} is outside`,
        { details: { medium, kind, bytes, min: bounds.min, max: bounds.max } },
      );
    }
    const fromBytes = map.countOf(kind) * size;
    const target = bytes / size;
    const current = map.countOf(kind);
    const result: ResizeResult = { medium, kind, fromBytes, toBytes: bytes, moved: {}, reclaimedBytes: 0 };
    if (target > current) await this.grow(medium, kind, target - current, result);
    else if (target < current) await this.shrink(medium, kind, current - target, result);
    return result;
  }

  private async grow(medium: MediumName, kind: UsedKind, need: number, result: ResizeResult): Promise<void> {
    const { layout, map } = this.state(medium);
    const size = layout.extentSize;
    const plan = this.donorPlan(medium, kind, need);
    const left = need - plan.reduce((sum, step) => sum + step.extents, 0);
    if (left > 0) {
      const available = (need - left) * size;
      throw new RuntimeError(
        'MS_PARTITION_NO_CAPACITY',
        `${medium} ${kind} cannot grow by ${formatSize(need * size)}: free and reclaimable cache extents above the cache minimum add up to ${formatSize(available)}`,
        { details: { medium, kind, needed: need * size, available } },
      );
    }
    // Extents of an owned kind (cache) are reserved as they are found, idle or handed
    // back, so that no owner can take them again while the others are being asked.
    const reserved = new Map<Kind, number[]>();
    try {
      for (const step of plan) {
        if (step.donor === 'free') {
          if (map.idleOf('free') < step.extents) throw this.busy(medium, 'free', step.extents, map.idleOf('free'));
          continue;
        }
        const held = this.reserve(medium, step.donor, Math.min(step.extents, map.idleOf(step.donor)));
        reserved.set(step.donor, held);
        const short = step.extents - held.length;
        if (short > 0) {
          const returned = await this.reclaim(medium, step.donor, short);
          held.push(...returned);
          result.reclaimedBytes += returned.length * size;
        }
        if (held.length < step.extents) throw this.busy(medium, step.donor, step.extents, held.length);
      }
    } catch (error) {
      for (const held of reserved.values()) map.release(held, RESERVED);
      throw error;
    }
    for (const step of plan) {
      const held = reserved.get(step.donor);
      if (held === undefined) {
        map.convert(step.donor, kind, step.extents);
      } else {
        map.release(held, RESERVED);
        map.convertExact(held, step.donor, kind);
      }
      result.moved[step.donor] = step.extents * size;
    }
  }

  private async shrink(medium: MediumName, kind: UsedKind, excess: number, result: ResizeResult): Promise<void> {
    const { layout, map } = this.state(medium);
    const held = this.reserve(medium, kind, Math.min(excess, map.idleOf(kind)));
    try {
      const short = excess - held.length;
      if (short > 0) {
        const returned = await this.reclaim(medium, kind, short);
        held.push(...returned);
        result.reclaimedBytes += returned.length * layout.extentSize;
      }
      if (held.length < excess) throw this.busy(medium, kind, excess, held.length);
    } catch (error) {
      map.release(held, RESERVED);
      throw error;
    }
    map.release(held, RESERVED);
    map.convertExact(held, kind, 'free');
    result.moved.free = -excess * layout.extentSize;
  }

  /** Takes `count` idle extents of `kind` out of reach of every owner until released. */
  private reserve(medium: MediumName, kind: Kind, count: number): number[] {
    return count > 0 ? this.state(medium).map.assign(kind, RESERVED, count) : [];
  }

  /** How many extents each donor may give towards `need`, without dropping below its own minimum. */
  private donorPlan(medium: MediumName, kind: UsedKind, need: number): { donor: Kind; extents: number }[] {
    const { layout, map } = this.state(medium);
    const plan: { donor: Kind; extents: number }[] = [];
    let left = need;
    for (const donor of DONORS) {
      if (donor === kind || left === 0) continue;
      const floor = donor === 'free' ? 0 : Math.ceil(layout.bounds[donor].min / layout.extentSize);
      const give = Math.min(left, Math.max(0, map.countOf(donor) - floor));
      if (give > 0) plan.push({ donor, extents: give });
      left -= give;
    }
    return plan;
  }

  /**
   * Asks the owners of `kind`, largest holder first, for `wanted` extents. What they hand
   * back is reserved at once (see grow) and returned.
   */
  private async reclaim(medium: MediumName, kind: Kind, wanted: number): Promise<number[]> {
    const { map } = this.state(medium);
    const got: number[] = [];
    for (const { owner, extents } of map.ownersOf(kind)) {
      if (got.length >= wanted || owner === RESERVED) continue;
      const reclaimer = this.reclaimers.get(owner);
      if (reclaimer === undefined) continue;
      try {
        const returned = [...new Set(await reclaimer({ medium, kind, extents: Math.min(extents, wanted - got.length) }))];
        map.transfer(returned, owner, RESERVED);
        got.push(...returned);
      } catch {
        // An owner that cannot give back counts as having given nothing; the caller
        // reports the shortfall as MS_PARTITION_BUSY.
      }
    }
    return got;
  }

  private busy(medium: MediumName, kind: Kind, needed: number, idle: number): RuntimeError {
    const size = this.state(medium).layout.extentSize;
    return new RuntimeError(
      'MS_PARTITION_BUSY',
      `${medium} ${kind}: ${formatSize(needed * size)} must be given back but its owners released only enough for ${formatSize(idle * size)}`,
      { details: { medium, kind, needed: needed * size, idle: idle * size } },
    );
  }
}
