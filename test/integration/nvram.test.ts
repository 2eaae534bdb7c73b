// NVRAM devices through the CLI and admin API of a real node.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { NvramDumpJson, NvramListJson, PartitionTableJson } from '../../src/protocol/admin/api.js';
import { runCli, startNode, tempDir } from '../support/node-process.js';

test('memstrata nvram create, list, dump and rm, with --json, coded errors and status', async (t) => {
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir });
  t.after(() => n.stop('SIGKILL'));
  const cli = (...args: string[]) => runCli([...args, '--admin', n.url]);

  const created = await cli('nvram', 'create', 'j1', '--size', '2MiB');
  assert.equal(created.code, 0, created.stderr);
  assert.match(created.stdout, /NVRAM device j1 created: 2MiB, local, on dram/);
  assert.equal((await cli('nvram', 'create', 'j2', '--size', '100000', '--policy', 'volatile')).code, 0);

  const list = await cli('nvram', 'list');
  assert.match(list.stdout, /NAME +POLICY +ROLE +MIRROR +MEDIUM +SIZE +USED +FIRST SEQ +LAST SEQ +EPOCH +JOURNAL +STATE\nj1 +local +primary +- +dram +2MiB +0 +- +- +0 +0 of 16MiB +ready\nj2 +volatile +primary +- +dram +1MiB +0 +- +- +0 +- +ready/);
  const json = JSON.parse((await cli('nvram', 'list', '--json')).stdout) as NvramListJson;
  assert.deepEqual(json.devices.map((d) => [d.name, d.size, d.policy]), [['j1', 2 * 2 ** 20, 'local'], ['j2', 2 ** 20, 'volatile']]);

  const partition = (await (await fetch(`${n.url}/v1/tables/partition`)).json()) as PartitionTableJson;
  assert.deepEqual(partition.rows.filter((r) => r.owner?.startsWith('nvram:')).map((r) => [r.owner, r.length]), [['nvram:j1', 2 * 2 ** 20], ['nvram:j2', 2 ** 20]]);

  const dump = JSON.parse((await cli('nvram', 'dump', 'j1', '--json')).stdout) as NvramDumpJson;
  assert.deepEqual(dump.records, []);
  assert.equal(dump.device?.name, 'j1');

  assert.match((await cli('nvram', 'create', 'j1', '--size', '1MiB')).stderr, /^memstrata: MS_NVRAM_EXISTS/);
  assert.match((await cli('nvram', 'create', 'big', '--size', '1GiB')).stderr, /^memstrata: MS_NVRAM_NO_CAPACITY: no room for NVRAM device big/);
  const badPolicy = await cli('nvram', 'create', 'x', '--size', '1MiB', '--policy', 'replicated');
  assert.equal(badPolicy.code, 2);
  assert.match((await cli('nvram', 'dump', 'nope')).stderr, /^memstrata: MS_NVRAM_NOT_FOUND/);
  const badQuery = await fetch(`${n.url}/v1/nvram/j1/records?from=-1`);
  assert.equal(badQuery.status, 400);

  assert.match((await runCli(['status', '--admin', n.url])).stdout, /NVRAM devices\nNAME/);
  assert.match((await cli('nvram', 'rm', 'j2')).stdout, /NVRAM device j2 removed/);

  // A clean stop vaults; the device is back after a restart.
  assert.equal(await n.stop('SIGTERM'), 0);
  const again = await startNode({ cwd: dir });
  t.after(() => again.stop('SIGKILL'));
  const after = JSON.parse((await runCli(['nvram', 'list', '--json', '--admin', again.url])).stdout) as NvramListJson;
  assert.deepEqual(after.devices.map((d) => d.name), ['j1']);
});
