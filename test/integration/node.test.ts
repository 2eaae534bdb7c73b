// A real node process on ephemeral loopback ports in a temporary directory, driven
// through its admin API and the CLI.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { access, mkdir, readFile, readdir, rm, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { NodeInfo, PartitionTableJson, AllocationTableJson, ResizeResponse } from '../../src/protocol/admin/api.js';
import { SMALL_MEDIA, runCli, startNode, tempDir } from '../support/node-process.js';

async function getJson<T>(url: string): Promise<{ status: number; body: T }> {
  const response = await fetch(url);
  return { status: response.status, body: (await response.json()) as T };
}

async function postJson<T>(url: string, body: unknown, raw?: string): Promise<{ status: number; body: T }> {
  const response = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: raw ?? JSON.stringify(body) });
  return { status: response.status, body: (await response.json()) as T };
}

test('admin API and CLI against a running node, then SIGTERM exits 0', async (t) => {
  const dir = await tempDir(t);
  const node = await startNode({ cwd: dir, args: ['--node-id', 'ms-test'] });
  t.after(() => node.stop('SIGKILL'));

  const health = await getJson<{ status: string }>(`${node.url}/healthz`);
  assert.deepEqual(health, { status: 200, body: { status: 'ok' } });

  const info = await getJson<NodeInfo>(`${node.url}/v1/node`);
  assert.equal(info.status, 200);
  assert.equal(info.body.id, 'ms-test');
  assert.equal(info.body.dataDir, join(dir, 'memstrata-data'));
  assert.deepEqual(info.body.media.map((m) => [m.name, m.capacity]), [['dram', 64 * 2 ** 20], ['flash', 128 * 2 ** 20]]);

  const partition = await getJson<PartitionTableJson>(`${node.url}/v1/tables/partition`);
  assert.deepEqual(partition.body.rows.filter((r) => r.medium === 'dram').map((r) => [r.range, r.kind]), [
    ['0x00000000 to 0x01ffffff', 'cache'],
    ['0x02000000 to 0x02ffffff', 'server'],
    ['0x03000000 to 0x033fffff', 'nvram'],
    ['0x03400000 to 0x03ffffff', 'free'],
  ]);

  const allocation = await getJson<AllocationTableJson>(`${node.url}/v1/tables/allocation`);
  assert.deepEqual(allocation.body, { rows: [], servers: [] });

  const resized = await postJson<ResizeResponse>(`${node.url}/v1/partition/resize`, { medium: 'dram', kind: 'server', bytes: '32MiB' });
  assert.equal(resized.status, 200);
  assert.deepEqual(resized.body.result.moved, { free: 12 * 2 ** 20, cache: 4 * 2 ** 20 });

  const bound = await postJson<{ error: { code: string; message: string } }>(`${node.url}/v1/partition/resize`, { medium: 'dram', kind: 'nvram', bytes: '1GiB' });
  assert.equal(bound.status, 409);
  assert.equal(bound.body.error.code, 'MS_PARTITION_BOUND');

  for (const [body, raw] of [[{ medium: 'tape', kind: 'server', bytes: 1 }], [{ medium: 'dram', kind: 'free', bytes: 1 }], [{ medium: 'dram', kind: 'server', bytes: '1GB' }], [{ medium: 'dram', kind: 'server', bytes: 1, extra: 1 }], [undefined, '{not json']] as const) {
    const bad = await postJson<{ error: { code: string } }>(`${node.url}/v1/partition/resize`, body, raw);
    assert.equal(bad.status, 400, JSON.stringify(body ?? raw));
    assert.equal(bad.body.error.code, 'MS_BAD_REQUEST');
  }
  const missing = await getJson<{ error: { code: string } }>(`${node.url}/v1/nothing`);
  assert.deepEqual([missing.status, missing.body.error.code], [404, 'MS_NOT_FOUND']);

  const metrics = await (await fetch(`${node.url}/metrics`)).text();
  assert.match(metrics, /memstrata_memory_bytes\{medium="dram",kind="server"\} 33554432/);
  assert.match(metrics, /memstrata_partition_resizes_total\{medium="dram",kind="nvram",result="MS_PARTITION_BOUND"\} 1/);
  assert.match(metrics, /process_cpu_user_seconds_total/);
  assert.match(metrics, /memstrata_node_info\{node="ms-test",version="[^"]+"\} 1/);

  // CLI: status as tables and as JSON.
  const status = await runCli(['status', '--admin', node.url]);
  assert.equal(status.code, 0, status.stderr);
  assert.match(status.stdout, /node ms-test/);
  assert.match(status.stdout, /Memory partition table\nMEDIUM +PHYSICAL ADDRESS +SIZE +KIND +OWNER\n/);
  assert.match(status.stdout, /dram +0x01c00000 to 0x02ffffff +20MiB +server +-\ndram +0x03000000 to 0x033fffff +4MiB +nvram +-\ndram +0x03400000 to 0x03ffffff +12MiB +server +-\n/);
  assert.match(status.stdout, /Server memory allocate table\n\(no server holds memory on this node\)/);
  const statusJson = await runCli(['status', '--json'], { env: { MEMSTRATA_ADMIN: node.url } });
  assert.equal(statusJson.code, 0, statusJson.stderr);
  const parsed = JSON.parse(statusJson.stdout) as { node: NodeInfo; partition: PartitionTableJson; allocation: AllocationTableJson };
  assert.equal(parsed.node.id, 'ms-test');
  assert.ok(parsed.partition.rows.length > 0);

  const show = await runCli(['partition', 'show', '--admin', node.url, '--json']);
  assert.equal(show.code, 0, show.stderr);
  assert.deepEqual((JSON.parse(show.stdout) as PartitionTableJson).rows, (await getJson<PartitionTableJson>(`${node.url}/v1/tables/partition`)).body.rows);
  const showText = await runCli(['partition', 'show', '--admin', node.url]);
  assert.match(showText.stdout, /flash +0x00000000 to 0x03ffffff +64MiB +cache/);

  const resize = await runCli(['partition', 'resize', '--medium', 'flash', '--kind', 'nvram', '--bytes', '16MiB', '--admin', node.url]);
  assert.equal(resize.code, 0, resize.stderr);
  assert.match(resize.stdout, /flash nvram: 8MiB -> 16MiB \(8MiB from free\)/);
  const resizeJson = await runCli(['partition', 'resize', '--medium', 'flash', '--kind', 'nvram', '--bytes', '8MiB', '--admin', node.url, '--json']);
  assert.equal((JSON.parse(resizeJson.stdout) as ResizeResponse).result.toBytes, 8 * 2 ** 20);

  const refused = await runCli(['partition', 'resize', '--medium', 'dram', '--kind', 'server', '--bytes', '1GiB', '--admin', node.url]);
  assert.equal(refused.code, 2);
  assert.equal(refused.stderr.trim().split('\n').length, 1);
  assert.match(refused.stderr, /^memstrata: MS_PARTITION_BOUND: dram server must stay between 0 and 64MiB/);
  const badChoice = await runCli(['partition', 'resize', '--medium', 'tape', '--kind', 'server', '--bytes', '1', '--admin', node.url]);
  assert.equal(badChoice.code, 2);
  assert.match(badChoice.stderr, /argument 'tape' is invalid/);

  const help = await runCli(['partition', 'resize', '--help']);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /--medium <medium>/);

  // A node that hangs on SIGTERM fails by the file's test timeout, not by a clock here.
  assert.equal(await node.stop('SIGTERM'), 0);
  assert.ok(node.logs.some((l) => l.msg === 'node stopped'));
  await assert.rejects(access(join(dir, 'memstrata-data', 'node.lock')), 'lock released on a clean stop');

  const unreachable = await runCli(['status', '--admin', node.url]);
  assert.equal(unreachable.code, 1);
  assert.match(unreachable.stderr, /^memstrata: MS_ADMIN_UNREACHABLE: cannot reach the admin API at http:\/\/127\.0\.0\.1:\d+/);
});

test('a second node on the same data directory is refused; a restart after kill -9 works', async (t) => {
  const dir = await tempDir(t);
  const first = await startNode({ cwd: dir });
  t.after(() => first.stop('SIGKILL'));
  const id = ((await getJson<NodeInfo>(`${first.url}/v1/node`)).body).id;
  assert.match(id, /^ms-[0-9a-f]{8}$/);

  const second = await runCli(['node', 'start', '--admin-listen', '127.0.0.1:0', '--log-format', 'json', '--dram-size', '64MiB', '--flash-size', '128MiB'], { cwd: dir });
  assert.equal(second.code, 1);
  assert.match(second.stderr, /MS_NODE_LOCKED: data directory is in use by another memstrata node \(pid \d+/);

  assert.equal(await first.stop('SIGKILL'), 'SIGKILL');
  const restarted = await startNode({ cwd: dir });
  t.after(() => restarted.stop('SIGKILL'));
  assert.ok(restarted.logs.some((l) => l.msg === 'took over the lock of a node that did not stop cleanly'));
  assert.equal(((await getJson<NodeInfo>(`${restarted.url}/v1/node`)).body).id, id, 'the node id is kept in the data directory');
  assert.equal(await restarted.stop('SIGINT'), 0);
});

test('Ctrl-C on npm start delivers SIGINT twice (the terminal, then npm): the node drains once and exits 0', async (t) => {
  const node = await startNode({ cwd: await tempDir(t) });
  t.after(() => node.stop('SIGKILL'));
  node.proc.kill('SIGINT');
  node.proc.kill('SIGINT');
  assert.equal(await node.stop('SIGINT'), 0);
  assert.ok(node.logs.some((l) => l.msg === 'node stopped'), 'it stopped in order');
  assert.equal(node.logs.some((l) => l.msg === 'second signal while stopping: exiting without draining'), false);
});

test('a damaged node-id file stops start-up with MS_NODE_ID_INVALID naming the file, and nothing is written through a node-id symlink', async (t) => {
  // Review finding: a 300-character id was accepted (and then no rmem HELLO could be
  // encoded), and the file was written with a plain writeFile that follows a symlink.
  const dir = await tempDir(t);
  const data = join(dir, 'memstrata-data');
  await mkdir(data);
  const start = ['node', 'start', '--admin-listen', '127.0.0.1:0', '--nbd-listen', '127.0.0.1:0', '--rmem-listen', '127.0.0.1:0', '--mirror-listen', '127.0.0.1:0', '--log-format', 'json', ...SMALL_MEDIA];
  await writeFile(join(data, 'node-id'), `${'x'.repeat(300)}\n`);
  const tooLong = await runCli(start, { cwd: dir });
  assert.equal(tooLong.code, 1, tooLong.stderr);
  assert.match(tooLong.stderr, /^memstrata: MS_NODE_ID_INVALID: node id file \S+memstrata-data\/node-id does not hold a node id \(300 characters, expected 1 to 64 letters/m);
  assert.ok(!tooLong.stderr.includes('x'.repeat(65)), 'the content is not echoed');
  await assert.rejects(access(join(data, 'node.lock')), 'the lock is released');

  const outside = join(await tempDir(t), 'elsewhere');
  await rm(join(data, 'node-id'));
  await symlink(outside, join(data, 'node-id'));
  const linked = await runCli(start, { cwd: dir });
  assert.equal(linked.code, 1, linked.stderr);
  assert.match(linked.stderr, /^memstrata: MS_NODE_ID_INVALID: node id file \S+node-id is a symbolic link, not a regular file/m);
  await assert.rejects(access(outside), 'nothing was written where the link points');

  await rm(join(data, 'node-id'));
  const fresh = await startNode({ cwd: dir });
  t.after(() => fresh.stop('SIGKILL'));
  const id = ((await getJson<NodeInfo>(`${fresh.url}/v1/node`)).body).id;
  assert.equal(await readFile(join(data, 'node-id'), 'utf8'), `${id}\n`, 'a new id is written to a regular file');
  assert.deepEqual((await readdir(data)).filter((f) => f.startsWith('node-id')), ['node-id'], 'no temporary file left');
  assert.equal(await fresh.stop(), 0);
});

test('defaults start a node with no configuration file; a YAML file is read', async (t) => {
  const dir = await tempDir(t);
  // Only the port is moved off the default so tests never collide with a running node.
  const plain = await startNode({ cwd: dir, env: { MEMSTRATA_ADMIN_LISTEN: '127.0.0.1:0' } });
  t.after(() => plain.stop('SIGKILL'));
  assert.equal((await getJson<{ status: string }>(`${plain.url}/healthz`)).status, 200);
  await access(join(dir, 'memstrata-data', 'flash.img'));
  assert.equal(await plain.stop(), 0);

  await writeFile(join(dir, 'node.yaml'), 'node:\n  id: from-yaml\nmedia:\n  extentSize: 4MiB\n  dram:\n    size: 64MiB\n  flash:\n    size: 0\n');
  const configured = await startNode({ cwd: dir, small: false, args: ['--config', 'node.yaml'] });
  t.after(() => configured.stop('SIGKILL'));
  const info = (await getJson<NodeInfo>(`${configured.url}/v1/node`)).body;
  assert.equal(info.id, 'from-yaml');
  assert.deepEqual(info.media.map((m) => [m.name, m.extentSize]), [['dram', 4 * 2 ** 20]]);
  assert.equal(await configured.stop(), 0);
});

test('invalid configuration stops start-up with one line and exit code 2', async (t) => {
  const dir = await tempDir(t);
  const result = await runCli(['node', 'start', '--dram-size', '12XB'], { cwd: dir });
  assert.equal(result.code, 2);
  assert.equal(result.stderr.trim().split('\n').length, 1);
  assert.match(result.stderr, /^memstrata: MS_CONFIG_INVALID: invalid configuration: media\.dram\.size is "12XB" \(from flag --dram-size\): expected a size/);
  await assert.rejects(access(join(dir, 'memstrata-data')), 'nothing was created');

  const busyPort = await startNode({ cwd: dir });
  t.after(() => busyPort.stop('SIGKILL'));
  const port = new URL(busyPort.url).port;
  const other = await tempDir(t);
  const clash = await runCli(['node', 'start', '--admin-listen', `127.0.0.1:${port}`, '--log-format', 'json', '--dram-size', '64MiB', '--flash-size', '128MiB'], { cwd: other });
  assert.equal(clash.code, 1);
  assert.match(clash.stderr, /^memstrata: MS_LISTEN_FAILED: admin API cannot listen on 127\.0\.0\.1:\d+: .*EADDRINUSE/);
  await assert.rejects(access(join(other, 'memstrata-data', 'node.lock')), 'a failed start releases the lock');
});
