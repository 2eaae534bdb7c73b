// Positional writes that finish what they start: a write may be short, so these loop
// until every byte is down. Shared by the flash medium, volume data stores and journal
// files.

import { write as fsWrite, writeSync as fsWriteSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';

const ZEROS = Buffer.alloc(1024 * 1024);

/** What positional writes need of a file: node's FileHandle, or a wrapper of one. */
export type PositionalFile = Pick<FileHandle, 'write'>;

/** Writes all of `buf` at `position`. */
export async function writeAll(handle: PositionalFile, buf: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await handle.write(buf, done, buf.length - done, position + done);
    if (bytesWritten === 0) throw nothingWritten(position + done);
    done += bytesWritten;
  }
}

/** Writes all of `buf` at `position` on the raw descriptor `fd`, through libuv's callback API. */
export function writeAllFd(fd: number, buf: Uint8Array, position: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      if (done >= buf.length) {
        resolve();
        return;
      }
      fsWrite(fd, buf, done, buf.length - done, position + done, (error, written) => {
        if (error !== null) reject(error);
        else if (written === 0) reject(nothingWritten(position + done));
        else step(done + written);
      });
    };
    step(0);
  });
}

/**
 * Writes all of `buf` at `position` on the raw descriptor `fd` in the caller's turn: a
 * write into the OS's cache, for callers that would otherwise pay a trip through libuv's
 * thread pool for a few kilobytes. Throws what the system call throws.
 */
export function writeAllFdSync(fd: number, buf: Uint8Array, position: number): void {
  for (let done = 0; done < buf.length; ) {
    const written = fsWriteSync(fd, buf, done, buf.length - done, position + done);
    if (written === 0) throw nothingWritten(position + done);
    done += written;
  }
}

/** A write that took none of its bytes: it would be asked again for ever, so it fails. */
function nothingWritten(position: number): NodeJS.ErrnoException {
  const error: NodeJS.ErrnoException = new Error(`EIO: a write at ${position} wrote nothing`);
  error.code = 'EIO';
  return error;
}

/** Writes `length` zero bytes at `offset`, a megabyte at a time. */
export async function writeZeros(handle: PositionalFile, offset: number, length: number): Promise<void> {
  for (let done = 0; done < length; ) {
    const n = Math.min(ZEROS.length, length - done);
    await writeAll(handle, ZEROS.subarray(0, n), offset + done);
    done += n;
  }
}
