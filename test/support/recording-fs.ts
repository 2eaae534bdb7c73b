// A MetaFs (src/fs/meta-file.ts) over node:fs/promises that records every call in order
// and can fail a chosen one, in the style of nbdkit's error filter: the tests see the
// order of writes, fsyncs and renames, and what a failure at each step leaves behind.

import { constants } from 'node:fs';
import { lstat, open, rename, rm } from 'node:fs/promises';
import { relative } from 'node:path';
import type { MetaFs, MetaHandle } from '../../src/fs/meta-file.js';

export interface RecordingFs extends MetaFs {
  /** Calls so far, such as `open volumes/vm1.json.tmp WRONLY|CREAT|EXCL|NOFOLLOW`, `sync volumes/vm1.json.tmp`, `rename ...`. */
  readonly calls: string[];
  /** Makes the next call whose record starts with `prefix` fail with EIO (once). */
  failNext(prefix: string): void;
}

export function recordingFs(root: string): RecordingFs {
  const calls: string[] = [];
  const failures: string[] = [];
  const name = (path: string): string => relative(root, path) || '.';
  const step = (record: string): void => {
    calls.push(record);
    const at = failures.findIndex((prefix) => record.startsWith(prefix));
    if (at >= 0) {
      failures.splice(at, 1);
      throw Object.assign(new Error(`EIO: injected failure of ${record}`), { code: 'EIO' });
    }
  };
  return {
    calls,
    failNext(prefix) {
      failures.push(prefix);
    },
    async open(path, flags, mode) {
      step(`open ${name(path)} ${typeof flags === 'number' ? flagNames(flags) : flags}`);
      const handle = await open(path, flags, mode);
      const wrapped: MetaHandle = {
        async writeFile(data) {
          step(`write ${name(path)}`);
          await handle.writeFile(data);
        },
        async sync() {
          step(`sync ${name(path)}`);
          await handle.sync();
        },
        async close() {
          calls.push(`close ${name(path)}`);
          await handle.close();
        },
        async stat() {
          step(`fstat ${name(path)}`);
          return handle.stat();
        },
        async read(buffer, offset, length, position) {
          step(`read ${name(path)}`);
          return handle.read(buffer, offset, length, position);
        },
      };
      return wrapped;
    },
    async rename(from, to) {
      step(`rename ${name(from)} ${name(to)}`);
      await rename(from, to);
    },
    async rm(path, options) {
      calls.push(`rm ${name(path)}`);
      await rm(path, options);
    },
    async lstat(path) {
      step(`lstat ${name(path)}`);
      return lstat(path);
    },
  };
}

/** Numeric open flags as a record shows them, such as `WRONLY|CREAT|EXCL|NOFOLLOW`. */
function flagNames(flags: number): string {
  const access = flags & (constants.O_RDONLY | constants.O_WRONLY | constants.O_RDWR);
  const names: string[] = [access === constants.O_RDWR ? 'RDWR' : access === constants.O_WRONLY ? 'WRONLY' : 'RDONLY'];
  for (const flag of ['O_CREAT', 'O_EXCL', 'O_TRUNC', 'O_APPEND', 'O_NOFOLLOW', 'O_NONBLOCK'] as const) {
    if ((flags & constants[flag]) !== 0) names.push(flag.slice(2));
  }
  return names.join('|');
}
