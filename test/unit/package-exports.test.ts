// The package's public entry points resolve by name (Node's self-reference through
// "exports") and carry what they promise.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, statSync } from 'node:fs';

test('memstrata exports the node, its configuration and its tables', async () => {
  const root = await import('memstrata');
  assert.equal(typeof root.StorageNode, 'function');
  assert.equal(typeof root.loadConfig, 'function');
  assert.equal(typeof root.PartitionTable, 'function');
  assert.ok('MS_CONFIG_INVALID' in root.ERRORS);
});

test('memstrata/client exports the admin client and the coded errors', async () => {
  const client = await import('memstrata/client');
  assert.equal(typeof client.AdminClient, 'function');
  await assert.rejects(new client.AdminClient('http://127.0.0.1:1', 2000).get('/v1/node'), (error: unknown) => {
    assert.ok(client.isMemstrataError(error));
    assert.equal(error.code, 'MS_ADMIN_UNREACHABLE');
    return true;
  });
});

test('memstrata/host resolves and shares the error registry with the node', async () => {
  const host = await import('memstrata/host');
  const root = await import('memstrata');
  assert.equal(host.MemstrataError, root.MemstrataError);
  assert.equal(host.parseSize('4KiB'), 4096);
  assert.equal(typeof host.HierarchyMemory.open, 'function');
  assert.equal(typeof host.NbdClient.connect, 'function');
  const memory = await host.HierarchyMemory.open({ serverId: 'exports', localDram: 64 * 1024 });
  const segment = await memory.alloc(4096, { class: 'highest' });
  await segment.write(0, Buffer.from('ok'));
  assert.equal((await segment.read(0, 2)).toString(), 'ok');
  await memory.close();
});

test('the memstrata command is executable as committed (what npx runs in a fresh clone, where tsc output is not) and runs the CLI', () => {
  const root = new URL('../../../', import.meta.url);
  const pkg = JSON.parse(readFileSync(new URL('package.json', root), 'utf8')) as { version: string; bin: Record<string, string>; files: string[] };
  const bin = pkg.bin.memstrata;
  assert.ok(bin !== undefined);
  assert.ok(pkg.files.some((f) => bin.startsWith(`${f}/`)), 'the bin is in the published files');
  const path = new URL(bin, root).pathname;
  assert.ok((statSync(path).mode & 0o111) !== 0, `${bin} is executable`);
  const tracked = spawnSync('git', ['ls-files', '-s', bin], { cwd: root.pathname, encoding: 'utf8' });
  if (tracked.status === 0 && tracked.stdout !== '') assert.match(tracked.stdout, /^100755 /, 'git keeps it executable');
  const run = spawnSync(path, ['--version'], { encoding: 'utf8' });
  assert.equal(run.status, 0, run.stderr);
  assert.equal(run.stdout.trim(), pkg.version);
});
