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

import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { MisuseError, RuntimeError, StorageError, toMemstrataError, type MemstrataError } from '../errors.js';
import type { MetaFs } from '../fs/meta-file.js';
import type { Logger } from '../logger.js';
import { formatSize } from '../units.js';
import { DataStore } from './data-store.js';
import { MAX_VOLUME_SIZE, NAME_PATTERN, SECTOR, VOLUME_NAME_FORM, readVolumeMeta, writeVolumeMeta } from './volume-meta.js';
import type { VolumeStore } from './volume-store.js';
import type { DamagedJson, VolumeInfo } from '../protocol/admin/api.js';
export type { VolumeInfo };
export { MAX_VOLUME_SIZE, SECTOR, VOLUME_NAME_FORM };

export const DEFAULT_VOLUME = 'default';

export class Volume {
  readonly name: string;
  readonly readOnly: boolean;
  readonly createdAt: string;
  readonly store: VolumeStore;
  /** The NVRAM device that journals this volume's writes (FUA and FLUSH then cost a journal append). */
  readonly writeLog: string | undefined;
  connections: number;

  constructor(name: string, readOnly: boolean, createdAt: string, store: VolumeStore, writeLog?: string) {
    this.name = name;
    this.readOnly = readOnly;
    this.writeLog = writeLog;
    this.createdAt = createdAt;
    this.store = store;
    this.connections = 0;
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

  info(): VolumeInfo {
    return {
      name: this.name,
      size: this.size,
      readOnly: this.readOnly,
      createdAt: this.createdAt,
      connections: this.connections,
      writeLog: this.writeLog ?? null,
      state: this.store.failure === undefined ? 'ready' : 'fenced',
      failure: this.store.failure?.message ?? null,
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
  private readonly volumes: Map<string, Volume>;
  /** Volumes found on disk but not loaded, by the name their files carry. */
  private readonly damagedVolumes: Map<string, DamagedJson>;
  private readonly log: Logger | undefined;
  private readonly fs: MetaFs | undefined;
  private queue: Promise<unknown>;

  constructor(dataDir: string, options: { log?: Logger; fs?: MetaFs } = {}) {
    this.dir = join(dataDir, 'volumes');
    this.onDrop = () => Promise.resolve();
    this.beforeResize = () => Promise.resolve();
    this.beforeRemove = () => Promise.resolve();
    this.volumes = new Map();
    this.damagedVolumes = new Map();
    this.log = options.log;
    this.fs = options.fs;
    this.queue = Promise.resolve();
  }

  /** Opens every volume in the directory (a damaged one is set aside), and makes the default volume if there is none. */
  async open(defaultSize: number): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    for (const entry of (await readdir(this.dir)).filter((f) => f.endsWith('.json')).sort()) {
      const name = entry.slice(0, -'.json'.length);
      try {
        const meta = await readVolumeMeta(this.dir, name, this.fs);
        const store = new DataStore(join(this.dir, `${name}.img`), meta.size);
        await store.open(false);
        this.volumes.set(name, new Volume(name, meta.readOnly, meta.createdAt, store, meta.writeLog));
      } catch (error) {
        this.setAside(name, join(this.dir, entry), toMemstrataError(error));
      }
    }
    if (!this.volumes.has(DEFAULT_VOLUME) && !this.damagedVolumes.has(DEFAULT_VOLUME)) await this.create(DEFAULT_VOLUME, defaultSize, false);
  }

  /** Volumes that were not loaded at start, with the reason. */
  damaged(): DamagedJson[] {
    return [...this.damagedVolumes.values()];
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
    });
  }

  resize(name: string, size: number): Promise<Volume> {
    return this.serialized(async () => {
      const volume = this.get(name);
      checkSize(size);
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
      await this.beforeRemove(volume);
      await this.onDrop(volume, 0);
      this.volumes.delete(name);
      await volume.store.close();
      await rm(join(this.dir, `${name}.json`), { force: true });
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

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0 || size % SECTOR !== 0 || size > MAX_VOLUME_SIZE) {
    throw new MisuseError('MS_VOLUME_INVALID', `invalid volume size ${size}: expected a positive multiple of ${SECTOR} bytes up to ${formatSize(MAX_VOLUME_SIZE)}`, {
      details: { size },
    });
  }
}
