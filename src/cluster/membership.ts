// A node's membership in its cluster (DESIGN 4.7): its member record under
// /memstrata/<cluster>/nodes/<id>, bound to its etcd lease.
//
//   start     lease granted -> record put (only if the key is free or already ours)
//   running   lease renewed in the background (lease-keeper.ts); the record is put again
//             when what it says changes (capacity, devices), at most once per second
//   lease lost (etcd unreachable past the TTL, or expired): etcd drops the record; a new
//             lease is granted as soon as etcd answers, and the record put again
//   stop      the lease is revoked: the record goes at once, not a lease later
//
// Two nodes must never hold one id: the record is written in a transaction that succeeds
// only when the key does not exist or is held by this node's own lease. A key held by
// another lease (a node with the same id, or this node's previous life killed within its
// lease) is waited out: that lease either ends, and the key frees itself, or it is
// renewed, and the node reports the conflict and stays out of the cluster.
//
// etcd away for longer than the lease: the node no longer counts on its lease, but keeps
// trying to renew it. etcd gives the leases it knew a fresh TTL when it comes back, so the
// renewal usually resumes the same lease, and the record never left: hosts see no node
// go and come back.

import type { Etcd3 } from 'etcd3';
import { EtcdLeaseInvalidError } from 'etcd3';
import type { Logger } from '../logger.js';
import { etcdProblem, openEtcd, type EtcdTls } from '../client/etcd.js';
import { decodeMember, encodeMember, memberKey, membersPrefix, type MemberRecord } from '../protocol/cluster/member.js';
import type { ClusterJson, ClusterSelfJson } from '../protocol/admin/api.js';
import { LeaseKeeper, type LeaseApi } from './lease-keeper.js';

/** How often the record is compared with what the node would say now. */
const UPDATE_MS = 1000;
/** How often the node reads its record back: one deleted or replaced by hand (or by a node with the same id) is written again, through the transaction that refuses another lease. */
const VERIFY_MS = 3000;

export type MembershipState = ClusterSelfJson['state'];

export interface MembershipOptions {
  endpoints: readonly string[];
  cluster: string;
  ttlMs: number;
  nodeId: string;
  /** The record as the node would write it now. */
  describe: () => MemberRecord;
  log: Logger;
  /** For https endpoints. */
  tls?: EtcdTls | undefined;
}

/** A member as the cluster shows it, with its lease. */
export interface ClusterMember {
  id: string;
  /** Seconds left on its lease, as etcd says; null when etcd would not say. */
  leaseSeconds: number | null;
  record: MemberRecord;
}

export class Membership {
  private readonly options: MembershipOptions;
  private readonly client: Etcd3;
  private readonly keeper: LeaseKeeper;
  private readonly key: string;
  private readonly log: Logger;
  private written: { lease: string; text: string } | undefined;
  private verifiedAt: number;
  private state: MembershipState;
  private problem: string | undefined;
  private timer: NodeJS.Timeout | undefined;
  private busy: Promise<void> | undefined;
  private closed: boolean;
  private joined: Promise<void>;
  private markJoined: () => void;

  constructor(options: MembershipOptions) {
    this.options = options;
    this.log = options.log;
    this.client = openEtcd({ endpoints: options.endpoints, tls: options.tls });
    this.key = memberKey(options.cluster, options.nodeId);
    this.keeper = new LeaseKeeper({ api: etcdLeases(this.client), ttlMs: options.ttlMs, log: options.log });
    this.written = undefined;
    this.verifiedAt = 0;
    this.state = 'joining';
    this.problem = undefined;
    this.timer = undefined;
    this.busy = undefined;
    this.closed = false;
    this.markJoined = () => undefined;
    this.joined = new Promise((resolve) => {
      this.markJoined = resolve;
    });
    this.keeper.on('granted', () => {
      this.tick();
    });
    this.keeper.on('lost', () => {
      this.written = undefined;
      if (this.state === 'member') this.state = 'joining';
    });
  }

  /** The etcd client, shared with the ownership of NVRAM devices. */
  get etcd(): Etcd3 {
    return this.client;
  }

  /** The node's lease, which its NVRAM ownership claims stand under too. */
  get lease(): LeaseKeeper {
    return this.keeper;
  }

  /**
   * Starts the lease and the record; resolves once the node is a member, or after
   * `waitMs` with the node still trying in the background (the reason is in status()).
   */
  async start(waitMs: number): Promise<void> {
    this.keeper.start();
    this.timer = setInterval(() => {
      this.tick();
    }, UPDATE_MS);
    await Promise.race([this.joined, new Promise((resolve) => setTimeout(resolve, waitMs).unref())]);
    if (this.state !== 'member') this.log.warn({ cluster: this.options.cluster, problem: this.problem ?? 'no lease yet' }, 'not a cluster member yet; still trying');
  }

  status(): ClusterSelfJson {
    return {
      cluster: this.options.cluster,
      endpoints: [...this.options.endpoints],
      // The lease ends by the clock, before the keeper's loop notices.
      state: this.state === 'member' && this.keeper.id === undefined ? 'joining' : this.state,
      lease: this.keeper.id ?? null,
      leaseRemainingMs: Math.round(this.keeper.remainingMs()),
      leaseTtlMs: this.options.ttlMs,
      problem: this.problem ?? this.keeper.problem ?? null,
    };
  }

  /** Every member record in etcd now, with its lease's time left; records that do not read are listed in `unreadable`. */
  async members(): Promise<{ members: ClusterMember[]; unreadable: string[] }> {
    const response = await this.client.getAll().prefix(membersPrefix(this.options.cluster)).exec();
    const members: ClusterMember[] = [];
    const unreadable: string[] = [];
    await Promise.all(
      response.kvs.map(async (kv) => {
        const key = kv.key.toString();
        if (key.slice(membersPrefix(this.options.cluster).length).includes('/')) {
          unreadable.push(`member record ${key}: not a member key (nested)`);
          return;
        }
        const record = decodeMember(kv.value, key);
        if (typeof record === 'string') {
          unreadable.push(record);
          return;
        }
        let leaseSeconds: number | null = null;
        if (kv.lease !== '0') {
          try {
            const ttl = await this.client.leaseClient.leaseTimeToLive({ ID: kv.lease });
            leaseSeconds = Math.max(0, Number(ttl.TTL));
          } catch {
            leaseSeconds = null;
          }
        }
        members.push({ id: record.id, leaseSeconds, record });
      }),
    );
    members.sort((a, b) => a.id.localeCompare(b.id));
    return { members, unreadable };
  }

  /** GET /v1/cluster: this node's membership, every member and the mirrored devices they report. */
  async view(): Promise<ClusterJson> {
    const view: ClusterJson = { enabled: true, node: this.options.nodeId, self: this.status(), members: [], devices: [], ownership: [], unreadable: [], problem: null };
    try {
      const { members, unreadable } = await this.members();
      view.unreadable = unreadable;
      for (const m of members) {
        view.members.push({ ...m.record, leaseSeconds: m.leaseSeconds, self: m.id === this.options.nodeId });
        for (const d of m.record.mirrored) view.devices.push({ device: d.name, node: m.id, role: d.role, epoch: d.epoch, state: d.state, policy: d.policy, partner: d.partner ?? m.record.partner });
      }
      view.devices.sort((a, b) => a.device.localeCompare(b.device) || a.node.localeCompare(b.node));
    } catch (error) {
      view.problem = `cannot list the cluster's members: ${etcdProblem(error)}`;
    }
    return view;
  }

  /** Leaves the cluster: the record is deleted with the lease, at once. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.timer !== undefined) clearInterval(this.timer);
    await this.busy;
    try {
      await this.keeper.close({ revoke: true });
    } catch (error) {
      this.log.warn({ problem: etcdProblem(error) }, 'could not revoke the cluster lease; the member record goes when it expires');
    }
    this.state = 'left';
    this.client.close();
  }

  /** Puts the record when it is not written under the current lease, or says something new. */
  private tick(): void {
    if (this.closed || this.busy !== undefined) return;
    this.busy = this.update()
      .catch((error: unknown) => {
        this.report(`cannot write the member record to etcd: ${etcdProblem(error)}`);
      })
      .finally(() => {
        this.busy = undefined;
      });
  }

  private async update(): Promise<void> {
    const lease = this.keeper.id;
    if (lease === undefined) return;
    const text = encodeMember(this.options.describe());
    if (this.written?.lease === lease && this.written.text === text) {
      if (Date.now() - this.verifiedAt < VERIFY_MS) return;
      this.verifiedAt = Date.now();
      const kv = (await this.client.get(this.key).exec()).kvs[0];
      if (kv !== undefined && kv.lease === lease && kv.value.toString() === text) return;
      this.log.warn({ key: this.key }, 'the member record was removed or replaced in etcd; writing it again');
      this.written = undefined;
      if (this.state === 'member') this.state = 'joining';
    }
    const put = this.client.put(this.key).value(text).lease(lease);
    const result = await this.client.if(this.key, 'Create', '==', 0).then(put).else(this.client.get(this.key)).commit();
    let stored = result.succeeded;
    if (!stored) {
      const holder = result.responses[0]?.response_range.kvs[0]?.lease ?? '0';
      if (holder === lease) {
        stored = (await this.client.if(this.key, 'Lease', '==', lease).then(this.client.put(this.key).value(text).lease(lease)).commit()).succeeded;
      } else {
        this.state = 'conflict';
        this.report(`node id ${this.options.nodeId} is held in the cluster by another lease (${holder}): another node with this id, or this node's previous run whose lease has not ended yet`);
        return;
      }
    }
    if (!stored || this.keeper.id !== lease) return;
    this.written = { lease, text };
    if (this.state !== 'member') {
      this.log.info({ cluster: this.options.cluster, key: this.key, lease }, 'joined the cluster');
      this.state = 'member';
    }
    this.problem = undefined;
    this.markJoined();
  }

  private report(problem: string): void {
    if (problem !== this.problem) this.log.warn({ cluster: this.options.cluster }, problem);
    this.problem = problem;
  }
}

/** The lease calls of LeaseKeeper, on etcd. */
export function etcdLeases(client: Etcd3, timeoutMs = 2000): LeaseApi {
  return {
    grant: async (ttlSeconds) => {
      const response = await client.leaseClient.leaseGrant({ TTL: ttlSeconds });
      return { id: response.ID, ttlSeconds: Number(response.TTL) };
    },
    keepAlive: async (id) => {
      const stream = await client.leaseClient.leaseKeepAlive();
      try {
        return await new Promise<number>((resolve, reject) => {
          const timer = setTimeout(() => { reject(new Error(`no answer to a lease renewal in ${timeoutMs} ms`)); }, timeoutMs);
          stream.on('data', (response) => {
            clearTimeout(timer);
            resolve(Number(response.TTL));
          });
          stream.on('error', (error: Error) => {
            clearTimeout(timer);
            reject(error);
          });
          stream.write({ ID: id });
        });
      } finally {
        stream.end();
      }
    },
    revoke: async (id) => {
      try {
        await client.leaseClient.leaseRevoke({ ID: id });
      } catch (error) {
        if (!(error instanceof EtcdLeaseInvalidError)) throw error;
      }
    },
  };
}
