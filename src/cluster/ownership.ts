// Fenced ownership of mirrored NVRAM devices in a cluster (DESIGN 4.7; issue 14, item 4).
//
//   /memstrata/<cluster>/nvram/<device>          the record: term, primary, replica, inSync
//   /memstrata/<cluster>/nvram/<device>/holder   the primary's claim, bound to its lease
//
// Both change only in etcd transactions that compare what the node last saw (the record's
// revision, the holder's existence or lease). The rules:
//
//   claim      a mirrored primary writes the holder under its own lease (and the record,
//              when there is none); it acknowledges appends only while its claim stands
//              under the lease it holds now (`check`, no round trip: the lease keeper's
//              conservative clock says how long that is)
//   outdate    before a primary acknowledges without its partner (degraded), the record
//              says inSync: false; after a resync it says true again
//   takeover   the replica named in the record takes the device over, with term + 1, only
//              when the holder is gone (the primary's lease ended in etcd) and inSync is
//              true, and only in one transaction that also checks nothing changed since
//   demotion   a node whose device the record gives to another primary that holds it (its
//              holder exists) stops serving its copy (recovering); the new primary's resync
//              then demotes it to a replica and fills it
//   handback   a node named primary whose copy cannot serve (it crashed before its
//              promotion was durable: a stale replica again) gives the record back to the
//              replica named in it, term + 1, while nobody holds it
//   removal    a device removed here takes its record and holder with it; a copy here
//              that the record names neither primary nor replica, under a primary that
//              holds it, is removed (after a fresh read, and only if no RESET reached it)
//   partner    in a cluster that chooses partners (no mirror.partner), the record's replica
//              is chosen when the record is made (partners.ts: another zone, most room);
//              a claimed primary not in sync (and not recovering) whose replica has been
//              out of the member list for a grace period, could not be brought in sync for
//              a while, or is none, names a new one, inSync: false, and mirrors there; only
//              the replica the record names is ever recorded in sync
//
// Why no split brain (docs/cluster.md has the whole argument): the replica takes over only
// once etcd has let the old primary's lease go; the old primary's own view of its lease
// ends no later than etcd's, and every acknowledgement is checked against that view right
// before it is made. So the old primary acknowledges nothing after a takeover; and what it
// acknowledged before was on the replica (in sync) or the record said inSync: false, which
// forbids the takeover.

import type { Etcd3, IKeyValue, Watcher } from 'etcd3';
import { z } from 'zod';
import { RuntimeError } from '../errors.js';
import type { Logger } from '../logger.js';
import { cancelWatcher, etcdProblem } from '../client/etcd.js';
import { clusterPrefix } from '../protocol/cluster/member.js';
import type { DeviceManager } from '../nvram/device-manager.js';
import { isMirrored } from '../nvram/device.js';
import type { MirrorOwnership } from '../nvram/mirroring.js';
import type { LeaseKeeper } from './lease-keeper.js';
import type { DeviceOwnershipJson } from '../protocol/admin/api.js';

const recordSchema = z.object({
  format: z.literal(1),
  device: z.string(),
  term: z.number().int().positive(),
  primary: z.string(),
  replica: z.string().nullable(),
  inSync: z.boolean(),
});
export type OwnershipRecord = z.infer<typeof recordSchema>;

/** How often each device's ownership is looked at, besides the watch's events. */
const TICK_MS = 250;
/** A primary out of sync asks its mirroring to resync at most this often. */
const RETRY_MS = 2000;

export interface OwnershipOptions {
  client: Etcd3;
  keeper: LeaseKeeper;
  cluster: string;
  nodeId: string;
  nvram: DeviceManager;
  /** The node a new record names as replica where the cluster does not choose: the partner set by hand, as its link knows it. */
  partner: (device: string) => string | undefined;
  /** The node a device is in sync with now, if it is (its link said HELLO with that id). */
  syncedWith: (device: string) => string | undefined;
  /** When the cluster chooses partners: the choice, and how long a node has been out of the member list. */
  placement?: Placement | undefined;
  /** Asks mirroring to resync a primary that is not in sync. */
  resync: (device: string) => void;
  log: Logger;
}

export type DeviceOwnership = DeviceOwnershipJson;

/** The cluster's choice of partners (partners.ts), as ownership uses it. */
export interface Placement {
  /** `named`: the replicas this node has named, by device; those a member's record does not list yet count against its room. */
  choose(need: { size: number; medium: string }, avoid: ReadonlySet<string>, named: ReadonlyMap<string, { node: string; size: number }>): string | undefined;
  goneForMs(id: string): number;
  /** The node is a member that lets the cluster choose its partners (no mirror.partner by hand). */
  choosesPartners(id: string): boolean;
  /** A replica out of the member list for longer than this is replaced. */
  graceMs: number;
  /** A replica a claimed primary could not bring in sync for this long, though a member, is replaced too (it refuses, cannot be reached, or has no room). */
  stuckMs: number;
}

export class Ownership implements MirrorOwnership {
  private readonly options: OwnershipOptions;
  private readonly prefix: string;
  private readonly records: Map<string, { record: OwnershipRecord; revision: string }>;
  /** Holder keys as the watch last saw them: the node, the lease, and the revision of that sight. */
  private readonly holders: Map<string, { node: string; lease: string; revision: string }>;
  /** Revisions at which keys were last seen deleted (so an older snapshot does not bring them back). */
  private readonly deleted: Map<string, string>;
  /** When each device last asked mirroring to resync. */
  private readonly retried: Map<string, number>;
  /** Devices for which no member had room for a replica (said once in the log). */
  private readonly unplaced: Set<string>;
  /** When each stale copy here was last looked at for removal. */
  private readonly swept: Map<string, number>;
  /** When each claimed primary here was last in sync, or in a long resync (or claimed, or given a new partner); performance.now(). */
  private readonly syncedAt: Map<string, number>;
  /** When each device was first seen resyncing in its current resync; performance.now(). */
  private readonly syncingSince: Map<string, number>;
  /** Replicas this node has chosen and not yet written in a record (a claim in flight), so choices made together do not all land on one member. */
  private readonly choosing: Map<string, string>;
  /** Per device, nodes replaced because they could not be brought in sync, and until when they are not chosen again. */
  private readonly shunned: Map<string, Map<string, number>>;
  private watching: Promise<void> | undefined;
  private relisting: Promise<void> | undefined;
  /** Claims this node's transactions confirmed, with the lease they stand under. */
  private readonly claims: Map<string, string>;
  /** Devices whose record this node set to inSync: false (under its current claim). */
  private readonly outdated: Map<string, string>;
  /** One etcd change per device at a time. */
  private readonly busy: Map<string, Promise<unknown>>;
  private watcher: Watcher | undefined;
  private timer: NodeJS.Timeout | undefined;
  private closed: boolean;

  constructor(options: OwnershipOptions) {
    this.options = options;
    this.prefix = `${clusterPrefix(options.cluster)}nvram/`;
    this.records = new Map();
    this.holders = new Map();
    this.deleted = new Map();
    this.retried = new Map();
    this.unplaced = new Set();
    this.swept = new Map();
    this.syncedAt = new Map();
    this.syncingSince = new Map();
    this.choosing = new Map();
    this.shunned = new Map();
    this.watching = undefined;
    this.relisting = undefined;
    this.claims = new Map();
    this.outdated = new Map();
    this.busy = new Map();
    this.watcher = undefined;
    this.timer = undefined;
    this.closed = false;
  }

  /** Lists and watches the ownership keys, then looks after each device every TICK_MS. */
  async start(): Promise<void> {
    this.options.keeper.on('lost', () => {
      // Every claim stood under that lease: none stands now.
      this.claims.clear();
      this.outdated.clear();
    });
    await this.relist().catch((error: unknown) => {
      this.options.log.warn({ problem: etcdProblem(error) }, 'cannot list NVRAM ownership in etcd yet; retrying');
    });
    this.timer = setInterval(() => {
      this.tick();
    }, TICK_MS);
    this.timer.unref();
    this.tick();
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer !== undefined) clearInterval(this.timer);
    await cancelWatcher(this.watcher);
    await Promise.allSettled([...this.busy.values()]);
  }

  /** Throws unless this node may acknowledge for `device` now. */
  check(device: string): void {
    const lease = this.options.keeper.id;
    const claim = this.claims.get(device);
    if (lease === undefined || claim !== lease) {
      throw new RuntimeError('MS_NVRAM_FENCED', `device ${device}: this node does not hold the device's ownership lease in the cluster${lease === undefined ? ' (its etcd lease is not held)' : ''}; its primary may be elsewhere`, {
        details: { device },
      });
    }
    const seen = this.records.get(device)?.record;
    if (seen !== undefined && seen.primary !== this.options.nodeId) {
      throw new RuntimeError('MS_NVRAM_FENCED', `device ${device}: the cluster made ${seen.primary} its primary (term ${seen.term})`, { details: { device, primary: seen.primary } });
    }
  }

  isOutdated(device: string): boolean {
    const lease = this.options.keeper.id;
    return lease !== undefined && this.outdated.get(device) === lease && this.claims.get(device) === lease;
  }

  /** Sets inSync: false in the record, under this node's claim; rejects when it cannot. */
  outdate(device: string): Promise<void> {
    if (this.isOutdated(device)) return Promise.resolve();
    return this.serial(device, async () => {
      if (this.isOutdated(device)) return;
      const lease = this.options.keeper.id;
      if (lease === undefined || this.claims.get(device) !== lease) throw new Error('this node does not hold the device\'s ownership');
      const ok = await this.update(device, (r) => (r.primary === this.options.nodeId ? { ...r, inSync: false } : undefined), true);
      if (!ok) throw new Error('the ownership record changed meanwhile');
      this.outdated.set(device, lease);
      this.options.log.warn({ device }, 'the cluster records the replica of this NVRAM device as out of date: it acknowledges without its partner, and the replica cannot take over');
    });
  }

  /**
   * A resync filled `node`'s replica: the record says in sync. Where the cluster chooses
   * partners, only if the record still names that node (the primary may have named
   * another meanwhile: then the filled copy is not the replica, and nothing changes).
   */
  inSync(device: string, node: string | undefined): void {
    const lease = this.options.keeper.id;
    if (lease === undefined || this.claims.get(device) !== lease || node === undefined) return;
    // From now on, acknowledging without the partner needs a new `outdate`, queued behind this.
    this.outdated.delete(device);
    this.syncedAt.set(device, performance.now());
    void this.serial(device, async () => {
      if (this.options.keeper.id !== lease || this.claims.get(device) !== lease) return;
      const chosen = this.options.placement !== undefined;
      await this.update(device, (r) => (r.primary === this.options.nodeId && (!chosen || r.replica === node) ? { ...r, inSync: true, replica: node } : undefined));
    }).catch((error: unknown) => {
      this.options.log.warn({ device, problem: error instanceof Error ? error.message : String(error) }, 'cannot record the replica as in sync in etcd; retrying with the next resync');
    });
  }

  /** The node the record names as replica of a device this node is the recorded primary of. */
  replicaOf(device: string): string | undefined {
    const record = this.records.get(device)?.record;
    return record !== undefined && record.primary === this.options.nodeId ? (record.replica ?? undefined) : undefined;
  }

  /** Every mirrored device's ownership, for status. */
  list(): DeviceOwnership[] {
    const lease = this.options.keeper.id;
    return this.options.nvram
      .devicesList()
      .filter((d) => isMirrored(d.policy))
      .map((d) => {
        const r = this.records.get(d.name)?.record;
        return { device: d.name, term: r?.term ?? null, primary: r?.primary ?? null, replica: r?.replica ?? null, inSync: r?.inSync ?? null, held: lease !== undefined && this.claims.get(d.name) === lease };
      });
  }

  // ---- the loop ----

  private tick(): void {
    if (this.closed) return;
    // No watch (etcd was away at the start, or the watch ended and its relist failed): list again.
    if (this.watcher === undefined && this.relisting === undefined) {
      this.relisting = this.relist()
        .catch(() => undefined)
        .finally(() => {
          this.relisting = undefined;
        });
    }
    // Devices removed here (not merely damaged) take their record and holder with them.
    const local = new Set(this.options.nvram.devicesList().map((d) => d.name));
    const damaged = new Set(this.options.nvram.damaged().map((d) => d.name));
    for (const [name, { record }] of this.records) {
      if (record.primary !== this.options.nodeId || local.has(name) || damaged.has(name) || this.busy.has(name)) continue;
      void this.serial(name, () => this.forget(name)).catch(() => undefined);
    }
    for (const device of this.options.nvram.devicesList()) {
      if (!isMirrored(device.policy) || this.busy.has(device.name)) continue;
      const name = device.name;
      void this.serial(name, () => (device.role === 'primary' ? this.ownPrimary(name) : this.ownReplica(name))).catch((error: unknown) => {
        this.options.log.debug({ device: name, problem: etcdProblem(error) }, 'NVRAM ownership step failed; retrying');
      });
    }
  }

  /** A primary here: claim it, or give it up when the record names another primary. */
  private async ownPrimary(name: string): Promise<void> {
    const lease = this.options.keeper.id;
    if (lease === undefined) return;
    const me = this.options.nodeId;
    const seen = this.records.get(name);
    if (seen !== undefined && seen.record.primary !== me) {
      this.claims.delete(name);
      // Only against a primary that holds it: one named but not (yet, or any more) holding
      // may hand the record back, and this copy may then be the only full one.
      if (this.holders.get(name)?.node === seen.record.primary) {
        this.options.nvram.stepAside(name, `the cluster made ${seen.record.primary} its primary (term ${seen.record.term})`);
        // Not even its replica: the device moved on without this copy.
        if (seen.record.replica !== null && seen.record.replica !== me) await this.discardStale(name);
      }
      return;
    }
    if (this.claims.get(name) === lease) {
      // Claimed. In sync here but recorded out of sync (its resync ended before the record
      // existed, or before the claim): say so. Not in sync here: ask mirroring to catch up,
      // at most every RETRY_MS (a resync tried before the claim could not outdate the
      // replica and did not run; after a takeover, the partner is the old primary).
      const mirror = this.options.nvram.find(name)?.info().mirror;
      // A resync that has run for a second is progress: the replica answers and takes records.
      if (mirror === 'syncing') {
        const since = this.syncingSince.get(name) ?? performance.now();
        this.syncingSince.set(name, since);
        if (performance.now() - since > 1000) this.syncedAt.set(name, performance.now());
      } else this.syncingSince.delete(name);
      if (mirror === 'in-sync') {
        this.syncedAt.set(name, performance.now());
        if (seen?.record.inSync === false) this.inSync(name, this.options.syncedWith(name));
      } else if (mirror !== 'syncing' && seen !== undefined && (await this.replacePartner(name, lease, seen))) {
        return;
      } else if (mirror !== 'syncing' && Date.now() - (this.retried.get(name) ?? 0) > RETRY_MS) {
        this.retried.set(name, Date.now());
        this.options.resync(name);
      }
      return;
    }
    const { client } = this.options;
    const recordKey = this.prefix + name;
    const holderKey = `${recordKey}/holder`;
    const holder = JSON.stringify({ node: me });
    if (seen === undefined) {
      const chosen = this.choosePartner(name, new Set());
      if (chosen !== undefined) this.choosing.set(name, chosen);
      const record: OwnershipRecord = { format: 1, device: name, term: 1, primary: me, replica: chosen ?? this.options.partner(name) ?? null, inSync: false };
      const result = await client
        .if(recordKey, 'Create', '==', 0)
        .and(holderKey, 'Create', '==', 0)
        .then(client.put(recordKey).value(JSON.stringify(record)), client.put(holderKey).value(holder).lease(lease))
        .commit()
        .finally(() => this.choosing.delete(name));
      if (result.succeeded) {
        this.setRecord(name, record, result.header.revision);
        this.holders.set(name, { node: me, lease, revision: result.header.revision });
        this.confirm(name, lease, record, 'claimed in the cluster (new ownership record)');
      } else await this.refresh(name);
      return;
    }
    // The record names this node: its holder is free, or already under this lease.
    const current = this.holders.get(name);
    if (current !== undefined && current.lease !== lease) return; // an older lease of this node (killed and back within it): wait it out
    const result = await client
      .if(recordKey, 'Mod', '==', seen.revision)
      .and(holderKey, current === undefined ? 'Create' : 'Lease', '==', current === undefined ? 0 : lease)
      .then(client.put(holderKey).value(holder).lease(lease))
      .commit();
    if (result.succeeded) {
      this.holders.set(name, { node: me, lease, revision: result.header.revision });
      this.confirm(name, lease, seen.record, 'claimed in the cluster');
    } else await this.refresh(name);
  }

  /** A partner for a device of this node, when the cluster chooses them; undefined when none has room (or it does not choose). */
  private choosePartner(name: string, avoid: ReadonlySet<string>): string | undefined {
    const device = this.options.nvram.find(name);
    if (this.options.placement === undefined || device === undefined) return undefined;
    // Every replica this node has named, in records or in claims not yet written: the
    // placement counts those its member's record does not list yet against its room.
    const named = new Map<string, { node: string; size: number }>();
    for (const [other, { record }] of this.records) {
      if (other !== name && record.primary === this.options.nodeId && record.replica !== null) named.set(other, { node: record.replica, size: this.options.nvram.find(other)?.size ?? 0 });
    }
    for (const [other, node] of this.choosing) if (other !== name) named.set(other, { node, size: this.options.nvram.find(other)?.size ?? 0 });
    return this.options.placement.choose({ size: device.size, medium: this.options.nvram.mediumOf(name) }, avoid, named);
  }

  /**
   * A claimed primary that is not in sync names a new replica, with inSync: false (the old
   * one may not take over any more, the new one only once a resync has filled it), when
   *   - it has none;
   *   - its replica has been out of the member list for longer than the grace;
   *   - or its replica, a member all the while, could not be brought in sync for stuckMs
   *     (it refuses, cannot be reached, or has no room): that node is avoided for this
   *     device for a while.
   * Never while the primary's own copy is `recovering`: it may lack records that only its
   * replica holds (a crash lost its journal's tail), and must wait for them. True when
   * the record changed.
   */
  private async replacePartner(name: string, lease: string, seen: { record: OwnershipRecord }): Promise<boolean> {
    const placement = this.options.placement;
    const device = this.options.nvram.find(name);
    if (placement === undefined || device === undefined || device.recovering) return false;
    const old = seen.record.replica;
    const gone = old === null || placement.goneForMs(old) > placement.graceMs;
    const now = performance.now();
    const stuck = old !== null && now - (this.syncedAt.get(name) ?? now) > placement.stuckMs;
    if (!gone && !stuck) return false;
    const shunned = this.shunned.get(name) ?? new Map<string, number>();
    for (const [node, until] of shunned) if (until < now) shunned.delete(node);
    const next = this.choosePartner(name, new Set([...(old === null ? [] : [old]), ...shunned.keys()]));
    if (next === undefined) {
      if (!this.unplaced.has(name)) this.options.log.warn({ device: name, replica: old, avoided: [...shunned.keys()] }, 'no other member of the cluster has room for a replica of this mirrored NVRAM device (or every other one is avoided for it); it stays unmirrored until one has');
      this.unplaced.add(name);
      return false;
    }
    this.unplaced.delete(name);
    // The old replica may remove its copy once another is named: every record acknowledged
    // here must be durable here first (a `mirrored` journal is written, not yet synced,
    // while the partner holds the records).
    if (device.policy === 'mirrored') await device.syncJournal();
    const ok = await this.update(name, (r) => (r.primary === this.options.nodeId && r.replica === old ? { ...r, replica: next, inSync: false } : undefined));
    if (!ok) return false;
    if (this.options.keeper.id === lease && this.claims.get(name) === lease) this.outdated.set(name, lease);
    this.syncedAt.set(name, performance.now());
    if (old !== null && !gone) {
      shunned.set(old, now + 10 * placement.stuckMs);
      this.shunned.set(name, shunned);
    }
    const why = old === null ? 'the cluster chose a mirror partner for this NVRAM device' : gone ? `the mirror partner of this NVRAM device left the cluster; the cluster chose ${next}` : `the mirror partner of this NVRAM device could not be brought in sync for ${placement.stuckMs} ms; the cluster chose ${next}`;
    this.options.log.warn({ device: name, replica: next, before: old }, why);
    return true;
  }

  /** A replica here: take the device over once its primary's claim is gone and the record allows it. */
  private async ownReplica(name: string): Promise<void> {
    const lease = this.options.keeper.id;
    if (lease === undefined) return;
    const me = this.options.nodeId;
    const seen = this.records.get(name);
    const device = this.options.nvram.find(name);
    if (seen === undefined || device === undefined) return;
    const { client } = this.options;
    const recordKey = this.prefix + name;
    const holderKey = `${recordKey}/holder`;
    if (seen.record.primary === me) {
      // This node won the record, but its copy is still a replica: a promotion that did not finish.
      if (this.claims.get(name) === lease && !device.recovering) {
        await this.options.nvram.promoteByCluster(name);
        return;
      }
      if (this.holders.has(name)) return; // an older lease of this node still holds it: wait it out
      if (!device.recovering) {
        // Not claimed (the node restarted): claim it, then promote.
        const claim = await client.if(recordKey, 'Mod', '==', seen.revision).and(holderKey, 'Create', '==', 0).then(client.put(holderKey).value(JSON.stringify({ node: me })).lease(lease)).commit();
        if (!claim.succeeded) {
          await this.refresh(name);
          return;
        }
        this.holders.set(name, { node: me, lease, revision: claim.header.revision });
        this.confirm(name, lease, seen.record, 'claimed in the cluster (a promotion to finish)');
        await this.options.nvram.promoteByCluster(name);
        return;
      }
      // A stale copy (this node crashed before its promotion was durable: it acknowledged
      // nothing as primary): hand the record back to the replica named in it, which holds the data.
      const back = seen.record.replica;
      if (back === null) {
        this.options.log.error({ device: name }, 'this node is named primary of an NVRAM device its copy cannot serve, and the record names no replica to hand it back to');
        return;
      }
      const record: OwnershipRecord = { ...seen.record, term: seen.record.term + 1, primary: back, replica: me, inSync: false };
      const result = await client.if(recordKey, 'Mod', '==', seen.revision).and(holderKey, 'Create', '==', 0).then(client.put(recordKey).value(JSON.stringify(record))).commit();
      if (result.succeeded) {
        this.setRecord(name, record, result.header.revision);
        this.options.log.warn({ device: name, term: record.term, primary: back }, 'NVRAM device handed back in the cluster: this node\'s copy is stale (it crashed before its promotion was durable)');
      } else await this.refresh(name);
      return;
    }
    // Another node named replica, under a primary that holds it: nobody mirrors here any more.
    if (seen.record.replica !== null && seen.record.replica !== me && this.holders.get(name)?.node === seen.record.primary) {
      await this.discardStale(name);
      return;
    }
    // A write log's replica stays one: its volume lives on the primary's node, which takes the device back when it returns.
    if (seen.record.replica !== me || !seen.record.inSync || this.holders.has(name) || device.recovering || device.nodeOwned) return;
    const record: OwnershipRecord = { ...seen.record, term: seen.record.term + 1, primary: me, replica: seen.record.primary, inSync: false };
    const result = await client
      .if(recordKey, 'Mod', '==', seen.revision)
      .and(holderKey, 'Create', '==', 0)
      .then(client.put(recordKey).value(JSON.stringify(record)), client.put(holderKey).value(JSON.stringify({ node: me })).lease(lease))
      .commit();
    if (!result.succeeded) {
      await this.refresh(name);
      return;
    }
    this.setRecord(name, record, result.header.revision);
    this.holders.set(name, { node: me, lease, revision: result.header.revision });
    this.confirm(name, lease, record, `took over from ${seen.record.primary}, whose lease ended`);
    this.outdated.set(name, lease);
    await this.options.nvram.promoteByCluster(name);
  }

  /**
   * Removes a copy here that the record names neither primary nor replica, while its
   * primary holds the device: nobody mirrors to it, and it can never take over or be
   * handed the device back. Only once a fresh read of etcd agrees, and only if no RESET
   * reached the copy since before that read (the primary may have named this node again
   * and begun to fill it: it writes the record first, then resyncs). At most every RETRY_MS.
   */
  private async discardStale(name: string): Promise<void> {
    // Only where the cluster chooses partners: with mirror.partner set by hand, the record's
    // replica may lag behind a partner changed in the configuration, and the copy being filled is then not the one it names.
    if (this.options.placement === undefined || Date.now() - (this.swept.get(name) ?? 0) < RETRY_MS) return;
    this.swept.set(name, Date.now());
    const me = this.options.nodeId;
    const resets = this.options.nvram.resetCount(name);
    await this.refresh(name);
    const seen = this.records.get(name);
    if (seen === undefined || seen.record.primary === me || seen.record.replica === null || seen.record.replica === me || this.holders.get(name)?.node !== seen.record.primary) return;
    // A primary with mirror.partner set by hand fills its partner before its record names
    // it: the copy may be the one it is filling.
    if (!this.options.placement.choosesPartners(seen.record.primary)) return;
    const why = `the cluster names ${seen.record.primary} primary and ${seen.record.replica ?? 'no node'} replica (term ${seen.record.term})`;
    if (await this.options.nvram.discardStale(name, resets, why)) this.swept.delete(name);
  }

  /** A device this node was primary of is gone here: its record and holder go too (compared with what was seen). */
  private async forget(name: string): Promise<void> {
    const seen = this.records.get(name);
    if (seen === undefined || this.options.nvram.find(name) !== undefined) return;
    const { client } = this.options;
    const recordKey = this.prefix + name;
    const result = await client.if(recordKey, 'Mod', '==', seen.revision).then(client.delete().key(recordKey), client.delete().key(`${recordKey}/holder`)).commit();
    if (result.succeeded) {
      this.records.delete(name);
      this.holders.delete(name);
      this.claims.delete(name);
      this.options.log.info({ device: name }, 'NVRAM device removed: its ownership record left the cluster');
    } else await this.refresh(name);
  }

  private confirm(name: string, lease: string, record: OwnershipRecord, what: string): void {
    this.claims.set(name, lease);
    this.syncedAt.set(name, performance.now());
    const level = record.term > 1 && what.startsWith('took over') ? 'warn' : 'info';
    this.options.log[level]({ device: name, term: record.term, lease, replica: record.replica, inSync: record.inSync }, `NVRAM device ${what}`);
  }

  /**
   * Rewrites the record if `change` gives a new one, comparing the revision last seen;
   * false when it changed meanwhile or there is nothing to change. `always` writes even
   * when the view already shows the change (the view may be behind etcd).
   */
  private async update(device: string, change: (r: OwnershipRecord) => OwnershipRecord | undefined, always = false): Promise<boolean> {
    const seen = this.records.get(device);
    if (seen === undefined) return false;
    const next = change(seen.record);
    if (next === undefined) return false;
    if (!always && JSON.stringify(next) === JSON.stringify(seen.record)) return true;
    const { client } = this.options;
    const key = this.prefix + device;
    const result = await client.if(key, 'Mod', '==', seen.revision).then(client.put(key).value(JSON.stringify(next))).commit();
    if (!result.succeeded) {
      await this.refresh(device);
      return false;
    }
    this.setRecord(device, next, result.header.revision);
    return true;
  }

  private serial<T>(device: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.busy.get(device) ?? Promise.resolve();
    const run = previous.catch(() => undefined).then(fn);
    const tail = run.finally(() => {
      if (this.busy.get(device) === tail) this.busy.delete(device);
    });
    // The caller handles `run`; the queue's own copy must not count as unhandled.
    tail.catch(() => undefined);
    this.busy.set(device, tail);
    return run;
  }

  // ---- the view of etcd ----

  /** Lists every key (at the start, and after the watch ended), then watches from there. */
  private async relist(): Promise<void> {
    const response = await this.options.client.getAll().prefix(this.prefix).exec();
    for (const kv of response.kvs) this.apply(kv);
    // Keys the snapshot does not hold are gone, unless seen put after it.
    const present = new Set(response.kvs.map((kv) => kv.key.toString().slice(this.prefix.length)));
    for (const [name, entry] of this.records) if (!present.has(name) && newer(response.header.revision, entry.revision)) this.records.delete(name);
    for (const [name, entry] of this.holders) if (!present.has(`${name}/holder`) && newer(response.header.revision, entry.revision)) this.holders.delete(name);
    this.watching ??= this.watch(response.header.revision).finally(() => {
      this.watching = undefined;
    });
    await this.watching;
  }

  /** Reads one device's two keys again (after a transaction that found them changed). */
  private async refresh(name: string): Promise<void> {
    const { client } = this.options;
    const recordKey = this.prefix + name;
    const [record, holder] = await Promise.all([client.get(recordKey).exec(), client.get(`${recordKey}/holder`).exec()]);
    for (const [response, sub] of [[record, name], [holder, `${name}/holder`]] as const) {
      const kv = response.kvs[0];
      if (kv !== undefined) this.apply(kv);
      else this.remove(sub, response.header.revision);
    }
  }

  private async watch(revision: string): Promise<void> {
    if (this.watcher !== undefined || this.closed) return;
    const watcher = await this.options.client
      .watch()
      .prefix(this.prefix)
      .startRevision(String(BigInt(revision) + 1n))
      .create();
    if (this.closed) {
      await cancelWatcher(watcher);
      return;
    }
    this.watcher = watcher;
    watcher.on('put', (kv) => {
      this.apply(kv);
      this.tick();
    });
    watcher.on('delete', (kv) => {
      this.remove(kv.key.toString().slice(this.prefix.length), kv.mod_revision);
      this.tick();
    });
    watcher.on('error', () => {
      // etcd cancelled the watch (compacted past it), and the client has let it go: never
      // cancel it again (see WATCH_ENDED in etcd.ts). The next tick lists again and watches anew.
      if (this.watcher === watcher) this.watcher = undefined;
    });
  }

  /** A key deleted at `revision`: forgotten unless seen put later. */
  private remove(sub: string, revision: string): void {
    this.deleted.set(sub, revision);
    if (sub.endsWith('/holder')) {
      const name = sub.slice(0, -'/holder'.length);
      const seen = this.holders.get(name);
      if (seen === undefined || newer(revision, seen.revision)) this.holders.delete(name);
    } else {
      const seen = this.records.get(sub);
      if (seen === undefined || newer(revision, seen.revision)) this.records.delete(sub);
    }
  }

  private setRecord(name: string, record: OwnershipRecord, revision: string): void {
    const seen = this.records.get(name);
    if (seen !== undefined && newer(seen.revision, revision)) return;
    this.records.set(name, { record, revision });
  }

  /** A key as etcd has it at its mod revision: applied unless the view has seen a later change. */
  private apply(kv: IKeyValue): void {
    const sub = kv.key.toString().slice(this.prefix.length);
    const revision = kv.mod_revision;
    const gone = this.deleted.get(sub);
    if (gone !== undefined && !newer(revision, gone)) return;
    if (sub.endsWith('/holder')) {
      const name = sub.slice(0, -'/holder'.length);
      const seen = this.holders.get(name);
      if (seen !== undefined && newer(seen.revision, revision)) return;
      let node = '?';
      try {
        const value = JSON.parse(kv.value.toString()) as { node?: unknown };
        if (typeof value.node === 'string') node = value.node;
      } catch {
        // a holder written by hand: it still holds the device
      }
      this.holders.set(name, { node, lease: kv.lease, revision });
      return;
    }
    if (sub.includes('/')) return;
    let parsed: unknown;
    try {
      parsed = JSON.parse(kv.value.toString());
    } catch {
      parsed = undefined;
    }
    const record = recordSchema.safeParse(parsed);
    if (!record.success || record.data.device !== sub) {
      this.options.log.warn({ key: kv.key.toString() }, 'an NVRAM ownership record in etcd does not read; the device is left as it is');
      return;
    }
    this.setRecord(sub, record.data, revision);
  }
}

/** Revision `a` is later than `b` (etcd revisions are decimal strings of 64-bit integers). */
function newer(a: string, b: string): boolean {
  return BigInt(a) > BigInt(b);
}
