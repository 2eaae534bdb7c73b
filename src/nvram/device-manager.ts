// NVRAM devices of a node: their extents in the `nvram` partition, their files, and
// what happens to their contents across stops.
//
//   nvram/<name>.json      metadata (device-meta.ts), validated on load, replaced durably
//   nvram/<name>.journal   the journal file of a `local` or mirrored primary (journal-file.ts)
//   nvram/<name>.vault     every live record of a device, written on a clean stop
//
// Start: each device takes its extents again and is filled
//   - from its vault, after a clean stop (every policy but `local`; a mirrored primary's
//     journal file is rewritten from it);
//   - else from its journal file (`local`, `mirrored+local`: a torn tail is cut, and the
//     file holds every acknowledged record; `mirrored`: the file may lack records only
//     the partner holds, so the device is `recovering` until the partner answers);
//   - else empty (`volatile` after a crash, as its policy says; a replica after a crash is
//     `recovering` until its primary resyncs it).
// The vault is removed once read.
// A device that cannot be restored (metadata that fails validation, MS_META_INVALID; or
// no room for it) is not loaded: its files stay as they are, the log says why at error,
// damaged() lists it, and its name is refused to create, remove and the mirror's RESET
// (MS_META_DAMAGED), so nothing writes over a journal an operator may repair.
// Stop: every device but a `local` one is vaulted (write, fsync, rename, fsync of the
// directory); every device is closed and its extents go back to the partition table.
//
// Roles (mirrored devices): the node where the device was created is its primary; the
// partner holds a replica of the same name, made and kept up to date over the mirror
// link (mirroring.ts, mirror-service.ts). A client that opens a replica with a newer
// epoch takes it over: it is promoted, gets a journal file, and mirrors back.

import { copyFile, mkdir, readdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { MisuseError, RuntimeError, StorageError, isMemstrataError, toMemstrataError } from '../errors.js';
import type { MetaFs } from '../fs/meta-file.js';
import type { DamagedJson, DivergedJson } from '../protocol/admin/api.js';
import { deviceFile, divergedFiles } from './device-files.js';
import { DEVICE_NAME_PATTERN, readDeviceMeta, writeDeviceMeta, type DeviceMeta } from './device-meta.js';
import type { MediumName } from '../kinds.js';
import type { Medium } from '../memory/medium.js';
import type { PartitionTable } from '../memory/partition-table.js';
import type { Logger } from '../logger.js';
import { formatSize } from '../units.js';
import { NvramDevice, POLICIES, isMirrored, type DeviceInfo, type Policy } from './device.js';
import { JournalFile, MAX_JOURNALED_DEVICE, encodeFileHeader, openTempFile, parseJournal, readJournalFile, syncDir, type JournalOptions, type JournalSink, type Recovered } from './journal-file.js';
import { RECORD_FLAG, type JournalRecord } from '../protocol/journal/record.js';
import { LatencyHistogram } from '../net/latency.js';
import { stagingPool, type BufferPool } from '../memory/buffer-pool.js';

const NAME_PATTERN = DEVICE_NAME_PATTERN;
/** What the staging pool keeps, for all devices together. */
const STAGING_BYTES = 8 * 1024 * 1024;

interface Entry {
  meta: DeviceMeta;
  device: NvramDevice;
  extents: number[];
}

export class DeviceManager {
  readonly dir: string;
  private readonly partition: PartitionTable;
  private readonly media: ReadonlyMap<MediumName, Medium>;
  private readonly log: Logger;
  private readonly devices: Map<string, Entry>;
  /** Devices found on disk but not restored, by the name their files carry. */
  private readonly damagedDevices: Map<string, DamagedJson>;
  /** Journals kept aside per device name (quarantine). */
  private readonly divergedCount: Map<string, number>;
  /** RESETs applied per replica name (a mirror partner began filling it), so a discard decided before one does not undo it. */
  private readonly resetsTaken: Map<string, number>;
  private readonly fs: MetaFs | undefined;
  private queue: Promise<unknown>;

  /** Mirroring hooks: a mirrored primary appeared (created, restored, promoted), or one went away. */
  onPrimary: ((device: NvramDevice) => void) | undefined;
  onRemoved: ((device: NvramDevice) => void) | undefined;
  /** The volume whose write log a device is (write-log.ts): such a device cannot be removed. */
  claimedBy: ((device: string) => string | undefined) | undefined;
  /**
   * In a cluster (cluster.etcd set): who owns each mirrored device is decided in etcd
   * (cluster/ownership.ts). A mirrored primary acknowledges only while `ownerCheck`
   * passes, and refuses everything until the cluster's ownership has started; a newer
   * epoch no longer takes a replica over (the cluster promotes replicas).
   */
  readonly clustered: boolean;
  ownerCheck: ((device: string) => void) | undefined;

  /** For every journal file: the sink wrapper (the fault-injection seam for tests) and the least ring. */
  private readonly journalOptions: JournalOptions;
  /** Buffers appends stage their records in, shared by every device (see NvramDevice.appendRecords). */
  private readonly staging: BufferPool;
  /** How long each journal batch's write and sync took, per device. */
  readonly syncLatency: LatencyHistogram;

  constructor(options: { dataDir: string; partition: PartitionTable; media: readonly Medium[]; log: Logger; journalRing?: number; fs?: MetaFs; journalWrap?: (sink: JournalSink) => JournalSink; clustered?: boolean }) {
    this.journalOptions = { ...(options.journalWrap === undefined ? {} : { wrap: options.journalWrap }), ...(options.journalRing === undefined ? {} : { ring: options.journalRing }) };
    this.syncLatency = new LatencyHistogram();
    this.staging = stagingPool(STAGING_BYTES);
    this.dir = join(options.dataDir, 'nvram');
    this.partition = options.partition;
    this.media = new Map(options.media.map((m) => [m.name, m]));
    this.log = options.log;
    this.devices = new Map();
    this.damagedDevices = new Map();
    this.divergedCount = new Map();
    this.resetsTaken = new Map();
    this.fs = options.fs;
    this.queue = Promise.resolve();
    this.onPrimary = undefined;
    this.onRemoved = undefined;
    this.claimedBy = undefined;
    this.clustered = options.clustered === true;
    this.ownerCheck = undefined;
  }

  async open(): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    const files = await readdir(this.dir);
    for (const file of files) {
      const name = /^(.+)\.diverged-\d+$/.exec(file)?.[1];
      if (name !== undefined) this.divergedCount.set(name, (this.divergedCount.get(name) ?? 0) + 1);
    }
    for (const file of files.filter((f) => f.endsWith('.json')).sort()) {
      const name = file.slice(0, -'.json'.length);
      try {
        await this.load(await readDeviceMeta(this.dir, name, this.fs), false);
      } catch (error) {
        const coded = toMemstrataError(error);
        this.damagedDevices.set(name, { name, file: join(this.dir, file), error: coded.toJSON() });
        this.log.error({ device: name, file: join(this.dir, file), code: coded.code, err: error }, `NVRAM device ${name} could not be restored: ${coded.message}; its files stay on disk as they are and it is offline`);
      }
    }
  }

  /** In a cluster: throws unless this node owns the mirrored device now (see `clustered`). */
  private checkOwner(name: string): void {
    if (!this.clustered) return;
    if (this.ownerCheck === undefined) {
      throw new RuntimeError('MS_NVRAM_FENCED', `device ${name}: the cluster has not confirmed this node as its owner yet`, { details: { device: name } });
    }
    this.ownerCheck(name);
  }

  /** Devices that were not restored at start, with the reason. */
  damaged(): DamagedJson[] {
    return [...this.damagedDevices.values()];
  }

  private refuseDamaged(name: string): void {
    const damaged = this.damagedDevices.get(name);
    if (damaged === undefined) return;
    throw new RuntimeError('MS_META_DAMAGED', `NVRAM device "${name}" was not restored at start (${damaged.error.code}: ${damaged.error.message}); repair or move away its files in ${this.dir}, then restart the node`, {
      details: { name, file: damaged.file },
    });
  }

  /** Vaults every device but `local` ones (they have their journal), closes all, gives their extents back. */
  async close(): Promise<void> {
    for (const entry of this.devices.values()) {
      try {
        // A recovering device knows less than its file or its partner: leave those be.
        if (isVaulted(entry.meta) && !entry.device.recovering) {
          await entry.device.quiesce();
          await this.vault(entry);
        }
      } catch (error) {
        this.log.error({ device: entry.meta.name, err: error }, 'vaulting an NVRAM device failed');
      }
      try {
        await entry.device.close();
      } catch (error) {
        this.log.error({ device: entry.meta.name, err: error }, 'closing an NVRAM device failed: records acknowledged without a sync (a write log\'s plain writes) may be missing from its journal');
      }
      this.partition.release(entry.meta.medium, entry.extents, owner(entry.meta.name));
    }
    this.devices.clear();
  }

  list(): DeviceInfo[] {
    return [...this.devices.values()].map((e) => this.info(e.device)).sort((a, b) => a.name.localeCompare(b.name));
  }

  /** A device's info, with the journals kept aside for it. */
  info(device: NvramDevice): DeviceInfo {
    return { ...device.info(), diverged: this.divergedCount.get(device.name) ?? 0 };
  }

  get(name: string): NvramDevice {
    const entry = this.devices.get(name);
    if (entry === undefined) throw new MisuseError('MS_NVRAM_NOT_FOUND', `no NVRAM device named "${name}"`, { details: { name } });
    return entry.device;
  }

  find(name: string): NvramDevice | undefined {
    return this.devices.get(name)?.device;
  }

  devicesList(): NvramDevice[] {
    return [...this.devices.values()].map((e) => e.device);
  }

  mediumOf(name: string): MediumName {
    return this.devices.get(name)?.meta.medium ?? 'dram';
  }

  /**
   * Opens a device for a writer. On a replica, a newer epoch than the replica's takes the
   * device over (failover): it becomes the primary here and mirrors back to the partner.
   */
  openJournal(name: string, epoch: number): Promise<DeviceInfo> {
    const device = this.get(name);
    if (device.role === 'replica' && device.nodeOwned) {
      // The partner's volume replays this journal: a client taking it over would fence the node's own writes.
      return Promise.reject(new MisuseError('MS_NVRAM_INVALID', `NVRAM device ${name} is the replica of a write log of the mirror partner's volume and is not open to clients`, { details: { name } }));
    }
    if (device.role === 'primary' || !Number.isSafeInteger(epoch) || epoch <= device.epoch || device.recovering) return device.open(epoch);
    if (this.clustered) {
      return Promise.reject(new RuntimeError('MS_NVRAM_REPLICA', `device ${name} is a replica here; in a cluster its primary is chosen through etcd (it takes over by itself when its primary's lease ends), not by an open with a newer epoch`, { details: { device: name } }));
    }
    return this.serialized(async () => {
      if (device.role === 'replica' && epoch > device.epoch && !device.recovering) {
        // Fence the old primary first: its APPENDs in flight land before the snapshot, and
        // later ones are refused, so the new journal file holds every record the replica
        // took. (If the promotion fails, the client opens again with a newer epoch.)
        device.raiseEpoch(epoch);
        await device.settleReplication();
        const old = device.promote(await this.rebuildJournal(device));
        await old?.close();
        const entry = this.devices.get(name);
        if (entry !== undefined) {
          entry.meta.role = 'primary';
          await this.writeMeta(entry.meta);
        }
        this.log.warn({ device: name, epoch, records: device.info().records, lastSeq: device.info().lastSeq }, 'NVRAM replica taken over by a newer epoch: this node is now its primary');
        this.onPrimary?.(device);
      }
      return device.open(epoch);
    });
  }

  /**
   * The cluster made this node the device's primary (its old primary's lease ended): the
   * replica becomes the primary here, at its epoch (failover fences no writer; the old
   * primary is fenced by its lease), with a journal file of what it holds, and mirrors
   * back to its partner. Idempotent.
   */
  promoteByCluster(name: string): Promise<void> {
    return this.serialized(async () => {
      const entry = this.devices.get(name);
      if (entry === undefined || entry.device.role === 'primary') return;
      const device = entry.device;
      if (device.recovering) throw new RuntimeError('MS_NVRAM_RECOVERING', `device ${name}: this replica is stale (recovering) and cannot become the primary`, { details: { device: name } });
      // Records a connection of the old primary is still applying land before the snapshot.
      await device.settleReplication();
      const old = device.promote(await this.rebuildJournal(device));
      await old?.close();
      entry.meta.role = 'primary';
      await this.writeMeta(entry.meta);
      this.log.warn({ device: name, epoch: device.epoch, records: device.info().records, lastSeq: device.info().lastSeq }, 'the cluster made this node the primary of an NVRAM device: its primary\'s lease ended');
      this.onPrimary?.(device);
    });
  }

  /**
   * The cluster made another node the device's primary, and that node holds it: this
   * copy stops serving (recovering) without being put aside yet. The new primary's
   * resync demotes it (its RESET is taken by a recovering primary); should the new
   * primary hand the device back instead (it crashed before its promotion was durable),
   * this copy, the full one, serves again once its own resync has run.
   */
  stepAside(name: string, why: string): void {
    const device = this.find(name);
    if (device === undefined || device.role !== 'primary' || device.recovering) return;
    device.recovering = true;
    this.log.warn({ device: name, why }, 'NVRAM device steps aside: another node is its primary now');
  }

  /**
   * The journal options of `name`'s file: the shared ones, and its sync times into
   * `syncLatency` while the device exists (a removed one's last syncs, as it closes, would
   * bring its series back).
   */
  private journalOptionsOf(name: string): JournalOptions {
    return {
      ...this.journalOptions,
      onSync: (seconds) => {
        if (this.devices.has(name)) this.syncLatency.record(name, seconds);
      },
    };
  }

  /**
   * Writes a new journal file holding the device's present contents, for a device that
   * is becoming a primary or adopting its partner's contents. Undefined for a policy
   * without a file.
   */
  async rebuildJournal(device: NvramDevice): Promise<JournalFile | undefined> {
    if (device.policy === 'volatile') return undefined;
    const records = await device.snapshot();
    return JournalFile.create(deviceFile(this.dir, device.name, '.journal'), device.size, { ...this.journalOptionsOf(device.name), records: Buffer.concat(records) });
  }

  /**
   * An operator ends a mirrored primary's wait for its partner (device.acceptLocal): it
   * serves its own journal file under a newer epoch. Logged at warn: records only the
   * partner held are given up.
   */
  async acceptLocal(name: string): Promise<DeviceInfo> {
    // Not in this manager's queue: the acceptance waits for a resync under way, which may
    // itself need the queue (a demotion).
    const device = this.get(name);
    const epoch = await device.acceptLocal();
    this.log.warn({ device: name, epoch, lastSeq: device.info().lastSeq }, 'NVRAM device accepted without its mirror partner: it serves its own journal file, and records only the partner held are given up');
    return this.info(device);
  }

  /** This node's copy is older than the partner's: it becomes a replica, filled by the partner's resync. */
  demote(name: string, why: string): Promise<void> {
    return this.serialized(async () => {
      const entry = this.devices.get(name);
      if (entry === undefined || entry.device.role === 'replica') return;
      await this.demoteEntry(entry, why);
    });
  }

  private async demoteEntry(entry: Entry, why: string): Promise<void> {
    const info = entry.device.info();
    await entry.device.demote();
    await this.quarantine(entry.meta.name, info, why);
    entry.meta.role = 'replica';
    await this.writeMeta(entry.meta);
    this.log.warn({ device: entry.meta.name, why }, 'NVRAM device is now a replica of the mirror partner');
  }

  /**
   * Makes `name` an empty replica at the primary's epoch and trim point (mirror RESET),
   * creating it when this node has none. Refuses when a device of that name here is not
   * the same mirrored device, or knows a newer epoch.
   */
  resetReplica(reset: { name: string; policy: Policy; medium: MediumName; size: number; epoch: number; trimmedTo: number; firstSeq: number; nodeOwned?: boolean }, feeder?: object): Promise<void> {
    return this.serialized(async () => {
      deviceFile(this.dir, reset.name, '.json'); // refuses a name that is not a device name
      this.refuseDamaged(reset.name);
      if (reset.size > MAX_JOURNALED_DEVICE) {
        // A replica may become the primary and then keeps a journal file: the same bound.
        throw new MisuseError('MS_NVRAM_INVALID', `device ${reset.name}: a replica of ${reset.size} bytes could not keep a journal file if promoted (at most ${MAX_JOURNALED_DEVICE} bytes)`);
      }
      let entry = this.devices.get(reset.name);
      if (entry !== undefined) {
        const device = entry.device;
        if (entry.meta.policy !== reset.policy) {
          throw new RuntimeError('MS_MIRROR_CONFLICT', `device ${reset.name} here has policy ${entry.meta.policy}, not ${reset.policy}; it is not a replica of the partner's`);
        }
        if (reset.epoch < device.epoch) {
          throw new RuntimeError('MS_NVRAM_FENCED', `device ${reset.name}: epoch ${reset.epoch} is fenced by epoch ${device.epoch} here`, { details: { device: reset.name, epoch: reset.epoch, current: device.epoch } });
        }
        if (device.role === 'primary' && !device.recovering && reset.epoch === device.epoch) {
          throw new RuntimeError('MS_MIRROR_CONFLICT', `device ${reset.name} is a primary here at the same epoch ${device.epoch}; open one of them with a newer epoch to decide`);
        }
        if (entry.meta.size !== reset.size) {
          if (device.role === 'primary') await this.quarantine(reset.name, device.info(), `the partner resyncs it with another size (${reset.size})`);
          await this.drop(entry);
          entry = undefined;
        } else if (device.role === 'primary') {
          await this.demoteEntry(entry, `the partner resyncs it with epoch ${reset.epoch}`);
        }
      }
      if (entry === undefined) {
        const medium = this.media.has(reset.medium) ? reset.medium : 'dram';
        const meta: DeviceMeta = { name: reset.name, size: reset.size, policy: reset.policy, medium, role: 'replica', createdAt: new Date().toISOString() };
        await this.load(meta, true);
        await this.writeMeta(meta);
        entry = this.devices.get(reset.name);
      }
      // Records an older connection is still applying land before the reset, never after it.
      await entry?.device.settleReplication();
      const nodeOwned = reset.nodeOwned === true;
      if (entry !== undefined && (entry.meta.nodeOwned === true) !== nodeOwned) {
        // Kept in the metadata: a restart must not let a client take over a write log's replica.
        if (nodeOwned) entry.meta.nodeOwned = true;
        else delete entry.meta.nodeOwned;
        await this.writeMeta(entry.meta);
      }
      entry?.device.resetReplica(reset.epoch, reset.trimmedTo, reset.firstSeq, feeder, nodeOwned);
      this.resetsTaken.set(reset.name, (this.resetsTaken.get(reset.name) ?? 0) + 1);
    });
  }

  /** How many RESETs the replica `name` has taken (see discardStale). */
  resetCount(name: string): number {
    return this.resetsTaken.get(name) ?? 0;
  }

  /**
   * Removes a copy the cluster no longer names (ownership.ts): a replica, or a primary that
   * stepped aside. Only when no RESET reached it since `resets` was read (a partner that
   * named this node again meanwhile is filling it) and it is no volume's write log. A
   * primary's journal is kept aside first, as at any demotion. False when it stays.
   */
  discardStale(name: string, resets: number, why: string): Promise<boolean> {
    return this.serialized(async () => {
      const entry = this.devices.get(name);
      if (entry === undefined || this.resetCount(name) !== resets || this.claimedBy?.(name) !== undefined) return false;
      const device = entry.device;
      if (device.role === 'primary' && !device.recovering) return false;
      if (device.role === 'primary') await this.quarantine(name, device.info(), why);
      await this.drop(entry);
      this.log.warn({ device: name, role: device.role, why }, 'NVRAM copy removed: the cluster no longer names this node for it');
      return true;
    });
  }
  create(name: string, size: number, policy: Policy, medium: MediumName = 'dram'): Promise<DeviceInfo> {
    return this.serialized(async () => {
      if (!NAME_PATTERN.test(name)) throw new MisuseError('MS_NVRAM_INVALID', `invalid device name "${name}": expected 1 to 64 letters, digits, ".", "_" or "-"`);
      if (!POLICIES.includes(policy)) throw new MisuseError('MS_NVRAM_INVALID', `invalid policy "${policy}": expected one of ${POLICIES.join(', ')}`);
      if (!this.media.has(medium)) throw new MisuseError('MS_NVRAM_INVALID', `this node has no ${medium} medium`);
      if (!Number.isSafeInteger(size) || size < 4096) throw new MisuseError('MS_NVRAM_INVALID', `invalid device size ${size}: expected at least 4096 bytes`);
      if (policy !== 'volatile' && size > MAX_JOURNALED_DEVICE) {
        throw new MisuseError('MS_NVRAM_INVALID', `invalid device size ${size}: a ${policy} device keeps a journal file and holds at most ${MAX_JOURNALED_DEVICE} bytes (1 GiB)`);
      }
      if (this.devices.has(name)) throw new MisuseError('MS_NVRAM_EXISTS', `NVRAM device "${name}" already exists`);
      this.refuseDamaged(name);
      const extentSize = this.partition.extentSize(medium);
      const rounded = Math.ceil(size / extentSize) * extentSize;
      const meta: DeviceMeta = { name, size: rounded, policy, medium, role: 'primary', createdAt: new Date().toISOString() };
      const info = await this.load(meta, true);
      await this.writeMeta(meta);
      const device = this.devices.get(name)?.device;
      if (device !== undefined && isMirrored(policy)) this.onPrimary?.(device);
      return device?.info() ?? info;
    });
  }

  remove(name: string): Promise<void> {
    return this.serialized(async () => {
      const entry = this.devices.get(name);
      if (entry === undefined) this.refuseDamaged(name);
      if (entry === undefined) throw new MisuseError('MS_NVRAM_NOT_FOUND', `no NVRAM device named "${name}"`);
      const volume = this.claimedBy?.(name);
      if (volume !== undefined) throw new MisuseError('MS_NVRAM_INVALID', `NVRAM device ${name} is the write log of volume ${volume}; remove the volume first`, { details: { name, volume } });
      await this.drop(entry);
      if (isMirrored(entry.meta.policy) && entry.device.role === 'primary') this.onRemoved?.(entry.device);
    });
  }

  /**
   * Keeps a primary's journal file when the partner's copy replaces it: it may hold
   * records this node acknowledged that the partner never had (a partition under
   * `degrade`). Renamed to nvram/<name>.diverged-<ms>, never removed by the node; logged
   * at error; listed by `divergedOf`, `memstrata nvram list` and the metrics, and read by
   * `memstrata nvram dump --diverged`.
   */
  private async quarantine(name: string, info: DeviceInfo, why: string): Promise<void> {
    const journal = deviceFile(this.dir, name, '.journal');
    const kept = await this.asideName(name);
    try {
      await rename(journal, kept);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return; // no file: nothing it alone held
      throw error;
    }
    await syncDir(kept);
    this.divergedCount.set(name, (this.divergedCount.get(name) ?? 0) + 1);
    this.log.error(
      { device: name, file: kept, lastSeq: info.lastSeq, epoch: info.epoch, why },
      `NVRAM device ${name}: this node's journal is replaced by the partner's copy (${why}); it may hold records acknowledged here that the partner never had. Kept as ${kept}; see memstrata nvram dump --diverged ${name}`,
    );
  }

  /** A name for a journal kept aside that no file has yet (two in one millisecond, or a clock stepped back, do not collide). */
  private async asideName(name: string): Promise<string> {
    const taken = new Set(await readdir(this.dir));
    let stamp = Date.now();
    while (taken.has(`${name}.diverged-${stamp}`)) stamp++;
    return deviceFile(this.dir, name, `.diverged-${stamp}`);
  }

  /** Every journal kept aside, by device name (existing or removed), oldest first. */
  async divergedJournals(): Promise<DivergedJson[]> {
    const files = await readdir(this.dir);
    return [...this.divergedCount.keys()].sort().map((name) => ({ name, files: divergedFiles(files, name).map((f) => join(this.dir, f)) })).filter((d) => d.files.length > 0);
  }

  /** How many journals are kept aside per device name; for the metrics. */
  divergedCounts(): ReadonlyMap<string, number> {
    return this.divergedCount;
  }

  /** Quarantined journals of a device (newest last), as kept by `quarantine`. */
  async divergedOf(name: string): Promise<string[]> {
    return divergedFiles(await readdir(this.dir), name).map((f) => join(this.dir, f));
  }

  /** User records of the newest quarantined journal of `name`, from `fromSeq`, at most `max`. */
  async divergedRecords(name: string, fromSeq: number, max: number): Promise<{ file: string; records: JournalRecord[] }> {
    const file = (await this.divergedOf(name)).at(-1);
    if (file === undefined) throw new MisuseError('MS_NVRAM_NOT_FOUND', `NVRAM device ${name} has no diverged journal kept aside`, { details: { name } });
    const records = parseJournal((await readJournalFile(file)) ?? Buffer.alloc(0)).records.filter((r) => (r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) === 0 && r.seq >= fromSeq);
    return { file, records: records.slice(0, max) };
  }

  /** Closes a device, zeroes and returns its extents, and removes its files. */
  private async drop(entry: Entry): Promise<void> {
    const name = entry.meta.name;
    {
      this.devices.delete(name);
      this.syncLatency.forget(name);
      // Its records are being removed with it: a failure to write the last of them is moot.
      await entry.device.close().catch(() => undefined);
      // Zero the memory before it goes back: the next owner must not read these records.
      const medium = this.medium(entry.meta.medium);
      const extentSize = this.partition.extentSize(entry.meta.medium);
      for (const e of entry.extents) await medium.zero(e * extentSize, extentSize);
      this.partition.release(entry.meta.medium, entry.extents, owner(name));
      for (const suffix of ['.json', '.journal', '.vault'] as const) await rm(deviceFile(this.dir, name, suffix), { force: true });
    }
  }

  private async load(meta: DeviceMeta, fresh: boolean): Promise<DeviceInfo> {
    const medium = this.medium(meta.medium);
    const extentSize = this.partition.extentSize(meta.medium);
    const extents = await this.takeExtents(meta, extentSize);
    let journal: JournalFile | undefined;
    try {
      const journalPath = deviceFile(this.dir, meta.name, '.journal');
      const vaultPath = deviceFile(this.dir, meta.name, '.vault');
      const role = meta.role ?? 'primary';
      const hasFile = meta.policy !== 'volatile' && role === 'primary';
      let records: JournalRecord[] = [];
      let base = { epoch: 0, trimmedTo: 0 };
      let recovering = false;
      let vaulted = false;
      if (fresh) {
        if (hasFile) journal = await JournalFile.create(journalPath, meta.size, this.journalOptionsOf(meta.name));
      } else {
        const vault = isVaulted(meta) ? await readIfThere(vaultPath) : undefined;
        if (vault !== undefined) {
          const recovered = parseJournal(vault);
          refuseDamage(meta.name, vaultPath, recovered);
          records = recovered.records;
          vaulted = true;
        } else if (hasFile) {
          const image = (await readIfThere(journalPath)) ?? Buffer.alloc(0);
          const recovered = parseJournal(image);
          if (recovered.validAfter !== undefined && meta.policy === 'mirrored') {
            // A `mirrored` file is written without a sync (the partner held each record
            // when it was acknowledged), so a power cut may leave it with holes. Keep the
            // file as it was, cut it, and take the records from the partner (recovering).
            const kept = await this.asideName(meta.name);
            await copyFile(journalPath, kept);
            await syncDir(kept);
            this.divergedCount.set(meta.name, (this.divergedCount.get(meta.name) ?? 0) + 1);
            this.log.warn({ device: meta.name, file: journalPath, damagedAt: recovered.validLength, validAfter: recovered.validAfter, keptAs: kept }, 'mirrored NVRAM journal damaged in the middle (an unsynced write lost to a power cut?); a copy is kept aside, the file is cut there, and the partner supplies the rest');
          } else {
            refuseDamage(meta.name, journalPath, recovered);
          }
          journal = await JournalFile.open(journalPath, recovered, meta.size, this.journalOptionsOf(meta.name));
          if (recovered.version === 1) {
            if (recovered.stoppedBecause !== undefined) this.log.warn({ device: meta.name, cutAt: recovered.validLength, reason: recovered.stoppedBecause }, 'NVRAM journal tail cut at recovery');
            this.log.info({ device: meta.name, file: journalPath }, 'NVRAM journal of format version 1 rewritten as version 2');
          }
          records = recovered.records;
          base = recovered.base;
          // `mirrored` acknowledges before its file is synced: the partner may hold more.
          recovering = meta.policy === 'mirrored';
        } else {
          // A volatile device after a crash is empty, as its policy says; a replica is
          // stale until its primary resyncs it.
          recovering = role === 'replica';
        }
      }
      const device = new NvramDevice({
        name: meta.name,
        size: meta.size,
        policy: meta.policy,
        medium,
        extents: extents.map((e) => e * extentSize),
        extentSize,
        journal,
        role,
        staging: this.staging,
      });
      if (isMirrored(meta.policy)) device.owner = () => { this.checkOwner(meta.name); };
      await device.restore(records, base);
      // After a clean stop the vault is the truth; a primary's journal file is rewritten from it.
      if (vaulted && hasFile) {
        journal = await this.rebuildJournal(device);
        device.promote(journal);
      }
      device.recovering = recovering;
      device.nodeOwned = role === 'replica' && meta.nodeOwned === true;
      await rm(vaultPath, { force: true });
      // Durably, before the device serves: a vault that came back after a crash would be
      // preferred to the journal written since, and hand out its numbers again.
      if (vaulted) await syncDir(vaultPath);
      this.devices.set(meta.name, { meta, device, extents });
      const info = device.info();
      this.log.info(
        { device: meta.name, policy: meta.policy, role, size: meta.size, records: info.records, lastSeq: info.lastSeq, epoch: info.epoch, state: info.state },
        fresh ? (role === 'replica' ? 'NVRAM replica created' : 'NVRAM device created') : 'NVRAM device restored',
      );
      return info;
    } catch (error) {
      // The journal opened before the failure (a restore refused, say) is closed: no descriptor is left behind.
      await journal?.close().catch(() => undefined);
      this.partition.release(meta.medium, extents, owner(meta.name));
      throw error;
    }
  }

  private async takeExtents(meta: DeviceMeta, extentSize: number): Promise<number[]> {
    const count = meta.size / extentSize;
    const map = this.partition.extents(meta.medium);
    const missing = count - map.idleOf('nvram');
    if (missing > 0) {
      try {
        await this.partition.resize(meta.medium, 'nvram', (map.countOf('nvram') + missing) * extentSize);
      } catch (error) {
        const why = isMemstrataError(error) ? error.message : String(error);
        throw new RuntimeError('MS_NVRAM_NO_CAPACITY', `no room for NVRAM device ${meta.name} (${formatSize(meta.size)}) on ${meta.medium}: ${why}`, { cause: error });
      }
    }
    return this.partition.assign(meta.medium, 'nvram', owner(meta.name), meta.size);
  }

  private async vault(entry: Entry): Promise<void> {
    const records = await entry.device.snapshot();
    const path = deviceFile(this.dir, entry.meta.name, '.vault');
    const tmp = `${path}.tmp`;
    const out = await openTempFile(tmp);
    try {
      await out.writeFile(Buffer.concat([encodeFileHeader(entry.meta.size, Date.now()), ...records]));
      await out.datasync();
    } finally {
      await out.close();
    }
    await rename(tmp, path);
    await syncDir(path);
  }

  private writeMeta(meta: DeviceMeta): Promise<void> {
    return writeDeviceMeta(this.dir, meta, this.fs);
  }

  private medium(name: MediumName): Medium {
    const medium = this.media.get(name);
    if (medium === undefined) throw new MisuseError('MS_NVRAM_INVALID', `this node has no ${name} medium`);
    return medium;
  }

  private serialized<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn);
    this.queue = run.catch(() => undefined);
    return run;
  }
}

/** A file's bytes, or undefined when there is none; any other failure to read it is an error (never "empty"). */
async function readIfThere(path: string): Promise<Buffer | undefined> {
  try {
    return await readJournalFile(path);
  } catch (error) {
    throw new StorageError('MS_MEDIUM_IO', `cannot read ${path}: ${(error as Error).message}; the device stays offline and its files as they are`, { cause: error });
  }
}

/**
 * A file damaged in the middle (a record that fails its checks, or a gap in the numbers,
 * with valid records after it) is not cut: cutting would drop acknowledged records
 * without a word. The device stays offline and the file as it is (MS_NVRAM_DAMAGED).
 */
function refuseDamage(name: string, file: string, recovered: Recovered): void {
  if (recovered.validAfter === undefined) return;
  throw new RuntimeError(
    'MS_NVRAM_DAMAGED',
    `NVRAM device ${name}: ${file} is damaged at byte ${recovered.validLength} (${recovered.stoppedBecause ?? 'unreadable'}), and valid records follow at byte ${recovered.validAfter}; the device is offline and the file is kept as it is. The records read before the damage are intact: to serve them and drop the rest, stop the node, run memstrata nvram cut-journal ${file} (copy the file aside first to keep what is dropped) and start it again`,
    { details: { device: name, file, damagedAt: recovered.validLength, validAfter: recovered.validAfter } },
  );
}

/** Devices whose contents a clean stop writes to a vault: all but those with a synced journal file. */
function isVaulted(meta: DeviceMeta): boolean {
  return meta.role === 'replica' || meta.policy === 'volatile' || meta.policy === 'mirrored';
}

function owner(name: string): string {
  return `nvram:${name}`;
}
