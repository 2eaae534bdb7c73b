// Guests through the CLI and admin API of a real node (issue 12): lifecycle, limits,
// status and metrics.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { GuestInfoJson, GuestsJson } from '../../src/protocol/admin/api.js';
import { RmemClient } from '../../src/client/index.js';
import { spawn } from 'node:child_process';
import { CLI, alive, runCli, startNode, tempDir } from '../support/node-process.js';

async function until(what: string, probe: () => Promise<boolean>, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error(`${what}: not reached in ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test('memstrata guest create, list, reset, logs, stop and rm against a real node; the node stops its guests when it stops and boots them again when it starts', async (t) => {
  const dir = await tempDir(t);
  // Guests run programs as the node's user: the node must have an admin token.
  const withoutToken = await startNode({ cwd: await tempDir(t) });
  t.after(() => withoutToken.stop('SIGKILL'));
  assert.match((await runCli(['guest', 'create', 'x', '--admin', withoutToken.url, '--', 'true'])).stderr, /^memstrata: MS_ADMIN_TOKEN_REQUIRED/);
  assert.equal((await runCli(['guest', 'list', '--json', '--admin', withoutToken.url])).stdout.trim(), '[]');
  await withoutToken.stop('SIGTERM');

  const env = { MEMSTRATA_ADMIN_TOKEN: 'guest-test-token-0123456789' };
  const n = await startNode({ cwd: dir, env });
  t.after(() => n.stop('SIGTERM'));
  const run = (args: string[]) => runCli(args, { env });
  const cli = (...args: string[]) => run([...args, '--admin', n.url]);
  const info = async (name: string) => ((JSON.parse((await cli('guest', 'list', '--json')).stdout) as GuestInfoJson[]).find((g) => g.name === name));

  const created = await run(['guest', 'create', 'hello', '--admin', n.url, '--env', 'GREETING=hi', '--', 'sh', '-c', 'echo "$GREETING from $MEMSTRATA_GUEST"; exec sleep 60']);
  assert.equal(created.code, 0, created.stderr);
  assert.match(created.stdout, /guest hello created/);
  await until('running', async () => (await info('hello'))?.state === 'running');
  const list = await cli('guest', 'list');
  assert.match(list.stdout, /NAME +STATE +PID +CPU +USED +CORES +THROTTLED +MEMORY\/LIMIT +RESTARTS +ENFORCEMENT +COMMAND\nhello +running +\d+ +- /);
  await until('its output in the log', async () => (await cli('guest', 'logs', 'hello')).stdout.includes('hi from hello'));
  // --follow prints the log, then what comes, until Ctrl-C (SIGINT), and exits 0.
  const follower = spawn(process.execPath, [CLI, 'guest', 'logs', 'hello', '--follow', '--admin', n.url], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let followed = '';
  follower.stdout.on('data', (chunk: Buffer) => { followed += chunk.toString(); });
  await until('followed output', () => Promise.resolve(followed.includes('hi from hello')));
  follower.kill('SIGINT');
  assert.equal(await new Promise((resolve) => follower.once('exit', (code) => resolve(code))), 0);

  const before = (await info('hello'))?.pid;
  const reset = await cli('guest', 'reset', 'hello');
  assert.equal(reset.code, 0, reset.stderr);
  await until('running again', async () => (await info('hello'))?.state === 'running');
  assert.notEqual((await info('hello'))?.pid, before);
  assert.ok(!alive(before), 'the old process is gone');

  // Coded errors for bad input; the node goes on.
  assert.match((await run(['guest', 'create', 'hello', '--admin', n.url, '--', 'true'])).stderr, /^memstrata: MS_GUEST_EXISTS/);
  assert.match((await run(['guest', 'create', 'bad/name', '--admin', n.url, '--', 'true'])).stderr, /^memstrata: MS_GUEST_INVALID/);
  assert.match((await cli('guest', 'stop', 'nobody')).stderr, /^memstrata: MS_GUEST_NOT_FOUND/);
  assert.match((await cli('guest', 'rm', 'hello')).stderr, /^memstrata: MS_GUEST_BUSY/);

  // The node stops its guests when it stops, and boots the running ones again when it starts.
  const pid = (await info('hello'))?.pid;
  assert.equal(await n.stop('SIGTERM'), 0);
  assert.ok(!alive(pid), 'a clean stop of the node stops its guests');
  const again = await startNode({ cwd: dir, env });
  t.after(() => again.stop('SIGTERM'));
  const list2 = async () => (await (await fetch(`${again.url}/v1/guests`, { headers: { authorization: `Bearer ${env.MEMSTRATA_ADMIN_TOKEN}` } })).json()) as GuestsJson;
  await until('booted again', async () => (await list2()).guests.find((g) => g.name === 'hello')?.state === 'running');
  const stopped = await run(['guest', 'stop', 'hello', '--admin', again.url]);
  assert.equal(stopped.code, 0, stopped.stderr);
  assert.match(stopped.stdout, /guest hello: stopped/);
  assert.equal((await run(['guest', 'rm', 'hello', '--admin', again.url])).code, 0);
  assert.deepEqual((await list2()).guests, []);
});

test('limits through a real node: guest create --cpu, guest set while it runs, the budget, status and /metrics', async (t) => {
  const env = { MEMSTRATA_ADMIN_TOKEN: 'guest-test-token-0123456789' };
  // signal enforcement: works on any machine, and the node's own figures are what is checked here.
  const n = await startNode({ cwd: await tempDir(t), env, args: ['--set', 'guests.enforcement=signal', '--set', 'guests.reserveCpu=0.5'] });
  // SIGTERM: a node stopped cleanly stops its guests; one killed would leave them running.
  t.after(() => n.stop('SIGTERM'));
  const cli = (...args: string[]) => runCli([...args, '--admin', n.url], { env });
  const info = async (name: string) => ((JSON.parse((await cli('guest', 'list', '--json')).stdout) as GuestInfoJson[]).find((g) => g.name === name));

  const create = (...args: string[]) => runCli(['guest', 'create', '--admin', n.url, ...args], { env });
  const created = await create('busy', '--cpu', '0.25', '--memory', '64MiB', '--', 'sh', '-c', 'while :; do :; done');
  assert.equal(created.code, 0, created.stderr);
  assert.match(created.stdout, /guest busy created: \w+, cpu 0\.25, memory 64 ?MiB \(signal\)/);
  await until('measured', async () => (await info('busy'))?.cpuUsed !== null);
  const first = await info('busy');
  assert.equal(first?.cpu, 0.25);
  assert.equal(first?.enforcement, 'signal');
  assert.equal(first?.memoryLimit, 64 * 1024 * 1024);

  const set = await cli('guest', 'set', 'busy', '--cpu', '0.5');
  assert.equal(set.code, 0, set.stderr);
  assert.equal((await info('busy'))?.cpu, 0.5);
  assert.equal((await info('busy'))?.pid, first?.pid, 'set does not restart it');

  // The budget: the machine's cores less 0.5.
  const cores = (await import('node:os')).availableParallelism();
  const over = await create('greedy', '--cpu', String(cores - 0.5), '--', 'sleep', '60');
  assert.equal(over.code, 2);
  assert.match(over.stderr, /^memstrata: MS_GUEST_CPU_BUDGET/);
  assert.match((await cli('guest', 'set', 'busy', '--cpu', 'lots')).stderr, /^memstrata: MS_GUEST_INVALID/);
  assert.match((await cli('guest', 'set', 'busy')).stderr, /^memstrata: MS_GUEST_INVALID/);
  assert.match((await cli('guest', 'set', 'busy', '--memory', '12XB')).stderr, /^memstrata: MS_BAD_REQUEST.*memory/);

  const status = await cli('status');
  assert.match(status.stdout, /Guests \(limits by signal; shares may add up to [\d.]+ of \d+ cores, 0\.5 kept for the node; period 100 ms\)\nNAME .*\nbusy +running +\d+ +0\.5 /);
  const metrics = await (await fetch(`${n.url}/metrics`, { headers: { authorization: `Bearer ${env.MEMSTRATA_ADMIN_TOKEN}` } })).text();
  assert.match(metrics, /memstrata_guest_cpu_share\{guest="busy"\} 0\.5/);
  assert.match(metrics, /memstrata_guest_state\{guest="busy",state="running"\} 1/);
  assert.match(metrics, /memstrata_guest_cpu_seconds_total\{guest="busy"\} [\d.]+/);
  assert.match(metrics, /memstrata_guest_throttled_seconds_total\{guest="busy"\} [\d.]+/);
  assert.match(metrics, /memstrata_guest_memory_bytes\{guest="busy"\} \d+/);
  assert.match(metrics, /memstrata_guest_restarts_total\{guest="busy"\} 0/);

  const none = await cli('guest', 'set', 'busy', '--cpu', 'none', '--memory', 'none');
  assert.equal(none.code, 0, none.stderr);
  assert.equal((await info('busy'))?.cpu, null);
  assert.equal((await info('busy'))?.enforcement, 'none');
});

test('a guest allocates NVRAM devices of its own within its quota, uses the journal operations on them, and removes them; TCP clients cannot allocate', async (t) => {
  const env = { MEMSTRATA_ADMIN_TOKEN: 'guest-test-token-0123456789' };
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir, env, args: ['--set', 'guests.enforcement=signal'] });
  t.after(() => n.stop('SIGTERM'));
  const cli = (...args: string[]) => runCli([...args, '--admin', n.url], { env });
  const script = join(await tempDir(t), 'alloc.mjs');
  const client = fileURLToPath(new URL('../../src/client/index.js', import.meta.url));
  await writeFile(script, `import { RmemClient } from ${JSON.stringify(client)};
const c = await RmemClient.connect({ path: process.env.MEMSTRATA_NVRAM_SOCKET, serverId: 'alloc', keepalive: false });
const out = {};
const code = async (fn) => { try { await fn(); return 'ok'; } catch (e) { return e.code; } };
out.first = await code(() => c.journalCreate('own-a', 2 << 20, 'local'));
out.again = await code(() => c.journalCreate('own-a', 1 << 20, 'local'));
out.second = await code(() => c.journalCreate('own-b', 2 << 20, 'volatile'));
out.over = await code(() => c.journalCreate('own-c', 1 << 20, 'local'));
const j = await c.journalOpen('own-a', 1);
const [ack] = await c.journalAppend(j, [{ payload: Buffer.from('entry'), target: { volume: 'v', offset: 4096 } }]);
const [rec] = await c.journalRead(j, ack.seq);
out.read = rec.payload.toString() + '@' + rec.target.volume + ':' + rec.target.offset + ' t=' + (rec.timestamp > 0);
await c.journalTrim(j, ack.seq);
out.info = (await c.journalInfo(j)).firstSeq;
out.removeOther = await code(() => c.journalRemove('given'));
out.removeOwn = await code(() => c.journalRemove('own-b'));
out.afterRemove = await code(() => c.journalCreate('own-c', 1 << 20, 'local'));
await c.close();
process.stdout.write(JSON.stringify(out) + '\\n');
`);
  assert.equal((await cli('nvram', 'create', 'given', '--size', '1MiB')).code, 0);
  const created = await runCli(['guest', 'create', 'alloc', '--admin', n.url, '--nvram', 'given', '--nvram-quota', '4MiB', '--restart', 'never', '--', process.execPath, script], { env });
  assert.equal(created.code, 0, created.stderr);
  await until('it ran', async () => (JSON.parse((await cli('guest', 'list', '--json')).stdout) as GuestInfoJson[]).find((g) => g.name === 'alloc')?.state === 'stopped');
  const result = JSON.parse((await cli('guest', 'logs', 'alloc')).stdout.trim().split('\n').at(-1) ?? '{}') as Record<string, unknown>;
  assert.deepEqual(result, {
    first: 'ok',
    again: 'MS_RMEM_INVALID', // the name exists (wire INVALID)
    second: 'ok',
    over: 'MS_RMEM_NO_CAPACITY', // 5 MiB would pass the 4 MiB quota
    read: 'entry@v:4096 t=true',
    info: 0,
    removeOther: 'MS_NVRAM_NOT_FOUND', // attached by the operator, not its own
    removeOwn: 'ok',
    afterRemove: 'ok',
  });
  const info = (JSON.parse((await cli('guest', 'list', '--json')).stdout) as GuestInfoJson[]).find((g) => g.name === 'alloc');
  assert.deepEqual(info?.nvram, ['given', 'own-a', 'own-c']);
  assert.equal(info?.nvramOwned, 3 * 1024 * 1024);
  // Its devices are attached to it: not removable until detached.
  assert.match((await cli('nvram', 'rm', 'own-a')).stderr, /^memstrata: MS_GUEST_ATTACHED/);
  // Over TCP, allocation is the admin API's.
  const node = JSON.parse((await cli('status', '--json')).stdout) as { node: { listen: { rmem: string } } };
  const tcp = await RmemClient.connect({ host: '127.0.0.1', port: Number(node.node.listen.rmem.split(':').pop()), serverId: 'tcp', keepalive: false, reconnect: false });
  t.after(() => tcp.close());
  await assert.rejects(tcp.journalCreate('sneaky', 1 << 20), { code: 'MS_RMEM_UNSUPPORTED' });
});

test('attachments hold under races: two guests created with one volume at once, attach against removal; a guest\'s socket admits guests.maxConnections', async (t) => {
  const env = { MEMSTRATA_ADMIN_TOKEN: 'guest-test-token-0123456789' };
  const n = await startNode({ cwd: await tempDir(t), env, args: ['--set', 'guests.enforcement=signal', '--set', 'guests.maxConnections=4'] });
  t.after(() => n.stop('SIGTERM'));
  const api = async (method: string, path: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }> => {
    const response = await fetch(`${n.url}${path}`, { method, headers: { authorization: `Bearer ${env.MEMSTRATA_ADMIN_TOKEN}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) }, ...(body === undefined ? {} : { body: JSON.stringify(body) }) });
    const text = await response.text();
    return { status: response.status, json: text === '' ? {} : (JSON.parse(text) as Record<string, unknown>) };
  };
  assert.equal((await api('POST', '/v1/volumes', { name: 'shared', size: '1MiB' })).status, 201);
  const [one, two] = await Promise.all(['g1', 'g2'].map((name) => api('POST', '/v1/guests', { name, command: ['sleep', '60'], volumes: ['shared'] })));
  assert.deepEqual([one?.status, two?.status].sort(), [201, 409], 'one create wins, the other is MS_GUEST_ATTACHED');
  const holders = ((await api('GET', '/v1/guests')).json.guests as GuestInfoJson[]).filter((g) => g.volumes.includes('shared'));
  assert.equal(holders.length, 1);

  // Attach against removal, many times: afterwards a volume attached to a guest exists.
  await api('POST', '/v1/guests', { name: 'taker', command: ['sleep', '60'] });
  for (let i = 0; i < 20; i++) {
    const name = `v${i}`;
    assert.equal((await api('POST', '/v1/volumes', { name, size: '1MiB' })).status, 201);
    await Promise.all([api('DELETE', `/v1/volumes/${name}`), api('POST', '/v1/guests/taker/attach', { volume: name })]);
    const attached = ((await api('GET', '/v1/guests')).json.guests as GuestInfoJson[]).find((g) => g.name === 'taker')?.volumes.includes(name) === true;
    const exists = ((await api('GET', '/v1/volumes')).json.volumes as { name: string }[]).some((v) => v.name === name);
    assert.ok(!attached || exists, `volume ${name} is attached to the guest but was removed`);
    if (attached) await api('POST', '/v1/guests/taker/detach', { volume: name });
  }

  // A guest's NBD socket admits 4 connections; more are closed at once, and TCP clients go on.
  const sockets = ((await api('GET', '/v1/guests')).json.guests as GuestInfoJson[]).find((g) => g.volumes.includes('shared'))?.sockets;
  assert.ok(sockets !== null && sockets !== undefined);
  const { connect } = await import('node:net');
  const opened = await Promise.all(Array.from({ length: 12 }, () => new Promise<boolean>((resolve) => {
    // Admitted: greeted (however long the greeting takes); refused: closed without one.
    const s = connect({ path: sockets.nbd });
    s.once('data', () => resolve(true));
    s.on('error', () => resolve(false));
    s.on('close', () => resolve(false));
    setTimeout(() => { resolve(false); }, 20_000).unref(); // not a reason to keep the test process up
    t.after(() => s.destroy());
  })));
  assert.equal(opened.filter(Boolean).length, 4, 'the NBD greeting reached 4 connections, no more');
  const { NbdClient } = await import('../../src/client/index.js');
  const info = (await api('GET', '/v1/node')).json as { listen: { nbd: string } };
  const tcp = await NbdClient.connect({ uri: `nbd://${info.listen.nbd}/default` });
  await tcp.close();
});
