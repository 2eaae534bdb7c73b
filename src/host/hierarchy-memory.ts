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
//
// Invariants:
//   - every read and write enters the IoGate of each segment it touches in the tick it
//     finds them, and leaves only once all of its I/O has settled; free takes the segment
//     out of the address space and closes its gate in one tick, then waits for the gate
//     to drain, drops its cached pages, and only then zeroes and releases its pieces. So
//     a read started before a free never returns the next owner's bytes, and a write
//     started before a free never lands in the next owner's range;
//   - a segment with a piece on a node that was lost is lost as a whole, for good: every
//     read and write of it fails with MS_HOST_NODE_LOST, and the page cache drops its
//     pages (dirty ones counted in the segment's lostDirtyBytes) and serves none of them;
//   - flush() rejects while a live segment is lost, naming the nodes and the dirty bytes
//     the cache could not write back; freeing the lost segment is how the application
//     acknowledges the loss.
//
// When a node is slow or unreachable, remote-node.ts decides when it is lost (retries
// with backoff, a grace period for the connection) and frees the host's old regions on
// it once it is back.
//
// With `cluster`, the nodes are the members of a memstrata cluster (DESIGN 4.7, FIG. 14):
// the host lists them in etcd and watches their records. A node that joins is connected
// and takes new allocations as soon as its capacity is known; a node whose lease ends
// (it stopped, or was silent for a lease) is lost at once, whatever its connection says,
// and takes no new allocation until it is a member again. A slow request alone never
// loses a node: that takes the retries of `nodeLoss`, or the end of its lease.

import { EventEmitter } from 'node:events';
import { NbdClient } from '../client/nbd-client.js';
import { ClusterMembers } from '../client/cluster-members.js';
import type { MemberRecord } from '../protocol/cluster/member.js';
import { RmemClient, type CapacityEntry } from '../client/rmem-client.js';
import { MisuseError, NetworkError, RuntimeError, isMemstrataError, type MemstrataError } from '../errors.js';
import { textTable } from '../text-table.js';
import { formatSize, hexRange } from '../units.js';
import { IoGate } from './io-gate.js';
import { PageCache, type PageCacheStats } from './page-cache.js';
import { DEFAULT_NODE_LOSS, RemoteNode, type NodeLossPolicy, type NodeState, type NodeTransition, type RmemSession } from './remote-node.js';
import { settleAll } from '../settle.js';
import { BufferStore, FileStore, RangeTier, VolumeStore, type Piece, type TierMedium } from './tiers.js';
import { RedundantPiece, type RedundancyHost } from './redundant-piece.js';

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
  /** Its failure zone: the two copies of a `redundancy: 2` segment go to different zones when there are two. */
  zone?: string;
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
  /**
   * Find nodes through a memstrata cluster instead of (or besides) `nodes`: etcd's
   * client URLs, the cluster's name (default `default`) and the rmem token its nodes
   * want, if any. Members are watched: a node that joins takes new allocations; one
   * whose lease ends is lost.
   */
  cluster?: {
    etcd: string | readonly string[];
    name?: string;
    token?: string;
    /**
     * TLS: `ca` checks etcd (https endpoints) and the nodes whose rmem service requires
     * TLS (their record says so); `cert` and `key` are presented where a certificate is
     * asked for (etcd's --client-cert-auth, a node's tls.ca).
     */
    tls?: { ca: Buffer | string; cert?: Buffer | string; key?: Buffer | string };
  };
  /**
   * rmem request timeout, ms (default 5000). A request with no answer in this time is
   * sent again under `nodeLoss`; the node is lost only when the retries run out.
   */
  timeoutMs?: number;
  /**
   * When a node that does not answer is declared lost (see {@link NodeLossPolicy}):
   * `retries` (default 3) attempts after the first, `backoffMs` (default 100) before the
   * first retry and doubled for each next one, `graceMs` (default 10000) for a connection
   * that is down, and `probeMs` (default 1000) between tries of a lost node. A stall
   * shorter than about `(retries + 1) * timeoutMs` plus the backoffs loses nothing.
   */
  nodeLoss?: Partial<NodeLossPolicy>;
}

export interface AllocOptions {
  /** Default `standard`. */
  class?: PerformanceClass;
  /** Only this medium (`volume` is the swap volume). */
  medium?: TierMedium;
  /** Only this device: `local`, a node name, or `swap`. */
  device?: string;
  /**
   * 2: the segment's bytes live on two nodes (in two zones when there are two); every
   * write goes to both before it is acknowledged, reads go to either, and when one node
   * is lost the host copies the bytes to a third node in the background. Remote memory
   * only. Default 1.
   */
  redundancy?: 1 | 2;
}

/** A row of the discovery table (FIG. 10). */
export interface DiscoveryRow {
  device: string;
  medium: TierMedium;
  /** Bytes the device offers this host: free now, plus what a node can still grow by. */
  offered: number;
  /** Bytes this host holds there (for a node: as it last answered, old regions included until reclaimed). */
  assigned: number;
  /**
   * `ok`; for a node also `suspect` (retrying a request or reconnecting), `lost` (its
   * segments fail with MS_HOST_NODE_LOST) and `reclaiming` (back, its old regions being
   * freed; then `ok` again for new allocations).
   */
  state: NodeState;
}

/** Events of a HierarchyMemory. */
export interface HierarchyEvents {
  /** A node changed state (the discovery table's STATE column). */
  node: [transition: NodeTransition];
  /** A cluster member joined (and was connected) or left; or a member could not be used. */
  member: [change: MemberChange];
  /** A `redundancy: 2` segment got its second copy back, or could not (yet). */
  rebuild: [event: { address: number; ok: boolean; reason: string }];
}

/** A change in the cluster's membership, as the host saw it. */
export interface MemberChange {
  node: string;
  change: 'joined' | 'left' | 'unusable';
  /** Its rmem service. */
  address: string | undefined;
  reason: string;
}

/** A row of the mapping table (FIG. 11). */
export interface MappingRow {
  virtualStart: number;
  length: number;
  device: string;
  medium: TierMedium;
  physicalStart: number;
  /** For a `redundancy: 2` segment: which copy (1, 2, ...), its state, and for a copy being rebuilt how much is copied. */
  copy?: number;
  state?: 'ok' | 'lost' | 'rebuilding';
  copiedBytes?: number;
}

/** Counters of the hierarchy: the page cache, and bytes moved to and from each tier. */
export interface HierarchyStats {
  cache: PageCacheStats;
  /** Bytes read from and written to each device and medium, page cache traffic included. */
  moved: { device: string; medium: TierMedium; readBytes: number; writtenBytes: number }[];
}

/** Bytes moved to and from one device and medium (HierarchyStats.moved). */
interface TrafficRow {
  device: string;
  medium: TierMedium;
  readBytes: number;
  writtenBytes: number;
}

/** One allocation: a range of virtual addresses and the pieces behind it. */
export class Segment {
  readonly address: number;
  readonly size: number;
  readonly class: PerformanceClass;
  private readonly owner: HierarchyMemory;
  /** @internal */
  readonly pieces: readonly Piece[];
  /** @internal Requests in flight on it; closed when it is freed. */
  readonly gate: IoGate;
  /** @internal The page cache dropping its pages after its node was lost. */
  purge: Promise<void> | undefined;
  private lostDirty: number;

  /** @internal */
  constructor(owner: HierarchyMemory, address: number, size: number, cls: PerformanceClass, pieces: readonly Piece[]) {
    this.owner = owner;
    this.address = address;
    this.size = size;
    this.class = cls;
    this.pieces = pieces;
    this.gate = new IoGate();
    this.purge = undefined;
    this.lostDirty = 0;
  }

  /** True once {@link HierarchyMemory.free} has begun for it: no new read or write is taken. */
  get isFreed(): boolean {
    return this.gate.closed;
  }

  /** True when some of it lives off this host (a node or the swap volume): it goes through the page cache. */
  get far(): boolean {
    return this.pieces.some((p) => p.device !== 'local');
  }

  /**
   * True once a node holding part of it was lost: its contents are gone, and every read
   * and write fails with MS_HOST_NODE_LOST until it is freed. Lost segments never come
   * back, even when the node does.
   */
  get lost(): boolean {
    return this.failure() !== undefined;
  }

  /** Bytes of dirty data (whole 4 KiB pages) the page cache held for it and could not write back because its node was lost. */
  get lostDirtyBytes(): number {
    return this.lostDirty;
  }

  /** Reads `length` bytes at `offset` within the segment. */
  async read(offset: number, length: number): Promise<Buffer> {
    this.check(offset, length);
    return this.owner.read(this.address + offset, length);
  }

  /** Reads `target.length` bytes at `offset` within the segment into `target` (see {@link HierarchyMemory.readInto}). */
  async readInto(offset: number, target: Uint8Array): Promise<void> {
    assertBytes(target, 'the target of a read');
    this.check(offset, target.length);
    return this.owner.readInto(this.address + offset, target);
  }

  /** Writes `data` at `offset` within the segment. */
  async write(offset: number, data: Uint8Array): Promise<void> {
    assertBytes(data);
    this.check(offset, data.length);
    return this.owner.write(this.address + offset, data);
  }

  /** Frees it (see {@link HierarchyMemory.free}). */
  free(): Promise<void> {
    return this.owner.free(this.address);
  }

  /** This segment's rows of the mapping table: for a redundant piece, one set of rows per copy. */
  mapping(): MappingRow[] {
    const rows: MappingRow[] = [];
    let base = this.address;
    for (const piece of this.pieces) {
      const copies = piece instanceof RedundantPiece ? piece.copyInfo() : [{ device: piece.device, medium: piece.medium, physical: piece.physical, state: undefined, copied: 0 }];
      for (const [i, copy] of copies.entries()) {
        let at = base;
        for (const r of copy.physical) {
          const row: MappingRow = { virtualStart: at, length: r.length, device: copy.device, medium: copy.medium, physicalStart: r.start };
          if (copy.state !== undefined) {
            row.copy = i + 1;
            row.state = copy.state;
            if (copy.state === 'rebuilding') row.copiedBytes = copy.copied;
          }
          rows.push(row);
          at += r.length;
        }
      }
      base += piece.length;
    }
    return rows;
  }

  /** Waits for rebuilds of its redundant pieces under way. */
  async rebuilt(): Promise<void> {
    for (const piece of this.pieces) if (piece instanceof RedundantPiece) await piece.settled();
  }

  /** @internal Why its memory is gone, or undefined. */
  failure(): MemstrataError | undefined {
    for (const piece of this.pieces) {
      const failure = piece.failure();
      if (failure !== undefined) return failure;
    }
    return undefined;
  }

  /** @internal */
  noteLost(bytes: number): void {
    this.lostDirty += bytes;
  }

  /** @internal Serves [offset, offset + target.length) of the segment from its pieces. */
  readPieces(offset: number, target: Buffer): Promise<void> {
    return this.eachPiece(offset, target.length, (piece, at, from, n) => {
      this.owner.count(piece, 'read', n);
      return piece.read(at, target.subarray(from, from + n));
    });
  }

  /** @internal */
  writePieces(offset: number, data: Buffer): Promise<void> {
    return this.eachPiece(offset, data.length, (piece, at, from, n) => {
      this.owner.count(piece, 'write', n);
      return piece.write(at, data.subarray(from, from + n));
    });
  }

  /** Runs `fn` on each piece the range touches; one piece (the usual case) costs no extra promise. */
  private eachPiece(offset: number, length: number, fn: (piece: Piece, at: number, from: number, n: number) => Promise<void>): Promise<void> {
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
      // A piece that threw instead of rejecting must not leave the pieces started before it unwatched.
      try {
        work.push(fn(piece, skip, done, n));
      } catch (error) {
        work.push(Promise.reject(error instanceof Error ? error : new Error(String(error))));
      }
      done += n;
      skip = 0;
    }
    return work.length === 1 && work[0] !== undefined ? work[0] : settleAll(work);
  }

  private check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new MisuseError('MS_HOST_VIOLATION', `access at offset ${offset} for ${length} bytes reaches outside the segment at ${hex(this.address)} (${this.size} bytes)`);
    }
  }
}

/** @internal What a hierarchy is made of: `open` builds it from options; tests from wrapped stores and fake sessions. */
export interface HierarchyParts {
  serverId: string;
  dram: RangeTier;
  flash?: RangeTier;
  swap?: RangeTier;
  /** Each node with its first session and a way to open another once that one gave up. */
  nodes?: readonly { name: string; address: string; session: RmemSession; connect: () => Promise<RmemSession>; zone?: string | undefined }[];
  pageCacheBytes: number;
  nodeLoss?: Partial<NodeLossPolicy>;
  /** Closes what the tiers hold open (the flash file, the swap connection); runs last in close(). */
  closeTiers?: () => Promise<void>;
}

/**
 * A host's memory hierarchy: one virtual address space over local DRAM, local flash,
 * memory borrowed from memstrata nodes, and a swap volume. Open it with
 * {@link HierarchyMemory.open}, allocate with {@link HierarchyMemory.alloc}, and read
 * and write through the returned {@link Segment} or by virtual address. Errors are coded:
 * MS_HOST_INVALID, MS_HOST_VIOLATION, MS_HOST_NO_CAPACITY and MS_HOST_NODE_LOST.
 *
 * Node loss: a request a node does not answer in time is retried with backoff
 * (`nodeLoss`); the node is lost when the retries run out, when its connection stays
 * down past the grace period, or when it no longer has this host's session. Then every
 * segment with memory there is lost for good (reads and writes fail with
 * MS_HOST_NODE_LOST, the page cache drops its pages), {@link HierarchyMemory.flush}
 * rejects until those segments are freed, and new allocations go elsewhere. The lost
 * node is tried again every `probeMs`; once it answers, the host frees every region it
 * held there and the node takes new allocations again. Each change of state is a `node`
 * event and shows in the discovery table.
 */
export class HierarchyMemory extends EventEmitter<HierarchyEvents> {
  readonly serverId: string;
  private readonly dram: RangeTier;
  private readonly flash: RangeTier | undefined;
  private readonly nodes: RemoteNode[];
  private readonly swap: RangeTier | undefined;
  private readonly capacity: Map<string, CapacityEntry[]>;
  /** Live segments, sorted by address. */
  private readonly segments: Segment[];
  private readonly cache: PageCache;
  private readonly traffic: Map<string, TrafficRow>;
  /** Each piece's row of `traffic`, so that counting an access builds no key. */
  private readonly trafficOf: WeakMap<Piece, TrafficRow>;
  private readonly closeTiers: () => Promise<void>;
  private readonly policy: NodeLossPolicy;
  private members: ClusterMembers | undefined;
  /** Each node's failure zone, when known (NodeAddress.zone, or its cluster record). */
  private readonly zones: Map<string, string>;
  /** Cluster members being connected (one loop each). */
  private readonly joining: Set<string>;
  /** When redundant pieces last refreshed every node's capacity (Date.now()). */
  private refreshedAt: number;
  /** Cluster nodes by name: the rmem address of their latest record, whether their rmem speaks TLS, and whether they are members now. */
  private readonly clustered: Map<string, { address: string; tls: boolean; member: boolean }>;
  private nextAddress: number;
  private closed: boolean;

  private constructor(parts: HierarchyParts) {
    super();
    this.serverId = parts.serverId;
    this.dram = parts.dram;
    this.flash = parts.flash;
    this.swap = parts.swap;
    this.capacity = new Map();
    this.segments = [];
    this.cache = new PageCache(parts.pageCacheBytes);
    this.traffic = new Map();
    this.trafficOf = new WeakMap();
    this.closeTiers = parts.closeTiers ?? (() => Promise.resolve());
    this.nextAddress = VIRTUAL_BASE;
    this.closed = false;
    this.members = undefined;
    this.clustered = new Map();
    this.zones = new Map();
    this.joining = new Set();
    this.refreshedAt = 0;
    this.policy = nodeLossPolicy(parts.nodeLoss);
    this.nodes = (parts.nodes ?? []).map((n) => this.remoteNode(n));
    for (const n of parts.nodes ?? []) if (n.zone !== undefined) this.zones.set(n.name, n.zone);
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
    const nodeLoss = nodeLossPolicy(options.nodeLoss);
    const dramBytes = budget - (cacheBytes - (cacheBytes % PAGE));
    const dram = new RangeTier('local', 'dram', dramBytes, new BufferStore(dramBytes));
    let flashStore: FileStore | undefined;
    let flash: RangeTier | undefined;
    if (options.localFlash !== undefined) {
      const { path, size } = options.localFlash;
      if (!Number.isSafeInteger(size) || size < PAGE) throw new MisuseError('MS_HOST_INVALID', `localFlash.size must be at least ${PAGE} bytes, got ${size}`);
      const capacity = size - (size % PAGE);
      flashStore = await FileStore.create(path, capacity);
      flash = new RangeTier('local', 'flash', capacity, flashStore);
    }
    const nodes: { name: string; address: string; session: RmemSession; connect: () => Promise<RmemSession>; zone?: string | undefined }[] = [];
    let swapClient: NbdClient | undefined;
    try {
      const names = new Set<string>();
      for (const address of options.nodes ?? []) {
        const port = address.port ?? 10810;
        const name = address.name ?? `${address.host}:${port}`;
        if (names.has(name) || name === 'local' || name === 'swap') throw new MisuseError('MS_HOST_INVALID', `node name "${name}" is used twice or is reserved`);
        names.add(name);
        const connect = (): Promise<RmemSession> =>
          RmemClient.connect({ host: address.host, port, serverId: options.serverId, timeoutMs: options.timeoutMs ?? 5000, ...(address.token === undefined ? {} : { token: address.token }) });
        nodes.push({ name, address: `${address.host}:${port}`, session: await connect(), connect, zone: address.zone });
      }
      if (options.swap !== undefined) swapClient = await NbdClient.connect({ uri: options.swap });
    } catch (error) {
      for (const n of nodes) await n.session.close().catch(() => undefined);
      await flashStore?.close();
      throw error;
    }
    const client = swapClient;
    const memory = new HierarchyMemory({
      serverId: options.serverId,
      dram,
      ...(flash === undefined ? {} : { flash }),
      ...(client === undefined ? {} : { swap: new RangeTier('swap', 'volume', client.size - (client.size % PAGE), new VolumeStore(client)) }),
      nodes,
      pageCacheBytes: cacheBytes,
      nodeLoss,
      closeTiers: async () => {
        await client?.close().catch(() => undefined);
        await flashStore?.close();
      },
    });
    try {
      if (options.cluster !== undefined) await memory.follow(options.cluster, options);
      await memory.refresh();
    } catch (error) {
      await memory.close();
      throw error;
    }
    return memory;
  }

  /** @internal A hierarchy over given tiers and node sessions (tests wrap them to delay or fail chosen calls). */
  static assemble(parts: HierarchyParts): HierarchyMemory {
    return new HierarchyMemory(parts);
  }

  /**
   * Follows the cluster's members: connects to each one listed now (open waits for them),
   * then to each that joins; loses each whose lease ends.
   */
  private async follow(cluster: NonNullable<HierarchyOptions['cluster']>, options: HierarchyOptions): Promise<void> {
    const etcd = typeof cluster.etcd === 'string' ? cluster.etcd.split(',').map((u) => u.trim()) : [...cluster.etcd];
    if (etcd.length === 0 || etcd.some((u) => !/^https?:\/\/[^/]+\/?$/.test(u))) throw new MisuseError('MS_HOST_INVALID', `cluster.etcd must be etcd client URLs such as http://10.0.0.1:2379, got ${JSON.stringify(cluster.etcd)}`);
    const tls = cluster.tls;
    const pem = (value: Buffer | string | undefined): Buffer | undefined => (value === undefined ? undefined : Buffer.from(value));
    const members = new ClusterMembers({ etcd, cluster: cluster.name ?? 'default', ...(tls === undefined ? {} : { tls: { ca: Buffer.from(tls.ca), cert: pem(tls.cert), key: pem(tls.key) } }) });
    this.members = members;
    const connect = (name: string): Promise<RmemSession> => {
      const entry = this.clustered.get(name);
      const { host, port } = splitAddress(entry?.address ?? '');
      const secure = entry?.tls === true ? { tls: { ...(tls === undefined ? {} : { ca: tls.ca, ...(tls.cert === undefined || tls.key === undefined ? {} : { cert: tls.cert, key: tls.key }) }) } } : {};
      return RmemClient.connect({ host, port, serverId: options.serverId, timeoutMs: options.timeoutMs ?? 5000, ...(cluster.token === undefined ? {} : { token: cluster.token }), ...secure });
    };
    // Open waits for the members listed at the start; later ones join in the background.
    let initial: Promise<void>[] | undefined = [];
    members.on('joined', (record) => {
      const joining = this.join(record, connect);
      initial?.push(joining);
    });
    members.on('updated', (record, previous) => {
      const entry = this.clustered.get(record.id);
      if (entry === undefined) return;
      const node = this.nodes.find((n) => n.name === record.id);
      entry.tls = record.tls?.rmem === true;
      if (record.services.rmem !== previous.services.rmem) {
        entry.address = record.services.rmem;
        node?.moved(`it came back at ${record.services.rmem}`);
      } else if (node !== undefined) {
        this.refreshNode(node).catch(() => undefined);
      }
    });
    members.on('left', (id) => {
      const entry = this.clustered.get(id);
      if (entry === undefined) return;
      entry.member = false;
      this.nodes.find((n) => n.name === id)?.expire('its cluster lease ended: it stopped, or was silent for a lease');
      this.emit('member', { node: id, change: 'left', address: entry.address, reason: 'its lease ended' });
    });
    members.on('unreadable', (problem) => {
      this.emit('member', { node: '', change: 'unusable', address: undefined, reason: problem });
    });
    await members.start();
    const listed = initial;
    initial = undefined;
    await Promise.all(listed);
  }

  /** A member joined: connect to it (again, when it was one before) and take it into use. */
  private async join(record: MemberRecord, connect: (name: string) => Promise<RmemSession>): Promise<void> {
    const name = record.id;
    const address = record.services.rmem;
    const known = this.clustered.get(name);
    if (known === undefined && (this.nodes.some((n) => n.name === name) || name === 'local' || name === 'swap')) {
      this.emit('member', { node: name, change: 'unusable', address, reason: `a node named ${name} is already in the tables` });
      return;
    }
    const moved = known !== undefined && known.address !== address;
    this.clustered.set(name, { address, tls: record.tls?.rmem === true, member: true });
    if (record.zone !== null) this.zones.set(name, record.zone);
    else this.zones.delete(name);
    const existing = this.nodes.find((n) => n.name === name);
    if (existing !== undefined) {
      // A member again: its old session is probed (or renewed at the new address) and reclaimed.
      if (moved) existing.moved(`it came back at ${address}`);
      this.emit('member', { node: name, change: 'joined', address, reason: 'a member again' });
      return;
    }
    // One connect loop per member: a record put again while it runs only changes the address it uses.
    if (this.joining.has(name)) return;
    this.joining.add(name);
    // The first try is awaited (open waits for the members it listed); a member that cannot be reached is tried again in the background.
    if (await this.connectMember(name, address, connect)) {
      this.joining.delete(name);
      return;
    }
    void (async () => {
      do await new Promise((resolve) => setTimeout(resolve, this.policy.probeMs).unref());
      while (!(await this.connectMember(name, address, connect)));
      this.joining.delete(name);
    })();
  }

  /** One try to connect to a member and take it into use; true when done (or no longer wanted). */
  private async connectMember(name: string, address: string, connect: (name: string) => Promise<RmemSession>): Promise<boolean> {
    if (this.closed || this.clustered.get(name)?.member !== true) return true;
    try {
      const session = await connect(name);
      if (this.closed || this.clustered.get(name)?.member !== true || this.nodes.some((n) => n.name === name)) {
        await session.close().catch(() => undefined);
        return true;
      }
      const node = this.remoteNode({ name, address: this.clustered.get(name)?.address ?? address, session, connect: () => connect(name) });
      this.nodes.push(node);
      await this.refreshNode(node).catch(() => undefined);
      this.emit('member', { node: name, change: 'joined', address, reason: 'joined the cluster' });
      return true;
    } catch (error) {
      this.emit('member', { node: name, change: 'unusable', address, reason: `cannot reach it yet: ${error instanceof Error ? error.message : String(error)}` });
      return false;
    }
  }

  private remoteNode(n: { name: string; address: string; session: RmemSession; connect: () => Promise<RmemSession> }): RemoteNode {
    return new RemoteNode({
      ...n,
      policy: this.policy,
      notify: (transition) => {
        this.onNode(transition);
      },
    });
  }

  /** A node that may take new allocations: answering, and a member when it came from the cluster. */
  private usable(node: RemoteNode): boolean {
    return node.state === 'ok' && this.clustered.get(node.name)?.member !== false;
  }

  /** Asks every node that is not lost for its capacity again (FIG. 14). */
  async refresh(): Promise<void> {
    await settleAll(this.nodes.map((n) => this.refreshNode(n)));
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
    const redundancy = options.redundancy ?? 1;
    if (redundancy !== 1 && redundancy !== 2) throw new MisuseError('MS_HOST_INVALID', `redundancy must be 1 or 2, got ${String(redundancy)}`);
    if (redundancy === 2 && options.device !== undefined) throw new MisuseError('MS_HOST_INVALID', 'a redundancy: 2 segment lives on two nodes the host chooses: it takes no device');
    const length = Math.ceil(size / PAGE) * PAGE;
    for (const step of this.order(cls)) {
      if (options.medium !== undefined && options.medium !== step.medium) continue;
      if (redundancy === 2 && step.kind !== 'remote') continue;
      const pieces = redundancy === 2 ? await this.tryRedundant(step.medium === 'flash' ? 'flash' : 'dram', length) : await this.tryStep(step, length, options.device);
      if (pieces !== undefined) {
        const segment = new Segment(this, this.nextAddress, length, cls, pieces);
        this.nextAddress += length;
        this.segments.push(segment);
        return segment;
      }
    }
    throw new RuntimeError('MS_HOST_NO_CAPACITY', `no tier can hold ${formatSize(length)} for class ${cls}${options.medium === undefined ? '' : ` on ${options.medium}`}${options.device === undefined ? '' : ` on ${options.device}`}${redundancy === 2 ? ' on two nodes' : ''}`, {
      details: { size: length, class: cls, redundancy, discovery: this.discovery() },
    });
  }

  /**
   * Frees the segment that starts at `address` (FIG. 17); anything else is a violation.
   * Reads and writes of the segment already in flight finish first (they may still fail
   * or succeed); only then is its memory zeroed and given back, so they can never reach
   * the next owner's memory. The regions of a lost segment are freed on its node when the
   * node is back. When zeroing a local flash or swap range fails, free rejects with that
   * failure, but the segment is freed all the same: the range is zeroed again before its
   * tier hands out space, and given back once that succeeds.
   */
  async free(address: number): Promise<void> {
    this.checkOpen();
    const i = this.segments.findIndex((s) => s.address === address);
    const segment = this.segments[i];
    if (segment === undefined) {
      throw new MisuseError('MS_HOST_VIOLATION', `free of ${hex(address)}: no segment starts there (never allocated, or already freed)`, { details: { address } });
    }
    this.segments.splice(i, 1);
    await this.release(segment);
  }

  /** Reads `length` bytes at a virtual address into a new Buffer; the range may cross segments that touch. */
  async read(address: number, length: number): Promise<Buffer> {
    this.checkOpen();
    // Validated before anything is allocated: a negative or huge length is a coded violation, not a RangeError or a large allocation.
    const spans = this.spans(address, length);
    const out = Buffer.alloc(length);
    const pending = this.readSpans(spans, out);
    if (pending !== undefined) await pending;
    return out;
  }

  /**
   * Reads `target.length` bytes at a virtual address into `target`, with no new memory
   * for the bytes: for an application that keeps its own buffers (a buffer pool's
   * frames), where a new Buffer per read is garbage the size of everything read. It must
   * not touch `target` until the promise settles; if it rejects, `target` may hold part
   * of the range. An empty target reads nothing, as `read(address, 0)` does.
   */
  async readInto(address: number, target: Uint8Array): Promise<void> {
    this.checkOpen();
    assertBytes(target, 'the target of a read');
    const spans = this.spans(address, target.byteLength);
    // Also a view of a detached ArrayBuffer, whose length reads 0: nothing to fill.
    if (target.byteLength === 0) return;
    const pending = this.readSpans(spans, Buffer.from(target.buffer, target.byteOffset, target.byteLength));
    if (pending !== undefined) await pending;
  }

  /** Writes `data` at a virtual address; the range may cross segments that touch. */
  async write(address: number, data: Uint8Array): Promise<void> {
    this.checkOpen();
    assertBytes(data);
    const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    const spans = this.spans(address, buf.length);
    const only = spans.length === 1 ? spans[0] : undefined;
    if (only !== undefined && only.segment.far && !only.segment.isFreed && this.cache.writeNow(only.segment, only.offset, buf)) return;
    await this.run(spans, ({ segment, offset, from, n }) =>
      segment.far ? this.cache.write(segment, offset, buf.subarray(from, from + n)) : segment.writePieces(offset, buf.subarray(from, from + n)),
    );
  }

  /**
   * Writes every dirty page of the page cache back to its tier. Rejects with
   * MS_HOST_NODE_LOST while a live segment is lost: the message and `details` name the
   * nodes, the lost segments, and `lostBytes`, the dirty bytes the cache held for them
   * that never reached their node (whole 4 KiB pages). Later flushes keep rejecting until
   * the lost segments are freed. Another write-back failure leaves its page dirty and
   * rejects too.
   */
  async flush(): Promise<void> {
    this.checkOpen();
    let failure: { error: unknown } | undefined;
    try {
      await this.cache.flush();
    } catch (error) {
      failure = { error };
    }
    // A loss drops pages in the background; the count is final once those drops are done.
    await Promise.all(this.segments.flatMap((s) => (s.purge === undefined ? [] : [s.purge])));
    const lost = this.segments.filter((s) => s.lost);
    if (lost.length > 0) throw lostOnFlush(lost, failure?.error);
    if (failure !== undefined) throw failure.error;
  }

  /** Page cache counters and bytes moved per tier. */
  stats(): HierarchyStats {
    return { cache: this.cache.stats(), moved: [...this.traffic.values()].map((t) => ({ ...t })) };
  }

  /** @internal Counts bytes moved to or from a piece's tier. */
  count(piece: Piece, direction: 'read' | 'write', bytes: number): void {
    let row = this.trafficOf.get(piece);
    if (row === undefined) {
      const key = `${piece.device}/${piece.medium}`;
      row = this.traffic.get(key);
      if (row === undefined) {
        row = { device: piece.device, medium: piece.medium, readBytes: 0, writtenBytes: 0 };
        this.traffic.set(key, row);
      }
      this.trafficOf.set(piece, row);
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
        rows.push({ device: node.name, medium: entry.medium, offered: this.usable(node) ? entry.available + entry.growable : 0, assigned: entry.used, state: node.state });
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
    const mapping = this.mapping();
    // Copies of redundant segments add a COPY and a STATE column (with a rebuild's progress).
    if (mapping.some((r) => r.copy !== undefined)) {
      const rows = mapping.map((r) => [
        hexRange(r.virtualStart, r.length),
        r.copy === undefined ? '-' : String(r.copy),
        r.device,
        r.medium,
        hexRange(r.physicalStart, r.length),
        r.state === undefined ? '-' : r.state === 'rebuilding' ? `rebuilding ${Math.floor((100 * (r.copiedBytes ?? 0)) / r.length)}%` : r.state,
      ]);
      return textTable(['VIRTUAL ADDRESS', 'COPY', 'DEVICE', 'MEDIUM', 'PHYSICAL ADDRESS', 'STATE'], rows);
    }
    const rows = mapping.map((r) => [hexRange(r.virtualStart, r.length), r.device, r.medium, hexRange(r.physicalStart, r.length)]);
    return textTable(['VIRTUAL ADDRESS', 'DEVICE', 'MEDIUM', 'PHYSICAL ADDRESS'], rows);
  }

  /**
   * Frees everything, closes the node connections and the swap volume, and removes
   * nothing on disk but the flash file's contents. Segments are freed side by side, and
   * each request to a node gets one attempt (no retries, no wait for a connection that is
   * down): a node that does not answer costs about one `timeoutMs`, whatever the number
   * of nodes and segments. Regions a FREE did not reach, and those on a node that is lost
   * at that moment, are freed by the node itself when this host's session lease runs out.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.members?.close();
    for (const node of this.nodes) node.shutdown();
    await Promise.allSettled(this.segments.splice(0).map((segment) => this.release(segment)));
    await Promise.all(this.nodes.map((node) => node.close()));
    await this.closeTiers();
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
    if (step.kind === 'local' || step.kind === 'swap') {
      if (device !== undefined && device !== step.kind) return undefined;
      const tier = step.kind === 'swap' ? this.swap : step.medium === 'dram' ? this.dram : this.flash;
      if (tier === undefined) return undefined;
      // Space whose zeroing failed at a free comes back once the store works again; a free already reported the failure.
      await tier.rezero().catch(() => undefined);
      const piece = tier.take(length);
      return piece === undefined ? undefined : [piece];
    }
    const medium = step.medium === 'flash' ? 'flash' : 'dram';
    const candidates = this.nodes.filter((n) => this.usable(n) && (device === undefined || n.name === device));
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
      if (n <= 0 || !this.usable(node)) continue; // a node that just failed a bind is not asked again
      const piece = await this.bindOn(node, medium, n);
      if (piece === undefined) continue;
      pieces.push(piece);
      left -= n;
    }
    if (left === 0) return pieces;
    for (const p of pieces) await p.release().catch(() => undefined);
    return undefined;
  }

  /**
   * Two copies of `length` bytes on two nodes, in two zones when the nodes' zones allow:
   * the node with the most room first, then the one with the most room in another zone
   * (or, with no such node, any other). Undefined when no two nodes can hold it.
   */
  private async tryRedundant(medium: 'dram' | 'flash', length: number): Promise<Piece[] | undefined> {
    const first = await this.bindBest(medium, length, []);
    if (first === undefined) return undefined;
    const second = await this.bindBest(medium, length, [first.device]);
    if (second === undefined) {
      await first.release().catch(() => undefined);
      return undefined;
    }
    return [new RedundantPiece([first, second], this.redundancyHost())];
  }

  /**
   * Binds `length` bytes on the usable node with the most room that is none of `avoid`,
   * preferring a zone none of `avoid` is in; undefined when no node can.
   */
  private async bindBest(medium: 'dram' | 'flash', length: number, avoid: readonly string[]): Promise<Piece | undefined> {
    const offered = (n: RemoteNode): number => {
      const entry = this.capacity.get(n.name)?.find((e) => e.medium === medium);
      return entry === undefined ? 0 : entry.available + entry.growable;
    };
    const taken = new Set(avoid.map((d) => this.zones.get(d)).filter((z): z is string => z !== undefined));
    const otherZone = (n: RemoteNode): number => (taken.size > 0 && !taken.has(this.zones.get(n.name) ?? '') ? 1 : 0);
    const ranked = this.nodes
      .filter((n) => this.usable(n) && !avoid.includes(n.name) && offered(n) >= length)
      .sort((a, b) => otherZone(b) - otherZone(a) || offered(b) - offered(a));
    for (const node of ranked) {
      const piece = await this.bindOn(node, medium, length);
      if (piece !== undefined) return piece;
    }
    return undefined;
  }

  /** What redundant pieces ask of the hierarchy: replacement copies, which nodes answer, and where to report rebuilds. */
  private redundancyHost(): RedundancyHost {
    return {
      replacement: async (length, medium, avoid) => {
        if (this.closed) return undefined;
        // Fresh capacities, at most once a second however many pieces rebuild.
        if (Date.now() - this.refreshedAt > 1000) {
          this.refreshedAt = Date.now();
          await this.refresh().catch(() => undefined);
        }
        return this.bindBest(medium === 'flash' ? 'flash' : 'dram', length, avoid);
      },
      answering: (piece) => this.nodes.find((n) => n.name === piece.device)?.state === 'ok',
      rebuilt: (piece, outcome) => {
        const segment = this.segments.find((s) => s.pieces.includes(piece));
        if (segment !== undefined) this.emit('rebuild', { address: segment.address, ...outcome });
      },
    };
  }

  /** Binds on a node; a refusal for capacity, a timeout or a loss gives undefined (try elsewhere). */
  private async bindOn(node: RemoteNode, medium: 'dram' | 'flash', length: number): Promise<Piece | undefined> {
    try {
      const piece = await node.bind(length, medium);
      await this.refreshNode(node).catch(() => undefined);
      return piece;
    } catch (error) {
      if (isMemstrataError(error) && error.code === 'MS_RMEM_NO_CAPACITY') {
        await this.refreshNode(node);
        return undefined;
      }
      if (isMemstrataError(error) && (error.code === 'MS_HOST_NODE_LOST' || error.code === 'MS_RMEM_TIMEOUT' || error.code === 'MS_RMEM_DISCONNECTED')) return undefined;
      throw error;
    }
  }

  private async refreshNode(node: RemoteNode): Promise<void> {
    if (node.state === 'lost' || node.state === 'reclaiming') return;
    try {
      this.capacity.set(node.name, await node.capacity());
    } catch (error) {
      if (!(isMemstrataError(error) && error.code === 'MS_HOST_NODE_LOST')) throw error;
    }
  }

  /**
   * Runs one request over the segments it spans: refused at once if one is lost; each
   * segment's gate is entered in this tick and left once every part has settled.
   */
  private async run(spans: readonly Span[], fn: (span: Span) => Promise<void>): Promise<void> {
    for (const { segment } of spans) {
      const failure = segment.failure();
      if (failure !== undefined) throw failure;
    }
    const entered: Segment[] = [];
    try {
      for (const { segment } of spans) {
        // spans() found it live in this same tick, and free closes the gate in the tick it unlinks it.
        if (!segment.gate.enter()) throw new MisuseError('MS_HOST_VIOLATION', `segment at ${hex(segment.address)} is being freed`);
        entered.push(segment);
      }
      await settleAll(spans.map(fn));
    } finally {
      for (const segment of entered) segment.gate.leave();
    }
  }

  /** Frees an unlinked segment: waits for its I/O, drops its cached pages, then gives its pieces back. */
  private async release(segment: Segment): Promise<void> {
    await segment.gate.close();
    if (segment.far) await this.cache.drop(segment, segment.size);
    // Side by side: a segment spanning nodes waits for the slowest one, not for their sum.
    await settleAll(segment.pieces.map((piece) => piece.release()));
  }

  /** A node changed state: a loss drops the cached pages of its segments; a return refreshes its capacity. */
  private onNode(transition: NodeTransition): void {
    if (transition.to === 'lost') {
      // A redundant piece with a copy there drops it and starts its rebuild.
      for (const segment of this.segments) for (const piece of segment.pieces) if (piece instanceof RedundantPiece) piece.notice();
      for (const segment of this.segments) {
        if (segment.far && segment.purge === undefined && segment.lost) segment.purge = this.cache.drop(segment, segment.size);
      }
    }
    if (transition.to === 'ok' && transition.from === 'reclaiming') {
      const node = this.nodes.find((n) => n.name === transition.node);
      if (node !== undefined) this.refreshNode(node).catch(() => undefined);
    }
    this.emit('node', transition);
  }

  /** The segments a virtual range covers; a gap or an end outside them is a violation. */
  private spans(address: number, length: number): Span[] {
    if (!Number.isSafeInteger(address) || !Number.isSafeInteger(length) || length < 0) throw new MisuseError('MS_HOST_VIOLATION', `invalid access at ${String(address)} for ${String(length)} bytes`);
    const out: Span[] = [];
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

  /** Reads the spans into `out`: undefined when the page cache answered at once (a hit within one page). */
  private readSpans(spans: readonly Span[], out: Buffer): Promise<void> | undefined {
    const only = spans.length === 1 ? spans[0] : undefined;
    if (only !== undefined && only.segment.far && !only.segment.isFreed && this.cache.readNow(only.segment, only.offset, out)) return undefined;
    return this.run(spans, ({ segment, offset, from, n }) =>
      segment.far ? this.cache.read(segment, offset, out.subarray(from, from + n)) : segment.readPieces(offset, out.subarray(from, from + n)),
    );
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

/** A JavaScript caller may pass anything: refuse what is not bytes before touching it. */
function assertBytes(data: unknown, what = 'data to write'): asserts data is Uint8Array {
  if (!(data instanceof Uint8Array)) throw new MisuseError('MS_HOST_INVALID', `${what} must be a Uint8Array or a Buffer, got ${data === null ? 'null' : typeof data}`);
}

/** `host:port` (or `[v6]:port`) of a member record. */
function splitAddress(address: string): { host: string; port: number } {
  const at = address.lastIndexOf(':');
  const host = address.slice(0, at).replace(/^\[(.*)\]$/, '$1');
  return { host, port: Number(address.slice(at + 1)) };
}

function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

/** A part of a request that falls in one segment: `n` bytes at `offset` of it, `from` bytes into the request. */
interface Span {
  segment: Segment;
  offset: number;
  from: number;
  n: number;
}

/** Defaults filled in and values checked. */
function nodeLossPolicy(given: Partial<NodeLossPolicy> | undefined): NodeLossPolicy {
  const policy = { ...DEFAULT_NODE_LOSS, ...given };
  for (const [field, value] of Object.entries(policy)) {
    const least = field === 'retries' || field === 'backoffMs' ? 0 : 1;
    if (!Number.isSafeInteger(value) || value < least) throw new MisuseError('MS_HOST_INVALID', `nodeLoss.${field} must be an integer of at least ${least}, got ${String(value)}`);
  }
  return policy;
}

/** The error of a flush while segments are lost: which nodes, which segments, how many dirty bytes never reached them. */
function lostOnFlush(lost: readonly Segment[], cause: unknown): NetworkError {
  const segments = lost.map((s) => {
    const failure = s.failure();
    const node = typeof failure?.details?.node === 'string' ? failure.details.node : 'unknown';
    return { address: s.address, size: s.size, node, lostBytes: s.lostDirtyBytes };
  });
  const nodes = [...new Set(segments.map((s) => s.node))];
  const lostBytes = segments.reduce((sum, s) => sum + s.lostBytes, 0);
  const held = segments.reduce((sum, s) => sum + s.size, 0);
  const message =
    `flush: node${nodes.length > 1 ? 's' : ''} ${nodes.join(', ')} lost ${segments.length} segment${segments.length > 1 ? 's' : ''} (${formatSize(held)}) of this host; ` +
    `${lostBytes} bytes of dirty data in the page cache never reached ${nodes.length > 1 ? 'them' : 'it'} and are gone; free the lost segments to acknowledge the loss`;
  return new NetworkError('MS_HOST_NODE_LOST', message, {
    details: { node: nodes[0], nodes, lostBytes, segments },
    ...(cause === undefined ? {} : { cause }),
  });
}
