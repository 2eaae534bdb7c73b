// Small JSON metadata files (volumes/<name>.json, nvram/<name>.json), and the data
// store's zero maps: replaced durably, read back through one validator.
//
// Durable replace, in this order (each step waits for the one before):
//
//   open <path>.tmp (create, truncate) -> write -> fsync -> close
//   rename <path>.tmp -> <path>
//   open <dir> -> fsync -> close
//
// Invariants:
//   - after a crash at any point, <path> holds either its old content or the whole new
//     content, never a mix or an empty file: the data is on disk (fsync) before the name
//     points at it (rename);
//   - once replaceFile resolves, the new content survives a crash: the rename is itself
//     on disk (fsync of the directory; without it, the old file can come back);
//   - a failed replace leaves <path> as it was and removes the temporary file.
//
// Reading never trusts the file: it is parsed and checked against a zod schema, and any
// failure is MS_META_INVALID naming the file and the field, so the caller can decide to
// leave the file alone rather than act on a wrong size or name.
//
// The file system sits behind MetaFs (node:fs/promises satisfies it), so a test can watch
// the order of the calls or make one of them fail.

import { open, readFile, rename, rm } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { z } from 'zod';
import { StorageError } from '../errors.js';

/** What replaceFile and readMetaFile need of an open file. */
export interface MetaHandle {
  writeFile(data: string | Uint8Array): Promise<void>;
  sync(): Promise<void>;
  close(): Promise<void>;
}

/** The file system calls metadata files use; node:fs/promises is one. */
export interface MetaFs {
  open(path: string, flags: string, mode?: number): Promise<MetaHandle>;
  rename(from: string, to: string): Promise<void>;
  rm(path: string, options: { force: boolean }): Promise<void>;
  readFile(path: string, encoding: 'utf8'): Promise<string>;
}

export const nodeMetaFs: MetaFs = { open, rename, rm, readFile };

/** Replaces `path` with `text` so that a crash leaves the old or the new content, and the new one once this resolves. */
export async function replaceFile(path: string, text: string | Uint8Array, fs: MetaFs = nodeMetaFs): Promise<void> {
  const tmp = `${path}.tmp`;
  try {
    const out = await fs.open(tmp, 'w', 0o600);
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

/**
 * Reads a metadata file and checks it against `schema`. Every way it can be wrong
 * (unreadable, not JSON, a field missing, of the wrong type or out of range, an unknown
 * field or version) is MS_META_INVALID, with the file and the first bad field in the
 * message and in `details`.
 */
export async function readMetaFile<T>(path: string, schema: z.ZodType<T>, what: string, fs: MetaFs = nodeMetaFs): Promise<T> {
  let text: string;
  try {
    text = await fs.readFile(path, 'utf8');
  } catch (error) {
    throw metaInvalid(path, what, null, `cannot be read: ${(error as Error).message}`, error);
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
