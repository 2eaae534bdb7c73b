// An NVRAM device: a journal of records kept in the device's own `nvram` extents, made
// durable by its policy (EMC US 8,990,520: global memory as NVRAM).
//
//   logical space [0, size) over the device's extents, used as a ring:
//     head ........ live records ........ tail
//   index: seq -> (logical offset, bytes), oldest first, with a start pointer
//
//   volatile        acknowledged once in memory; kept across a clean stop by the vault
//   local           acknowledged once also in the device's journal file, by group commit
//   mirrored        acknowledged once the partner node holds the record in memory; the
//                   journal file is written too, in the background, so a partner loss
//                   costs one fdatasync and no copy (mirroring.ts). A write log's plain
//                   WRITE (append without sync) is acknowledged once sent; its FLUSH
//                   (commit) waits for the partner to hold it
//   mirrored+local  acknowledged once the partner holds it and the journal file is synced
//
// A mirrored device is a `primary` on one node and a `replica` on its partner. A replica
// takes records only from the mirror link, with their sequence numbers and timestamps
// unchanged; the device manager promotes it when a client opens it with a newer epoch.
//
// Rules:
//   - sequence numbers are given out in append order, contiguous, never reused;
//   - an append with an epoch older than the device's is refused (fenced), checked when
//     it arrives, so nothing a fenced writer sends afterwards becomes visible;
//   - a record that does not fit in the space not yet trimmed is refused (full); nothing
//     untrimmed is ever overwritten;
//   - reads return acknowledged records only, in order;
//   - a record is acknowledged once everything its policy asks for holds it (memory,
//     the synced journal file, the partner) and every record before it is acknowledged;
//     when one append fails, every append taken after it fails too;
//   - a failure (a journal write or sync, the medium, the partner under `refuse`) puts
//     the device in repair: every request waits while the numbers of the appends that
//     failed become void records (no target, no payload), the journal file is rewritten
//     from memory and synced, and a mirrored replica is reset; then it serves again. If
//     the repair fails, requests fail and the next one tries again;
//   - after a newer open returns, no append of an older epoch is acknowledged: the open
//     waits for the appends taken before it.
//
// Markers (epoch, trim) go to the journal file too, so a restart knows the epoch and what
// was trimmed; they carry no sequence number of their own.
//
// Writers (multipath clients, issue 12): an append may carry a writer id and the writer's
// own sequence number per record (stored in the record, flag WRITER). A retry of a number
// the device already took gets the first append's answer (its sequence number and
// timestamp) and appends nothing; so a client that re-sends what was not acknowledged
// after a failover, to this node or to a promoted replica, has each record exactly once.
// The writers index is in memory, rebuilt from the live records after a restart or a
// replica's records (restore, replicate), of fixed size (writers.ts): per writer the
// highest number taken and the answers of its last WRITER_WINDOW numbers. A number at or
// below the highest that is not in the window is refused, except one whose append failed,
// which may be appended again; a retry with another payload is refused. At most
// MAX_WRITERS writers are remembered per device (least recently used first out): a writer
// forgotten that way and retrying could append a record twice.

import { MisuseError, RuntimeError, StorageError, asError } from '../errors.js';
import type { Medium } from '../memory/medium.js';
import { JournalFile } from './journal-file.js';
import { POLICIES, isMirrored, type Policy, type Role } from '../protocol/journal/policy.js';
import { MAX_PAYLOAD, RECORD_FLAG, WRITER_FIELDS, WRITER_ID_PATTERN, decodeRecord, encodeRecord, encodeRecordInto, encodedSize, nowMicros, recordSize, type JournalRecord, type RecordTarget, type RecordWriter } from '../protocol/journal/record.js';
import type { BufferPool } from '../memory/buffer-pool.js';
import type { MirrorMode, DeviceInfo } from '../protocol/admin/api.js';
import { WRITER_WINDOW, WritersIndex, payloadCrc } from './writers.js';
export type { MirrorMode, DeviceInfo };

/** Bytes of records appended without sync after which a commit starts by itself. */
export const DEFER_LIMIT = 4 * 1024 * 1024;
export { POLICIES, isMirrored, type Policy, type Role };

/** What a mirrored primary needs from the node's mirroring (mirroring.ts). */
export interface MirrorPort {
  mode(): MirrorMode;
  /** Resolves once a resync in progress is over. */
  settled(): Promise<void>;
  /**
   * Sends encoded records to the partner. Resolves true once the partner holds them,
   * false when the partner was lost and the device is to degrade (the caller syncs its
   * journal instead); rejects when it is to refuse, or when the partner fenced it.
   */
  append(device: string, epoch: number, records: Buffer, count: number): Promise<boolean>;
  /** Best effort: a resync carries the epoch and trim point anyway. */
  epoch(device: string, epoch: number): Promise<void>;
  trim(device: string, epoch: number, upTo: number): void;
  /** Records the replica may hold were voided here: bring it up to date again. */
  rolledBack(device: string): void;
  /**
   * Runs `fn` while no resync of the device runs (it waits for one under way, and appends
   * wait as during a resync); a resync follows if the partner is reachable.
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T>;
}

export interface AppendEntry {
  payload: Buffer;
  target?: RecordTarget;
  /** Record flags to set (RECORD_FLAG.ZERO for a journaled zeroing); default none. */
  flags?: number;
  /** The writer and its number for this record: a retry of the same is not appended twice. */
  writer?: RecordWriter;
}

export interface Appended {
  seq: number;
  timestamp: number;
}

/** An append's numbers and time, and what its acknowledgement waits for (NvramDevice.take). */
interface Taken {
  first: number;
  last: number;
  timestamp: number;
  work: Promise<void>[];
}

interface IndexEntry {
  seq: number;
  at: number;
  bytes: number;
  timestamp: number;
}

export interface DeviceOptions {
  name: string;
  size: number;
  policy: Policy;
  medium: Medium;
  /** Physical offsets of the device's extents, in logical order. */
  extents: readonly number[];
  extentSize: number;
  journal: JournalFile | undefined;
  role?: Role;
  /** Where appends stage their encoded records (see appendRecords); fresh buffers without. */
  staging?: BufferPool;
}

export class NvramDevice {
  readonly name: string;
  readonly size: number;
  readonly policy: Policy;
  readonly medium: Medium;
  private readonly extents: readonly number[];
  private readonly extentSize: number;
  private journal: JournalFile | undefined;
  private readonly staging: BufferPool | undefined;
  /**
   * Bytes of records appended without sync that the journal holds unsynced (write logs;
   * see append), counted as two running totals: every such byte ever deferred, and how
   * many of them the last sync to finish covered (what was deferred before that sync was
   * asked for, or what a repair's rewritten file holds). Their difference is what no
   * sync has covered yet. Totals, not a count taken down by each commit: commits
   * overlap, and two that each took down what they saw when they began took the same
   * bytes down twice, counting records deferred since as covered.
   */
  private deferredTotal: number;
  private coveredTotal: number;
  /**
   * `mirrored` write logs: records acknowledged before the partner held them (appends
   * without sync, in sync), and the sends still on their way. Settles once every one
   * of them is held by the partner, or was synced here (partner lost), or failed (the
   * device is then in repair, which syncs them here from memory).
   */
  private partnerPending: Promise<void>;
  private partnerPendingBytes: number;
  /**
   * Such a record's send failed: it is this node's alone until a resync has pushed it.
   * Under `refuse` no FLUSH succeeds meanwhile, as no append would.
   */
  private unmirrored: boolean;
  private index: IndexEntry[];
  private indexStart: number;
  private head: number;
  private tail: number;
  private used: number;
  private nextSeq: number;
  private ackedSeq: number;
  private epochValue: number;
  private trimmedTo: number;
  private closed: boolean;
  private ackChain: Promise<void>;
  private failure: Error | undefined;
  private repairing: Promise<void> | undefined;
  /** Replica: the mirror connection whose RESET made it what it is; APPENDs come from it only. */
  private feeder: object | undefined;
  /** Replica: records being applied; a RESET waits for them. */
  private replicating: Promise<void>;
  private roleValue: Role;
  private recoveringValue: boolean;
  /** acceptLocal calls, one after another. */
  private accepting: Promise<unknown>;
  /** Waiting for the device to leave `recovering` (whenRecovered). */
  private recoveredWaiters: (() => void)[];
  /** Replica: the device is a volume's write log on the primary node; no client may take it over. */
  nodeOwned: boolean;
  /** The node's mirroring, for a mirrored primary. */
  port: MirrorPort | undefined;
  /**
   * In a cluster, a mirrored primary's ownership: throws unless this node may acknowledge
   * for the device now (it holds the device's ownership lease in etcd). Checked when an
   * append starts and again right before it is acknowledged.
   */
  owner: (() => void) | undefined;
  private readonly writers: WritersIndex;
  /** Records came in other than by append (restore, replication): the writers index is rebuilt before the next writer append. */
  private writersStale: boolean;
  private writersRebuild: Promise<void> | undefined;

  constructor(options: DeviceOptions) {
    this.name = options.name;
    this.size = options.size;
    this.policy = options.policy;
    this.medium = options.medium;
    this.extents = options.extents;
    this.extentSize = options.extentSize;
    this.journal = options.journal;
    this.staging = options.staging;
    this.deferredTotal = 0;
    this.coveredTotal = 0;
    this.partnerPending = Promise.resolve();
    this.partnerPendingBytes = 0;
    this.unmirrored = false;
    this.index = [];
    this.indexStart = 0;
    this.head = 0;
    this.tail = 0;
    this.used = 0;
    this.nextSeq = 1;
    this.ackedSeq = 0;
    this.epochValue = 0;
    this.trimmedTo = 0;
    this.closed = false;
    this.ackChain = Promise.resolve();
    this.failure = undefined;
    this.repairing = undefined;
    this.feeder = undefined;
    this.replicating = Promise.resolve();
    this.roleValue = options.role ?? 'primary';
    this.recoveringValue = false;
    this.accepting = Promise.resolve();
    this.recoveredWaiters = [];
    this.nodeOwned = false;
    this.port = undefined;
    this.owner = undefined;
    this.writers = new WritersIndex();
    this.writersStale = false;
    this.writersRebuild = undefined;
  }

  get epoch(): number {
    return this.epochValue;
  }

  /** Set after a crash until the partner has confirmed or supplied the contents. */
  get recovering(): boolean {
    return this.recoveringValue;
  }

  set recovering(value: boolean) {
    this.recoveringValue = value;
    if (value || this.recoveredWaiters.length === 0) return;
    const waiters = this.recoveredWaiters;
    this.recoveredWaiters = [];
    for (const wake of waiters) wake();
  }

  /**
   * Resolves once the device is not recovering (at once if it is not): a write log's
   * replay waits for the partner to give back what this node lost. Rejects with the
   * signal's reason when it aborts first.
   */
  whenRecovered(signal?: AbortSignal): Promise<void> {
    if (!this.recoveringValue) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const wake = (): void => {
        signal?.removeEventListener('abort', abort);
        resolve();
      };
      const abort = (): void => {
        this.recoveredWaiters = this.recoveredWaiters.filter((w) => w !== wake);
        reject(asError(signal?.reason));
      };
      if (signal?.aborted === true) {
        abort();
        return;
      }
      signal?.addEventListener('abort', abort, { once: true });
      this.recoveredWaiters.push(wake);
    });
  }

  get role(): Role {
    return this.roleValue;
  }

  /** Sequence number of the last acknowledged record (0 before the first). */
  get lastSeq(): number {
    return this.ackedSeq;
  }

  /**
   * Loads recovered state: records after the trim point, the epoch, the next sequence
   * number. `base` is the epoch and trim point of markers no longer among `records` (a
   * journal ring's pointer stands for them).
   */
  async restore(records: readonly JournalRecord[], base = { epoch: 0, trimmedTo: 0 }): Promise<void> {
    if (records.length > 0) this.writersStale = true;
    this.epochValue = Math.max(this.epochValue, base.epoch);
    this.trimmedTo = Math.max(this.trimmedTo, base.trimmedTo);
    for (const r of records) {
      if ((r.flags & RECORD_FLAG.EPOCH) !== 0) this.epochValue = Math.max(this.epochValue, Number(r.payload.readBigUInt64BE(0)));
      if ((r.flags & RECORD_FLAG.TRIM) !== 0) this.trimmedTo = Math.max(this.trimmedTo, Number(r.payload.readBigUInt64BE(0)));
    }
    let last = this.trimmedTo;
    for (const r of records) {
      if ((r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) !== 0) continue;
      last = Math.max(last, r.seq);
      if (r.seq <= this.trimmedTo) continue;
      const bytes = encodeRecord(r);
      if (this.used + bytes.length > this.size) throw new RuntimeError('MS_NVRAM_FULL', `device ${this.name}: recovered records do not fit in ${this.size} bytes`);
      await this.place(bytes, r.seq, r.timestamp);
    }
    this.nextSeq = last + 1;
    this.ackedSeq = last;
  }

  /**
   * Opens the journal for a writer. A higher epoch fences every older one; the same epoch
   * resumes; an older one is itself fenced.
   */
  async open(epoch: number): Promise<DeviceInfo> {
    this.check();
    if (!Number.isSafeInteger(epoch) || epoch < 0) throw new MisuseError('MS_NVRAM_INVALID', `epoch must be a non-negative integer, got ${epoch}`);
    await this.ready();
    if (epoch < this.epochValue) throw fenced(this.name, epoch, this.epochValue);
    if (this.roleValue === 'replica') throw replicaError(this.name);
    // In a cluster a writer is told its epoch only by the device's owner.
    this.owner?.();
    await this.raise(epoch);
    this.owner?.();
    return this.info();
  }

  /**
   * Opens the device with an epoch newer than any it has seen, chosen here once the
   * device is ready, so no writer can have opened it with that epoch first: every handle
   * of an older epoch is fenced. For the node taking a device for itself (a write log).
   */
  async fence(): Promise<number> {
    this.check();
    await this.ready();
    if (this.roleValue === 'replica') throw replicaError(this.name);
    const epoch = this.epochValue + 1;
    await this.raise(epoch);
    return epoch;
  }

  /**
   * Ends the recovery of a mirrored primary without its partner: an operator's decision
   * when the partner is gone for good. The device serves what its own journal file holds,
   * under a newer epoch (its marker synced first), so that the partner's copy, should it
   * come back, is reset from this one and never taken back over records written since.
   * Returns the new epoch.
   */
  async acceptLocal(): Promise<number> {
    const accept = async (): Promise<number> => {
      if (this.closed) throw new RuntimeError('MS_SHUTTING_DOWN', `device ${this.name} is closed`);
      if (!this.recoveringValue || this.roleValue !== 'primary') {
        throw new MisuseError('MS_NVRAM_INVALID', `device ${this.name} is not a mirrored primary waiting for its partner after a crash; there is nothing to accept`, { details: { device: this.name } });
      }
      const epoch = this.epochValue + 1;
      try {
        await this.journal?.append(this.marker(RECORD_FLAG.EPOCH, epoch));
      } catch (error) {
        this.failed(error);
        throw error;
      }
      this.epochValue = Math.max(this.epochValue, epoch);
      this.recovering = false; // the marker is durable: a write log waiting may replay now
      return epoch;
    };
    // No resync may run meanwhile: one that read this device's older epoch could take the
    // partner's copy back over what the operator accepted. Two acceptances take turns.
    const run = this.accepting.then(() => (this.port === undefined ? accept() : this.port.exclusive(accept)));
    this.accepting = run.catch(() => undefined);
    return run;
  }

  /**
   * Raises the epoch (no await before it: nothing else is taken meanwhile), then waits
   * until every append taken before is acknowledged or failed, whether it raised the
   * epoch or resumed it: the lastSeq reported then covers every record an older writer,
   * or a writer that opened the same epoch first, will ever have acknowledged.
   */
  private async raise(epoch: number): Promise<void> {
    let marker: Promise<void> | undefined;
    let partner: Promise<void> | undefined;
    if (epoch > this.epochValue) {
      this.epochValue = epoch;
      marker = this.journal?.append(this.marker(RECORD_FLAG.EPOCH, epoch)).catch((error: unknown) => {
        this.failed(error);
        throw error;
      });
      partner = this.port?.epoch(this.name, epoch);
    }
    await Promise.all([marker, partner, this.quiesce()]);
  }

  /**
   * Appends records; resolves with their sequence numbers once durable under the policy.
   * Entries with a writer that this device already took are not appended again: they get
   * the first append's answer.
   *
   * `sync: false` (the node's own write logs, for writes without FUA; `local` and
   * `mirrored` devices, others ignore it): resolves once the records are in the
   * device's memory, with their journal write queued (in order) but neither done nor
   * synced, or, for a `mirrored` device in sync, with their send to the partner under
   * way; `commit` makes them durable (the one sync, or the partner's answer), and so
   * does any synced append or marker after them. More than DEFER_LIMIT bytes waiting
   * start a commit in the background (`local`) or make the append wait for the partner.
   */
  async append(epoch: number, entries: readonly AppendEntry[], options?: { sync?: boolean }): Promise<Appended[]> {
    // Not a `mirrored+local` device: it comes back from a crash `ready` from its file, on
    // the promise that the file holds every acknowledged record.
    const sync = (options?.sync ?? true) || (this.policy !== 'local' && this.policy !== 'mirrored');
    if (!entries.some((e) => e.writer !== undefined)) {
      // A record larger than a reader takes would be acknowledged and then be unreadable.
      for (const e of entries) if (e.payload.length > MAX_PAYLOAD) throw payloadTooLarge(this.name, e.payload.length);
      return this.appendRecords(epoch, entries, sync);
    }
    for (const e of entries) {
      const stored = e.payload.length + (e.writer === undefined ? 0 : WRITER_FIELDS);
      if (stored > MAX_PAYLOAD) throw payloadTooLarge(this.name, stored);
      if (e.writer !== undefined && (!WRITER_ID_PATTERN.test(e.writer.id) || !Number.isSafeInteger(e.writer.seq) || e.writer.seq < 1)) {
        throw new MisuseError('MS_NVRAM_INVALID', 'a writer is a 16-hex-digit id and a sequence number from 1');
      }
    }
    // Every writer append waits for a rebuild under way, in arrival order (one promise).
    if (this.writersStale && this.writersRebuild === undefined) {
      this.writersStale = false;
      this.writersRebuild = this.rebuildWriters().finally(() => { this.writersRebuild = undefined; });
    }
    if (this.writersRebuild !== undefined) await this.writersRebuild;
    // From here to appendRecords' own first step nothing awaits: a retry arriving meanwhile
    // finds this append's numbers taken and waits for its answer.
    const crcs = entries.map((e) => (e.writer === undefined ? 0 : payloadCrc(e.payload)));
    const lookups = entries.map((e, i) => (e.writer === undefined ? undefined : this.writers.lookup(e.writer.id, e.writer.seq, crcs[i] ?? 0)));
    const inBatch = new Map<string, number>();
    for (const [i, found] of lookups.entries()) {
      const writer = entries[i]?.writer;
      if (writer === undefined || found === undefined) continue;
      const key = `${writer.id}:${writer.seq}`;
      if (inBatch.has(key) && inBatch.get(key) !== crcs[i]) {
        throw new MisuseError('MS_NVRAM_INVALID', `device ${this.name}: writer ${writer.id} number ${writer.seq} appears twice in one append with different payloads`, { details: { device: this.name, writer: writer.id, seq: writer.seq } });
      }
      inBatch.set(key, crcs[i] ?? 0);
      if (found.kind === 'too-old') {
        throw new MisuseError('MS_NVRAM_INVALID', `device ${this.name}: writer ${writer.id} number ${writer.seq} is older than the last ${WRITER_WINDOW} this device remembers (its highest is ${found.last})`, {
          details: { device: this.name, writer: writer.id, seq: writer.seq },
        });
      }
      if (found.kind === 'mismatch') {
        throw new MisuseError('MS_NVRAM_INVALID', `device ${this.name}: writer ${writer.id} number ${writer.seq} was appended with another payload; a writer id kept across a restart must keep its numbers too`, {
          details: { device: this.name, writer: writer.id, seq: writer.seq },
        });
      }
    }
    const fresh: AppendEntry[] = [];
    const answers: Promise<Appended>[] = [];
    let settle: { resolve(a: Appended[]): void; reject(e: unknown): void } = { resolve: () => undefined, reject: () => undefined };
    const freshDone = new Promise<Appended[]>((resolve, reject) => { settle = { resolve, reject }; });
    for (const [i, e] of entries.entries()) {
      const found = lookups[i];
      // Taken by an earlier entry of this same batch?
      const again = e.writer === undefined ? undefined : this.writers.lookup(e.writer.id, e.writer.seq, crcs[i] ?? 0);
      if (found?.kind === 'known' || again?.kind === 'known') {
        const known = found?.kind === 'known' ? found.answer : again?.kind === 'known' ? again.answer : Promise.reject(new Error('unreachable'));
        answers.push(known);
        continue;
      }
      const k = fresh.length;
      fresh.push(e);
      const answer = freshDone.then((all) => all[k] ?? Promise.reject(new Error('append answered short')));
      answers.push(answer);
      if (e.writer !== undefined) this.writers.taking(e.writer.id, e.writer.seq, crcs[i] ?? 0, answer);
    }
    // Unhandled only when nothing asks (all answers are awaited below).
    answers.forEach((a) => { a.catch(() => undefined); });
    if (fresh.length === 0) settle.resolve([]);
    else this.appendRecords(epoch, fresh, sync).then((appended) => { settle.resolve(appended); }, (error: unknown) => { settle.reject(error); });
    // Settles only once this append's own entries are done with (encoded, or refused),
    // even when an earlier append's answer it shares fails first: a caller may reuse the
    // payloads' memory once it has the answer (the rmem service pools request bodies).
    await freshDone.catch(() => undefined);
    return Promise.all(answers);
  }

  /** The writers index's size (writers, numbers in flight, failed numbers kept). */
  writerStats(): { writers: number; inflight: number; failed: number } {
    return this.writers.stats();
  }

  /** Rebuilds the writers index from the live records (after a restore or replication). */
  private async rebuildWriters(): Promise<void> {
    for (let from = this.trimmedTo + 1; ;) {
      const batch = await this.collect(from, 1024, 16 * 1024 * 1024);
      const before = from;
      if (batch.length === 0) return;
      for (const bytes of batch) {
        const decoded = decodeRecord(bytes);
        if (!('record' in decoded)) continue;
        const { record } = decoded;
        from = record.seq + 1;
        if (record.writer !== undefined) this.writers.known(record.writer.id, record.writer.seq, { seq: record.seq, timestamp: record.timestamp }, payloadCrc(record.payload));
      }
      if (from === before) return;
    }
  }

  private async appendRecords(epoch: number, entries: readonly AppendEntry[], sync: boolean): Promise<Appended[]> {
    await this.ready();
    if (this.roleValue === 'replica') throw replicaError(this.name);
    if (epoch < this.epochValue) throw fenced(this.name, epoch, this.epochValue);
    this.owner?.();
    const mode = this.port?.mode();
    if (mode === 'refusing') {
      throw new RuntimeError('MS_NVRAM_PARTNER_DOWN', `device ${this.name}: the mirror partner is unreachable; appends wait for it (mirror.onPartnerDown is refuse or, in a cluster, etcd has not yet recorded the replica as out of date)`, {
        details: { device: this.name },
      });
    }
    if (entries.length === 0) return [];
    if (this.policy !== 'volatile' && this.journal === undefined) {
      // Never acknowledge a record that neither a journal file nor a partner will hold.
      throw new StorageError('MS_MEDIUM_IO', `device ${this.name} has no journal file now and takes no appends`, { details: { device: this.name } });
    }
    const { first, last, timestamp, work } = this.take(epoch, entries, sync, mode, false);
    // Acknowledge in order: a record becomes readable only once everything its policy
    // asks for holds it and every record before it is acknowledged. Each link of the
    // chain settles only after the one before it, so the chain's end settles last.
    const previous = this.ackChain;
    const stored = (async () => {
      const results = await Promise.allSettled(work);
      let earlier = false;
      await previous.catch(() => { earlier = true; });
      const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed !== undefined) throw asError(failed.reason);
      if (earlier) {
        throw new StorageError('MS_MEDIUM_IO', `device ${this.name}: an append taken before this one failed, so records ${first} to ${last} are not acknowledged; their numbers become void`, {
          details: { device: this.name, firstSeq: first, lastSeq: last },
        });
      }
      // In a cluster: acknowledged only while this node still owns the device (its lease
      // held by its own, conservative clock), so nothing is acknowledged after a takeover.
      this.owner?.();
      this.ackedSeq = Math.max(this.ackedSeq, last);
    })();
    this.ackChain = stored;
    stored.catch((error: unknown) => { this.failed(error); });
    await stored;
    return entries.map((_, i) => ({ seq: first + i, timestamp }));
  }

  /**
   * Whether `appendNow` would take these entries now: a `local` or `mirrored` device,
   * ready (not failed, repairing, recovering, resyncing or refusing), a primary at
   * `epoch`, owned (in a cluster), every append before acknowledged, room for the
   * records, its memory written synchronously (DRAM), its journal file open, and for a
   * mirrored device in sync no more than DEFER_LIMIT bytes on their way to the partner.
   * Entries with writers never are (their numbers are looked up first).
   */
  canAppendNow(epoch: number, entries: readonly AppendEntry[]): boolean {
    if (this.policy !== 'local' && this.policy !== 'mirrored') return false;
    if (this.closed || this.recovering || this.failure !== undefined || this.roleValue !== 'primary' || epoch !== this.epochValue) return false;
    if (this.journal === undefined || this.medium.writeSync === undefined || this.ackedSeq !== this.nextSeq - 1 || entries.length === 0) return false;
    const mode = this.port?.mode();
    if (mode === 'refusing' || mode === 'syncing' || (mode === 'in-sync' && this.partnerPendingBytes > DEFER_LIMIT)) return false;
    let bytes = 0;
    for (const e of entries) {
      if (e.writer !== undefined || e.payload.length > MAX_PAYLOAD) return false;
      bytes += recordSize(e.payload.length, e.target === undefined ? 0 : Buffer.byteLength(e.target.volume, 'utf8'));
    }
    if (this.used + bytes > this.size) return false;
    try {
      this.owner?.();
    } catch {
      return false; // append reports it
    }
    return true;
  }

  /**
   * An append without sync, acknowledged in the caller's turn (a write log's plain
   * WRITE whose data the cache took in the same turn: WriteLogIo.writeNow), or undefined
   * when it would have to wait (see canAppendNow), having taken nothing (or, where writing
   * the device's memory failed, numbers that the repair it starts makes void). The same promise
   * as `append` with sync false: the records are in the device's memory, their journal
   * write deferred to the next commit (or, mirrored in sync, their send to the partner
   * and their unsynced journal write begun), and every record before them acknowledged.
   */
  appendNow(epoch: number, entries: readonly AppendEntry[]): Appended[] | undefined {
    if (!this.canAppendNow(epoch, entries)) return undefined;
    let taken: Taken;
    try {
      taken = this.take(epoch, entries, false, this.port?.mode(), true);
    } catch {
      return undefined; // nothing acknowledged; a failure to write memory put the device in repair
    }
    this.ackedSeq = taken.last;
    return entries.map((_, i) => ({ seq: taken.first + i, timestamp: taken.timestamp }));
  }

  /**
   * Encodes the entries, takes their sequence numbers and ring space, places them in the
   * device's memory (in this turn when `now`) and starts their journal write and their
   * send to the partner as the policy asks. Returns what an acknowledgement waits for.
   */
  private take(epoch: number, entries: readonly AppendEntry[], sync: boolean, mode: MirrorMode | undefined, now: boolean): Taken {
    const timestamp = nowMicros();
    // Encoded back to back into one buffer: for the device's memory, the journal file and
    // the partner alike.
    const records = entries.map((e, i): JournalRecord => ({ seq: this.nextSeq + i, timestamp, epoch, flags: e.flags ?? 0, target: e.target, payload: e.payload, writer: e.writer }));
    const bytes = records.reduce((sum, r) => sum + encodedSize(r), 0);
    if (this.used + bytes > this.size) {
      throw new RuntimeError('MS_NVRAM_FULL', `device ${this.name} is full: ${bytes} bytes of records do not fit in the ${this.size - this.used} bytes left; trim first`, {
        details: { device: this.name, needed: bytes, free: this.size - this.used },
      });
    }
    // The device's memory, the journal file and the partner's link read these bytes, and
    // each is done with them once its promise settles (the link writes them as they are,
    // and a request of its settles only once answered or its socket is destroyed; a
    // resync reads records from memory): the buffer goes back to the staging pool then. Encoded before anything is taken: a record that cannot be encoded (an
    // offset out of range) fails the append and changes nothing.
    const staging = this.staging;
    const owner = staging === undefined ? Buffer.allocUnsafe(bytes) : staging.acquire(bytes);
    const all = owner.subarray(0, bytes);
    const sizes: number[] = [];
    try {
      for (let i = 0, at = 0; i < records.length; i++) {
        const size = encodeRecordInto(records[i] as JournalRecord, all, at);
        sizes.push(size);
        at += size;
      }
    } catch (error) {
      staging?.release(owner);
      throw new MisuseError('MS_NVRAM_INVALID', `device ${this.name}: a record cannot be encoded: ${asError(error).message}`, { details: { device: this.name } });
    }
    // Sequence numbers, ring space and the journal's queue position are all taken now,
    // synchronously, so they follow arrival order whatever order the I/O finishes in.
    const first = this.nextSeq;
    const last = first + entries.length - 1;
    this.nextSeq += entries.length;
    const readers: Promise<unknown>[] = [];
    const work: Promise<void>[] = [];
    try {
      for (let i = 0, at = 0; i < records.length; i++) {
        const size = sizes[i] ?? 0;
        work.push(this.place(all.subarray(at, at + size), first + i, timestamp, now));
        at += size;
      }
    } catch (error) {
      // Only a write into memory in this turn throws (a closed medium): the numbers are
      // taken and not acknowledged, so the repair makes them void records.
      this.failed(error);
      staging?.release(owner);
      throw error;
    }
    // The journal file is synced before the acknowledgement, unless the partner holds the
    // record (`mirrored`, in sync): then the file is written without a sync, in order (in
    // this turn when the journal's writer is idle, else behind it: JournalFile.writeNow),
    // so that losing the partner later costs one sync that covers it. An append without
    // sync (a write log's plain WRITE) is queued for the journal's next batch: its record
    // is in memory, and `commit` writes and syncs it. Waiting for a write would cost a
    // round trip through libuv's thread pool per WRITE for no promise NBD makes.
    const journal = this.journal;
    if (journal !== undefined && this.policy === 'mirrored' && mode === 'in-sync') {
      // The partner's copy is what acknowledges; a failure here still needs a repair.
      const background = journal.append(all, false);
      readers.push(background);
      background.catch((error: unknown) => { this.failed(error); });
    } else if (journal !== undefined && !sync) {
      // Written with the next batch that syncs (a commit, a synced append, a marker), so
      // a power cut tears no more of the file than it could before; a failure there puts
      // the device in repair, and the commit waiting for that batch reports it.
      this.deferredTotal += all.length;
      const deferred = journal.defer(all);
      readers.push(deferred);
      deferred.catch((error: unknown) => { this.failed(error); });
      if (this.deferredBytes > DEFER_LIMIT) void this.commit().catch(() => undefined);
    } else if (journal !== undefined) {
      work.push(journal.append(all));
    }
    if (mode === 'in-sync' && this.port !== undefined) {
      const port = this.port;
      const sent = port.append(this.name, this.epochValue, all, records.length).then(async (partnerHolds) => {
        // The partner was lost on the way: the record is this node's alone, so sync it here.
        if (!partnerHolds && this.policy === 'mirrored') await journal?.flush();
      });
      readers.push(sent);
      if (sync || this.partnerPendingBytes > DEFER_LIMIT) {
        work.push(sent);
      } else {
        // A write log's plain WRITE: acknowledged now, held by the partner (or synced
        // here) before the next commit returns. A failure puts the device in repair, which
        // rewrites the journal from memory, these records included, and resets the replica;
        // until then the records count as uncommitted, so the write-ahead barrier waits.
        this.partnerPendingBytes += all.length;
        const done = sent.then(
          () => { this.partnerPendingBytes -= all.length; },
          (error: unknown) => {
            this.deferredTotal += all.length;
            this.unmirrored = true;
            this.partnerPendingBytes -= all.length;
            this.failed(error);
          },
        );
        const before = this.partnerPending;
        this.partnerPending = Promise.all([before, done]).then(() => undefined);
      }
    }
    if (staging !== undefined) void Promise.allSettled([...work, ...readers]).then(() => { staging.release(owner); });
    return { first, last, timestamp, work };
  }

  /** Acknowledged records from `fromSeq` on, up to `maxRecords` and about `maxBytes`. */
  async read(fromSeq: number, maxRecords = 1024, maxBytes = 16 * 1024 * 1024): Promise<Buffer[]> {
    this.check();
    return this.collect(fromSeq, maxRecords, maxBytes);
  }

  /** `read` without the state check: for the vault, dumps and resyncs. */
  async collect(fromSeq: number, maxRecords: number, maxBytes: number, upTo = this.ackedSeq): Promise<Buffer[]> {
    const out: Buffer[] = [];
    let bytes = 0;
    for (let i = this.locate(fromSeq); i < this.index.length && out.length < maxRecords; i++) {
      const entry = this.index[i];
      if (entry === undefined || entry.seq > upTo) break;
      if (out.length > 0 && bytes + entry.bytes > maxBytes) break;
      const buf = Buffer.allocUnsafe(entry.bytes);
      await this.readLogical(entry.at, buf);
      out.push(buf);
      bytes += entry.bytes;
    }
    return out;
  }

  /** Frees every record up to and including `upToSeq` (a checkpoint the writer has applied). */
  async trim(epoch: number, upToSeq: number): Promise<void> {
    await this.ready();
    if (epoch < this.epochValue) throw fenced(this.name, epoch, this.epochValue);
    const limit = Math.min(upToSeq, this.ackedSeq);
    if (limit <= this.trimmedTo) return;
    while (this.indexStart < this.index.length) {
      const entry = this.index[this.indexStart];
      if (entry === undefined || entry.seq > limit) break;
      this.used -= entry.bytes;
      this.head = (entry.at + entry.bytes) % this.size;
      this.indexStart++;
    }
    if (this.indexStart > 1024 && this.indexStart * 2 > this.index.length) {
      this.index = this.index.slice(this.indexStart);
      this.indexStart = 0;
    }
    if (this.indexStart >= this.index.length) {
      this.index = [];
      this.indexStart = 0;
      this.head = this.tail;
    }
    this.trimmedTo = limit;
    if (this.port?.mode() === 'in-sync') this.port.trim(this.name, epoch, limit);
    const journal = this.journal;
    if (journal === undefined) return;
    try {
      // The ring reuses what this frees once its writer comes round to it.
      await journal.append(this.marker(RECORD_FLAG.TRIM, limit));
    } catch (error) {
      this.failed(error);
      throw error;
    }
  }

  info(): DeviceInfo {
    const live = this.index.length - this.indexStart;
    const first = this.index[this.indexStart];
    return {
      name: this.name,
      size: this.size,
      used: this.used,
      policy: this.policy,
      medium: this.medium.name,
      epoch: this.epochValue,
      firstSeq: first?.seq ?? null,
      lastSeq: this.ackedSeq > 0 ? this.ackedSeq : null,
      records: live,
      state: this.closed ? 'closed' : this.failure !== undefined ? 'failed' : this.recovering ? 'recovering' : 'ready',
      role: this.roleValue,
      mirror: this.roleValue === 'primary' ? (this.port?.mode() ?? null) : null,
      journal: this.journal?.info() ?? null,
    };
  }

  /**
   * Makes everything written to the journal file durable: for a `mirrored` device whose
   * partner was lost, whose records the partner alone held until now.
   */
  async syncJournal(): Promise<void> {
    try {
      await this.journal?.flush();
    } catch (error) {
      this.failed(error);
      throw error;
    }
  }

  /**
   * Makes every record acknowledged so far durable under the policy, those appended with
   * `sync: false` included: one fdatasync of the journal file, shared by every commit and
   * synced append that comes while it runs (the journal's group commit). Waits for a
   * repair in progress; a failed sync puts the device in repair and rejects.
   */
  async commit(): Promise<void> {
    await this.ready();
    await this.quiesce();
    // A send to the partner that failed put the device in repair: wait for it.
    if (this.failure !== undefined) await this.ready();
    const mode = this.port?.mode();
    if (mode === 'in-sync') this.unmirrored = false; // a resync pushed every record since
    if (mode === 'refusing' && this.unmirrored) {
      throw new RuntimeError('MS_NVRAM_PARTNER_DOWN', `device ${this.name}: records acknowledged before this FLUSH never reached the mirror partner, which is unreachable, and mirror.onPartnerDown is refuse (or etcd has not yet recorded the replica as out of date); the FLUSH succeeds once the partner is back`, {
        details: { device: this.name },
      });
    }
    const journal = this.journal;
    // A volatile device promises memory only; an in-sync mirrored one, the partner's copy
    // (records deferred while it was not in sync went to the partner with the resync,
    // synced here all the same).
    if (journal === undefined || (this.policy === 'mirrored' && mode === 'in-sync' && this.deferredBytes === 0)) return;
    // The sync covers what the journal was given before it was asked for (its queue's order).
    const upTo = this.deferredTotal;
    try {
      await journal.flush();
    } catch (error) {
      this.failed(error);
      throw error;
    }
    this.coveredTotal = Math.max(this.coveredTotal, upTo);
  }

  /**
   * Appends have taken numbers that are not acknowledged yet (a synced one on its way, or
   * one that failed and waits for the repair): the write-ahead barrier waits for them too,
   * as `commit` does, so no data is written back ahead of a record still in flight.
   */
  get appending(): boolean {
    return this.ackedSeq < this.nextSeq - 1;
  }

  /** Bytes the live (untrimmed) records take of the device's size. */
  get usedBytes(): number {
    return this.used;
  }

  /** Bytes of records appended without sync that the journal holds and no sync has covered yet. */
  private get deferredBytes(): number {
    return this.deferredTotal - this.coveredTotal;
  }

  /** Bytes of records appended without sync that no commit has covered yet. */
  get uncommittedBytes(): number {
    return this.deferredBytes + this.partnerPendingBytes;
  }

  /**
   * Resolves once every append taken so far has been acknowledged or has failed, and
   * every record acknowledged before the partner held it is held there or synced here.
   */
  async quiesce(): Promise<void> {
    await this.ackChain.catch(() => undefined);
    await this.partnerPending;
  }

  /** Sequence number the first record after the live ones would get, for a resync. */
  get trimPoint(): number {
    return this.trimmedTo;
  }

  // ---- replica side: records from the partner, applied as they are ----

  /**
   * Makes this device an empty replica at the primary's epoch and trim point, expecting
   * `firstSeq` next; the primary's records follow with `replicate`.
   */
  resetReplica(epoch: number, trimmedTo: number, firstSeq: number, feeder?: object, nodeOwned = false): void {
    this.writersStale = true;
    this.feeder = feeder;
    this.nodeOwned = nodeOwned;
    this.roleValue = 'replica';
    this.index = [];
    this.indexStart = 0;
    this.head = 0;
    this.tail = 0;
    this.used = 0;
    this.epochValue = epoch;
    this.trimmedTo = trimmedTo;
    this.nextSeq = firstSeq;
    this.ackedSeq = firstSeq - 1;
    // Not through the setter: a replica is no primary back from recovery (a primary that
    // adopts its partner's records passes through here on its way to `promote`).
    this.recoveringValue = false;
    this.failure = undefined;
    this.ackChain = Promise.resolve();
  }

  /**
   * Applies encoded records from a primary at `epoch`; they must continue the sequence
   * exactly. A primary older than this replica's epoch is fenced.
   */
  replicate(epoch: number, records: readonly JournalRecord[], encoded: readonly Buffer[], feeder?: object): Promise<void> {
    if (this.feeder !== undefined && feeder !== this.feeder) {
      return Promise.reject(new RuntimeError('MS_MIRROR_CONFLICT', `replica ${this.name} was reset from a newer mirror connection; records from an older one are refused`, { details: { device: this.name } }));
    }
    this.writersStale = true;
    const run = this.replicating.then(() => this.apply(epoch, records, encoded));
    this.replicating = run.catch(() => undefined);
    return run;
  }

  /**
   * Sends the mirror partner a fresh RESET and every record (a mirrored primary): after
   * something the RESET carries changed, such as the device becoming a write log.
   */
  refreshReplica(): void {
    this.port?.rolledBack(this.name);
  }

  /** Whether this replica takes records and trims from `feeder` (the connection of its last RESET). */
  acceptsFrom(feeder: object): boolean {
    return this.feeder === undefined || this.feeder === feeder;
  }

  /** Resolves once records being applied to this replica are in place: before a RESET. */
  async settleReplication(): Promise<void> {
    await this.replicating;
  }

  private async apply(epoch: number, records: readonly JournalRecord[], encoded: readonly Buffer[]): Promise<void> {
    if (this.roleValue !== 'replica') throw replicaError(this.name, 'is a primary here and takes no mirrored records');
    if (epoch < this.epochValue) throw fenced(this.name, epoch, this.epochValue);
    const bytes = encoded.reduce((sum, b) => sum + b.length, 0);
    for (const [i, r] of records.entries()) {
      if (r.seq !== this.nextSeq + i) {
        throw new RuntimeError('MS_MIRROR_GAP', `device ${this.name}: mirrored record ${r.seq} does not follow ${this.nextSeq + i - 1}`, {
          details: { device: this.name, expected: this.nextSeq + i, got: r.seq },
        });
      }
    }
    if (this.used + bytes > this.size) throw new RuntimeError('MS_NVRAM_FULL', `replica ${this.name} is full: ${bytes} bytes do not fit in ${this.size - this.used}`);
    const first = this.nextSeq;
    this.nextSeq += records.length;
    // Settles only once every record is placed, failed or not: the caller may reuse `encoded`'s memory then.
    const placed = await Promise.allSettled(encoded.map((buf, i) => this.place(buf, first + i, records[i]?.timestamp ?? 0)));
    const failed = placed.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed !== undefined) throw asError(failed.reason);
    this.ackedSeq = Math.max(this.ackedSeq, first + records.length - 1);
  }

  /** A replica follows the primary's epoch. */
  raiseEpoch(epoch: number): void {
    if (epoch < this.epochValue) throw fenced(this.name, epoch, this.epochValue);
    this.epochValue = epoch;
  }

  /**
   * Makes this device the primary, journaling to `journal` from now on (a replica taken
   * over, or a primary that adopted its partner's contents). Returns the journal it had.
   */
  promote(journal: JournalFile | undefined): JournalFile | undefined {
    const old = this.journal;
    this.roleValue = 'primary';
    this.journal = journal;
    this.recovering = false;
    return old;
  }

  /** Turns a primary into a stale replica: the partner's resync will fill it. */
  async demote(): Promise<void> {
    // A replica from this moment: nothing more is taken (appends already taken finish,
    // journaled as before, and stay in the file that is kept aside).
    this.roleValue = 'replica';
    this.recovering = true;
    this.port = undefined;
    await this.quiesce();
    await this.repairing?.catch(() => undefined);
    const journal = this.journal;
    this.journal = undefined;
    await journal?.close();
    this.resetReplica(this.epochValue, this.trimmedTo, this.nextSeq);
    this.recovering = true;
  }

  /** Every live record, for the vault and for dump; markers first so a reader knows the epoch and trim point. */
  async snapshot(): Promise<Buffer[]> {
    const records = await this.collect(0, Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);
    // Numbers given to appends that were not acknowledged (a repair that has not run or
    // failed) go in as void records, so whoever reads this never hands them out again.
    const timestamp = nowMicros();
    for (let seq = Math.max(this.ackedSeq, this.trimmedTo) + 1; seq < this.nextSeq; seq++) {
      records.push(encodeRecord({ seq, timestamp, epoch: this.epochValue, flags: RECORD_FLAG.VOID, target: undefined, payload: Buffer.alloc(0) }));
    }
    return [this.marker(RECORD_FLAG.EPOCH, this.epochValue), this.marker(RECORD_FLAG.TRIM, this.trimmedTo), ...records];
  }

  /**
   * Closes the device. Its journal is synced first when records a write log acknowledged
   * without a sync wait in it, or a `mirrored` device wrote it behind its partner's copy;
   * if that fails, or the device had failed (a write behind that failed unnoticed
   * included), the journal is rewritten from memory (the repair), so what was
   * acknowledged is in the file. The journal alone: a commit would also wait for a resync
   * under way, and a resync may wait for the device manager this close runs under
   * (DeviceManager.remove).
   */
  async close(): Promise<void> {
    if (this.closed) return;
    if (this.journal !== undefined && (this.uncommittedBytes > 0 || this.failure !== undefined || this.policy === 'mirrored')) {
      try {
        if (this.failure !== undefined) throw this.failure;
        await this.syncJournal();
      } catch {
        await this.repair().catch(() => undefined);
      }
    }
    this.closed = true;
    await this.repairing?.catch(() => undefined);
    const journal = this.journal;
    this.journal = undefined;
    await journal?.close();
  }

  private marker(flag: number, value: number): Buffer {
    const payload = Buffer.alloc(8);
    payload.writeBigUInt64BE(BigInt(value), 0);
    return encodeRecord({ seq: this.nextSeq, timestamp: nowMicros(), epoch: this.epochValue, flags: flag, target: undefined, payload });
  }

  /** Takes space at the tail and writes the record there (in this turn when `now`: the medium has writeSync). */
  private place(buf: Buffer, seq: number, timestamp: number, now = false): Promise<void> {
    const at = this.tail;
    this.tail = (this.tail + buf.length) % this.size;
    this.used += buf.length;
    this.index.push({ seq, at, bytes: buf.length, timestamp });
    if (!now) return this.writeLogical(at, buf);
    const medium = this.medium;
    if (medium.writeSync === undefined) throw new MisuseError('MS_NVRAM_INVALID', `device ${this.name}: its ${medium.name} medium cannot be written in this turn`);
    for (let done = 0; done < buf.length;) {
      const { physical, room } = this.map((at + done) % this.size);
      const n = Math.min(room, buf.length - done);
      medium.writeSync(physical, buf.subarray(done, done + n));
      done += n;
    }
    return Promise.resolve();
  }

  private locate(fromSeq: number): number {
    const first = this.index[this.indexStart];
    if (first === undefined) return this.index.length;
    return this.indexStart + Math.max(0, fromSeq - first.seq);
  }

  private async writeLogical(at: number, buf: Buffer): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const { physical, room } = this.map((at + done) % this.size);
      const n = Math.min(room, buf.length - done);
      await this.medium.write(physical, buf.subarray(done, done + n));
      done += n;
    }
  }

  private async readLogical(at: number, buf: Buffer): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const { physical, room } = this.map((at + done) % this.size);
      const n = Math.min(room, buf.length - done);
      await this.medium.read(physical, buf.subarray(done, done + n));
      done += n;
    }
  }

  /** Logical offset -> physical offset on the medium, and bytes until the extent or ring ends. */
  private map(logical: number): { physical: number; room: number } {
    const index = Math.floor(logical / this.extentSize);
    const within = logical - index * this.extentSize;
    const extent = this.extents[index] ?? 0;
    return { physical: extent + within, room: Math.min(this.extentSize - within, this.size - logical) };
  }

  /**
   * Waits until the device can take a request: repaired after a failure, and not
   * resyncing its partner. Throws when it is closed, recovering, or its repair failed.
   */
  private async ready(): Promise<void> {
    for (;;) {
      this.check();
      if (this.failure !== undefined) {
        // A repair that began before this request came may fail on a fault since gone:
        // wait for it, and if it failed, this request tries one of its own.
        const running = this.repairing;
        if (running !== undefined) await running.catch(() => undefined);
        else await this.repair();
      } else if (this.port?.mode() === 'syncing') await this.settle();
      else return;
    }
  }

  /** Notes a failure that leaves records unacknowledged or the journal file fenced, and starts a repair. */
  private failed(error: unknown): void {
    this.failure ??= asError(error);
    if (this.repairing === undefined) setImmediate(() => { this.repair().catch(() => undefined); });
  }

  private repair(): Promise<void> {
    this.repairing ??= this.rebuild().finally(() => {
      this.repairing = undefined;
    });
    return this.repairing;
  }

  /**
   * After a failure: once every append taken has settled, the numbers of those that were
   * not acknowledged become void records (so no number is used twice, and the sequence
   * stays whole for readers, the replica and recovery), the journal file is rewritten
   * from memory and synced, and the replica is reset. Only then is the device ready.
   */
  private async rebuild(): Promise<void> {
    await this.quiesce();
    if (this.failure === undefined || this.closed) return;
    if (this.roleValue === 'replica') {
      this.failure = undefined; // demoted meanwhile: the partner's resync fills it
      return;
    }
    while (this.index.length > this.indexStart) {
      const entry = this.index[this.index.length - 1];
      if (entry === undefined || entry.seq <= this.ackedSeq) break;
      this.index.pop();
      this.tail = entry.at;
      this.used -= entry.bytes;
    }
    const timestamp = nowMicros();
    const voids: Promise<void>[] = [];
    for (let seq = this.ackedSeq + 1; seq < this.nextSeq; seq++) {
      const record = encodeRecord({ seq, timestamp, epoch: this.epochValue, flags: RECORD_FLAG.VOID, target: undefined, payload: Buffer.alloc(0) });
      voids.push(this.place(record, seq, timestamp));
    }
    await Promise.all(voids);
    const upTo = this.nextSeq - 1;
    if (this.journal !== undefined) {
      // The new file holds, synced, every record in memory now.
      const deferred = this.deferredTotal;
      const records = await this.collect(0, Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER, upTo);
      await this.journal.replace(Buffer.concat([this.marker(RECORD_FLAG.EPOCH, this.epochValue), this.marker(RECORD_FLAG.TRIM, this.trimmedTo), ...records]));
      this.coveredTotal = Math.max(this.coveredTotal, deferred);
    }
    this.ackedSeq = upTo;
    this.ackChain = Promise.resolve();
    this.failure = undefined;
    this.port?.rolledBack(this.name);
  }

  /** Waits while the partner is being brought up to date. */
  private async settle(): Promise<void> {
    while (this.port?.mode() === 'syncing') {
      await this.port.settled();
      this.check();
    }
  }

  private check(): void {
    if (this.closed) throw new RuntimeError('MS_SHUTTING_DOWN', `device ${this.name} is closed`);
    if (this.recovering) {
      throw new RuntimeError('MS_NVRAM_RECOVERING', `device ${this.name} is recovering after a crash and waits for its mirror partner, which may hold records this node lost`, {
        details: { device: this.name },
      });
    }
  }
}

function replicaError(name: string, why = 'is a replica of the mirror partner: open it there, or open it here with a newer epoch to take it over'): RuntimeError {
  return new RuntimeError('MS_NVRAM_REPLICA', `device ${name} ${why}`, { details: { device: name } });
}

function payloadTooLarge(name: string, stored: number): MisuseError {
  return new MisuseError('MS_NVRAM_INVALID', `device ${name}: a record of ${stored} payload bytes (writer fields included) is larger than the ${MAX_PAYLOAD} a record may hold`, { details: { device: name, bytes: stored } });
}

function fenced(name: string, epoch: number, current: number): RuntimeError {
  return new RuntimeError('MS_NVRAM_FENCED', `device ${name}: epoch ${epoch} is fenced by a newer open with epoch ${current}`, {
    details: { device: name, epoch, current },
  });
}

export function recordBytes(payloadLength: number, targetName = ''): number {
  return recordSize(payloadLength, Buffer.byteLength(targetName));
}
