// Guests through the CLI and admin API of a real node (issue 12, lifecycle so far).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { GuestInfoJson, GuestsJson } from '../../src/protocol/admin/api.js';
import { runCli, startNode, tempDir } from '../support/node-process.js';

function alive(pid: number | null | undefined): boolean {
  if (pid === null || pid === undefined) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

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
  t.after(() => n.stop('SIGKILL'));
  const run = (args: string[]) => runCli(args, { env });
  const cli = (...args: string[]) => run([...args, '--admin', n.url]);
  const info = async (name: string) => ((JSON.parse((await cli('guest', 'list', '--json')).stdout) as GuestInfoJson[]).find((g) => g.name === name));

  const created = await run(['guest', 'create', 'hello', '--admin', n.url, '--env', 'GREETING=hi', '--', 'sh', '-c', 'echo "$GREETING from $MEMSTRATA_GUEST"; exec sleep 60']);
  assert.equal(created.code, 0, created.stderr);
  assert.match(created.stdout, /guest hello created/);
  await until('running', async () => (await info('hello'))?.state === 'running');
  const list = await cli('guest', 'list');
  assert.match(list.stdout, /NAME +STATE +PID +RESTARTS +RESETS +POLICY +COMMAND\nhello +running +\d+ +0 +0 +on-failure +sh -c/);
  await until('its output in the log', async () => (await cli('guest', 'logs', 'hello')).stdout.includes('hi from hello'));

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
  t.after(() => again.stop('SIGKILL'));
  const list2 = async () => (await (await fetch(`${again.url}/v1/guests`, { headers: { authorization: `Bearer ${env.MEMSTRATA_ADMIN_TOKEN}` } })).json()) as GuestsJson;
  await until('booted again', async () => (await list2()).guests.find((g) => g.name === 'hello')?.state === 'running');
  const stopped = await run(['guest', 'stop', 'hello', '--admin', again.url]);
  assert.equal(stopped.code, 0, stopped.stderr);
  assert.match(stopped.stdout, /guest hello: stopped/);
  assert.equal((await run(['guest', 'rm', 'hello', '--admin', again.url])).code, 0);
  assert.deepEqual((await list2()).guests, []);
});
