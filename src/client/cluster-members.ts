// The members of a cluster as etcd has them, followed by watching their prefix (FIG. 14:
// the network tells every device when a node appears or goes).
//
//   start    list /memstrata/<cluster>/nodes/ at revision R, then watch from R + 1
//   put      a new id: `joined`; a known one: `updated` (capacity, services)
//   delete   `left`: the node's lease ended (it stopped, or was silent for a lease)
//
// The etcd3 watcher resumes from the last revision it saw when its stream breaks, so no
// change is missed while etcd is briefly away. If etcd has compacted past that revision,
// the members are listed again and the differences reported, as if each had happened.
// A record that cannot be read is reported (`unreadable`) and otherwise ignored: a node
// that cannot be understood is not a member a host should use.

import { EventEmitter } from 'node:events';
import type { Etcd3, IKeyValue, Watcher } from 'etcd3';
import { decodeMember, membersPrefix, type MemberRecord } from '../protocol/cluster/member.js';
import { cancelWatcher, etcdProblem, openEtcd, type EtcdTls } from './etcd.js';

export interface ClusterMembersEvents {
  joined: [record: MemberRecord];
  updated: [record: MemberRecord, previous: MemberRecord];
  left: [id: string];
  /** A record that cannot be read, or a problem with the watch itself. */
  unreadable: [problem: string];
}

export interface ClusterMembersOptions {
  etcd: readonly string[];
  cluster: string;
  /** For https endpoints. */
  tls?: EtcdTls;
}

export class ClusterMembers extends EventEmitter<ClusterMembersEvents> {
  private readonly client: Etcd3;
  private readonly prefix: string;
  private readonly known: Map<string, MemberRecord>;
  private watcher: Watcher | undefined;
  private closed: boolean;

  constructor(options: ClusterMembersOptions) {
    super();
    this.client = openEtcd({ endpoints: options.etcd, tls: options.tls });
    this.prefix = membersPrefix(options.cluster);
    this.known = new Map();
    this.watcher = undefined;
    this.closed = false;
  }

  /** Lists the members (each a `joined` event), then follows changes. Rejects when etcd cannot be reached. */
  async start(): Promise<void> {
    const revision = await this.relist();
    await this.watch(revision);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await cancelWatcher(this.watcher);
    this.client.close();
  }

  /** A member's record as last seen; undefined when it is not a member. */
  get(id: string): MemberRecord | undefined {
    return this.known.get(id);
  }

  /** Every member's record as last seen. */
  records(): MemberRecord[] {
    return [...this.known.values()];
  }

  /** Lists every record and reports what changed against what was known; returns the revision listed at. */
  private async relist(): Promise<string> {
    const response = await this.client.getAll().prefix(this.prefix).exec();
    const seen = new Set<string>();
    for (const kv of response.kvs) {
      const id = this.apply(kv);
      if (id !== undefined) seen.add(id);
    }
    // Members whose record no longer reads are gone too.
    for (const id of [...this.known.keys()]) {
      if (!seen.has(id)) {
        this.known.delete(id);
        this.emit('left', id);
      }
    }
    return response.header.revision;
  }

  private async watch(revision: string): Promise<void> {
    const watcher = await this.client
      .watch()
      .prefix(this.prefix)
      .startRevision(String(BigInt(revision) + 1n))
      .create();
    if (this.closed) {
      await watcher.cancel();
      return;
    }
    this.watcher = watcher;
    watcher.on('put', (kv) => {
      this.apply(kv);
    });
    watcher.on('delete', (kv) => {
      const id = kv.key.toString().slice(this.prefix.length);
      if (!id.includes('/') && this.known.delete(id)) this.emit('left', id);
    });
    watcher.on('error', (error) => {
      // Compacted past our revision (or another end of the stream): list again, then watch anew.
      this.emit('unreadable', `member watch ended: ${etcdProblem(error)}; listing the members again`);
      void this.restart();
    });
  }

  /** After the watch ended with an error: etcd cancelled it, and the client has let it go (see WATCH_ENDED in etcd.ts). */
  private async restart(): Promise<void> {
    this.watcher = undefined;
    while (!this.closed) {
      try {
        await this.watch(await this.relist());
        return;
      } catch (error) {
        this.emit('unreadable', `cannot list the members: ${etcdProblem(error)}`);
        await new Promise((resolve) => setTimeout(resolve, 500));
      }
    }
  }

  /** A record put: joined or updated; returns its id, or undefined when it does not read. */
  private apply(kv: IKeyValue): string | undefined {
    const key = kv.key.toString();
    const name = key.slice(this.prefix.length);
    // Only /nodes/<id>: deeper keys are nobody's record.
    if (name.includes('/')) {
      this.emit('unreadable', `member record ${key}: not a member key (nested under ${this.prefix})`);
      return undefined;
    }
    const record = decodeMember(kv.value, key);
    if (typeof record === 'string') {
      this.emit('unreadable', record);
      // A member whose record no longer reads is not one a host should go on using.
      if (this.known.delete(name)) this.emit('left', name);
      return undefined;
    }
    const previous = this.known.get(record.id);
    this.known.set(record.id, record);
    if (previous === undefined) this.emit('joined', record);
    else if (JSON.stringify(previous) !== JSON.stringify(record)) this.emit('updated', record, previous);
    return record.id;
  }
}
