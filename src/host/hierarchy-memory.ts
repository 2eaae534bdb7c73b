// HierarchyMemory: a host's own memory hierarchy (Hitachi US 9,304,828, FIG. 10-11 and
// 14-17): local DRAM, local flash, remote DRAM and flash on memstrata nodes, and a swap
// volume over NBD as the last resort, behind one virtual address space.
//
//   discovery table (FIG. 10)  device (local, node, swap) -> medium -> offered, assigned
//   mapping table   (FIG. 11)  virtual range -> device -> medium -> physical range
//
// Allocation (FIG. 16) tries tiers in the order of the performance class:
//
//   highest    local dram, local flash, remote dram, remote flash, swap
//   standard              local flash, remote dram, remote flash, swap
//   capacity              local flash, remote flash, remote dram, swap
//
// A local tier and the swap volume take an allocation only when it fits whole. Remote
// memory goes to the node with the most room; when no node can hold it alone, it spans
// nodes. A node is asked for what it offers including what its server partition can
// still grow by (FIG. 14 S134: the node grows the partition when the bind needs it); if
// it refuses, its row is refreshed and the next node or tier is tried.
//
// Virtual addresses are handed out upward in 4 KiB pages and never reused, so a stale
// address is always caught as a violation (FIG. 17) rather than reaching someone else's
// memory.
//
// Segments on nodes or the swap volume are read and written through a page cache in a
// share of the local DRAM budget (page-cache.ts): hot pages are promoted into it, cold
// ones demoted (written back when dirty).

import { NbdClient } from '../client/nbd-client.js';
import { RmemClient, type CapacityEntry } from '../client/rmem-client.js';
import { MisuseError, RuntimeError, isMemstrataError } from '../errors.js';
import { textTable } from '../text-table.js';
import { formatSize, hexRange } from '../units.js';
import { PageCache, type PageCacheStats } from './page-cache.js';
import { LocalDramTier, LocalFlashTier, RemoteNode, SwapTier, remotePiece, type Piece, type TierMedium } from './tiers.js';

export const PAGE = 4096;
/** The first virtual address handed out. */
export const VIRTUAL_BASE = 0x1000_0000;

export const PERFORMANCE_CLASSES = ['highest', 'standard', 'capacity'] as const;
export type PerformanceClass = (typeof PERFORMANCE_CLASSES)[number];

/** A memstrata node the host may borrow from. */
export interface NodeAddress {
  /** Name in the tables; default `host:port`. */
  name?: string;
  host: string;
  /** rmem port; default 10810. */
  port?: number;
  token?: string;
}

export interface HierarchyOptions {
  /** This host's id on every node (its sessions and regions belong to it). */
  serverId: string;
  /** Bytes of local memory the hierarchy may use, the page cache included. */
  localDram: number;
  /**
   * Bytes of `localDram` kept for the page cache of remote and swap-backed segments;
   * default a quarter of it. 0 turns the cache off.
   */
  pageCache?: number;
  /** An optional local flash tier: a file and its size. */
  localFlash?: { path: string; size: number };
  nodes?: readonly NodeAddress[];
  /** An optional swap volume, `nbd://host:port/export`. */
  swap?: string;
  /** rmem request timeout, ms (default 5000); a node that does not answer in time is lost. */
  timeoutMs?: number;
}

export interface AllocOptions {
  /** Default `standard`. */
  class?: PerformanceClass;
  /** Only this medium (`volume` is the swap volume). */
  medium?: TierMedium;
  /** Only this device: `local`, a node name, or `swap`. */
  device?: string;
}

/** A row of the discovery table (FIG. 10). */
export interface DiscoveryRow {
  device: string;
  medium: TierMedium;
  /** Bytes the device offers this host: free now, plus what a node can still grow by. */
  offered: number;
  /** Bytes this host holds there. */
  assigned: number;
  state: 'ok' | 'lost';
}

/** A row of the mapping table (FIG. 11). */
export interface MappingRow {
  virtualStart: number;
  length: number;
  device: string;
  medium: TierMedium;
  physicalStart: number;
}

/** Counters of the hierarchy: the page cache, and bytes moved to and from each tier. */
export interface HierarchyStats {
  cache: PageCacheStats;
  /** Bytes read from and written to each device and medium, page cache traffic included. */
  moved: { device: string; medium: TierMedium; readBytes: number; writtenBytes: number }[];
}

/** One allocation: a range of virtual addresses and the pieces behind it. */
export class Segment {
  readonly address: number;
  readonly size: number;
  readonly class: PerformanceClass;
  private readonly owner: HierarchyMemory;
  /** @internal */
  readonly pieces: readonly Piece[];
  private freed: boolean;

  /** @internal */
  constructor(owner: HierarchyMemory, address: number, size: number, cls: PerformanceClass, pieces: readonly Piece[]) {
    this.owner = owner;
    this.address = address;
    this.size = size;
    this.class = cls;
    this.pieces = pieces;
    this.freed = false;
  }

  get isFreed(): boolean {
    return this.freed;
  }

  /** True when some of it lives off this host (a node or the swap volume): it goes through the page cache. */
  get far(): boolean {
    return this.pieces.some((p) => p.device !== 'local');
  }

  /** Reads `length` bytes at `offset` within the segment. */
  async read(offset: number, length: number): Promise<Buffer> {
    this.check(offset, length);
    return this.owner.read(this.address + offset, length);
  }

  /** Writes `data` at `offset` within the segment. */
  async write(offset: number, data: Uint8Array): Promise<void> {
    this.check(offset, data.length);
    return this.owner.write(this.address + offset, data);
  }

  free(): Promise<void> {
    return this.owner.free(this.address);
  }

  /** This segment's rows of the mapping table. */
  mapping(): MappingRow[] {
    const rows: MappingRow[] = [];
    let at = this.address;
    for (const piece of this.pieces) {
      for (const r of piece.physical) {
        rows.push({ virtualStart: at, length: r.length, device: piece.device, medium: piece.medium, physicalStart: r.start });
        at += r.length;
      }
    }
    return rows;
  }

  /** @internal */
  markFreed(): void {
    this.freed = true;
  }

  /** @internal Serves [offset, offset + target.length) of the segment from its pieces. */
  async readPieces(offset: number, target: Buffer): Promise<void> {
    await this.eachPiece(offset, target.length, (piece, at, from, n) => {
      this.owner.count(piece, 'read', n);
      return piece.read(at, target.subarray(from, from + n));
    });
  }

  /** @internal */
  async writePieces(offset: number, data: Buffer): Promise<void> {
    await this.eachPiece(offset, data.length, (piece, at, from, n) => {
      this.owner.count(piece, 'write', n);
      return piece.write(at, data.subarray(from, from + n));
    });
  }

  private async eachPiece(offset: number, length: number, fn: (piece: Piece, at: number, from: number, n: number) => Promise<void>): Promise<void> {
    let skip = offset;
    let done = 0;
    const work: Promise<void>[] = [];
    for (const piece of this.pieces) {
      if (done === length) break;
      if (skip >= piece.length) {
        skip -= piece.length;
        continue;
      }
      const n = Math.min(piece.length - skip, length - done);
      work.push(fn(piece, skip, done, n));
      done += n;
      skip = 0;
    }
    await Promise.all(work);
  }

  private check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new MisuseError('MS_HOST_VIOLATION', `access at offset ${offset} for ${length} bytes reaches outside the segment at ${hex(this.address)} (${this.size} bytes)`);
    }
  }
}

/**
 * A host's memory hierarchy: one virtual address space over local DRAM, local flash,
 * memory borrowed from memstrata nodes, and a swap volume. Open it with
 * {@link HierarchyMemory.open}, allocate with {@link HierarchyMemory.alloc}, and read
 * and write through the returned {@link Segment} or by virtual address. Errors are coded:
 * MS_HOST_INVALID, MS_HOST_VIOLATION, MS_HOST_NO_CAPACITY and MS_HOST_NODE_LOST.
 */
export class HierarchyMemory {
  readonly serverId: string;
  private readonly dram: LocalDramTier;
  private readonly flash: LocalFlashTier | undefined;
  private readonly nodes: RemoteNode[];
  private readonly swap: SwapTier | undefined;
  private readonly capacity: Map<string, CapacityEntry[]>;
  /** Live segments, sorted by address. */
  private readonly segments: Segment[];
  private readonly cache: PageCache;
  private readonly traffic: Map<string, { device: string; medium: TierMedium; readBytes: number; writtenBytes: number }>;
  private nextAddress: number;
  private closed: boolean;

  private constructor(serverId: string, dram: LocalDramTier, flash: LocalFlashTier | undefined, nodes: RemoteNode[], swap: SwapTier | undefined, cache: PageCache) {
    this.serverId = serverId;
    this.dram = dram;
    this.flash = flash;
    this.nodes = nodes;
    this.swap = swap;
    this.capacity = new Map();
    this.segments = [];
    this.cache = cache;
    this.traffic = new Map();
    this.nextAddress = VIRTUAL_BASE;
    this.closed = false;
  }

  /**
   * Opens the hierarchy: creates the local tiers, connects to every node (HELLO, then
   * CAPACITY for the discovery table) and to the swap volume. A node that cannot be
   * reached fails the open; so does a swap volume.
   */
  static async open(options: HierarchyOptions): Promise<HierarchyMemory> {
    if (!Number.isSafeInteger(options.localDram) || options.localDram < 0) throw new MisuseError('MS_HOST_INVALID', `localDram must be a byte count, got ${options.localDram}`);
    const budget = options.localDram - (options.localDram % PAGE);
    const cacheBytes = options.pageCache ?? Math.floor(budget / 4 / PAGE) * PAGE;
    if (!Number.isSafeInteger(cacheBytes) || cacheBytes < 0 || cacheBytes > budget) {
      throw new MisuseError('MS_HOST_INVALID', `pageCache must be a byte count within localDram (${budget}), got ${cacheBytes}`);
    }
    const dram = new LocalDramTier(budget - (cacheBytes - (cacheBytes % PAGE)));
    let flash: LocalFlashTier | undefined;
    if (options.localFlash !== undefined) {
      const { path, size } = options.localFlash;
      if (!Number.isSafeInteger(size) || size < PAGE) throw new MisuseError('MS_HOST_INVALID', `localFlash.size must be at least ${PAGE} bytes, got ${size}`);
      flash = new LocalFlashTier(path, size - (size % PAGE));
      await flash.open();
    }
    const nodes: RemoteNode[] = [];
    let swap: SwapTier | undefined;
    try {
      const names = new Set<string>();
      for (const address of options.nodes ?? []) {
        const port = address.port ?? 10810;
        const name = address.name ?? `${address.host}:${port}`;
        if (names.has(name) || name === 'local' || name === 'swap') throw new MisuseError('MS_HOST_INVALID', `node name "${name}" is used twice or is reserved`);
        names.add(name);
        const client = await RmemClient.connect({ host: address.host, port, serverId: options.serverId, timeoutMs: options.timeoutMs ?? 5000, ...(address.token === undefined ? {} : { token: address.token }) });
        nodes.push(new RemoteNode(name, `${address.host}:${port}`, client));
      }
      if (options.swap !== undefined) swap = new SwapTier(await NbdClient.connect({ uri: options.swap }));
    } catch (error) {
      for (const n of nodes) await n.client.close().catch(() => undefined);
      await flash?.close();
      throw error;
    }
    const memory = new HierarchyMemory(options.serverId, dram, flash, nodes, swap, new PageCache(cacheBytes));
    await memory.refresh();
    return memory;
  }

  /** Asks every node that is not lost for its capacity again (FIG. 14). */
  async refresh(): Promise<void> {
    await Promise.all(this.nodes.map((n) => this.refreshNode(n)));
  }

  /**
   * Allocates `size` bytes (rounded up to 4 KiB pages) in the first tier of the class's
   * order that can hold them (FIG. 16). Fails with MS_HOST_NO_CAPACITY when none can.
   */
  async alloc(size: number, options: AllocOptions = {}): Promise<Segment> {
    this.checkOpen();
    if (!Number.isSafeInteger(size) || size <= 0) throw new MisuseError('MS_HOST_INVALID', `allocation size must be a positive byte count, got ${size}`);
    const cls = options.class ?? 'standard';
    if (!PERFORMANCE_CLASSES.includes(cls)) throw new MisuseError('MS_HOST_INVALID', `unknown performance class "${cls as string}": expected ${PERFORMANCE_CLASSES.join(', ')}`);
    if (options.device !== undefined && options.device !== 'local' && options.device !== 'swap' && !this.nodes.some((n) => n.name === options.device)) {
      throw new MisuseError('MS_HOST_INVALID', `unknown device "${options.device}": expected local, swap or one of the nodes ${this.nodes.map((n) => n.name).join(', ') || '(none)'}`);
    }
    const length = Math.ceil(size / PAGE) * PAGE;
    for (const step of this.order(cls)) {
      if (options.medium !== undefined && options.medium !== step.medium) continue;
      const pieces = await this.tryStep(step, length, options.device);
      if (pieces !== undefined) {
        const segment = new Segment(this, this.nextAddress, length, cls, pieces);
        this.nextAddress += length;
        this.segments.push(segment);
        return segment;
      }
    }
    throw new RuntimeError('MS_HOST_NO_CAPACITY', `no tier can hold ${formatSize(length)} for class ${cls}${options.medium === undefined ? '' : ` on ${options.medium}`}${options.device === undefined ? '' : ` on ${options.device}`}`, {
      details: { size: length, class: cls, discovery: this.discovery() },
    });
  }

  /** Frees the segment that starts at `address` (FIG. 17); anything else is a violation. */
  async free(address: number): Promise<void> {
    this.checkOpen();
    const i = this.segments.findIndex((s) => s.address === address);
    const segment = this.segments[i];
    if (segment === undefined) {
      throw new MisuseError('MS_HOST_VIOLATION', `free of ${hex(address)}: no segment starts there (never allocated, or already freed)`, { details: { address } });
    }
    this.segments.splice(i, 1);
    segment.markFreed();
    if (segment.far) await this.cache.drop(segment, segment.size);
    const failures: unknown[] = [];
    for (const piece of segment.pieces) await piece.release().catch((error: unknown) => failures.push(error));
    if (failures.length > 0) throw failures[0];
  }

  /** Reads `length` bytes at a virtual address; the range may cross segments that touch. */
  async read(address: number, length: number): Promise<Buffer> {
    this.checkOpen();
    const out = Buffer.alloc(length);
    await Promise.all(
      this.spans(address, length).map(({ segment, offset, from, n }) =>
        segment.far ? this.cache.read(segment, offset, out.subarray(from, from + n)) : segment.readPieces(offset, out.subarray(from, from + n)),
      ),
    );
    return out;
  }

  /** Writes `data` at a virtual address; the range may cross segments that touch. */
  async write(address: number, data: Uint8Array): Promise<void> {
    this.checkOpen();
    const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    await Promise.all(
      this.spans(address, buf.length).map(({ segment, offset, from, n }) =>
        segment.far ? this.cache.write(segment, offset, buf.subarray(from, from + n)) : segment.writePieces(offset, buf.subarray(from, from + n)),
      ),
    );
  }

  /** Writes every dirty page of the page cache back to its tier. */
  async flush(): Promise<void> {
    this.checkOpen();
    await this.cache.flush();
  }

  /** Page cache counters and bytes moved per tier. */
  stats(): HierarchyStats {
    return { cache: this.cache.stats(), moved: [...this.traffic.values()].map((t) => ({ ...t })) };
  }

  /** @internal Counts bytes moved to or from a piece's tier. */
  count(piece: Piece, direction: 'read' | 'write', bytes: number): void {
    const key = `${piece.device}/${piece.medium}`;
    let row = this.traffic.get(key);
    if (row === undefined) {
      row = { device: piece.device, medium: piece.medium, readBytes: 0, writtenBytes: 0 };
      this.traffic.set(key, row);
    }
    if (direction === 'read') row.readBytes += bytes;
    else row.writtenBytes += bytes;
  }

  /** The discovery table (FIG. 10), as data. */
  discovery(): DiscoveryRow[] {
    const rows: DiscoveryRow[] = [{ device: 'local', medium: 'dram', offered: this.dram.available, assigned: this.dram.assigned, state: 'ok' }];
    if (this.flash !== undefined) rows.push({ device: 'local', medium: 'flash', offered: this.flash.available, assigned: this.flash.assigned, state: 'ok' });
    for (const node of this.nodes) {
      for (const entry of this.capacity.get(node.name) ?? []) {
        rows.push({ device: node.name, medium: entry.medium, offered: node.lost ? 0 : entry.available + entry.growable, assigned: entry.used, state: node.lost ? 'lost' : 'ok' });
      }
    }
    if (this.swap !== undefined) rows.push({ device: 'swap', medium: 'volume', offered: this.swap.available, assigned: this.swap.assigned, state: 'ok' });
    return rows;
  }

  /** The mapping table (FIG. 11), as data: one row per physical range, by virtual address. */
  mapping(): MappingRow[] {
    return this.segments.flatMap((s) => s.mapping());
  }

  /** The discovery table as text, for a status page or a log. */
  formatDiscovery(): string {
    const rows = this.discovery().map((r) => [r.device, r.medium, formatSize(r.offered), formatSize(r.assigned), r.state]);
    return textTable(['DEVICE', 'MEDIUM', 'OFFERED', 'ASSIGNED', 'STATE'], rows, [2, 3]);
  }

  /** The mapping table as text, with ranges written the way FIG. 11 writes them. */
  formatMapping(): string {
    const rows = this.mapping().map((r) => [hexRange(r.virtualStart, r.length), r.device, r.medium, hexRange(r.physicalStart, r.length)]);
    return textTable(['VIRTUAL ADDRESS', 'DEVICE', 'MEDIUM', 'PHYSICAL ADDRESS'], rows);
  }

  /** Frees everything, closes the node connections and the swap volume, and removes nothing on disk but the flash file's contents. */
  async close(): Promise<void> {
    if (this.closed) return;
    for (const segment of [...this.segments]) await this.free(segment.address).catch(() => undefined);
    this.closed = true;
    for (const node of this.nodes) await node.client.close().catch(() => undefined);
    await this.swap?.client.close().catch(() => undefined);
    await this.flash?.close();
  }

  // ---- internals ----

  private order(cls: PerformanceClass): { kind: 'local' | 'remote' | 'swap'; medium: TierMedium }[] {
    const remote = cls === 'capacity' ? (['flash', 'dram'] as const) : (['dram', 'flash'] as const);
    return [
      ...(cls === 'highest' ? [{ kind: 'local' as const, medium: 'dram' as const }] : []),
      { kind: 'local', medium: 'flash' },
      ...remote.map((medium) => ({ kind: 'remote' as const, medium })),
      { kind: 'swap', medium: 'volume' },
    ];
  }

  private async tryStep(step: { kind: 'local' | 'remote' | 'swap'; medium: TierMedium }, length: number, device: string | undefined): Promise<Piece[] | undefined> {
    if (step.kind === 'local') {
      if (device !== undefined && device !== 'local') return undefined;
      const piece = (step.medium === 'dram' ? this.dram : this.flash)?.take(length);
      return piece === undefined ? undefined : [piece];
    }
    if (step.kind === 'swap') {
      if (device !== undefined && device !== 'swap') return undefined;
      const piece = this.swap?.take(length);
      return piece === undefined ? undefined : [piece];
    }
    const medium = step.medium === 'flash' ? 'flash' : 'dram';
    const candidates = this.nodes.filter((n) => !n.lost && (device === undefined || n.name === device));
    if (candidates.length === 0) return undefined;
    // The node with the most room first; one that can hold it all before spanning.
    const offered = (n: RemoteNode): number => {
      const entry = this.capacity.get(n.name)?.find((e) => e.medium === medium);
      return entry === undefined ? 0 : entry.available + entry.growable;
    };
    const ranked = [...candidates].sort((a, b) => offered(b) - offered(a));
    const whole = ranked.find((n) => offered(n) >= length);
    if (whole !== undefined) {
      const piece = await this.bindOn(whole, medium, length);
      if (piece !== undefined) return [piece];
    }
    // Span nodes: take what each offers, largest first, until the allocation is covered.
    const total = ranked.reduce((sum, n) => sum + offered(n), 0);
    if (total < length) return undefined;
    const pieces: Piece[] = [];
    let left = length;
    for (const node of ranked) {
      if (left === 0) break;
      const n = Math.min(left, offered(node) - (offered(node) % PAGE));
      if (n <= 0) continue;
      const piece = await this.bindOn(node, medium, n);
      if (piece === undefined) continue;
      pieces.push(piece);
      left -= n;
    }
    if (left === 0) return pieces;
    for (const p of pieces) await p.release().catch(() => undefined);
    return undefined;
  }

  /** Binds on a node; a refusal for capacity refreshes its row and gives undefined. */
  private async bindOn(node: RemoteNode, medium: 'dram' | 'flash', length: number): Promise<Piece | undefined> {
    try {
      const region = await node.guard(() => node.client.bind(length, { medium }));
      await this.refreshNode(node);
      return remotePiece(node, medium, region);
    } catch (error) {
      if (isMemstrataError(error) && error.code === 'MS_RMEM_NO_CAPACITY') {
        await this.refreshNode(node);
        return undefined;
      }
      if (isMemstrataError(error) && error.code === 'MS_HOST_NODE_LOST') return undefined;
      throw error;
    }
  }

  private async refreshNode(node: RemoteNode): Promise<void> {
    if (node.lost) return;
    try {
      this.capacity.set(node.name, await node.guard(() => node.client.capacity()));
    } catch (error) {
      if (!(isMemstrataError(error) && error.code === 'MS_HOST_NODE_LOST')) throw error;
    }
  }

  /** The segments a virtual range covers; a gap or an end outside them is a violation. */
  private spans(address: number, length: number): { segment: Segment; offset: number; from: number; n: number }[] {
    if (!Number.isSafeInteger(address) || !Number.isSafeInteger(length) || length < 0) throw new MisuseError('MS_HOST_VIOLATION', `invalid access at ${String(address)} for ${String(length)} bytes`);
    const out: { segment: Segment; offset: number; from: number; n: number }[] = [];
    let at = address;
    let done = 0;
    let i = this.find(address);
    while (done < length) {
      const segment = this.segments[i];
      if (segment === undefined || at < segment.address || at >= segment.address + segment.size) {
        throw new MisuseError('MS_HOST_VIOLATION', `access at ${hex(address)} for ${length} bytes: ${hex(at)} is not allocated (never, or freed)`, { details: { address, length, at } });
      }
      const offset = at - segment.address;
      const n = Math.min(segment.size - offset, length - done);
      out.push({ segment, offset, from: done, n });
      done += n;
      at += n;
      i++;
    }
    return out;
  }

  /** Index of the segment holding `address`, or where it would be. */
  private find(address: number): number {
    let lo = 0;
    let hi = this.segments.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const s = this.segments[mid];
      if (s !== undefined && s.address + s.size <= address) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  private checkOpen(): void {
    if (this.closed) throw new MisuseError('MS_HOST_INVALID', 'the hierarchy memory is closed');
  }
}

function hex(n: number): string {
  return `0x${n.toString(16)}`;
}


