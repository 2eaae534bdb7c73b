// A node embedded through the package (StorageNode from src/index.ts), in this process:
// it starts once. start() again while it runs is refused with MS_NODE_STARTED and changes
// nothing (its uptime included); a stop() that overtakes start() leaves nothing running
// (its data-directory lock is free again, so a new node takes the same directory), and
// start() after stop() is refused too.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { StorageNode, createLogger, loadConfig } from '../../src/index.js';
import { isMemstrataError } from '../../src/errors.js';
import { tempDir } from '../support/node-process.js';

const codeOf = (error: unknown): string | undefined => (isMemstrataError(error) ? error.code : undefined);

async function embedded(dir: string): Promise<StorageNode> {
  const flags: [string, string][] = [
    ['dataDir', dir],
    ['admin.listen', '127.0.0.1:0'],
    ['nbd.listen', '127.0.0.1:0'],
    ['rmem.listen', '127.0.0.1:0'],
    ['mirror.listen', '127.0.0.1:0'],
    ['media.dram.size', '64MiB'],
    ['media.flash.size', '128MiB'],
    ['volumes.defaultSize', '64MiB'],
  ];
  const { config } = await loadConfig({ flags, env: {}, cwd: dir });
  return new StorageNode(config, createLogger({ level: 'silent', format: 'json' }));
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

test('a stop() that overtakes an embedded node\'s start() leaves nothing running: start() rejects, and the directory is free for a new node', async (t) => {
  const dir = await tempDir(t);
  for (const delayMs of [0, 5, 30]) {
    const node = await embedded(dir);
    const starting = node.start();
    await new Promise((resolve) => setTimeout(resolve, delayMs));
    const stopped = node.stop();
    const start = await starting.then(
      () => undefined,
      (error: unknown) => error,
    );
    await stopped;
    if (start !== undefined) assert.equal(codeOf(start), 'MS_SHUTTING_DOWN', `after ${delayMs} ms: ${start instanceof Error ? start.message : typeof start}`);
    assert.equal(node.adminAddress, undefined, `after ${delayMs} ms: no admin API left listening`);
    // The lock and the listeners are released: a new node takes the same data directory at once.
    const next = await embedded(dir);
    await next.start();
    await next.stop();
  }
});
