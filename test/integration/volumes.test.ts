// Volumes through the CLI and the admin API of a real node.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { access } from 'node:fs/promises';
import { join } from 'node:path';
import type { VolumesJson } from '../../src/protocol/admin/api.js';
import { runCli, startNode, tempDir } from '../support/node-process.js';

test('memstrata volume create, list, resize and rm, with --json and coded errors', async (t) => {
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir });
  t.after(() => n.stop('SIGKILL'));
  const cli = (...args: string[]) => runCli([...args, '--admin', n.url]);

  const created = await cli('volume', 'create', 'vm1', '--size', '16MiB');
  assert.equal(created.code, 0, created.stderr);
  assert.match(created.stdout, /volume vm1 created: 16MiB/);
  const ro = await cli('volume', 'create', 'golden', '--size', '4MiB', '--read-only', '--json');
  assert.equal((JSON.parse(ro.stdout) as { readOnly: boolean }).readOnly, true);
  await access(join(dir, 'memstrata-data', 'volumes', 'vm1.img'));

  const list = await cli('volume', 'list');
  assert.match(list.stdout, /Volumes\nNAME +SIZE +READ-ONLY +WRITE LOG +CLIENTS +STATE +CREATED\ndefault +64MiB +no +- +0 +ready /);
  assert.match(list.stdout, /golden +4MiB +yes +- +0 /);
  const json = JSON.parse((await cli('volume', 'list', '--json')).stdout) as VolumesJson;
  assert.deepEqual(json.volumes.map((v) => [v.name, v.size]), [['default', 64 * 2 ** 20], ['golden', 4 * 2 ** 20], ['vm1', 16 * 2 ** 20]]);

  assert.match((await cli('volume', 'resize', 'vm1', '--size', '32MiB')).stdout, /volume vm1 is now 32MiB/);
  const dup = await cli('volume', 'create', 'vm1', '--size', '1MiB');
  assert.equal(dup.code, 2);
  assert.match(dup.stderr, /^memstrata: MS_VOLUME_EXISTS: volume "vm1" already exists/);
  const badName = await cli('volume', 'create', '../etc', '--size', '1MiB');
  assert.match(badName.stderr, /^memstrata: MS_VOLUME_INVALID: invalid volume name "\.\.\/etc"/);
  const badSize = await cli('volume', 'create', 'odd', '--size', '1000');
  assert.match(badSize.stderr, /MS_VOLUME_INVALID: invalid volume size 1000: expected a positive multiple of 4096/);
  const badUnit = await cli('volume', 'create', 'odd', '--size', '1GB');
  assert.match(badUnit.stderr, /MS_BAD_REQUEST: invalid volume request: size: expected a size/);
  const missing = await cli('volume', 'rm', 'nope');
  assert.match(missing.stderr, /^memstrata: MS_VOLUME_NOT_FOUND: no volume named "nope"/);

  assert.match((await cli('volume', 'rm', 'vm1')).stdout, /volume vm1 removed/);
  await assert.rejects(access(join(dir, 'memstrata-data', 'volumes', 'vm1.img')));

  // Volumes and their data outlive a restart.
  assert.equal(await n.stop('SIGTERM'), 0);
  const again = await startNode({ cwd: dir });
  t.after(() => again.stop('SIGKILL'));
  const after = JSON.parse((await runCli(['volume', 'list', '--json', '--admin', again.url])).stdout) as VolumesJson;
  assert.deepEqual(after.volumes.map((v) => [v.name, v.readOnly]), [['default', false], ['golden', true]]);
  const status = await runCli(['status', '--admin', again.url]);
  assert.match(status.stdout, /Storage cache\nhits \d+ {2}misses \d+/);
  assert.match(status.stdout, /nbd +127\.0\.0\.1:\d+/);
});
