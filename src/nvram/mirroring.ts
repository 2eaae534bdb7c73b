// Mirroring of this node's mirrored NVRAM devices to its partner (DESIGN 4.3).
//
//   link up    -> for each mirrored primary: resync (appends wait), then in-sync
//   resync     -> ask the partner what it holds (STATE);
//                 newer epoch there: this copy is stale, become its replica;
//                 same epoch, more records there (this node crashed): adopt them;
//                 then RESET the replica and send every live record (APPEND chunks)
//   in-sync    -> each append goes to the partner; acknowledged once it holds it
//   link down  -> degrade (acknowledge once the journal file is synced) or refuse,
//                 as `mirror.onPartnerDown` says; logged, counted, shown in status
//
// Requests on the link are answered in order, so records appended after a resync's
// snapshot reach the replica after it; appends wait for the resync to end, so the
// snapshot holds every record taken before it.

import type { ConnectionOptions } from 'node:tls';
import { RuntimeError, isMemstrataError } from '../errors.js';
import type { Logger } from '../logger.js';
import { formatAddress, type ListenAddress } from '../units.js';
import {
  MIRROR_CHUNK,
  MOP,
  MSTATUS,
  MSTATUS_NAME,
  decodeState,
  encodeAppend,
  encodeEpoch,
  encodeFetch,
  encodeName,
  encodeReset,
  encodeTrim,
  errorMessage,
  splitRecords,
  type DeviceState,
} from '../protocol/mirror/codec.js';
import type { DeviceManager } from './device-manager.js';
import { isMirrored, type MirrorMode, type MirrorPort, type NvramDevice } from './device.js';
import { MirrorLink, type LinkReply } from './mirror-link.js';
import type { JournalRecord } from '../protocol/journal/record.js';
import type { OnPartnerDown, MirroringInfo } from '../protocol/admin/api.js';
export type { OnPartnerDown, MirroringInfo };

export interface MirroringOptions {
  nvram: DeviceManager;
  partner: ListenAddress | undefined;
  onPartnerDown: OnPartnerDown;
  nodeId: string;
  token: string | undefined;
  /** The partner's node id, checked both ways at HELLO; any when undefined. */
  partnerId?: string | undefined;
  timeoutMs: number;
  retryMs: number;
  log: Logger;
  /** TLS to the partner (mirror.tls=require). */
  tls?: ConnectionOptions | undefined;
  /**
   * In a cluster, the devices' ownership in etcd (cluster/ownership.ts): a device degrades
   * only once etcd records its replica as out of date (so the replica cannot take over
   * without records acknowledged here), and etcd learns when it is in sync again.
   */
  ownership?: MirrorOwnership | undefined;
}

/** What mirroring needs from the cluster's ownership of a device. */
export interface MirrorOwnership {
  /** Records in etcd that the replica lacks records; rejects when that cannot be done now. */
  outdate(device: string): Promise<void>;
  /** The replica is recorded as out of date: acknowledging without it is safe. */
  isOutdated(device: string): boolean;
  /** The replica holds every record again (a resync ended): etcd may let it take over. */
  inSync(device: string): void;
}

export class Mirroring {
  private readonly options: MirroringOptions;
  private readonly link: MirrorLink | undefined;
  private readonly inSync: Set<string>;
  private readonly syncing: Map<string, Promise<void>>;
  /** Devices whose running resync may have sent the replica records voided since: resync again. */
  private readonly again: Set<string>;
  private degradations: number;
  private resyncs: number;
  private mirroredRecords: number;

  constructor(options: MirroringOptions) {
    this.options = options;
    this.inSync = new Set();
    this.syncing = new Map();
    this.again = new Set();
    this.degradations = 0;
    this.resyncs = 0;
    this.mirroredRecords = 0;
    this.link =
      options.partner === undefined
        ? undefined
        : new MirrorLink({
            partner: options.partner,
            nodeId: options.nodeId,
            token: options.token,
            partnerId: options.partnerId,
            timeoutMs: options.timeoutMs,
            retryMs: options.retryMs,
            log: options.log,
            onUp: (partnerNode) => { this.linkUp(partnerNode); },
            onDown: (why) => { this.linkDown(why); },
            tls: options.tls,
          });
  }

  start(): void {
    const { nvram, log } = this.options;
    nvram.onPrimary = (device) => { this.attach(device); };
    nvram.onRemoved = (device) => { this.dropped(device); };
    for (const device of nvram.devicesList()) {
      if (isMirrored(device.policy) && device.role === 'primary') this.attach(device);
    }
    if (this.link === undefined) {
      const mirrored = nvram.devicesList().filter((d) => isMirrored(d.policy)).map((d) => d.name);
      if (mirrored.length > 0) log.warn({ devices: mirrored, mode: this.downMode() }, 'mirrored NVRAM devices but no mirror.partner configured');
      return;
    }
    log.info({ partner: this.link.address, partnerId: this.options.partnerId ?? null, onPartnerDown: this.options.onPartnerDown }, 'mirroring to partner');
    if (this.options.partnerId === undefined) {
      log.warn({ partner: this.link.address }, 'mirror.partnerId is not set: this node mirrors to whatever node answers at the partner address, and its mirror service admits any node id; set mirror.partnerId on both nodes');
    }
    this.link.start();
  }

  close(): void {
    this.link?.close();
    this.options.nvram.onPrimary = undefined;
    this.options.nvram.onRemoved = undefined;
  }

  info(): MirroringInfo {
    return {
      partner: this.link?.address ?? null,
      partnerNode: this.link?.partnerNode ?? null,
      link: this.link === undefined ? 'none' : this.link.up ? 'up' : 'down',
      onPartnerDown: this.options.onPartnerDown,
      degradations: this.degradations,
      resyncs: this.resyncs,
      mirroredRecords: this.mirroredRecords,
    };
  }

  /** Gives a mirrored primary its port, and brings the partner up to date when the link is up. */
  private attach(device: NvramDevice): void {
    device.port = this.portFor(device.name);
    if (this.link?.up === true) void this.resync(device);
    else if (this.link !== undefined) this.options.log.warn({ device: device.name, mode: this.downMode() }, 'mirrored NVRAM device waits for its partner');
  }

  private dropped(device: NvramDevice): void {
    this.inSync.delete(device.name);
    if (this.link?.up === true) void this.link.send(MOP.DROP, encodeName(device.name)).catch(() => undefined);
  }

  private mode(name: string): MirrorMode {
    if (this.syncing.has(name)) return 'syncing';
    if (this.link?.up === true && this.inSync.has(name)) return 'in-sync';
    const down = this.downMode();
    // In a cluster, a device acknowledges without its partner only once etcd says the replica is out of date.
    const ownership = this.options.ownership;
    if (down === 'degraded' && ownership !== undefined && !ownership.isOutdated(name)) {
      void ownership.outdate(name).catch(() => undefined);
      return 'refusing';
    }
    return down;
  }

  /** A resync of `name` when its partner is reachable and it is not in sync (the cluster asks after a takeover or a demotion). */
  retry(name: string): void {
    const device = this.options.nvram.find(name);
    if (device === undefined || device.role !== 'primary' || !isMirrored(device.policy)) return;
    if (this.link?.up === true && !this.inSync.has(name) && !this.syncing.has(name)) void this.resync(device);
  }

  private downMode(): MirrorMode {
    return this.options.onPartnerDown === 'degrade' ? 'degraded' : 'refusing';
  }

  private portFor(name: string): MirrorPort {
    return {
      mode: () => this.mode(name),
      settled: () => this.syncing.get(name) ?? Promise.resolve(),
      append: (device, epoch, records, count) => this.append(device, epoch, records, count),
      epoch: async (device, epoch) => {
        const ownership = this.options.ownership;
        if (this.mode(device) !== 'in-sync' || this.link === undefined) {
          // In a cluster the replica must know every epoch a writer was told of before it may
          // take over: not in sync, etcd must say it is out of date (a resync under way has
          // done so, and its push carries the epoch).
          if (ownership !== undefined) await ownership.outdate(device);
          return;
        }
        const sent = await this.link.send(MOP.EPOCH, encodeEpoch(device, epoch)).then(() => true, () => false);
        if (!sent && ownership !== undefined) await ownership.outdate(device);
      },
      trim: (device, epoch, upTo) => {
        void this.link?.send(MOP.TRIM, encodeTrim(device, epoch, upTo)).catch(() => undefined);
      },
      exclusive: (fn) => this.exclusive(name, fn),
      rolledBack: (device) => {
        // The replica may hold records that were voided here: RESET it and send them again.
        const found = this.options.nvram.find(device);
        if (this.syncing.has(device)) this.again.add(device);
        // Also when it was not in sync: a resync that failed on the fenced journal this
        // repair just rewrote is not retried by anything else while the link stays up.
        else if ((this.inSync.delete(device) || this.link?.up === true) && found !== undefined && found.role === 'primary') void this.resync(found);
      },
    };
  }

  private async append(name: string, epoch: number, records: Buffer, count: number): Promise<boolean> {
    const link = this.link;
    if (link === undefined) return this.degrade(name);
    let answer: LinkReply;
    try {
      answer = await link.send(MOP.APPEND, encodeAppend(name, epoch, records));
    } catch (error) {
      if (isMemstrataError(error) && error.code === 'MS_MIRROR_UNREACHABLE') return this.degrade(name);
      throw error;
    }
    if (answer.status === MSTATUS.OK) {
      this.mirroredRecords += count;
      return true;
    }
    const why = `${MSTATUS_NAME[answer.status] ?? answer.status}: ${errorMessage(answer.body)}`;
    if (answer.status === MSTATUS.FENCED) {
      // The partner took the device over with a newer epoch: this copy is stale.
      this.inSync.delete(name);
      void this.options.nvram.demote(name, `partner fenced an append: ${why}`);
      throw new RuntimeError('MS_NVRAM_FENCED', `device ${name} was taken over on the mirror partner with a newer epoch`, { details: { device: name } });
    }
    // The replica is out of step (a gap, no room, restarted): bring it up to date again.
    this.options.log.warn({ device: name, why }, 'mirror partner refused records; resyncing the replica');
    const device = this.options.nvram.find(name);
    if (this.inSync.delete(name) && device !== undefined) setImmediate(() => void this.resync(device));
    return this.degrade(name, false);
  }

  /** partnerLost, and in a cluster only once etcd records the replica as out of date (else PARTNER_DOWN). */
  private async degrade(name: string, count = true): Promise<boolean> {
    const degrade = this.partnerLost(name, count);
    const ownership = this.options.ownership;
    if (ownership !== undefined) {
      try {
        await ownership.outdate(name);
      } catch (error) {
        throw new RuntimeError('MS_NVRAM_PARTNER_DOWN', `device ${name}: the mirror partner does not hold the record, and etcd could not record its replica as out of date: ${error instanceof Error ? error.message : String(error)}`, {
          details: { device: name },
        });
      }
    }
    return degrade;
  }

  /** The partner does not hold the record: false to degrade, or a PARTNER_DOWN error. */
  private partnerLost(name: string, count = true): boolean {
    if (count && this.inSync.delete(name)) this.degradations++;
    if (this.options.onPartnerDown === 'degrade') return false;
    throw new RuntimeError('MS_NVRAM_PARTNER_DOWN', `device ${name}: the mirror partner does not hold the record and mirror.onPartnerDown is refuse`, {
      details: { device: name },
    });
  }

  private linkUp(partnerNode: string): void {
    this.options.log.info({ partner: this.link?.address, partnerNode }, 'mirror link up');
    void this.resyncAll();
  }

  private linkDown(why: string): void {
    const lost = [...this.inSync];
    // A `mirrored` device's records were durable in the partner's memory; its journal
    // file has them, written but maybe not synced: sync it now.
    for (const name of lost) {
      const device = this.options.nvram.find(name);
      if (device?.policy !== 'mirrored') continue;
      device.syncJournal().catch((error: unknown) => {
        this.options.log.error({ device: name, err: error }, 'syncing the journal of a mirrored device after losing its partner failed; records acknowledged by the partner may not survive a power loss here');
      });
    }
    this.inSync.clear();
    this.degradations += lost.length;
    for (const name of lost) void this.options.ownership?.outdate(name).catch(() => undefined);
    const level = lost.length > 0 ? 'warn' : 'info';
    this.options.log[level]({ partner: this.link?.address, why, devices: lost, mode: this.downMode() }, `mirror link down; mirrored devices ${this.downMode() === 'degraded' ? 'degrade to their local journal' : 'refuse appends'}`);
  }

  private async resyncAll(): Promise<void> {
    for (const device of this.options.nvram.devicesList()) {
      if (isMirrored(device.policy) && device.role === 'primary' && this.link?.up === true) await this.resync(device);
    }
  }

  /** Runs `fn` holding the device's resync slot (MirrorPort.exclusive). */
  private async exclusive<T>(name: string, fn: () => Promise<T>): Promise<T> {
    for (let running = this.syncing.get(name); running !== undefined; running = this.syncing.get(name)) await running;
    let release = (): void => undefined;
    this.syncing.set(name, new Promise<void>((resolve) => (release = resolve)));
    try {
      return await fn();
    } finally {
      this.syncing.delete(name);
      release();
      const device = this.options.nvram.find(name);
      if (this.link?.up === true && device !== undefined && device.role === 'primary' && isMirrored(device.policy)) void this.resync(device);
    }
  }

  /** Brings the partner's replica of `device` up to date; appends wait meanwhile. */
  private async resync(device: NvramDevice): Promise<void> {
    const { log, nvram } = this.options;
    const name = device.name;
    if (this.syncing.has(name)) return;
    let release = (): void => undefined;
    this.syncing.set(name, new Promise<void>((resolve) => (release = resolve)));
    try {
      await device.quiesce();
      const theirs = decodeState(await this.call(MOP.STATE, encodeName(name)));
      if (theirs !== undefined && theirs.epoch > device.epoch) {
        await nvram.demote(name, `the partner holds it with epoch ${theirs.epoch}, newer than ${device.epoch} here`);
        return;
      }
      if (theirs !== undefined && theirs.policy !== device.policy) {
        throw new RuntimeError('MS_MIRROR_CONFLICT', `the partner holds a device ${name} with policy ${theirs.policy}, not ${device.policy}`);
      }
      if (theirs !== undefined && theirs.role === 'primary' && !theirs.recovering && theirs.epoch === device.epoch) {
        throw new RuntimeError('MS_MIRROR_CONFLICT', `the partner is also primary of ${name} at epoch ${device.epoch}; open one of them with a newer epoch to decide`);
      }
      // A volume's `mirrored+local` write log synced every record it acknowledged, and its
      // volume was replayed from that file at start: records only the partner holds were
      // never acknowledged, and taking them (with the partner's older trim point) would
      // bring back records already replayed. The partner gets this node's copy instead.
      //
      // Only a device back from a crash (`recovering`) takes the partner's records: one that
      // served since (a `mirrored+local` one, whose file held every record it acknowledged;
      // one an operator accepted without its partner) never has its copy replaced.
      const partnerHasMore = theirs !== undefined && !theirs.recovering && theirs.epoch === device.epoch && theirs.lastSeq > device.lastSeq;
      const ownLog = device.policy === 'mirrored+local' && nvram.claimedBy?.(name) !== undefined;
      if (partnerHasMore && device.recovering && !ownLog) {
        await this.adopt(device, theirs);
      } else if (partnerHasMore) {
        log.info({ device: name, lastSeq: device.lastSeq, partnerLastSeq: theirs.lastSeq }, 'the mirror partner holds records this node never acknowledged or gave up; the replica is reset to what this node holds');
      } else if (device.recovering) {
        log.warn({ device: name, partnerHas: theirs === undefined ? 'nothing' : theirs.recovering ? 'a stale copy' : `up to ${theirs.lastSeq}` }, 'mirror partner holds nothing newer; serving what the journal file holds');
      }
      // The RESET empties the replica, which may hold records this node's journal has
      // written but not synced (mirrored, in sync until the link dropped): make them
      // durable here first, so no acknowledged record is on neither node's stable copy.
      if (device.policy === 'mirrored') await device.syncJournal();
      // In a cluster, the replica must not be able to take over while the RESET has emptied
      // it and the push has not refilled it: etcd says it is out of date first (which only
      // the device's confirmed owner can do; any other primary does not resync at all).
      if (this.options.ownership !== undefined) await this.options.ownership.outdate(name);
      device.recovering = false;
      await this.push(device);
      this.inSync.add(name);
      this.options.ownership?.inSync(name);
      this.resyncs++;
      log.info({ device: name, lastSeq: device.lastSeq, epoch: device.epoch, partner: this.link?.address }, 'mirror in sync; appends are mirrored again');
    } catch (error) {
      log.warn({ device: name, err: error, mode: this.downMode() }, 'mirror resync failed; the device stays unmirrored until the link comes up again');
    } finally {
      this.syncing.delete(name);
      release();
      if (this.again.delete(name)) {
        this.inSync.delete(name);
        if (this.link?.up === true) void this.resync(device);
      }
    }
  }

  /** Sends the replica a RESET and every live record, and waits until it holds them all. */
  private async push(device: NvramDevice): Promise<void> {
    const first = device.info().firstSeq ?? device.lastSeq + 1;
    const epoch = device.epoch;
    await this.call(
      MOP.RESET,
      encodeReset({
        name: device.name,
        policy: device.policy,
        medium: this.options.nvram.mediumOf(device.name),
        size: device.size,
        epoch,
        trimmedTo: device.trimPoint,
        firstSeq: first,
        nodeOwned: this.options.nvram.claimedBy?.(device.name) !== undefined,
      }),
    );
    let from = first;
    for (;;) {
      const chunk = await device.collect(from, Number.MAX_SAFE_INTEGER, MIRROR_CHUNK);
      if (chunk.length === 0) break;
      await this.call(MOP.APPEND, encodeAppend(device.name, epoch, Buffer.concat(chunk)));
      from += chunk.length;
    }
    // An open that raised the epoch meanwhile was not sent: send it now.
    if (device.epoch !== epoch) await this.call(MOP.EPOCH, encodeEpoch(device.name, device.epoch));
  }

  /**
   * Takes the partner's contents: this node crashed before its file held every record the
   * partner has (all at this epoch, so the same history, only longer).
   */
  private async adopt(device: NvramDevice, theirs: DeviceState): Promise<void> {
    const name = device.name;
    const records: Buffer[] = [];
    const decoded: JournalRecord[] = [];
    let from = 0;
    for (;;) {
      const bytes = await this.call(MOP.FETCH, encodeFetch(name, from, MIRROR_CHUNK));
      if (bytes.length === 0) break;
      const split = splitRecords(bytes, 'FETCH reply');
      records.push(...split.encoded);
      decoded.push(...split.records);
      const last = split.records.at(-1);
      if (last === undefined) break;
      from = last.seq + 1;
    }
    const firstSeq = decoded[0]?.seq ?? theirs.lastSeq + 1;
    device.resetReplica(theirs.epoch, theirs.trimmedTo, firstSeq);
    await device.replicate(theirs.epoch, decoded, records);
    const old = device.promote(await this.options.nvram.rebuildJournal(device));
    await old?.close();
    this.options.log.warn({ device: name, lastSeq: device.lastSeq, partnerLastSeq: theirs.lastSeq }, 'took records from the mirror partner that this node lost in a crash');
  }

  /** One request on the link; anything but OK is an error naming the partner's reason. */
  private async call(op: number, body: Buffer): Promise<Buffer> {
    if (this.link === undefined) throw new RuntimeError('MS_NVRAM_PARTNER_DOWN', 'no mirror partner is configured');
    const answer = await this.link.send(op, body);
    if (answer.status !== MSTATUS.OK) {
      throw new RuntimeError(answer.status === MSTATUS.FENCED ? 'MS_NVRAM_FENCED' : 'MS_MIRROR_CONFLICT', `mirror partner ${formatAddress(this.options.partner ?? { host: '?', port: 0 })} answered ${MSTATUS_NAME[answer.status] ?? answer.status}: ${errorMessage(answer.body)}`);
    }
    return answer.body;
  }
}
