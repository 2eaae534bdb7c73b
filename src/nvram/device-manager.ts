// NVRAM devices of a node: their extents in the `nvram` partition, their files, and
// what happens to their contents across stops.
//
//   nvram/<name>.json      {"name","size","policy","medium","createdAt","version":1}
//   nvram/<name>.journal   the journal file of a `local` device (journal-file.ts)
//   nvram/<name>.vault     every live record of a device, written on a clean stop
//
// Start: each device takes its extents again and is filled from its journal (`local`;
// a torn tail is cut) or from its vault (`volatile`, after a clean stop; after a crash a
// volatile device starts empty, as its policy says). The vault is removed once read.
// Stop: every volatile device is vaulted (write, fsync, rename, fsync of the directory);
// every device is closed and its extents go back to the partition table.

import { mkdir, readFile, readdir, rename, rm, writeFile, open } from 'node:fs/promises';
import { join } from 'node:path';
import { MisuseError, RuntimeError, isMemstrataError } from '../errors.js';
import type { MediumName } from '../memory/kinds.js';
import type { Medium } from '../memory/medium.js';
import type { PartitionTable } from '../memory/partition-table.js';
import type { Logger } from '../node/logger.js';
import { formatSize } from '../units.js';
import { NvramDevice, POLICIES, type DeviceInfo, type Policy } from './device.js';
import { JournalFile, encodeFileHeader, parseJournal, syncDir } from './journal-file.js';
import type { JournalRecord } from './record.js';

const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

interface DeviceMeta {
  name: string;
  size: number;
  policy: Policy;
  medium: MediumName;
  createdAt: string;
}

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
  private queue: Promise<unknown>;

  private readonly compactAt: number | undefined;

  constructor(options: { dataDir: string; partition: PartitionTable; media: readonly Medium[]; log: Logger; compactAt?: number }) {
    this.compactAt = options.compactAt;
    this.dir = join(options.dataDir, 'nvram');
    this.partition = options.partition;
    this.media = new Map(options.media.map((m) => [m.name, m]));
    this.log = options.log;
    this.devices = new Map();
    this.queue = Promise.resolve();
  }

  async open(): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    for (const file of (await readdir(this.dir)).filter((f) => f.endsWith('.json')).sort()) {
      const meta = JSON.parse(await readFile(join(this.dir, file), 'utf8')) as DeviceMeta;
      try {
        await this.load(meta, false);
      } catch (error) {
        this.log.error({ device: meta.name, err: error }, 'NVRAM device could not be restored; it stays on disk and offline');
      }
    }
  }

  /** Vaults every volatile device (a local one has its journal), closes all, gives their extents back. */
  async close(): Promise<void> {
    for (const entry of this.devices.values()) {
      try {
        if (entry.meta.policy === 'volatile') await this.vault(entry);
      } catch (error) {
        this.log.error({ device: entry.meta.name, err: error }, 'vaulting an NVRAM device failed');
      }
      await entry.device.close();
      this.partition.release(entry.meta.medium, entry.extents, owner(entry.meta.name));
    }
    this.devices.clear();
  }

  list(): DeviceInfo[] {
    return [...this.devices.values()].map((e) => e.device.info()).sort((a, b) => a.name.localeCompare(b.name));
  }

  get(name: string): NvramDevice {
    const entry = this.devices.get(name);
    if (entry === undefined) throw new MisuseError('MS_NVRAM_NOT_FOUND', `no NVRAM device named "${name}"`, { details: { name } });
    return entry.device;
  }

  create(name: string, size: number, policy: Policy, medium: MediumName = 'dram'): Promise<DeviceInfo> {
    return this.serialized(async () => {
      if (!NAME_PATTERN.test(name)) throw new MisuseError('MS_NVRAM_INVALID', `invalid device name "${name}": expected 1 to 64 letters, digits, ".", "_" or "-"`);
      if (!POLICIES.includes(policy)) throw new MisuseError('MS_NVRAM_INVALID', `invalid policy "${policy}": expected one of ${POLICIES.join(', ')}`);
      if (!this.media.has(medium)) throw new MisuseError('MS_NVRAM_INVALID', `this node has no ${medium} medium`);
      if (!Number.isSafeInteger(size) || size < 4096) throw new MisuseError('MS_NVRAM_INVALID', `invalid device size ${size}: expected at least 4096 bytes`);
      if (this.devices.has(name)) throw new MisuseError('MS_NVRAM_EXISTS', `NVRAM device "${name}" already exists`);
      const extentSize = this.partition.extentSize(medium);
      const rounded = Math.ceil(size / extentSize) * extentSize;
      const meta: DeviceMeta = { name, size: rounded, policy, medium, createdAt: new Date().toISOString() };
      const info = await this.load(meta, true);
      await this.writeMeta(meta);
      return info;
    });
  }

  remove(name: string): Promise<void> {
    return this.serialized(async () => {
      const entry = this.devices.get(name);
      if (entry === undefined) throw new MisuseError('MS_NVRAM_NOT_FOUND', `no NVRAM device named "${name}"`);
      this.devices.delete(name);
      await entry.device.close();
      // Zero the memory before it goes back: the next owner must not read these records.
      const medium = this.medium(entry.meta.medium);
      const extentSize = this.partition.extentSize(entry.meta.medium);
      for (const e of entry.extents) await medium.zero(e * extentSize, extentSize);
      this.partition.release(entry.meta.medium, entry.extents, owner(name));
      for (const suffix of ['.json', '.journal', '.vault']) await rm(join(this.dir, `${name}${suffix}`), { force: true });
    });
  }

  private async load(meta: DeviceMeta, fresh: boolean): Promise<DeviceInfo> {
    const medium = this.medium(meta.medium);
    const extentSize = this.partition.extentSize(meta.medium);
    const extents = await this.takeExtents(meta, extentSize);
    try {
      const journalPath = join(this.dir, `${meta.name}.journal`);
      let journal: JournalFile | undefined;
      let records: JournalRecord[] | undefined = fresh ? [] : undefined;
      if (meta.policy === 'local') {
        if (fresh) {
          journal = await JournalFile.create(journalPath, meta.size);
        } else {
          const image = await readFile(journalPath).catch(() => Buffer.alloc(0));
          const recovered = parseJournal(image);
          if (recovered.validLength === 0) journal = await JournalFile.create(journalPath, meta.size);
          else journal = await JournalFile.openExisting(journalPath, recovered.validLength);
          if (recovered.stoppedBecause !== undefined && recovered.validLength < image.length) {
            this.log.warn({ device: meta.name, cutAt: recovered.validLength, reason: recovered.stoppedBecause }, 'NVRAM journal tail cut at recovery');
          }
          records = recovered.records;
        }
      }
      const vaultPath = join(this.dir, `${meta.name}.vault`);
      if (records === undefined) {
        // A volatile device: only a clean stop's vault carries its contents over.
        const vault = parseJournal(await readFile(vaultPath).catch(() => Buffer.alloc(0)));
        records = vault.records;
      }
      await rm(vaultPath, { force: true });
      const device = new NvramDevice({
        name: meta.name,
        size: meta.size,
        policy: meta.policy,
        medium,
        extents: extents.map((e) => e * extentSize),
        extentSize,
        journal,
        ...(this.compactAt === undefined ? {} : { compactAt: this.compactAt }),
      });
      await device.restore(records);
      this.devices.set(meta.name, { meta, device, extents });
      const info = device.info();
      this.log.info({ device: meta.name, policy: meta.policy, size: meta.size, records: info.records, lastSeq: info.lastSeq, epoch: info.epoch }, fresh ? 'NVRAM device created' : 'NVRAM device restored');
      return info;
    } catch (error) {
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
    const path = join(this.dir, `${entry.meta.name}.vault`);
    const tmp = `${path}.tmp`;
    const out = await open(tmp, 'w', 0o600);
    try {
      await out.writeFile(Buffer.concat([encodeFileHeader(entry.meta.size, Date.now()), ...records]));
      await out.datasync();
    } finally {
      await out.close();
    }
    await rename(tmp, path);
    await syncDir(path);
  }

  private async writeMeta(meta: DeviceMeta): Promise<void> {
    const path = join(this.dir, `${meta.name}.json`);
    await writeFile(`${path}.tmp`, `${JSON.stringify({ ...meta, version: 1 })}\n`);
    await rename(`${path}.tmp`, path);
    await syncDir(path);
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

function owner(name: string): string {
  return `nvram:${name}`;
}
