// Volumes: named, sized, optionally read-only block devices, each an NBD export, each
// backed by a DataStore in <dataDir>/volumes.
//
//   volumes/<name>.json   metadata (volume-meta.ts), validated on load, replaced durably
//   volumes/<name>.img    data (DataStore)
//   volumes/<name>.zmap   zero map (DataStore)
//
// The `default` volume (1 GiB unless configured) is made on first start; the empty NBD
// export name selects it. A volume with clients connected cannot be removed or shrunk.
//
// Damaged volumes: a volume whose metadata fails to load (MS_META_INVALID) or whose data
// store cannot be opened is not served, and its files are left exactly as they are; the
// node logs it at error and starts the rest. It is listed by damaged() (volume list,
// status) with its error, and its name stays taken: create, resize and remove answer
// MS_META_DAMAGED, and the default volume is not made again over a damaged one, so
// nothing ever writes over the files an operator may repair. A repaired volume comes
// back at the next start.
//
// Orphans: create makes the data files before the metadata, and remove deletes the
// metadata before the data files, so a crash in between leaves <name>.img or
// <name>.zmap without <name>.json: a volume that was never acknowledged, or one being
// removed. Such a file is never deleted and never reused: at start (and at a create of
// that name) it is renamed to <file>.orphan-<time>, logged at warn and listed by
// orphans() (volume list, status) for as long as it stays in the directory, and the
// name is free again, so a crash in the middle of creating `default` cannot keep the
// node from starting.
//
// Size: the data file's length is the volume's size. A resize truncates the file first
// and writes the metadata last, so after a crash in between the two disagree; the file
// wins, the metadata is rewritten durably, and the log says so at warn. A data file whose
// length is no volume size (zero, not whole 4 KiB pages, over MAX_VOLUME_SIZE), or that
// is not a regular file, sets the volume aside as damaged.

import { lstat, mkdir, readdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { MisuseError, RuntimeError, StorageError, toMemstrataError, type MemstrataError } from '../errors.js';
import { metaInvalid, syncDirectory, type MetaFs } from '../fs/meta-file.js';
import type { Logger } from '../logger.js';
import { formatSize } from '../units.js';
import { DataStore } from './data-store.js';
import { MAX_VOLUME_SIZE, NAME_PATTERN, SECTOR, VOLUME_NAME_FORM, readVolumeMeta, volumeMetaPath, writeVolumeMeta } from './volume-meta.js';
import type { VolumeStore } from './volume-store.js';
import type { DamagedJson, OrphanJson, VolumeInfo } from '../protocol/admin/api.js';
export type { VolumeInfo };
export { MAX_VOLUME_SIZE, SECTOR, VOLUME_NAME_FORM };

export const DEFAULT_VOLUME = 'default';

/** The files of a volume besides its metadata; without the metadata they are orphans. */
const DATA_SUFFIXES = ['.img', '.zmap'] as const;
/** An orphan moved aside: `<name>.img.orphan-<time>` or `<name>.zmap.orphan-<time>`. */
const ORPHAN_PATTERN = /^(.+)\.(?:img|zmap)\.orphan-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d-\d{3}Z(?:-\d+)?$/;

export class Volume {
  readonly name: string;
  readonly readOnly: boolean;
  readonly createdAt: string;
  readonly store: VolumeStore;
  /** The NVRAM device that journals this volume's writes (FUA and FLUSH then cost a journal append). */
  readonly writeLog: string | undefined;
  connections: number;
  /**
   * Set by the write log (write-log.ts): makes durable the journal records of writes
   * acknowledged so far, and of those over the range that are on their way. The cache
   * calls it with the range (a line) before it writes dirty data of it back to the
   * store, so a record never reaches the disk after the data it describes (write-ahead):
   * otherwise a replay after a crash could put an older record over newer data.
   */
  logBarrier: ((offset: number, length: number) => Promise<void>) | undefined;
  /**
   * Set while the volume waits for its write log (a `mirrored` device after a crash) to
   * get back from the mirror partner what this node lost, and while the log is replayed:
   * the volume is not served (NBD answers that the export is unavailable) and cannot be
   * resized or removed. `why` says what it waits for, or what failed.
   */
  recovering: { why: string; removable?: boolean } | undefined;

  constructor(name: string, readOnly: boolean, createdAt: string, store: VolumeStore, writeLog?: string) {
    this.name = name;
    this.readOnly = readOnly;
    this.writeLog = writeLog;
    this.createdAt = createdAt;
    this.store = store;
    this.connections = 0;
    this.logBarrier = undefined;
    this.recovering = undefined;
  }

  get size(): number {
    return this.store.size;
  }

  /** Why the volume is fenced (read-only until the node restarts), or undefined. */
  get failure(): Error | undefined {
    return this.store.failure;
  }

  /** Throws MS_VOLUME_FENCED once a sync of the volume has failed: nothing written now could be made durable. */
  checkWritable(): void {
    const failure = this.store.failure;
    if (failure === undefined) return;
    throw new StorageError('MS_VOLUME_FENCED', `volume "${this.name}" is fenced since a sync failed (${failure.message}); it is read-only until the node restarts`, {
      cause: failure,
      details: { volume: this.name },
    });
  }

  /** Throws MS_VOLUME_RECOVERING while the volume waits for its write log (see `recovering`). */
  checkRecovered(): void {
    if (this.recovering === undefined) return;
    throw new RuntimeError('MS_VOLUME_RECOVERING', `volume "${this.name}" is recovering: ${this.recovering.why}`, { details: { volume: this.name } });
  }

  info(): VolumeInfo {
    return {
      name: this.name,
      size: this.size,
      readOnly: this.readOnly,
      createdAt: this.createdAt,
      connections: this.connections,
      writeLog: this.writeLog ?? null,
      state: this.recovering !== undefined ? 'recovering' : this.store.failure === undefined ? 'ready' : 'fenced',
      failure: this.recovering?.why ?? this.store.failure?.message ?? null,
    };
  }
}

export class VolumeManager {
  readonly dir: string;
  /** Called before a volume loses data (removed, or shrunk from `fromOffset`): the cache drops its lines. */
  onDrop: (volume: Volume, fromOffset: number) => Promise<void>;
  /** Called before a volume's size changes: its write log is checkpointed (write-log.ts). */
  beforeResize: (volume: Volume) => Promise<void>;
  /** Called before a volume is removed: its write log is emptied, so no record of it is replayed into another. */
  beforeRemove: (volume: Volume) => Promise<void>;
  /**
   * Makes an NVRAM device the write log of a new volume, or refuses it with a coded error
   * (write-log.ts `claim`); `releaseWriteLog` gives it back. Without them (no NVRAM on
   * this node) a volume with a write log is refused.
   */
  claimWriteLog: ((volume: string, device: string) => Promise<void>) | undefined;
  releaseWriteLog: (device: string) => void;
  private readonly volumes: Map<string, Volume>;
  /** Volumes found on disk but not loaded, by the name their files carry. */
  private readonly damagedVolumes: Map<string, DamagedJson>;
  /** Data files found without metadata and moved aside, by their new path. */
  private readonly orphanFiles: Map<string, OrphanJson>;
  private readonly log: Logger | undefined;
  private readonly fs: MetaFs | undefined;
  private queue: Promise<unknown>;

  constructor(dataDir: string, options: { log?: Logger; fs?: MetaFs } = {}) {
    this.dir = join(dataDir, 'volumes');
    this.onDrop = () => Promise.resolve();
    this.beforeResize = () => Promise.resolve();
    this.beforeRemove = () => Promise.resolve();
    this.claimWriteLog = undefined;
    this.releaseWriteLog = () => undefined;
    this.volumes = new Map();
    this.damagedVolumes = new Map();
    this.orphanFiles = new Map();
    this.log = options.log;
    this.fs = options.fs;
    this.queue = Promise.resolve();
  }

  /**
   * Opens every volume in the directory (a damaged one is set aside), moves data files
   * without metadata aside, and makes the default volume if there is none.
   */
  async open(defaultSize: number): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    const entries = (await readdir(this.dir)).sort();
    const metaNames = new Set(entries.filter((f) => f.endsWith('.json')).map((f) => f.slice(0, -'.json'.length)));
    for (const name of metaNames) {
      try {
        this.volumes.set(name, await this.load(name));
      } catch (error) {
        this.setAside(name, volumeMetaPath(this.dir, name), toMemstrataError(error));
      }
    }
    for (const entry of entries) {
      const orphan = ORPHAN_PATTERN.exec(entry);
      if (orphan !== null) this.orphanFiles.set(join(this.dir, entry), { name: orphan[1] ?? entry, file: join(this.dir, entry) });
    }
    if (this.orphanFiles.size > 0) {
      this.log?.warn({ files: [...this.orphanFiles.keys()] }, `${this.orphanFiles.size} volume file(s) set aside earlier without metadata are still in ${this.dir}; remove them once they are not needed`);
    }
    const orphaned = new Set(entries.flatMap((f) => DATA_SUFFIXES.filter((suffix) => f.endsWith(suffix)).map((suffix) => f.slice(0, -suffix.length))).filter((name) => !metaNames.has(name)));
    for (const name of orphaned) {
      // One file that cannot be moved keeps its name blocked (a create of it retries),
      // not the node from starting.
      await this.moveOrphansAside(name).catch((error: unknown) => {
        this.log?.error({ volume: name, err: error }, `volume files of ${name} without metadata could not be moved aside: ${(error as Error).message}`);
      });
    }
    if (!this.volumes.has(DEFAULT_VOLUME) && !this.damagedVolumes.has(DEFAULT_VOLUME)) await this.create(DEFAULT_VOLUME, defaultSize, false);
  }

  /**
   * Loads one volume. The data file must be a regular file (and the zero map, if any),
   * and its length is the size: a metadata size that disagrees (a resize cut short) is
   * rewritten to match.
   */
  private async load(name: string): Promise<Volume> {
    const meta = await readVolumeMeta(this.dir, name, this.fs);
    const img = join(this.dir, `${name}.img`);
    const fileSize = await regularFileSize(img, 'data file', false);
    await regularFileSize(join(this.dir, `${name}.zmap`), 'zero map', true);
    const path = volumeMetaPath(this.dir, name);
    if (fileSize !== meta.size && !validSize(fileSize)) {
      throw metaInvalid(path, 'volume metadata', 'size', `field size: ${meta.size} bytes, but the data file ${img} holds ${fileSize} bytes, which is no volume size (${SIZE_FORM}); the two cannot be reconciled`);
    }
    const store = new DataStore(img, fileSize);
    await store.open(false);
    const volume = new Volume(name, meta.readOnly, meta.createdAt, store, meta.writeLog);
    if (fileSize === meta.size) return volume;
    this.log?.warn(
      { volume: name, file: path, field: 'size', metaSize: meta.size, fileSize },
      `volume ${name}: field size of ${path} is ${meta.size} bytes but its data file ${img} holds ${fileSize} (a resize cut short by a crash); serving ${fileSize} bytes and rewriting the metadata`,
    );
    try {
      await this.writeMeta(volume);
    } catch (error) {
      await store.close().catch(() => undefined);
      throw error;
    }
    return volume;
  }

  /**
   * Renames `<name>.img` and `<name>.zmap`, which have no metadata, to a dated name
   * nothing else uses, durably, and lists them: the name is free again, and nothing is
   * deleted.
   */
  private async moveOrphansAside(name: string): Promise<void> {
    let moved = false;
    for (const suffix of DATA_SUFFIXES) {
      const from = join(this.dir, `${name}${suffix}`);
      if (!(await exists(from))) continue;
      const stamp = new Date().toISOString().replace(/[:.]/g, '-');
      let to = `${from}.orphan-${stamp}`;
      for (let n = 1; await exists(to); n++) to = `${from}.orphan-${stamp}-${n}`;
      try {
        await rename(from, to);
      } catch (error) {
        throw new StorageError('MS_DATA_DIR', `cannot move ${from}, a volume file without metadata, aside: ${(error as Error).message}`, { cause: error, details: { file: from } });
      }
      moved = true;
      this.orphanFiles.set(to, { name, file: to });
      this.log?.warn({ volume: name, file: from, movedTo: to }, `${from} has no metadata (${name}.json): a create or removal of volume ${name} was cut short; moved aside to ${to}, nothing is deleted`);
    }
    if (moved) await syncDirectory(this.dir, this.fs);
  }

  /** Volumes that were not loaded at start, with the reason. */
  damaged(): DamagedJson[] {
    return [...this.damagedVolumes.values()];
  }

  /** Volume files found without metadata and moved aside (at this start or an earlier one). */
  orphans(): OrphanJson[] {
    return [...this.orphanFiles.values()].sort((a, b) => a.file.localeCompare(b.file));
  }

  private setAside(name: string, file: string, error: MemstrataError): void {
    this.damagedVolumes.set(name, { name, file, error: error.toJSON() });
    this.log?.error({ volume: name, file, code: error.code, err: error }, `volume ${name} is not served: ${error.message}; its files are left as they are`);
  }

  private refuseDamaged(name: string): void {
    const damaged = this.damagedVolumes.get(name);
    if (damaged === undefined) return;
    throw new RuntimeError('MS_META_DAMAGED', `volume "${name}" was not loaded at start (${damaged.error.code}: ${damaged.error.message}); repair or move away its files in ${this.dir}, then restart the node`, {
      details: { name, file: damaged.file },
    });
  }

  async close(): Promise<void> {
    for (const volume of this.volumes.values()) await volume.store.close();
    this.volumes.clear();
  }

  list(): Volume[] {
    return [...this.volumes.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  /** The volume an NBD export name selects; the empty name selects `default`. */
  get(name: string): Volume {
    const volume = this.volumes.get(name === '' ? DEFAULT_VOLUME : name);
    if (volume === undefined) this.refuseDamaged(name === '' ? DEFAULT_VOLUME : name);
    if (volume === undefined) throw new MisuseError('MS_VOLUME_NOT_FOUND', `no volume named "${name}"`, { details: { name } });
    return volume;
  }

  find(name: string): Volume | undefined {
    return this.volumes.get(name === '' ? DEFAULT_VOLUME : name);
  }

  create(name: string, size: number, readOnly: boolean, writeLog?: string): Promise<Volume> {
    return this.serialized(async () => {
      checkName(name);
      checkSize(size);
      this.refuseDamaged(name);
      if (this.volumes.has(name)) throw new MisuseError('MS_VOLUME_EXISTS', `volume "${name}" already exists`, { details: { name } });
      if (writeLog !== undefined) {
        if (this.claimWriteLog === undefined) throw new MisuseError('MS_VOLUME_INVALID', `this node cannot give volume "${name}" a write log: it has no NVRAM devices`);
        await this.claimWriteLog(name, writeLog);
      }
      try {
        await this.moveOrphansAside(name);
        const store = new DataStore(join(this.dir, `${name}.img`), size);
        try {
          await store.open(true);
        } catch (error) {
          throw new StorageError('MS_DATA_DIR', `cannot create volume "${name}": ${(error as Error).message}`, { cause: error });
        }
        const volume = new Volume(name, readOnly, new Date().toISOString(), store, writeLog);
        try {
          await this.writeMeta(volume);
        } catch (error) {
          // Without its metadata the new, empty store would be an orphan that blocks the name.
          await store.close().catch(() => undefined);
          await store.destroy().catch(() => undefined);
          throw error;
        }
        this.volumes.set(name, volume);
        return volume;
      } catch (error) {
        if (writeLog !== undefined) this.releaseWriteLog(writeLog);
        throw error;
      }
    });
  }

  resize(name: string, size: number): Promise<Volume> {
    return this.serialized(async () => {
      const volume = this.get(name);
      checkSize(size);
      volume.checkRecovered();
      if (size < volume.size && volume.connections > 0) {
        throw new RuntimeError('MS_VOLUME_BUSY', `volume "${name}" has ${volume.connections} client(s) connected; it can only grow while in use`);
      }
      // The write log is settled first, so that no record from before the resize can be
      // replayed over it; the store is resized before the cache lets go of what lies past
      // the new end, so a failed resize loses nothing.
      await this.beforeResize(volume);
      const shrink = size < volume.size;
      await volume.store.resize(size);
      if (shrink) await this.onDrop(volume, size);
      await this.writeMeta(volume);
      return volume;
    });
  }

  remove(name: string): Promise<void> {
    return this.serialized(async () => {
      const volume = this.get(name);
      if (volume.connections > 0) {
        throw new RuntimeError('MS_VOLUME_BUSY', `volume "${name}" has ${volume.connections} client(s) connected; disconnect them first`);
      }
      // Its records are still to come back from the mirror partner and be replayed
      // (unless its log will never be this node's again).
      if (volume.recovering?.removable !== true) volume.checkRecovered();
      await this.beforeRemove(volume);
      await this.onDrop(volume, 0);
      this.volumes.delete(name);
      await volume.store.close();
      await rm(join(this.dir, `${name}.json`), { force: true });
      if (volume.writeLog !== undefined) this.releaseWriteLog(volume.writeLog);
      await volume.store.destroy();
    });
  }

  private writeMeta(volume: Volume): Promise<void> {
    const { name, size, readOnly, createdAt, writeLog } = volume;
    return writeVolumeMeta(this.dir, writeLog === undefined ? { name, size, readOnly, createdAt } : { name, size, readOnly, createdAt, writeLog }, this.fs);
  }

  private serialized<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn);
    this.queue = run.catch(() => undefined);
    return run;
  }
}

function checkName(name: string): void {
  if (!NAME_PATTERN.test(name)) throw new MisuseError('MS_VOLUME_INVALID', `invalid volume name "${name}": expected ${VOLUME_NAME_FORM}`, { details: { name } });
}

const SIZE_FORM = `a positive multiple of ${SECTOR} bytes up to ${formatSize(MAX_VOLUME_SIZE)}`;

function validSize(size: number): boolean {
  return Number.isSafeInteger(size) && size > 0 && size % SECTOR === 0 && size <= MAX_VOLUME_SIZE;
}

function checkSize(size: number): void {
  if (!validSize(size)) throw new MisuseError('MS_VOLUME_INVALID', `invalid volume size ${size}: expected ${SIZE_FORM}`, { details: { size } });
}

async function exists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw new StorageError('MS_DATA_DIR', `cannot look at ${path}: ${(error as Error).message}`, { cause: error, details: { file: path } });
  }
}

/**
 * The length of a volume file, which must be a regular file: a FIFO would hang the
 * open, a symlink would lead out of the directory. `optional`: an absent file is fine
 * (undefined).
 */
async function regularFileSize(path: string, what: string, optional: true): Promise<number | undefined>;
async function regularFileSize(path: string, what: string, optional: false): Promise<number>;
async function regularFileSize(path: string, what: string, optional: boolean): Promise<number | undefined> {
  let stats;
  try {
    stats = await lstat(path);
  } catch (error) {
    if (optional && (error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new StorageError('MS_DATA_DIR', `cannot open volume ${what} ${path}: ${(error as Error).message}`, { cause: error, details: { file: path } });
  }
  if (!stats.isFile()) throw new StorageError('MS_DATA_DIR', `volume ${what} ${path} is not a regular file (${stats.isSymbolicLink() ? 'a symbolic link' : stats.isDirectory() ? 'a directory' : stats.isFIFO() ? 'a FIFO' : 'a device or socket'}); it is not opened`, { details: { file: path } });
  return stats.size;
}
