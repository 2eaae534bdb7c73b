// Small JSON metadata files (volumes/<name>.json, nvram/<name>.json), and the data
// store's zero maps: replaced durably, read back through one validator.
//
// Durable replace, in this order (each step waits for the one before):
//
//   remove <path>.tmp (a leftover of a crash, or anything planted there)
//   open <path>.tmp (O_CREAT | O_EXCL | O_NOFOLLOW) -> write -> fsync -> close
//   rename <path>.tmp -> <path>
//   open <dir> -> fsync -> close
//
// Invariants:
//   - after a crash at any point, <path> holds either its old content or the whole new
//     content, never a mix or an empty file: the data is on disk (fsync) before the name
//     points at it (rename);
//   - once replaceFile resolves, the new content survives a crash: the rename is itself
//     on disk (fsync of the directory; without it, the old file can come back);
//   - a failed replace leaves <path> as it was and removes the temporary file;
//   - nothing is written through a symbolic link: the temporary file is always a new
//     file (O_EXCL fails on any existing name, a symlink included), and rename replaces
//     the name <path>, never what a link there points at.
//
// Reading never trusts the file: only a regular file is opened (lstat first, so a FIFO,
// a device or a symlink is never opened at all; then O_NOFOLLOW | O_NONBLOCK and fstat,
// so one swapped in meanwhile is refused too), only up to META_MAX_BYTES is read, and
// the text is parsed and checked against a zod schema. Any failure is MS_META_INVALID
// naming the file and the field, so the caller can decide to leave the file alone
// rather than act on a wrong size or name, or hang on a FIFO.
//
// The file system sits behind MetaFs (node:fs/promises satisfies it), so a test can watch
// the order of the calls or make one of them fail.

import { constants } from 'node:fs';
import { lstat, open, rename, rm } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { z } from 'zod';
import { StorageError } from '../errors.js';

/** Largest metadata file read: these files are a few hundred bytes; a larger one is not ours. */
export const META_MAX_BYTES = 64 * 1024;

/** Flags of a temporary file: always a new file, never through a symlink. */
export const CREATE_NEW_FLAGS = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;

/** Flags of a metadata read: no symlink followed, no wait for a FIFO's writer. */
const READ_FLAGS = constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK;

/** What readMetaFile needs to know of a file (node's Stats is one). */
export interface MetaStats {
  size: number;
  dev: number;
  ino: number;
  isFile(): boolean;
  isSymbolicLink(): boolean;
  isDirectory(): boolean;
  isFIFO(): boolean;
}

/** What replaceFile and readMetaFile need of an open file. */
export interface MetaHandle {
  writeFile(data: string | Uint8Array): Promise<void>;
  sync(): Promise<void>;
  close(): Promise<void>;
  stat(): Promise<MetaStats>;
  read(buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number }>;
}

/** The file system calls metadata files use; node:fs/promises is one. */
export interface MetaFs {
  open(path: string, flags: string | number, mode?: number): Promise<MetaHandle>;
  rename(from: string, to: string): Promise<void>;
  rm(path: string, options: { force: boolean }): Promise<void>;
  lstat(path: string): Promise<MetaStats>;
}

export const nodeMetaFs: MetaFs = { open, rename, rm, lstat };

/**
 * Opens `path` as a new file for writing: an existing file of that name (a temporary
 * file left by a crash, or a symlink planted there) is removed first (the name, never
 * what a link points at), and the open fails rather than follow a link made meanwhile.
 */
export async function openNewFile(path: string, fs: MetaFs = nodeMetaFs): Promise<MetaHandle> {
  await fs.rm(path, { force: true });
  return fs.open(path, CREATE_NEW_FLAGS, 0o600);
}

/** Replaces `path` with `text` so that a crash leaves the old or the new content, and the new one once this resolves. */
export async function replaceFile(path: string, text: string | Uint8Array, fs: MetaFs = nodeMetaFs): Promise<void> {
  const tmp = `${path}.tmp`;
  try {
    const out = await openNewFile(tmp, fs);
    try {
      await out.writeFile(text);
      await out.sync();
    } finally {
      await out.close();
    }
    await fs.rename(tmp, path);
  } catch (error) {
    await fs.rm(tmp, { force: true }).catch(() => undefined);
    throw new StorageError('MS_DATA_DIR', `cannot write ${path}: ${(error as Error).message}`, { cause: error, details: { file: path } });
  }
  await syncDirectory(dirname(path), fs);
}

/** Makes the directory's entries (a rename, a new file) durable. */
export async function syncDirectory(dir: string, fs: MetaFs = nodeMetaFs): Promise<void> {
  try {
    const handle = await fs.open(dir, 'r');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  } catch (error) {
    throw new StorageError('MS_DATA_DIR', `cannot sync directory ${dir}: ${(error as Error).message}`, { cause: error, details: { file: dir } });
  }
}

/** Why a file is not one a metadata read may open, or undefined for a regular file. */
function notRegular(stats: MetaStats): string | undefined {
  if (stats.isFile()) return undefined;
  if (stats.isSymbolicLink()) return 'is a symbolic link, not a regular file';
  if (stats.isDirectory()) return 'is a directory, not a regular file';
  if (stats.isFIFO()) return 'is a FIFO, not a regular file';
  return 'is not a regular file (a device or a socket)';
}

/**
 * Reads a small regular file whole, as UTF-8. Refused, with the reason as the message:
 * anything that is not a regular file (never opened: lstat first, then O_NOFOLLOW and
 * O_NONBLOCK, and fstat must show the same regular file), and a file over `limit` bytes
 * (nothing past the limit is read).
 */
export async function readSmallFile(path: string, limit: number, fs: MetaFs = nodeMetaFs): Promise<string> {
  const before = await fs.lstat(path);
  const kind = notRegular(before);
  if (kind !== undefined) throw new Error(kind);
  if (before.size > limit) throw new Error(`is ${before.size} bytes, more than the ${limit} such a file may hold`);
  const handle = await fs.open(path, READ_FLAGS);
  try {
    const stats = await handle.stat();
    const swapped = notRegular(stats) ?? (stats.dev !== before.dev || stats.ino !== before.ino ? 'was replaced while it was opened' : undefined);
    if (swapped !== undefined) throw new Error(swapped);
    // One byte more than the limit tells a file that grew past it since the fstat.
    const buffer = Buffer.alloc(Math.min(stats.size, limit) + 1);
    let length = 0;
    while (length < buffer.length) {
      const { bytesRead } = await handle.read(buffer, length, buffer.length - length, length);
      if (bytesRead === 0) break;
      length += bytesRead;
    }
    if (length > limit) throw new Error(`is more than the ${limit} bytes such a file may hold`);
    return buffer.toString('utf8', 0, length);
  } finally {
    await handle.close();
  }
}

/**
 * Reads a metadata file and checks it against `schema`. Every way it can be wrong
 * (not a regular file, larger than META_MAX_BYTES, unreadable, not JSON, a field
 * missing, of the wrong type or out of range, an unknown field or version) is
 * MS_META_INVALID, with the file and the first bad field in the message and in `details`.
 */
export async function readMetaFile<T>(path: string, schema: z.ZodType<T>, what: string, fs: MetaFs = nodeMetaFs): Promise<T> {
  let text: string;
  try {
    text = await readSmallFile(path, META_MAX_BYTES, fs);
  } catch (error) {
    const reason = (error as NodeJS.ErrnoException).code === undefined ? (error as Error).message : `cannot be read: ${(error as Error).message}`;
    throw metaInvalid(path, what, null, reason, error);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw metaInvalid(path, what, null, `is not valid JSON (${(error as Error).message})`, error);
  }
  const parsed = schema.safeParse(json);
  if (parsed.success) return parsed.data;
  const issue = parsed.error.issues[0];
  const field = issue === undefined ? null : issue.code === 'unrecognized_keys' ? issue.keys.join(', ') : issue.path.map(String).join('.') || null;
  const reason = issue === undefined ? 'fails validation' : issue.code === 'unrecognized_keys' ? `has unknown field ${issue.keys.join(', ')}` : `field ${field ?? '(top level)'}: ${issue.message}`;
  throw metaInvalid(path, what, field, reason);
}

/** MS_META_INVALID for a file whose content is wrong in a way no schema sees (a name that is not the file's). */
export function metaInvalid(path: string, what: string, field: string | null, reason: string, cause?: unknown): StorageError {
  return new StorageError('MS_META_INVALID', `${what} ${path} ${reason}`, { ...(cause === undefined ? {} : { cause }), details: { file: path, field } });
}
