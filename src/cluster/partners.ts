// Where a node's mirrored NVRAM devices keep their replicas when the cluster chooses
// (cluster.etcd set, mirror.partner not; issue 14, item 4):
//
//   choose   a device's partner is a member that lets the cluster choose (no
//            mirror.partner of its own) with room for it in its `nvram` partition
//            on the device's medium (its record's nvramRoom: idle nvram extents, and what
//            nvram may grow by from free extents and the cache above its minimum):
//            one in another zone when there is one, then the one with the most room
//   reach    a partner is reached at the mirror service its member record names; the
//            address last seen is kept after the node leaves, so a link to a node that
//            is cut from etcd but not from this node goes on
//   gone     how long a partner has been out of the member list, so an owner can give a
//            device whose replica is gone for good a new one
//
// The members come from ClusterMembers (list, then watch), on an etcd client of their own.

import { ClusterMembers } from '../client/cluster-members.js';
import { etcdProblem, type EtcdTls } from '../client/etcd.js';
import type { Logger } from '../logger.js';
import type { MemberRecord } from '../protocol/cluster/member.js';
import { parseAddress, type ListenAddress } from '../units.js';

/** How to reach a device's partner: its node id (checked at HELLO), its mirror service, and whether that speaks TLS only. */
export interface PartnerRoute {
  node: string;
  address: ListenAddress;
  tls: boolean;
}

/** What a partner must hold: the device's size on its medium. */
export interface PartnerNeed {
  size: number;
  medium: string;
}

/** Bytes a member can give a new replica on `medium`, as it says (nvramRoom), else its free extents and nvram extents no device owns. */
export function roomFor(record: MemberRecord, medium: string): number {
  const c = record.capacity.find((m) => m.medium === medium);
  if (c === undefined) return 0;
  return c.nvramRoom ?? c.kinds.free.bytes + c.kinds.nvram.idleBytes;
}

/**
 * Bytes of replicas this node has named on `member` (`named`, by device) that its record
 * does not list yet among its mirrored devices: its nvramRoom does not count them. One it
 * lists is in its room already (the record lists a device and counts its room in one write).
 */
export function pendingOn(member: MemberRecord, named: ReadonlyMap<string, { node: string; size: number }>): number {
  const listed = new Set(member.mirrored.map((d) => d.name));
  let bytes = 0;
  for (const [device, { node, size }] of named) if (node === member.id && !listed.has(device)) bytes += size;
  return bytes;
}

/**
 * The member to hold a replica for a device of this node: one that lets the cluster choose
 * (a node with mirror.partner set by hand admits only its own partner) and has room for
 * it, less the replicas this node has named there that it does not list yet; in another zone than
 * `self` first (when zones are known), then the most room, then by id (so two nodes
 * looking at the same records choose alike). Undefined when none has room.
 */
export function choosePartner(
  records: readonly MemberRecord[],
  self: { id: string; zone: string | null },
  need: PartnerNeed,
  avoid: ReadonlySet<string> = new Set(),
  named: ReadonlyMap<string, { node: string; size: number }> = new Map(),
): string | undefined {
  const room = (r: MemberRecord): number => roomFor(r, need.medium) - pendingOn(r, named);
  const otherZone = (r: MemberRecord): number => (self.zone !== null && r.zone !== null && r.zone !== self.zone ? 0 : 1);
  const best = records
    .filter((r) => r.id !== self.id && r.partner === null && !avoid.has(r.id) && room(r) >= need.size)
    .sort((a, b) => otherZone(a) - otherZone(b) || room(b) - room(a) || a.id.localeCompare(b.id))[0];
  return best?.id;
}

export interface PartnersOptions {
  etcd: readonly string[];
  tls?: EtcdTls | undefined;
  cluster: string;
  nodeId: string;
  zone: string | null;
  log: Logger;
}

/** How long to wait before listing the members again when etcd did not answer. */
const RETRY_MS = 500;

export class Partners {
  private readonly options: PartnersOptions;
  private readonly members: ClusterMembers;
  /** Each node's mirror service as its record last said (kept after it left). */
  private readonly lastSeen: Map<string, PartnerRoute>;
  /** When each node left the member list (performance.now()). */
  private readonly leftAt: Map<string, number>;
  /** When the member list was first read; undefined until then. */
  private listedAt: number | undefined;
  private closed: boolean;

  constructor(options: PartnersOptions) {
    this.options = options;
    // A client of its own: one watcher per etcd client (WATCH_ENDED in etcd.ts).
    this.members = new ClusterMembers({ etcd: options.etcd, cluster: options.cluster, ...(options.tls === undefined ? {} : { tls: options.tls }) });
    this.lastSeen = new Map();
    this.leftAt = new Map();
    this.listedAt = undefined;
    this.closed = false;
    const seen = (record: MemberRecord): void => {
      this.leftAt.delete(record.id);
      const route = routeOf(record);
      if (route !== undefined) this.lastSeen.set(record.id, route);
    };
    this.members.on('joined', seen);
    this.members.on('updated', seen);
    this.members.on('left', (id) => {
      this.leftAt.set(id, performance.now());
    });
    this.members.on('unreadable', (problem) => {
      options.log.debug({ problem }, 'cluster member record or watch problem');
    });
  }

  /** Lists and watches the members in the background, retrying while etcd does not answer. */
  start(): void {
    void (async () => {
      while (!this.closed) {
        try {
          await this.members.start();
          this.listedAt ??= performance.now();
          return;
        } catch (error) {
          this.options.log.debug({ problem: etcdProblem(error) }, 'cannot list the cluster members for mirror partners yet; retrying');
          await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
        }
      }
    })();
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.members.close();
  }

  isMember(id: string): boolean {
    return this.members.get(id) !== undefined;
  }

  /** How to reach `id`'s mirror service: as its record says now, or said last. */
  route(id: string): PartnerRoute | undefined {
    return this.lastSeen.get(id);
  }

  /**
   * How long `id` has not been a member, in ms: 0 while it is one (or before the members
   * were first listed), else since it left, or since they were first listed when it never was.
   */
  goneForMs(id: string): number {
    if (this.listedAt === undefined || this.isMember(id)) return 0;
    return performance.now() - (this.leftAt.get(id) ?? this.listedAt);
  }

  /** A partner for a device of this node (choosePartner over the members now); undefined when none has room. */
  choose(need: PartnerNeed, avoid: ReadonlySet<string> = new Set(), named: ReadonlyMap<string, { node: string; size: number }> = new Map()): string | undefined {
    return choosePartner(this.members.records(), { id: this.options.nodeId, zone: this.options.zone }, need, avoid, named);
  }

  /** `id` is a member that lets the cluster choose its partners (its record names no partner set by hand). */
  choosesPartners(id: string): boolean {
    return this.members.get(id)?.partner === null;
  }
}

function routeOf(record: MemberRecord): PartnerRoute | undefined {
  try {
    return { node: record.id, address: parseAddress(record.services.mirror), tls: record.tls?.mirror ?? false };
  } catch {
    return undefined;
  }
}
