// The server memory allocate table (patent FIG. 13): for each server, the regions it
// holds and, per region, the physical ranges on each medium.
//
//   server id   region   medium   physical address
//   srv-a       1        dram     0x00006000 to 0x00007fff
//   srv-a       2        flash    0x00100000 to 0x001fffff
//
// The rmem service fills it on bind and empties it on free and at lease expiry. The
// table is the authority on who holds which bytes: no two regions, of any servers,
// overlap on a medium, and region ids are never reused while the node runs, so a stale
// id from a freed region can never name someone else's memory.
//
// Known limit: the overlap check scans the ranges of the medium, O(regions) per add.

import { MisuseError } from '../errors.js';
import type { MediumName } from '../kinds.js';
import type { ServerSummary } from '../protocol/admin/api.js';
export type { ServerSummary };

export interface PhysicalRange {
  medium: MediumName;
  start: number;
  length: number;
}

export interface Region {
  id: number;
  serverId: string;
  ranges: readonly PhysicalRange[];
  bytes: number;
  createdAt: number;
}

export interface AllocationRow {
  serverId: string;
  regionId: number;
  medium: MediumName;
  start: number;
  length: number;
}

export class AllocationTable {
  private readonly byServer: Map<string, Map<number, Region>>;
  private nextId: number;

  constructor() {
    this.byServer = new Map();
    this.nextId = 1;
  }

  /** Records a new region for `serverId`; fails with MS_ALLOC_OVERLAP if a range is already held. */
  add(serverId: string, ranges: readonly PhysicalRange[], now = Date.now()): Region {
    for (const [i, range] of ranges.entries()) {
      if (!Number.isSafeInteger(range.start) || !Number.isSafeInteger(range.length) || range.start < 0 || range.length <= 0) {
        throw new MisuseError('MS_BAD_REQUEST', `range ${i} of the region is not a valid physical range`, { details: { ...range } });
      }
      for (const other of ranges.slice(0, i)) if (overlaps(range, other)) throw overlapError(range, serverId, 0);
      const holder = this.holderOf(range);
      if (holder !== undefined) throw overlapError(range, holder.serverId, holder.id);
    }
    const region: Region = {
      id: this.nextId++,
      serverId,
      ranges: ranges.map((r) => ({ ...r })),
      bytes: ranges.reduce((sum, r) => sum + r.length, 0),
      createdAt: now,
    };
    let regions = this.byServer.get(serverId);
    if (regions === undefined) {
      regions = new Map();
      this.byServer.set(serverId, regions);
    }
    regions.set(region.id, region);
    return region;
  }

  /** The region if and only if `serverId` holds it. */
  region(serverId: string, regionId: number): Region | undefined {
    return this.byServer.get(serverId)?.get(regionId);
  }

  /** Removes one region of `serverId`; a region the server does not hold is a violation (FIG. 17 S164). */
  remove(serverId: string, regionId: number): Region {
    const regions = this.byServer.get(serverId);
    const region = regions?.get(regionId);
    if (regions === undefined || region === undefined) {
      throw new MisuseError('MS_ALLOC_UNKNOWN_REGION', `region ${regionId} is not allocated to server ${serverId}`, {
        details: { serverId, regionId },
      });
    }
    regions.delete(regionId);
    if (regions.size === 0) this.byServer.delete(serverId);
    return region;
  }

  /** Removes every region of a server and the server itself (FIG. 15 S143). */
  removeServer(serverId: string): Region[] {
    const regions = [...(this.byServer.get(serverId)?.values() ?? [])];
    this.byServer.delete(serverId);
    return regions;
  }

  servers(): ServerSummary[] {
    return [...this.byServer.keys()].sort().map((serverId) => {
      const regions = [...(this.byServer.get(serverId)?.values() ?? [])];
      const bytes: Partial<Record<MediumName, number>> = {};
      for (const region of regions) for (const r of region.ranges) bytes[r.medium] = (bytes[r.medium] ?? 0) + r.length;
      return { serverId, regions: regions.length, bytes };
    });
  }

  /** One row per physical range, by server, then region, then address. */
  rows(): AllocationRow[] {
    const rows: AllocationRow[] = [];
    for (const serverId of [...this.byServer.keys()].sort()) {
      const regions = [...(this.byServer.get(serverId)?.values() ?? [])].sort((a, b) => a.id - b.id);
      for (const region of regions) {
        for (const r of region.ranges) rows.push({ serverId, regionId: region.id, medium: r.medium, start: r.start, length: r.length });
      }
    }
    return rows;
  }

  private holderOf(range: PhysicalRange): Region | undefined {
    for (const regions of this.byServer.values()) {
      for (const region of regions.values()) if (region.ranges.some((r) => overlaps(r, range))) return region;
    }
    return undefined;
  }
}

function overlaps(a: PhysicalRange, b: PhysicalRange): boolean {
  return a.medium === b.medium && a.start < b.start + b.length && b.start < a.start + a.length;
}

function overlapError(range: PhysicalRange, serverId: string, regionId: number): MisuseError {
  const holder = regionId === 0 ? 'another range of the same region' : `region ${regionId} of server ${serverId}`;
  return new MisuseError('MS_ALLOC_OVERLAP', `${range.medium} range at ${range.start} length ${range.length} overlaps ${holder}`, {
    details: { medium: range.medium, start: range.start, length: range.length, serverId, regionId },
  });
}
