// Server memory: the regions application servers bind in the node's `server`
// partition (patent FIG. 13, 16-19), independent of any wire protocol.
//
//   partition table      server extents, each held by one server (owner = server id)
//        |
//   holdings             per server and medium: the extents held, and the free pages
//        |               inside them (FreeRanges)
//   regions              id -> server, random 64-bit key, size, physical ranges
//
// Invariants:
//   - every free page inside a held extent reads as zero: extents are zeroed when a
//     server takes them from the partition, and a region's pages are zeroed when it is
//     freed, so memory is zero-filled before it is handed over and no tenant reads
//     another's data;
//   - an extent with no bound page is handed back to the partition table at once;
//   - a region belongs to one tenancy: one session of one server (a server id and a
//     generation). It is served only to that tenancy, only with its key, and only while
//     the tenancy is live; a new session of the same server id is another tenancy and
//     reaches none of it. end() makes every region of a tenancy unreachable at once, before
//     any of it is zeroed;
//   - a region being freed refuses new I/O and waits for the I/O already in flight before
//     its pages are zeroed, so a late read or write can never touch the next tenant's
//     memory;
//   - nothing of an ended tenancy outlives its release, by construction: binds, frees and
//     releases take turns in one queue; end() queues the release behind every bind that
//     was asked for before it (those binds complete, then the release frees what they
//     made) and a bind that reaches its turn after its tenancy ended takes nothing;
//   - pages whose zeroing failed (a FREE's or a release's: EIO, ENOSPC on a sparse flash
//     file) are kept aside: out of every region and every free list, their extents held
//     by their server in the partition table, so they are handed to no one. Each end()
//     first tries to zero them again and gives back those it can. A release goes on past
//     a region whose zeroing fails, and hands back every extent of the server that no
//     live region and no kept-aside page uses.
//
// Binds, frees and releases run one at a time (they move extents and zero memory); reads
// and writes run concurrently with each other and with them.
//
// A region is made of at most `maxRanges` physical ranges (the rmem BIND reply lists
// them all): a bind that free memory can satisfy only in more pieces fails with
// NO_CAPACITY before anything is bound. A read or write finds its first range by binary
// search over the region's offsets, so its cost grows with the ranges it touches, not
// with the ranges before them.
//
// Known limit: flash extents are zeroed by writing zeros, so binding a large flash
// region costs a write of its size.

import { randomBytes } from 'node:crypto';
import { MisuseError, RuntimeError, asError, isMemstrataError } from '../errors.js';
import { formatSize } from '../units.js';
import type { AllocationTable, PhysicalRange } from './allocation-table.js';
import { FreeRanges, type ByteRange } from './free-ranges.js';
import { MEDIA, type MediumName } from '../kinds.js';
import type { Medium } from './medium.js';
import type { PartitionTable } from './partition-table.js';

export const PAGE_SIZE = 4096;

/** Physical ranges one region may have, unless the owner says otherwise (rmem: MAX_RANGES). */
export const MAX_REGION_RANGES = 4096;

export type PerformanceClass = 'highest' | 'capacity';

export type BindPlacement =
  | { kind: 'medium'; medium: MediumName }
  | { kind: 'class'; class: PerformanceClass }
  | { kind: 'address'; medium: MediumName; address: number };

/**
 * One session of a server: what its regions belong to. A new session of the same server
 * id (after the old one's lease ran out) is a new tenancy and reaches nothing of the old.
 */
export class Tenancy {
  readonly serverId: string;
  /** Counts the node's tenancies; for logs and tables. */
  readonly generation: number;

  constructor(serverId: string, generation: number) {
    this.serverId = serverId;
    this.generation = generation;
  }
}

export class ServerRegion {
  readonly id: number;
  readonly tenancy: Tenancy;
  readonly serverId: string;
  readonly key: bigint;
  readonly size: number;
  readonly ranges: readonly PhysicalRange[];
  /** Offset within the region at which each range starts. */
  readonly offsets: readonly number[];
  inflight: number;
  freeing: boolean;
  drained: (() => void) | undefined;

  constructor(id: number, tenancy: Tenancy, key: bigint, ranges: readonly PhysicalRange[]) {
    this.id = id;
    this.tenancy = tenancy;
    this.serverId = tenancy.serverId;
    this.key = key;
    this.ranges = ranges;
    const offsets: number[] = [];
    let size = 0;
    for (const r of ranges) {
      offsets.push(size);
      size += r.length;
    }
    this.offsets = offsets;
    this.size = size;
    this.inflight = 0;
    this.freeing = false;
    this.drained = undefined;
  }
}

export interface MediumCapacity {
  medium: MediumName;
  total: number;
  partition: number;
  available: number;
  growable: number;
  used: number;
}

interface Holding {
  extents: Set<number>;
  free: FreeRanges;
}

/** Pages a FREE or a release could not zero: handed to no one until a later attempt zeroes them. */
export interface KeptAside {
  serverId: string;
  medium: MediumName;
  start: number;
  length: number;
  /** Why the zeroing failed, the last time it was tried. */
  error: string;
}

/** What end() did: regions freed, and bytes of theirs kept aside because they could not be zeroed. */
export interface EndResult {
  regions: number;
  keptAsideBytes: number;
}

export class ServerMemory {
  private readonly partition: PartitionTable;
  private readonly allocation: AllocationTable;
  private readonly media: ReadonlyMap<MediumName, Medium>;
  private readonly regions: Map<number, ServerRegion>;
  private readonly holdings: Map<string, Map<MediumName, Holding>>;
  private queue: Promise<unknown>;
  private generations: number;
  /** Tenancies end() was called for: nothing of theirs is reachable. */
  private readonly ended: WeakSet<Tenancy>;
  private readonly aside: KeptAside[];
  private readonly maxRanges: number;

  constructor(options: { partition: PartitionTable; allocation: AllocationTable; media: readonly Medium[]; maxRanges?: number }) {
    this.partition = options.partition;
    this.allocation = options.allocation;
    this.media = new Map(options.media.map((m) => [m.name, m]));
    this.regions = new Map();
    this.holdings = new Map();
    this.queue = Promise.resolve();
    this.generations = 0;
    this.ended = new WeakSet();
    this.aside = [];
    this.maxRanges = options.maxRanges ?? MAX_REGION_RANGES;
  }

  /** A new tenancy (session) for `serverId`; what it binds belongs to it alone. */
  open(serverId: string): Tenancy {
    return new Tenancy(serverId, ++this.generations);
  }

  /** False once end() was called for the tenancy. */
  isLive(tenancy: Tenancy): boolean {
    return !this.ended.has(tenancy);
  }

  /** Binds a region of at least `size` bytes (whole pages) for the tenancy (FIG. 16 S154-S155). */
  bind(tenancy: Tenancy, size: number, placement: BindPlacement): Promise<ServerRegion> {
    return this.serialized(() => {
      // Its release is queued ahead of this bind: taking memory now would outlive it.
      if (this.ended.has(tenancy)) throw sessionEnded(tenancy);
      return this.bindNow(tenancy, size, placement);
    });
  }

  /**
   * Frees a region; one the tenancy does not hold, or a wrong key, is a memory violation
   * (FIG. 17 S164). If its zeroing fails the region is gone all the same, its unzeroed
   * pages kept aside, and the failure is thrown.
   */
  async free(tenancy: Tenancy, regionId: number, key: bigint): Promise<void> {
    // A violation is answered at once, not after the binds queued ahead.
    this.lookup(tenancy, regionId, key);
    return this.serialized(async () => {
      const region = this.lookup(tenancy, regionId, key);
      const { failure } = await this.dropRegion(region);
      if (failure !== undefined) throw failure;
    });
  }

  /**
   * Ends a tenancy (its lease ran out, or its server left holding nothing): from now on
   * none of its regions is reachable. Then, in turn behind every bind asked for before,
   * tries again to zero the pages kept aside so far, frees and zeroes every region the
   * tenancy holds (a region whose zeroing fails is freed all the same, its unzeroed
   * pages kept aside), and hands back every extent its server no longer uses (FIG. 15
   * S143). Resolves with the regions freed and the bytes of theirs kept aside.
   */
  end(tenancy: Tenancy): Promise<EndResult> {
    this.ended.add(tenancy);
    return this.serialized(async () => {
      await this.retryKeptAside();
      let regions = 0;
      let keptAsideBytes = 0;
      // Chosen in turn, not when end() was called: regions of binds that were running are included.
      for (const region of [...this.regions.values()]) {
        if (region.tenancy !== tenancy || this.regions.get(region.id) !== region) continue;
        keptAsideBytes += (await this.dropRegion(region)).keptAside;
        regions++;
      }
      this.releaseUnused(tenancy.serverId);
      return { regions, keptAsideBytes };
    });
  }

  /** Pages kept aside because their zeroing failed, with the server whose extents hold them. */
  keptAside(): readonly KeptAside[] {
    return this.aside;
  }

  /** The region, if the tenancy is live, holds it, and the key matches; else a violation that says no more than that. */
  lookup(tenancy: Tenancy, regionId: number, key: bigint): ServerRegion {
    const region = this.regions.get(regionId);
    if (region === undefined || region.tenancy !== tenancy || this.ended.has(tenancy) || region.key !== key || region.freeing) {
      throw new MisuseError('MS_RMEM_VIOLATION', `region ${regionId} is not allocated to server ${tenancy.serverId} with that key`);
    }
    return region;
  }

  /** True while the tenancy holds a region (a session worth keeping for its lease). */
  holds(tenancy: Tenancy): boolean {
    for (const region of this.regions.values()) if (region.tenancy === tenancy) return true;
    return false;
  }

  /** Reads `target.length` bytes at `offset` of the region (FIG. 18). */
  async read(region: ServerRegion, offset: number, target: Buffer): Promise<void> {
    checkBounds(region, offset, target.length);
    region.inflight++;
    try {
      await this.eachPiece(region, offset, target.length, (medium, at, done, n) => medium.read(at, target.subarray(done, done + n)));
    } finally {
      this.settle(region);
    }
  }

  /**
   * `read`, synchronously, when every piece lies on a medium that reads synchronously
   * (readSync: DRAM, and flash while its reads are fast): the rmem read path answers
   * those without a promise. False: use `read` (a medium declined; `target` may hold part
   * of a copy). Throws as `read` does for a range outside the region.
   */
  readNow(region: ServerRegion, offset: number, target: Buffer): boolean {
    checkBounds(region, offset, target.length);
    try {
      return this.readPieces(region, offset, target);
    } catch {
      return false; // declined (FlashMedium.readSync while its reads are slow): `read` reports errors
    }
  }

  private readPieces(region: ServerRegion, offset: number, target: Buffer): boolean {
    let done = 0;
    for (let pass = 0; pass < 2; pass++) {
      // First pass: every piece can be read now; second: read them.
      done = 0;
      for (let i = rangeAt(region.offsets, offset); i < region.ranges.length && done < target.length; i++) {
        const r = region.ranges[i];
        const base = region.offsets[i];
        if (r === undefined || base === undefined || base + r.length <= offset + done) continue;
        const medium = this.medium(r.medium);
        if (medium.readSync === undefined) return false;
        const within = offset + done - base;
        const n = Math.min(r.length - within, target.length - done);
        if (pass === 1) medium.readSync(r.start + within, target.subarray(done, done + n));
        done += n;
      }
    }
    return true;
  }

  /** Writes `data` at `offset` of the region (FIG. 19). */
  async write(region: ServerRegion, offset: number, data: Buffer): Promise<void> {
    checkBounds(region, offset, data.length);
    region.inflight++;
    try {
      await this.eachPiece(region, offset, data.length, (medium, at, done, n) => medium.write(at, data.subarray(done, done + n)));
    } finally {
      this.settle(region);
    }
  }

  /** Per medium: capacity, the server partition, what a bind can have now and by growing, and this tenancy's use (FIG. 14 S132/S136). */
  capacity(tenancy: Tenancy): MediumCapacity[] {
    const serverId = tenancy.serverId;
    return this.partition.usage().map((usage) => {
      const holding = this.holdings.get(serverId)?.get(usage.medium);
      let used = 0;
      for (const region of this.regions.values()) {
        if (region.tenancy !== tenancy) continue;
        for (const r of region.ranges) if (r.medium === usage.medium) used += r.length;
      }
      return {
        medium: usage.medium,
        total: usage.capacity,
        partition: usage.kinds.server.bytes,
        available: (holding?.free.total ?? 0) + usage.kinds.server.idleBytes,
        growable: this.partition.headroom(usage.medium, 'server'),
        used,
      };
    });
  }

  /** Regions currently bound, for tests and status. */
  regionCount(): number {
    return this.regions.size;
  }

  // ---- binding ----

  private async bindNow(tenancy: Tenancy, size: number, placement: BindPlacement): Promise<ServerRegion> {
    const serverId = tenancy.serverId;
    if (!Number.isSafeInteger(size) || size <= 0) {
      throw new MisuseError('MS_RMEM_INVALID', `bind size must be a positive number of bytes, got ${size}`);
    }
    const bytes = Math.ceil(size / PAGE_SIZE) * PAGE_SIZE;
    let ranges: PhysicalRange[];
    if (placement.kind === 'address') {
      ranges = await this.takeAddress(serverId, placement.medium, placement.address, bytes);
    } else if (placement.kind === 'medium') {
      this.medium(placement.medium);
      ranges = await this.take(serverId, placement.medium, bytes, this.maxRanges);
    } else {
      ranges = await this.takeByClass(serverId, placement.class, bytes);
    }
    const key = randomBytes(8).readBigUInt64BE(0);
    let recorded;
    try {
      recorded = this.allocation.add(serverId, ranges);
    } catch (error) {
      this.giveBack(serverId, ranges);
      throw error;
    }
    const region = new ServerRegion(recorded.id, tenancy, key, ranges);
    this.regions.set(region.id, region);
    return region;
  }

  private async takeByClass(serverId: string, cls: PerformanceClass, bytes: number): Promise<PhysicalRange[]> {
    const preference: MediumName[] = cls === 'highest' ? ['dram', 'flash'] : ['flash', 'dram'];
    const order = preference.filter((m) => this.media.has(m));
    const obtainable = order.map((m) => this.obtainable(serverId, m));
    // One medium whole if one can hold it, in the class's order; else both, preferred first.
    for (const [i, medium] of order.entries()) {
      if ((obtainable[i] ?? 0) >= bytes) return this.take(serverId, medium, bytes, this.maxRanges);
    }
    const total = obtainable.reduce((sum, n) => sum + n, 0);
    const [first, second] = order;
    if (first === undefined || second === undefined || total < bytes) {
      throw noCapacity(`cannot bind ${formatSize(bytes)} of class ${cls}: ${formatSize(total)} can be had across ${order.join(' and ')}`);
    }
    const head = Math.floor((obtainable[0] ?? 0) / PAGE_SIZE) * PAGE_SIZE;
    const part = await this.take(serverId, first, head, this.maxRanges);
    try {
      return [...part, ...(await this.take(serverId, second, bytes - head, this.maxRanges - part.length))];
    } catch (error) {
      this.giveBack(serverId, part);
      throw error;
    }
  }

  /** Bytes of `medium` a bind by `serverId` could have, growing the partition if need be. */
  private obtainable(serverId: string, medium: MediumName): number {
    const holding = this.holdings.get(serverId)?.get(medium);
    const extentSize = this.partition.extentSize(medium);
    const idle = this.partition.extents(medium).idleOf('server') * extentSize;
    return (holding?.free.total ?? 0) + idle + this.partition.headroom(medium, 'server');
  }

  /**
   * Takes `bytes` of free pages for the server on one medium, in at most `maxPieces`
   * ranges, taking more extents first if needed.
   */
  private async take(serverId: string, medium: MediumName, bytes: number, maxPieces: number): Promise<PhysicalRange[]> {
    if (bytes === 0) return [];
    const holding = this.holding(serverId, medium);
    const shortfall = bytes - holding.free.total;
    if (shortfall > 0) await this.acquireExtents(serverId, medium, Math.ceil(shortfall / this.partition.extentSize(medium)));
    const pieces = maxPieces > 0 ? holding.free.take(bytes, maxPieces) : undefined;
    if (pieces === undefined) {
      // Extents taken for this bind go back.
      this.releaseUnused(serverId);
      throw noCapacity(`cannot bind ${formatSize(bytes)} on ${medium}: the free memory of server ${serverId} there is in pieces too small to make a region of at most ${this.maxRanges} ranges; free regions or bind less`);
    }
    return pieces.map((p) => ({ medium, start: p.start, length: p.length }));
  }

  /** Takes the exact page range [address, address + bytes) on `medium` for the server. */
  private async takeAddress(serverId: string, medium: MediumName, address: number, bytes: number): Promise<PhysicalRange[]> {
    const device = this.medium(medium);
    if (!Number.isSafeInteger(address) || address % PAGE_SIZE !== 0 || address + bytes > device.capacity) {
      throw new MisuseError('MS_RMEM_INVALID', `bind address ${address} on ${medium} must be page aligned and the range must lie inside the medium`);
    }
    const extentSize = this.partition.extentSize(medium);
    const holding = this.holding(serverId, medium);
    const map = this.partition.extents(medium);
    const wanted: number[] = [];
    for (let e = Math.floor(address / extentSize); e * extentSize < address + bytes; e++) {
      if (holding.extents.has(e)) continue;
      if (map.kindOf(e) !== 'server' || map.ownerOf(e) !== null) {
        throw new MisuseError('MS_RMEM_INVALID', `${medium} address range at ${address} length ${bytes} is not free server memory (extent ${e} is ${map.kindOf(e)}${map.ownerOf(e) === null ? '' : ', in use'})`);
      }
      wanted.push(e);
    }
    // Pages inside extents the server already holds must be free too; check before taking anything.
    for (let e = Math.floor(address / extentSize); e * extentSize < address + bytes; e++) {
      if (!holding.extents.has(e)) continue;
      const from = Math.max(address, e * extentSize);
      const to = Math.min(address + bytes, (e + 1) * extentSize);
      if (!holding.free.contains(from, to - from)) throw new MisuseError('MS_RMEM_INVALID', `${medium} address range at ${address} length ${bytes} overlaps memory this server has bound`);
    }
    this.partition.assignExact(medium, 'server', serverId, wanted);
    await this.adoptExtents(serverId, medium, holding, wanted);
    holding.free.remove(address, bytes);
    return [{ medium, start: address, length: bytes }];
  }

  private async acquireExtents(serverId: string, medium: MediumName, count: number): Promise<void> {
    const extentSize = this.partition.extentSize(medium);
    const map = this.partition.extents(medium);
    const missing = count - map.idleOf('server');
    if (missing > 0) {
      try {
        await this.partition.resize(medium, 'server', (map.countOf('server') + missing) * extentSize);
      } catch (error) {
        if (isMemstrataError(error)) throw noCapacity(`cannot bind on ${medium}: the server partition cannot grow by ${formatSize(missing * extentSize)} (${error.message})`, error);
        throw error;
      }
    }
    let extents: number[];
    try {
      extents = this.partition.assign(medium, 'server', serverId, count * extentSize);
    } catch (error) {
      throw noCapacity(`cannot bind on ${medium}: ${(error as Error).message}`, error);
    }
    await this.adoptExtents(serverId, medium, this.holding(serverId, medium), extents);
  }

  /** Zeroes newly held extents (they may hold a former owner's data) and adds their pages to the free list. */
  private async adoptExtents(serverId: string, medium: MediumName, holding: Holding, extents: readonly number[]): Promise<void> {
    const extentSize = this.partition.extentSize(medium);
    const device = this.medium(medium);
    try {
      for (const run of runsOf(extents)) await device.zero(run.start * extentSize, run.length * extentSize);
    } catch (error) {
      this.partition.release(medium, extents, serverId);
      throw error;
    }
    for (const e of extents) {
      holding.extents.add(e);
      holding.free.add(e * extentSize, extentSize);
    }
  }

  // ---- freeing ----

  /**
   * Takes a region out of every table once its I/O in flight is over, zeroes its pages
   * and gives them back; pages whose zeroing fails are kept aside instead. Returns the
   * bytes kept aside and the first failure.
   */
  private async dropRegion(region: ServerRegion): Promise<{ keptAside: number; failure: Error | undefined }> {
    region.freeing = true;
    if (region.inflight > 0) await new Promise<void>((resolve) => (region.drained = resolve));
    this.regions.delete(region.id);
    this.allocation.remove(region.serverId, region.id);
    const zeroed: PhysicalRange[] = [];
    let keptAside = 0;
    let failure: Error | undefined;
    for (const r of region.ranges) {
      try {
        await this.medium(r.medium).zero(r.start, r.length);
        zeroed.push(r);
      } catch (error) {
        failure ??= asError(error);
        keptAside += r.length;
        this.aside.push({ serverId: region.serverId, medium: r.medium, start: r.start, length: r.length, error: messageOf(error) });
      }
    }
    this.giveBack(region.serverId, zeroed);
    return { keptAside, failure };
  }

  /** Zeroes again the pages kept aside; those that are zero now go back to their server's free pages (and whole extents to the partition). */
  private async retryKeptAside(): Promise<void> {
    for (const entry of [...this.aside]) {
      try {
        await this.medium(entry.medium).zero(entry.start, entry.length);
      } catch (error) {
        entry.error = messageOf(error);
        continue;
      }
      this.aside.splice(this.aside.indexOf(entry), 1);
      this.giveBack(entry.serverId, [{ medium: entry.medium, start: entry.start, length: entry.length }]);
      this.releaseUnused(entry.serverId);
    }
  }

  /** Hands back every extent of the server that holds no page of a live region and none kept aside; forgets an empty holding. */
  private releaseUnused(serverId: string): void {
    const byMedium = this.holdings.get(serverId);
    if (byMedium === undefined) return;
    for (const [medium, holding] of byMedium) {
      const extentSize = this.partition.extentSize(medium);
      const unused = [...holding.extents].filter((e) => holding.free.contains(e * extentSize, extentSize));
      for (const e of unused) {
        holding.free.remove(e * extentSize, extentSize);
        holding.extents.delete(e);
      }
      if (unused.length > 0) this.partition.release(medium, unused, serverId);
      if (holding.extents.size === 0) byMedium.delete(medium);
    }
    if (byMedium.size === 0) this.holdings.delete(serverId);
  }

  /** Returns zeroed pages to the server's free list, and whole free extents to the partition. */
  private giveBack(serverId: string, ranges: readonly PhysicalRange[]): void {
    for (const r of ranges) {
      const holding = this.holding(serverId, r.medium);
      holding.free.add(r.start, r.length);
      const extentSize = this.partition.extentSize(r.medium);
      const released: number[] = [];
      for (let e = Math.floor(r.start / extentSize); e * extentSize < r.start + r.length; e++) {
        if (holding.extents.has(e) && holding.free.contains(e * extentSize, extentSize)) {
          holding.free.remove(e * extentSize, extentSize);
          holding.extents.delete(e);
          released.push(e);
        }
      }
      if (released.length > 0) this.partition.release(r.medium, released, serverId);
    }
  }

  // ---- helpers ----

  private settle(region: ServerRegion): void {
    region.inflight--;
    if (region.inflight === 0 && region.drained !== undefined) {
      const drained = region.drained;
      region.drained = undefined;
      drained();
    }
  }

  private eachPiece(
    region: ServerRegion,
    offset: number,
    length: number,
    io: (medium: Medium, at: number, done: number, n: number) => Promise<void>,
  ): Promise<void> {
    const first = region.ranges[0];
    // The common case, one range: one medium call with no bookkeeping.
    if (region.ranges.length === 1 && first !== undefined) return io(this.medium(first.medium), first.start + offset, 0, length);
    return this.eachPieceSlow(region, offset, length, io);
  }

  private async eachPieceSlow(
    region: ServerRegion,
    offset: number,
    length: number,
    io: (medium: Medium, at: number, done: number, n: number) => Promise<void>,
  ): Promise<void> {
    let done = 0;
    for (let i = rangeAt(region.offsets, offset); i < region.ranges.length && done < length; i++) {
      const r = region.ranges[i];
      const base = region.offsets[i];
      if (r === undefined || base === undefined || base + r.length <= offset + done) continue;
      const within = offset + done - base;
      const n = Math.min(r.length - within, length - done);
      await io(this.medium(r.medium), r.start + within, done, n);
      done += n;
    }
  }

  private holding(serverId: string, medium: MediumName): Holding {
    let byMedium = this.holdings.get(serverId);
    if (byMedium === undefined) {
      byMedium = new Map();
      this.holdings.set(serverId, byMedium);
    }
    let holding = byMedium.get(medium);
    if (holding === undefined) {
      holding = { extents: new Set(), free: new FreeRanges() };
      byMedium.set(medium, holding);
    }
    return holding;
  }

  private medium(name: MediumName): Medium {
    const medium = this.media.get(name);
    if (medium === undefined) throw new MisuseError('MS_RMEM_INVALID', `this node has no ${name} medium (it has ${MEDIA.filter((m) => this.media.has(m)).join(', ') || 'none'})`);
    return medium;
  }

  private serialized<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn);
    this.queue = run.catch(() => undefined);
    return run;
  }
}

function checkBounds(region: ServerRegion, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > region.size) {
    throw new MisuseError('MS_RMEM_RANGE', `offset ${offset} length ${length} lies outside region ${region.id} of ${region.size} bytes`, {
      details: { regionId: region.id, offset, length, size: region.size },
    });
  }
}

/** Index of the range holding `offset`: the last whose starting offset is at most it (binary search). */
function rangeAt(offsets: readonly number[], offset: number): number {
  let lo = 0;
  let hi = offsets.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >>> 1;
    if ((offsets[mid] ?? Infinity) <= offset) lo = mid;
    else hi = mid - 1;
  }
  return Math.max(0, lo);
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function sessionEnded(tenancy: Tenancy): MisuseError {
  return new MisuseError('MS_RMEM_NO_SESSION', `the session of server ${tenancy.serverId} has ended`);
}

function noCapacity(message: string, cause?: unknown): RuntimeError {
  return new RuntimeError('MS_RMEM_NO_CAPACITY', message, cause === undefined ? {} : { cause });
}

/** Sorted extent indexes grouped into contiguous runs. */
function runsOf(extents: readonly number[]): ByteRange[] {
  const sorted = [...extents].sort((a, b) => a - b);
  const runs: ByteRange[] = [];
  for (const e of sorted) {
    const last = runs[runs.length - 1];
    if (last !== undefined && last.start + last.length === e) last.length++;
    else runs.push({ start: e, length: 1 });
  }
  return runs;
}
