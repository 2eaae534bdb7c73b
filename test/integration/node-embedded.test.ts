// A node embedded through the package (StorageNode from src/index.ts), in this process:
// it starts once. start() again while it runs is refused with MS_NODE_STARTED and changes
// nothing (its uptime included); a stop() that overtakes start() at any of its steps leaves
// nothing running by the time start() rejects (no lock, no open file, no listener), so a
// new node takes the same directory; and start() after stop() is refused too.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { access, readdir, readlink } from 'node:fs/promises';
import { connect, createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { pino, type Logger } from 'pino';
import { StorageNode, createLogger, loadConfig } from '../../src/index.js';
import { LOCK_FILE } from '../../src/node/lock.js';
import { isMemstrataError } from '../../src/errors.js';
import { tempDir } from '../support/node-process.js';

const codeOf = (error: unknown): string | undefined => (isMemstrataError(error) ? error.code : undefined);

async function embedded(dir: string, log: Logger = createLogger({ level: 'silent', format: 'json' }), extra: [string, string][] = []): Promise<StorageNode> {
  const flags: [string, string][] = [
    ['dataDir', dir],
    ['admin.listen', '127.0.0.1:0'],
    ['nbd.listen', '127.0.0.1:0'],
    ['rmem.listen', '127.0.0.1:0'],
    ['mirror.listen', '127.0.0.1:0'],
    ['media.dram.size', '64MiB'],
    ['media.flash.size', '128MiB'],
    ['volumes.defaultSize', '64MiB'],
    ...extra,
  ];
  const { config } = await loadConfig({ flags, env: {}, cwd: dir });
  return new StorageNode(config, log);
}

test('an embedded node starts once: a second start() is refused and leaves it running, its uptime untouched', async (t) => {
  const dir = await tempDir(t);
  const node = await embedded(dir);
  await node.start();
  t.after(() => node.stop());
  const before = (await node.info()).startedAt;
  await new Promise((resolve) => setTimeout(resolve, 20));
  await assert.rejects(node.start(), (error: unknown) => codeOf(error) === 'MS_NODE_STARTED');
  assert.equal((await node.info()).startedAt, before, 'a refused start does not reset the uptime');
  assert.notEqual(node.adminAddress, undefined, 'still serving');
  await node.stop();
  await assert.rejects(node.start(), (error: unknown) => codeOf(error) === 'MS_NODE_STARTED');
});

/** Descriptors this process holds on files under `dir`. */
async function openUnder(dir: string): Promise<string[]> {
  const fds = await readdir('/proc/self/fd');
  const targets = await Promise.all(fds.map((fd) => readlink(`/proc/self/fd/${fd}`).catch(() => '')));
  return targets.filter((target) => target.startsWith(`${dir}/`));
}

/** Whether something accepts connections at host:port. */
function accepts(address: string): Promise<boolean> {
  const at = address.lastIndexOf(':');
  return new Promise((resolve) => {
    const socket = connect({ host: address.slice(0, at), port: Number(address.slice(at + 1)) });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

test('a stop() that overtakes an embedded node\'s start() at any step leaves nothing running once start() has rejected', async (t) => {
  // stop() is called as each step has started (from its "started" log line, in start()'s
  // own turn), so start() is overtaken at every point: before the next step, or after the last.
  const steps = ['data directory', 'cpu wake-up latency', 'media', 'nvram', 'volumes', 'cache', 'write-log replay', 'mirror service', 'mirroring', 'rmem', 'nbd', 'admin', 'cluster', 'guests'];
  for (const step of steps) {
    const dir = await tempDir(t);
    const listening: string[] = [];
    const ref: { node?: StorageNode; stopped?: Promise<void> } = {};
    const log = pino({ level: 'debug' }, {
      write: (line: string) => {
        const entry = JSON.parse(line) as { msg?: string; step?: string; address?: string; url?: string };
        if (typeof entry.address === 'string' && entry.msg?.endsWith('listening') === true) listening.push(entry.address);
        if (typeof entry.url === 'string' && entry.msg === 'admin API listening') listening.push(new URL(entry.url).host);
        if (entry.msg === 'started' && entry.step === step) ref.stopped ??= ref.node?.stop();
      },
    });
    const node = await embedded(dir, log);
    ref.node = node;
    const start = await node.start().then(
      () => undefined,
      (error: unknown) => error,
    );
    assert.equal(codeOf(start), 'MS_SHUTTING_DOWN', `stopped after ${step}: ${start instanceof Error ? start.message : 'start() resolved'}`);
    // By the time start() has rejected, everything it started is stopped.
    await assert.rejects(access(join(dir, LOCK_FILE)), `after ${step}: the lock is released`);
    assert.deepEqual(await openUnder(dir), [], `after ${step}: no file under the data directory is open`);
    if (steps.indexOf(step) >= steps.indexOf('mirror service')) assert.ok(listening.length > 0, `after ${step}: a service had listened`);
    for (const address of listening) assert.equal(await accepts(address), false, `after ${step}: ${address} is closed`);
    await ref.stopped;
    // And a new node takes the same directory at once.
    const next = await embedded(dir);
    await next.start();
    await next.stop();
  }
});

test('an embedded node whose start fails at a listener (its port taken) leaves nothing running: no lock, open file, timer or socket', async (t) => {
  for (const service of ['mirror.listen', 'rmem.listen', 'nbd.listen', 'admin.listen']) {
    const dir = await tempDir(t);
    const blocker = createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
    const port = (blocker.address() as AddressInfo).port;
    const before = process.getActiveResourcesInfo();
    const node = await embedded(dir, createLogger({ level: 'silent', format: 'json' }), [[service, `127.0.0.1:${port}`]]);
    await assert.rejects(node.start(), (error: unknown) => codeOf(error) === 'MS_LISTEN_FAILED', service);
    await assert.rejects(access(join(dir, LOCK_FILE)), `${service}: the lock is released`);
    assert.deepEqual(await openUnder(dir), [], `${service}: no file under the data directory is open`);
    await new Promise((resolve) => setImmediate(resolve));
    // No timer, socket or server more than before the node (a request of the test's own may have ended meanwhile).
    const count = (kinds: string[]): Map<string, number> => kinds.reduce((m, k) => m.set(k, (m.get(k) ?? 0) + 1), new Map<string, number>());
    const [was, now] = [count(before), count(process.getActiveResourcesInfo())];
    const extra = [...now].filter(([kind, n]) => n > (was.get(kind) ?? 0));
    assert.deepEqual(extra, [], `${service}: resources the node left behind`);
    await node.stop();
    await new Promise<void>((resolve) => blocker.close(() => resolve()));
  }
});
