// Admin authentication on a real node process: the token from the environment or a file,
// the CLI with --token and MEMSTRATA_ADMIN_TOKEN, /metrics with admin.metricsPublic, the
// start-up refusal of an open admin API on a non-loopback address, and that the token
// shows up nowhere (logs, status, errors).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { access, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { NodeInfo, VolumesJson } from '../../src/protocol/admin/api.js';
import { runCli, startNode, tempDir } from '../support/node-process.js';

const TOKEN = 'b8e1f0c3a6d94e27b5c8a1f0e3d6c9b2';

async function get(url: string, token?: string): Promise<{ status: number; body: string; authenticate: string | null }> {
  const response = await fetch(url, token === undefined ? {} : { headers: { authorization: `Bearer ${token}` } });
  return { status: response.status, body: await response.text(), authenticate: response.headers.get('www-authenticate') };
}

test('a node with admin.token from the environment: API, CLI and metrics need the token; /healthz does not', async (t) => {
  const dir = await tempDir(t);
  const node = await startNode({ cwd: dir, env: { MEMSTRATA_ADMIN_TOKEN: TOKEN } });
  t.after(() => node.stop('SIGKILL'));
  const listening = node.logs.find((l) => l.msg === 'admin API listening');
  assert.equal(listening?.token, true);

  assert.equal((await get(`${node.url}/healthz`)).status, 200);
  for (const path of ['/v1/node', '/v1/volumes', '/v1/nvram', '/v1/servers', '/v1/tables/partition', '/v1/tables/allocation', '/metrics', '/v1/nvram/none/records', '/']) {
    for (const token of [undefined, 'b8e1f0c3a6d94e27b5c8a1f0e3d6c9b3']) {
      const answer = await get(`${node.url}${path}`, token);
      assert.equal(answer.status, 401, `${path} with ${token === undefined ? 'no' : 'a wrong'} token`);
      assert.match(answer.authenticate ?? '', /^Bearer /);
      assert.equal((JSON.parse(answer.body) as { error: { code: string } }).error.code, 'MS_ADMIN_UNAUTHORIZED');
    }
  }
  const removal = await fetch(`${node.url}/v1/volumes/default`, { method: 'DELETE' });
  assert.equal(removal.status, 401);
  const info = await get(`${node.url}/v1/node`, TOKEN);
  assert.equal(info.status, 200);
  assert.equal((await get(`${node.url}/metrics`, TOKEN)).status, 200);
  const volumes = JSON.parse((await get(`${node.url}/v1/volumes`, TOKEN)).body) as VolumesJson;
  assert.deepEqual(volumes.volumes.map((v) => v.name), ['default'], 'the refused DELETE changed nothing');

  // CLI: the token from --token, from the environment, and none.
  const withFlag = await runCli(['volume', 'list', '--admin', node.url, '--token', TOKEN], { env: { MEMSTRATA_ADMIN_TOKEN: '' } });
  assert.equal(withFlag.code, 0, withFlag.stderr);
  assert.match(withFlag.stdout, /default/);
  const withEnv = await runCli(['status', '--json', '--admin', node.url], { env: { MEMSTRATA_ADMIN_TOKEN: TOKEN } });
  assert.equal(withEnv.code, 0, withEnv.stderr);
  const status = JSON.parse(withEnv.stdout) as { node: NodeInfo };
  assert.ok(status.node.id.length > 0);
  const created = await runCli(['volume', 'create', 'vm1', '--size', '1MiB', '--admin', node.url], { env: { MEMSTRATA_ADMIN_TOKEN: TOKEN } });
  assert.equal(created.code, 0, created.stderr);
  for (const env of [{ MEMSTRATA_ADMIN_TOKEN: '' }, { MEMSTRATA_ADMIN_TOKEN: 'not-the-token-0123456789' }]) {
    const refused = await runCli(['volume', 'rm', 'vm1', '--admin', node.url], { env });
    assert.equal(refused.code, 2, refused.stderr);
    assert.equal(refused.stderr.trim().split('\n').length, 1);
    assert.match(refused.stderr, /^memstrata: MS_ADMIN_UNAUTHORIZED: /);
  }
  const still = JSON.parse((await get(`${node.url}/v1/volumes`, TOKEN)).body) as VolumesJson;
  assert.deepEqual(still.volumes.map((v) => v.name), ['default', 'vm1']);

  const metrics = (await get(`${node.url}/metrics`, TOKEN)).body;
  assert.match(metrics, /memstrata_admin_auth_failures_total (\d+)/);
  assert.ok(Number(/memstrata_admin_auth_failures_total (\d+)/.exec(metrics)?.[1]) >= 21);

  const everything = [JSON.stringify(node.logs), info.body, withEnv.stdout, withEnv.stderr, metrics].join('\n');
  assert.ok(!everything.includes(TOKEN), 'the token appears in no log, status or metric');
  assert.ok(node.logs.some((l) => l.msg === 'admin API request refused: missing or wrong token'), 'refusals are logged');
  assert.equal(await node.stop(), 0);
});

test('admin.tokenFile holds the token; admin.metricsPublic opens /metrics only', async (t) => {
  const dir = await tempDir(t);
  await writeFile(join(dir, 'admin-token'), `${TOKEN}\n`, { mode: 0o600 });
  const node = await startNode({ cwd: dir, args: ['--set', 'admin.tokenFile=admin-token', '--set', 'admin.metricsPublic=true'] });
  t.after(() => node.stop('SIGKILL'));
  assert.equal((await get(`${node.url}/metrics`)).status, 200);
  assert.equal((await get(`${node.url}/v1/node`)).status, 401);
  assert.equal((await get(`${node.url}/v1/node`, TOKEN)).status, 200);
  assert.ok(!JSON.stringify(node.logs).includes(TOKEN));
  assert.equal(await node.stop(), 0);
});

test('an admin API on a non-loopback address without a token refuses to start, naming the field', async (t) => {
  const dir = await tempDir(t);
  for (const listen of ['0.0.0.0:0', '[::]:0']) {
    const result = await runCli(['node', 'start', '--admin-listen', listen, '--log-format', 'json', '--dram-size', '64MiB', '--flash-size', '128MiB'], { cwd: dir });
    assert.equal(result.code, 2, listen);
    assert.equal(result.stderr.trim().split('\n').length, 1, result.stderr);
    assert.match(result.stderr, /^memstrata: MS_CONFIG_INVALID: invalid configuration: admin\.listen is "[^"]+" \(from flag --admin-listen\): expected a loopback address .*unless admin\.token or admin\.tokenFile is set/);
  }
  await assert.rejects(access(join(dir, 'memstrata-data')), 'nothing was created');

  const tooShort = await runCli(['node', 'start', '--admin-listen', '127.0.0.1:0'], { cwd: dir, env: { MEMSTRATA_ADMIN_TOKEN: 'weak-secret' } });
  assert.equal(tooShort.code, 2);
  assert.match(tooShort.stderr, /admin\.token is \(hidden\)/);
  assert.ok(!tooShort.stderr.includes('weak-secret'), 'a refused token is not printed');
});
