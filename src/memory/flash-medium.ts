// Flash medium: a preallocated sparse file on local SSD, positional I/O through one
// FileHandle.
//
// The file is extended to `capacity` with ftruncate, so blocks are taken on disk only as
// they are written. Contents survive a restart of the medium (the NVRAM vault relies on
// that). A file larger than the configured capacity is refused instead of truncated,
// since cutting it would drop data. I/O in flight is counted so that `close` waits for
// it; I/O that starts after `close` fails with MS_MEDIUM_CLOSED.

import { mkdir, open, type FileHandle } from 'node:fs/promises';
import { constants, read as readCallback } from 'node:fs';
import { dirname } from 'node:path';
import { RuntimeError, StorageError, isMemstrataError } from '../errors.js';
import { formatSize } from '../units.js';
import { writeAll, writeZeros } from '../fs/positional-io.js';
import type { MediumName } from '../kinds.js';
import { checkRange, type Medium, type MediumCapabilities } from './medium.js';

export class FlashMedium implements Medium {
  readonly name: MediumName = 'flash';
  readonly capacity: number;
  readonly extentSize: number;
  readonly path: string;
  readonly capabilities: MediumCapabilities = { persistent: true, lazy: true };
  private handle: FileHandle | undefined;
  private inFlight: number;
  private drained: (() => void) | undefined;

  constructor(options: { path: string; capacity: number; extentSize: number }) {
    this.path = options.path;
    this.capacity = options.capacity;
    this.extentSize = options.extentSize;
    this.handle = undefined;
    this.inFlight = 0;
    this.drained = undefined;
  }

  async open(): Promise<void> {
    try {
      await mkdir(dirname(this.path), { recursive: true });
      const handle = await open(this.path, constants.O_RDWR | constants.O_CREAT, 0o600);
      const { size } = await handle.stat();
      if (size > this.capacity) {
        await handle.close();
        throw new StorageError(
          'MS_FLASH_SIZE',
          `flash file ${this.path} is ${formatSize(size)} but media.flash.size is ${formatSize(this.capacity)}; shrinking it would lose data, so raise the size or remove the file`,
          { details: { path: this.path, fileSize: size, capacity: this.capacity } },
        );
      }
      if (size < this.capacity) await handle.truncate(this.capacity);
      this.handle = handle;
    } catch (error) {
      if (isMemstrataError(error)) throw error;
      throw new StorageError('MS_DATA_DIR', `cannot open flash file ${this.path}: ${(error as Error).message}`, { cause: error });
    }
  }

  async read(offset: number, target: Uint8Array): Promise<void> {
    const handle = this.begin(offset, target.length);
    try {
      let done = 0;
      while (done < target.length) {
        const bytesRead = await readAt(handle.fd, target, done, target.length - done, offset + done);
        // The file is never shorter than capacity, so a short read means it was cut under us.
        if (bytesRead === 0) throw new Error(`unexpected end of file at ${offset + done}`);
        done += bytesRead;
      }
    } catch (error) {
      throw this.ioError('read', offset, target.length, error);
    } finally {
      this.end();
    }
  }

  async write(offset: number, source: Uint8Array): Promise<void> {
    const handle = this.begin(offset, source.length);
    try {
      await writeAll(handle, source, offset);
    } catch (error) {
      throw this.ioError('write', offset, source.length, error);
    } finally {
      this.end();
    }
  }

  async zero(offset: number, length: number): Promise<void> {
    const handle = this.begin(offset, length);
    try {
      await writeZeros(handle, offset, length);
    } catch (error) {
      throw this.ioError('zero', offset, length, error);
    } finally {
      this.end();
    }
  }

  async sync(): Promise<void> {
    const handle = this.begin(0, 0);
    try {
      await handle.datasync();
    } catch (error) {
      throw this.ioError('sync', 0, 0, error);
    } finally {
      this.end();
    }
  }

  async close(): Promise<void> {
    const handle = this.handle;
    if (handle === undefined) return;
    this.handle = undefined;
    if (this.inFlight > 0) await new Promise<void>((resolve) => { this.drained = resolve; });
    await handle.close();
  }

  async resident(): Promise<number> {
    const handle = this.begin(0, 0);
    try {
      const { blocks } = await handle.stat();
      return blocks * 512;
    } finally {
      this.end();
    }
  }

  private begin(offset: number, length: number): FileHandle {
    const handle = this.handle;
    if (handle === undefined) throw new RuntimeError('MS_MEDIUM_CLOSED', `flash: medium ${this.path} is not open`);
    checkRange(this, offset, length);
    this.inFlight++;
    return handle;
  }

  private end(): void {
    this.inFlight--;
    if (this.inFlight === 0 && this.drained !== undefined) {
      const drained = this.drained;
      this.drained = undefined;
      drained();
    }
  }

  private ioError(op: string, offset: number, length: number, error: unknown): Error {
    if (isMemstrataError(error)) return error;
    return new StorageError('MS_MEDIUM_IO', `flash: ${op} at ${offset} length ${length} failed: ${(error as Error).message}`, {
      cause: error,
      details: { path: this.path, op, offset, length },
    });
  }
}

/**
 * One pread through fs.read's callback form: the promise API (FileHandle.read) costs the
 * event loop several microseconds more per call, which a 4 KiB read from the flash level
 * pays on every hit.
 */
function readAt(fd: number, target: Uint8Array, at: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    readCallback(fd, target, at, length, position, (error, bytesRead) => {
      if (error === null) resolve(bytesRead);
      else reject(error);
    });
  });
}
