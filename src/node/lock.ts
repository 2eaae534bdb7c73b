// The data-directory lock: one running node per data directory.
//
// The lock is a file created with O_EXCL holding the owner's pid and start time. A lock
// whose pid is no longer alive was left by a killed node and is taken over; a lock
// whose pid lives is refused with MS_NODE_LOCKED naming that pid. Known limits: a pid
// reused by an unrelated process after a crash keeps the lock until that process ends
// (the message says which pid to check), and the lock is advisory, for memstrata nodes.
//
// A lock file naming this very process is stale unless a lock of this process holds it
// now: a node restarted in a container often gets the pid its previous run had, while
// two nodes embedded in one process (StorageNode) must not share a directory. So the
// paths held here are also kept in memory, and a second holder in this process is
// refused like one in another (the same directory reached by another path through a
// symbolic link is not recognised).

import { open, readFile, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { RuntimeError, StorageError } from '../errors.js';

export const LOCK_FILE = 'node.lock';

export interface LockInfo {
  pid: number;
  startedAt: string;
}

/** Lock files held by DataDirLocks of this process (resolved paths). */
const heldHere = new Set<string>();

export class DataDirLock {
  readonly path: string;
  private held: boolean;

  constructor(dataDir: string) {
    this.path = join(dataDir, LOCK_FILE);
    this.held = false;
  }

  /** Takes the lock, replacing a stale one; returns the stale owner's pid if there was one. */
  async acquire(): Promise<{ stalePid: number | undefined }> {
    const key = resolve(this.path);
    if (this.held) return { stalePid: undefined };
    // Claimed before the first await, so that two acquires in this process cannot both pass.
    if (heldHere.has(key)) {
      throw new RuntimeError('MS_NODE_LOCKED', `data directory is in use by another memstrata node in this process (pid ${process.pid}); stop it or choose another --data-dir`, {
        details: { lock: this.path, pid: process.pid },
      });
    }
    heldHere.add(key);
    try {
      const taken = await this.take();
      this.held = true;
      return taken;
    } catch (error) {
      heldHere.delete(key);
      throw error;
    }
  }

  private async take(): Promise<{ stalePid: number | undefined }> {
    let stalePid: number | undefined;
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        const handle = await open(this.path, 'wx', 0o644);
        const info: LockInfo = { pid: process.pid, startedAt: new Date().toISOString() };
        await handle.writeFile(`${JSON.stringify(info)}\n`);
        await handle.close();
        return { stalePid };
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EEXIST') {
          throw new StorageError('MS_DATA_DIR', `cannot create lock file ${this.path}: ${(error as Error).message}`, { cause: error });
        }
      }
      const owner = await readLock(this.path);
      // This process's own pid: no lock of this process holds it (heldHere), so a previous run's.
      if (owner !== undefined && owner.pid !== process.pid && isAlive(owner.pid)) {
        throw new RuntimeError(
          'MS_NODE_LOCKED',
          `data directory is in use by another memstrata node (pid ${owner.pid}, started ${owner.startedAt}); stop it or choose another --data-dir`,
          { details: { lock: this.path, pid: owner.pid } },
        );
      }
      // Left by a node that died (or unreadable, as after a crash mid-write): take it over.
      stalePid = owner?.pid;
      await rm(this.path, { force: true });
    }
    throw new RuntimeError('MS_NODE_LOCKED', `could not take the lock ${this.path}: another node keeps taking it`, { details: { lock: this.path } });
  }

  async release(): Promise<void> {
    if (!this.held) return;
    this.held = false;
    try {
      const owner = await readLock(this.path);
      if (owner?.pid === process.pid) await rm(this.path, { force: true });
    } finally {
      heldHere.delete(resolve(this.path));
    }
  }
}

async function readLock(path: string): Promise<LockInfo | undefined> {
  try {
    const parsed: unknown = JSON.parse(await readFile(path, 'utf8'));
    if (typeof parsed === 'object' && parsed !== null && 'pid' in parsed && typeof parsed.pid === 'number') {
      const startedAt = 'startedAt' in parsed && typeof parsed.startedAt === 'string' ? parsed.startedAt : 'unknown';
      return { pid: parsed.pid, startedAt };
    }
  } catch {
    // Missing or torn lock file: treated as stale.
  }
  return undefined;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    // EPERM: the process exists but belongs to someone else.
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}
