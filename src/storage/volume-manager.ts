// Volumes: named, sized, optionally read-only block devices, each an NBD export, each
// backed by a DataStore in <dataDir>/volumes.
//
//   volumes/<name>.json   {"name","size","readOnly","createdAt","writeLog"?,"version":1}, replaced atomically
//   volumes/<name>.img    data (DataStore)
//   volumes/<name>.zmap   zero map (DataStore)
//
// The `default` volume (1 GiB unless configured) is made on first start; the empty NBD
// export name selects it. A volume with clients connected cannot be removed or shrunk.

import { mkdir, open, readdir, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { MisuseError, RuntimeError, StorageError } from '../errors.js';
import { formatSize } from '../units.js';
import { DataStore } from './data-store.js';
import type { VolumeStore } from './volume-store.js';
import type { VolumeInfo } from '../protocol/admin/api.js';
export type { VolumeInfo };

export const DEFAULT_VOLUME = 'default';
const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
export const VOLUME_NAME_FORM = '1 to 64 letters, digits, ".", "_" or "-", starting with a letter or digit';
export const SECTOR = 4096;
export const MAX_VOLUME_SIZE = 2 ** 50; // 1 PiB: far past anything a sparse file here should hold

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
  private readonly volumes: Map<string, Volume>;
  private queue: Promise<unknown>;

  constructor(dataDir: string) {
    this.dir = join(dataDir, 'volumes');
    this.onDrop = () => Promise.resolve();
    this.volumes = new Map();
    this.queue = Promise.resolve();
  }

  /** Opens every volume in the directory, and makes the default volume if there is none. */
  async open(defaultSize: number): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    for (const entry of (await readdir(this.dir)).filter((f) => f.endsWith('.json')).sort()) {
      const meta = JSON.parse(await readFile(join(this.dir, entry), 'utf8')) as { name: string; size: number; readOnly: boolean; createdAt: string; writeLog?: string };
      const store = new DataStore(join(this.dir, `${meta.name}.img`), meta.size);
      await store.open(false);
      this.volumes.set(meta.name, new Volume(meta.name, meta.readOnly, meta.createdAt, store, meta.writeLog));
    }
    if (!this.volumes.has(DEFAULT_VOLUME)) await this.create(DEFAULT_VOLUME, defaultSize, false);
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
      if (this.volumes.has(name)) throw new MisuseError('MS_VOLUME_EXISTS', `volume "${name}" already exists`, { details: { name } });
      const store = new DataStore(join(this.dir, `${name}.img`), size);
      try {
        await store.open(true);
      } catch (error) {
        throw new StorageError('MS_DATA_DIR', `cannot create volume "${name}": ${(error as Error).message}`, { cause: error });
      }
      const volume = new Volume(name, readOnly, new Date().toISOString(), store, writeLog);
      await this.writeMeta(volume);
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
      if (size < volume.size) await this.onDrop(volume, size);
      await volume.store.resize(size);
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
      await this.onDrop(volume, 0);
      this.volumes.delete(name);
      await volume.store.close();
      await rm(join(this.dir, `${name}.json`), { force: true });
      await volume.store.destroy();
    });
  }

  private async writeMeta(volume: Volume): Promise<void> {
    const path = join(this.dir, `${volume.name}.json`);
    const tmp = `${path}.tmp`;
    const out = await open(tmp, 'w', 0o600);
    try {
      await out.writeFile(`${JSON.stringify({ name: volume.name, size: volume.size, readOnly: volume.readOnly, createdAt: volume.createdAt, writeLog: volume.writeLog, version: 1 })}\n`);
      await out.sync();
    } finally {
      await out.close();
    }
    await rename(tmp, path);
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
