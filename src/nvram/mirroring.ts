// Mirroring of this node's mirrored NVRAM devices to their partners (DESIGN 4.3).
//
// A device's partner is the node's `mirror.partner`, set by hand, or in a cluster without
// one the node the cluster chose for it (`route`, cluster/partners.ts): there is one link
// per partner node, and each device goes over its own partner's link.
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
import type { ListenAddress } from '../units.js';
import {
  MIRROR_CHUNK,
  MOP,
  MSTATUS,
  MSTATUS_NAME,
  decodeState,
  encodeAppend,
  encodeAppendParts,
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

/** Where a device's replica lives when the cluster chose it: the node, its mirror service, and whether that speaks TLS only. */
export interface MirrorRoute {
  node: string;
  address: ListenAddress;
  tls: boolean;
}

export interface MirroringOptions {
  nvram: DeviceManager;
  /** The partner set by hand (mirror.partner): every device mirrors there. */
  partner: ListenAddress | undefined;
  /**
   * Without a partner set by hand, in a cluster: where each device's replica lives, as the
   * cluster chose it; undefined while it has none. Looked at every REFRESH_MS.
   */
  route?: ((device: string) => MirrorRoute | undefined) | undefined;
  onPartnerDown: OnPartnerDown;
  nodeId: string;
  token: string | undefined;
  /** The partner's node id, checked both ways at HELLO; any when undefined. */
  partnerId?: string | undefined;
  timeoutMs: number;
  retryMs: number;
  log: Logger;
  /** TLS to every partner (mirror.tls=require). */
  tls?: ConnectionOptions | undefined;
  /** TLS to a chosen partner whose mirror service speaks only TLS (its member record says so); the node's certificates. */
  peerTls?: ConnectionOptions | undefined;
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
  /** The replica on `node` holds every record again (a resync ended): etcd may let it take over, if it is the one the record names. */
  inSync(device: string, node: string | undefined): void;
}

/** How often a device's partner is looked up again when the cluster chooses them. */
const REFRESH_MS = 250;

/** One partner: its link, and for a chosen one the route it was made for. */
interface Partner {
  link: MirrorLink;
  route: MirrorRoute | undefined;
}

export class Mirroring {
  private readonly options: MirroringOptions;
  /** The partner set by hand, when there is one. */
  private readonly fixed: Partner | undefined;
  /** Chosen partners' links, by node id. */
  private readonly partners: Map<string, Partner>;
  /** Each mirrored primary's chosen partner (node id), as last looked up. */
  private readonly routes: Map<string, string>;
  /** Devices in sync, with the link their replica is on. */
  private readonly inSync: Map<string, MirrorLink>;
  private readonly syncing: Map<string, Promise<void>>;
  /** Devices whose running resync may have sent the replica records voided since: resync again. */
  private readonly again: Set<string>;
  private timer: NodeJS.Timeout | undefined;
  private degradations: number;
  private resyncs: number;
  private mirroredRecords: number;

  constructor(options: MirroringOptions) {
    this.options = options;
    this.partners = new Map();
    this.routes = new Map();
    this.inSync = new Map();
    this.syncing = new Map();
    this.again = new Set();
    this.timer = undefined;
    this.degradations = 0;
    this.resyncs = 0;
    this.mirroredRecords = 0;
    this.fixed = options.partner === undefined ? undefined : this.newPartner(options.partner, options.partnerId, options.tls, undefined);
  }

  start(): void {
    const { nvram, log } = this.options;
    nvram.onPrimary = (device) => { this.attach(device); };
    nvram.onRemoved = (device) => { this.dropped(device); };
    for (const device of nvram.devicesList()) {
      if (isMirrored(device.policy) && device.role === 'primary') this.attach(device);
    }
    if (this.fixed === undefined) {
      if (this.options.route !== undefined) {
        log.info({ onPartnerDown: this.options.onPartnerDown }, 'mirroring to partners the cluster chooses for each device');
        this.timer = setInterval(() => { this.refresh(); }, REFRESH_MS);
        this.timer.unref();
        return;
      }
      const mirrored = nvram.devicesList().filter((d) => isMirrored(d.policy)).map((d) => d.name);
      if (mirrored.length > 0) log.warn({ devices: mirrored, mode: this.downMode() }, 'mirrored NVRAM devices but no mirror.partner configured');
      return;
    }
    log.info({ partner: this.fixed.link.address, partnerId: this.options.partnerId ?? null, onPartnerDown: this.options.onPartnerDown }, 'mirroring to partner');
    if (this.options.partnerId === undefined) {
      log.warn({ partner: this.fixed.link.address }, 'mirror.partnerId is not set: this node mirrors to whatever node answers at the partner address, and its mirror service admits any node id; set mirror.partnerId on both nodes');
    }
    this.fixed.link.start();
  }

  close(): void {
    clearInterval(this.timer);
    this.fixed?.link.close();
    for (const partner of this.partners.values()) partner.link.close();
    this.partners.clear();
    this.options.nvram.onPrimary = undefined;
    this.options.nvram.onRemoved = undefined;
  }

  info(): MirroringInfo {
    const fixed = this.fixed?.link;
    const links = [...(fixed === undefined ? [] : [fixed]), ...[...this.partners.values()].map((p) => p.link)];
    return {
      partner: fixed?.address ?? null,
      partnerNode: fixed?.partnerNode ?? null,
      link: fixed === undefined ? 'none' : fixed.up ? 'up' : 'down',
      chosen: this.options.route !== undefined && fixed === undefined,
      links: links.map((link) => ({
        node: link.partnerNode ?? link.expectedNode ?? null,
        address: link.address,
        up: link.up,
        devices: this.options.nvram.devicesList().filter((d) => d.role === 'primary' && this.linkOf(d.name) === link).map((d) => d.name).sort(),
      })),
      onPartnerDown: this.options.onPartnerDown,
      degradations: this.degradations,
      resyncs: this.resyncs,
      mirroredRecords: this.mirroredRecords,
    };
  }

  /** The node a device's replica is to be on: its link's node, as HELLO said or as expected (for a new record where the cluster does not choose). */
  partnerOf(name: string): string | undefined {
    const link = this.linkOf(name);
    return link?.partnerNode ?? link?.expectedNode;
  }

  /** The node a device is in sync with now; undefined when it is not in sync. */
  syncedWith(name: string): string | undefined {
    return this.isInSync(name) ? this.inSync.get(name)?.partnerNode : undefined;
  }

  /** A resync of `name` when its partner is reachable and it is not in sync (the cluster asks after a takeover or a demotion). */
  retry(name: string): void {
    const device = this.options.nvram.find(name);
    if (device === undefined || device.role !== 'primary' || !isMirrored(device.policy)) return;
    this.refresh();
    if (this.linkOf(name)?.up === true && !this.isInSync(name) && !this.syncing.has(name)) void this.resync(device);
  }

  /**
   * Looks up each mirrored primary's chosen partner again: a device whose partner changed
   * is no longer in sync (it goes on as its partner is down, and resyncs to the new one as
   * soon as that link is up); links no device needs any more are closed.
   */
  private refresh(): void {
    const route = this.options.route;
    if (route === undefined || this.fixed !== undefined) return;
    const wanted = new Set<string>();
    for (const device of this.options.nvram.devicesList()) {
      if (!isMirrored(device.policy) || device.role !== 'primary') {
        this.routes.delete(device.name);
        continue;
      }
      const name = device.name;
      const next = route(name);
      const partner = next === undefined ? undefined : this.partnerFor(next);
      if (next !== undefined) wanted.add(next.node);
      const before = this.routes.get(name);
      if (next?.node === before) continue;
      if (next === undefined) this.routes.delete(name);
      else this.routes.set(name, next.node);
      if (this.inSync.get(name) !== undefined && this.inSync.get(name) !== partner?.link) this.lostPartner([name], `its partner is now ${next?.node ?? 'none'}`);
      this.options.log.info({ device: name, partner: next?.node ?? null, before: before ?? null }, next === undefined ? 'mirrored NVRAM device has no partner now' : 'mirrored NVRAM device mirrors to the partner the cluster chose');
      if (partner?.link.up === true) void this.resync(device);
    }
    for (const [node, partner] of this.partners) {
      if (wanted.has(node)) continue;
      this.partners.delete(node);
      partner.link.close();
    }
  }

  /** The link to a chosen partner, made (or made again, when its address changed) as needed. */
  private partnerFor(route: MirrorRoute): Partner {
    const known = this.partners.get(route.node);
    if (known?.route !== undefined && sameRoute(known.route, route)) return known;
    known?.link.close();
    const tls = this.options.tls ?? (route.tls ? this.options.peerTls : undefined);
    if (route.tls && tls === undefined) this.options.log.error({ partner: route.node }, 'the chosen mirror partner speaks TLS only, and this node has no certificates (tls.cert, tls.key, tls.ca) to reach it');
    const partner = this.newPartner(route.address, route.node, tls, route);
    this.partners.set(route.node, partner);
    partner.link.start();
    return partner;
  }

  private newPartner(address: ListenAddress, node: string | undefined, tls: ConnectionOptions | undefined, route: MirrorRoute | undefined): Partner {
    const partner: Partner = {
      route,
      link: new MirrorLink({
        partner: address,
        nodeId: this.options.nodeId,
        token: this.options.token,
        partnerId: node,
        timeoutMs: this.options.timeoutMs,
        retryMs: this.options.retryMs,
        log: this.options.log,
        onUp: (partnerNode) => { this.linkUp(partner.link, partnerNode); },
        onDown: (why) => { this.linkDown(partner.link, why); },
        // An idle link asks after a device in sync over it: a partner that stopped answering is noticed without appends.
        probe: () => [...this.inSync].find(([, on]) => on === partner.link)?.[0],
        onProbe: (device, reply) => { this.probed(partner.link, device, reply); },
        tls,
      }),
    };
    return partner;
  }

  /** An idle probe's answer: a partner that no longer holds the replica (removed there, or reset) is not in sync any more. */
  private probed(link: MirrorLink, name: string, reply: LinkReply): void {
    if (reply.status !== MSTATUS.OK || this.inSync.get(name) !== link) return;
    let theirs: DeviceState | undefined;
    try {
      theirs = decodeState(reply.body);
    } catch {
      return;
    }
    const device = this.options.nvram.find(name);
    if (theirs?.role === 'replica' || device === undefined) return;
    this.lostPartner([name], 'the partner no longer holds the replica', link);
    if (link.up && device.role === 'primary') void this.resync(device);
  }

  /**
   * The link a device's replica is on: the partner set by hand, or the one the cluster
   * chose, as the record says now (not as the last refresh saw it: a device whose record
   * names another replica is at once not in sync with the old one).
   */
  private linkOf(name: string): MirrorLink | undefined {
    if (this.fixed !== undefined) return this.fixed.link;
    const route = this.options.route?.(name);
    const partner = route === undefined ? undefined : this.partners.get(route.node);
    return partner?.route !== undefined && route !== undefined && sameRoute(partner.route, route) ? partner.link : undefined;
  }

  private isInSync(name: string): boolean {
    const link = this.inSync.get(name);
    return link !== undefined && link === this.linkOf(name) && link.up;
  }

  /** Gives a mirrored primary its port, and brings the partner up to date when the link is up. */
  private attach(device: NvramDevice): void {
    device.port = this.portFor(device.name);
    this.refresh();
    const link = this.linkOf(device.name);
    if (link?.up === true) void this.resync(device);
    else if (link !== undefined) this.options.log.warn({ device: device.name, mode: this.downMode() }, 'mirrored NVRAM device waits for its partner');
  }

  private dropped(device: NvramDevice): void {
    const link = this.linkOf(device.name);
    this.inSync.delete(device.name);
    this.routes.delete(device.name);
    if (link?.up === true) void link.send(MOP.DROP, encodeName(device.name)).catch(() => undefined);
  }

  private mode(name: string): MirrorMode {
    if (this.syncing.has(name)) return 'syncing';
    if (this.isInSync(name)) return 'in-sync';
    const down = this.downMode();
    // In a cluster, a device acknowledges without its partner only once etcd says the replica is out of date.
    const ownership = this.options.ownership;
    if (down === 'degraded' && ownership !== undefined && !ownership.isOutdated(name)) {
      void ownership.outdate(name).catch(() => undefined);
      return 'refusing';
    }
    return down;
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
        const link = this.linkOf(device);
        if (this.mode(device) !== 'in-sync' || link === undefined) {
          // In a cluster the replica must know every epoch a writer was told of before it may
          // take over: not in sync, etcd must say it is out of date (a resync under way has
          // done so, and its push carries the epoch).
          if (ownership !== undefined) await ownership.outdate(device);
          return;
        }
        const sent = await link.send(MOP.EPOCH, encodeEpoch(device, epoch)).then(() => true, () => false);
        if (!sent && ownership !== undefined) await ownership.outdate(device);
      },
      trim: (device, epoch, upTo) => {
        void this.linkOf(device)?.send(MOP.TRIM, encodeTrim(device, epoch, upTo)).catch(() => undefined);
      },
      exclusive: (fn) => this.exclusive(name, fn),
      rolledBack: (device) => {
        // The replica may hold records that were voided here: RESET it and send them again.
        const found = this.options.nvram.find(device);
        if (this.syncing.has(device)) this.again.add(device);
        // Also when it was not in sync: a resync that failed on the fenced journal this
        // repair just rewrote is not retried by anything else while the link stays up.
        else if ((this.inSync.delete(device) || this.linkOf(device)?.up === true) && found !== undefined && found.role === 'primary') void this.resync(found);
      },
    };
  }

  private async append(name: string, epoch: number, records: Buffer, count: number): Promise<boolean> {
    const link = this.linkOf(name);
    if (link === undefined || this.inSync.get(name) !== link) return this.degrade(name);
    let answer: LinkReply;
    try {
      // The records as they are, not copied: the device keeps them until this settles.
      answer = await link.send(MOP.APPEND, encodeAppendParts(name, epoch, records));
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

  private linkUp(link: MirrorLink, partnerNode: string): void {
    this.options.log.info({ partner: link.address, partnerNode }, 'mirror link up');
    void this.resyncAll(link);
  }

  private linkDown(link: MirrorLink, why: string): void {
    const lost = [...this.inSync].filter(([, on]) => on === link).map(([name]) => name);
    this.lostPartner(lost, why, link);
  }

  /** Devices whose replica no longer takes records: sync what the partner held, and go on degraded or refusing. */
  private lostPartner(lost: readonly string[], why: string, link?: MirrorLink): void {
    // A `mirrored` device's records were durable in the partner's memory; its journal
    // file has them, written but maybe not synced: sync it now.
    for (const name of lost) {
      this.inSync.delete(name);
      const device = this.options.nvram.find(name);
      if (device?.policy !== 'mirrored') continue;
      device.syncJournal().catch((error: unknown) => {
        this.options.log.error({ device: name, err: error }, 'syncing the journal of a mirrored device after losing its partner failed; records acknowledged by the partner may not survive a power loss here');
      });
    }
    this.degradations += lost.length;
    for (const name of lost) void this.options.ownership?.outdate(name).catch(() => undefined);
    const level = lost.length > 0 ? 'warn' : 'info';
    this.options.log[level]({ partner: link?.address, why, devices: lost, mode: this.downMode() }, `mirror link down; mirrored devices ${this.downMode() === 'degraded' ? 'degrade to their local journal' : 'refuse appends'}`);
  }

  private async resyncAll(link: MirrorLink): Promise<void> {
    for (const device of this.options.nvram.devicesList()) {
      if (isMirrored(device.policy) && device.role === 'primary' && link.up && this.linkOf(device.name) === link) await this.resync(device);
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
      if (this.linkOf(name)?.up === true && device !== undefined && device.role === 'primary' && isMirrored(device.policy)) void this.resync(device);
    }
  }

  /** Brings the partner's replica of `device` up to date; appends wait meanwhile. */
  private async resync(device: NvramDevice): Promise<void> {
    const { log, nvram } = this.options;
    const name = device.name;
    if (this.syncing.has(name)) return;
    const link = this.linkOf(name);
    if (link === undefined) return;
    let release = (): void => undefined;
    this.syncing.set(name, new Promise<void>((resolve) => (release = resolve)));
    try {
      await device.quiesce();
      const theirs = decodeState(await this.call(link, MOP.STATE, encodeName(name)));
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
        await this.adopt(link, device, theirs);
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
      await this.push(link, device);
      // The device's partner changed meanwhile: this replica is not the one it mirrors to.
      if (this.linkOf(name) !== link) throw new RuntimeError('MS_NVRAM_PARTNER_DOWN', `device ${name}: its partner changed during the resync`);
      this.inSync.set(name, link);
      this.options.ownership?.inSync(name, link.partnerNode);
      this.resyncs++;
      log.info({ device: name, lastSeq: device.lastSeq, epoch: device.epoch, partner: link.partnerNode ?? link.address }, 'mirror in sync; appends are mirrored again');
    } catch (error) {
      log.warn({ device: name, err: error, mode: this.downMode() }, 'mirror resync failed; the device stays unmirrored until the link comes up again');
    } finally {
      this.syncing.delete(name);
      release();
      if (this.again.delete(name)) {
        this.inSync.delete(name);
        if (this.linkOf(name)?.up === true) void this.resync(device);
      }
    }
  }

  /** Sends the replica a RESET and every live record, and waits until it holds them all. */
  private async push(link: MirrorLink, device: NvramDevice): Promise<void> {
    const first = device.info().firstSeq ?? device.lastSeq + 1;
    const epoch = device.epoch;
    await this.call(
      link,
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
      await this.call(link, MOP.APPEND, encodeAppend(device.name, epoch, Buffer.concat(chunk)));
      from += chunk.length;
    }
    // An open that raised the epoch meanwhile was not sent: send it now.
    if (device.epoch !== epoch) await this.call(link, MOP.EPOCH, encodeEpoch(device.name, device.epoch));
  }

  /**
   * Takes the partner's contents: this node crashed before its file held every record the
   * partner has (all at this epoch, so the same history, only longer).
   */
  private async adopt(link: MirrorLink, device: NvramDevice, theirs: DeviceState): Promise<void> {
    const name = device.name;
    const records: Buffer[] = [];
    const decoded: JournalRecord[] = [];
    let from = 0;
    for (;;) {
      const bytes = await this.call(link, MOP.FETCH, encodeFetch(name, from, MIRROR_CHUNK));
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
  private async call(link: MirrorLink, op: number, body: Buffer): Promise<Buffer> {
    const answer = await link.send(op, body);
    if (answer.status !== MSTATUS.OK) {
      throw new RuntimeError(answer.status === MSTATUS.FENCED ? 'MS_NVRAM_FENCED' : 'MS_MIRROR_CONFLICT', `mirror partner ${link.partnerNode ?? link.address} answered ${MSTATUS_NAME[answer.status] ?? answer.status}: ${errorMessage(answer.body)}`);
    }
    return answer.body;
  }
}

function sameRoute(a: MirrorRoute, b: MirrorRoute): boolean {
  return a.node === b.node && a.tls === b.tls && a.address.host === b.address.host && a.address.port === b.address.port;
}
