import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFile, writeFile, access } from 'node:fs/promises';
import { join } from 'node:path';
import { DataDirLock, LOCK_FILE } from '../../../src/node/lock.js';
import { tempDir } from '../../support/node-process.js';

test('a held lock refuses a second holder in this process too, and release lets the next one in', async (t) => {
  const dir = await tempDir(t);
  const first = new DataDirLock(dir);
  assert.deepEqual(await first.acquire(), { stalePid: undefined });
  const info = JSON.parse(await readFile(join(dir, LOCK_FILE), 'utf8')) as { pid: number };
  assert.equal(info.pid, process.pid);
  // A second holder in this same process (two embedded nodes), also by another spelling of the path.
  for (const path of [dir, `${dir}/./`]) {
    await assert.rejects(new DataDirLock(path).acquire(), (error: Error & { code?: string }) => error.code === 'MS_NODE_LOCKED' && /in this process/.test(error.message));
  }
  const racers = await Promise.allSettled([new DataDirLock(join(dir, 'x', '..')).acquire(), new DataDirLock(dir).acquire()]);
  assert.ok(racers.every((r) => r.status === 'rejected'), 'refused while held, even when asked at once');
  assert.equal((JSON.parse(await readFile(join(dir, LOCK_FILE), 'utf8')) as { pid: number }).pid, process.pid, 'the refusals left the lock as it was');
  await first.release();
  await assert.rejects(access(join(dir, LOCK_FILE)));
  const second = new DataDirLock(dir);
  await second.acquire();
  await second.release();
});

test('a lock held by a live process is refused with MS_NODE_LOCKED naming the pid', async (t) => {
  const dir = await tempDir(t);
  const holder = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 30000)'], { stdio: 'ignore' });
  t.after(() => holder.kill('SIGKILL'));
  await writeFile(join(dir, LOCK_FILE), JSON.stringify({ pid: holder.pid, startedAt: '2026-01-01T00:00:00Z' }));
  await assert.rejects(new DataDirLock(dir).acquire(), (error: Error & { code?: string }) => {
    assert.equal(error.code, 'MS_NODE_LOCKED');
    assert.match(error.message, new RegExp(`pid ${holder.pid}`));
    return true;
  });
});

test('a stale lock from a dead process, from this pid in a previous run, or a torn lock file, is taken over', async (t) => {
  const dir = await tempDir(t);
  const gone = spawn(process.execPath, ['-e', '0'], { stdio: 'ignore' });
  await new Promise((resolve) => gone.once('exit', resolve));
  await writeFile(join(dir, LOCK_FILE), JSON.stringify({ pid: gone.pid, startedAt: 'x' }));
  const lock = new DataDirLock(dir);
  assert.deepEqual(await lock.acquire(), { stalePid: gone.pid });
  await lock.release();

  // Our own pid, held by no lock of this process: a previous run that had the same pid (a container's).
  await writeFile(join(dir, LOCK_FILE), JSON.stringify({ pid: process.pid, startedAt: 'x' }));
  const same = new DataDirLock(dir);
  assert.deepEqual(await same.acquire(), { stalePid: process.pid });
  await same.release();

  await writeFile(join(dir, LOCK_FILE), '{"pi');
  const torn = new DataDirLock(dir);
  assert.deepEqual(await torn.acquire(), { stalePid: undefined });
  await torn.release();
});
