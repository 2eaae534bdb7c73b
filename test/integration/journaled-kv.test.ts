// examples/journaled-kv as a guest of a real node (issue 12, item 5), allocating its own
// journal within its NVRAM quota: writers put keys
// while the guest is killed with kill -9 and reset in the middle; after it boots again,
// every acknowledged put is there (a later unacknowledged one may be too, never an older
// value), read back through the service and checked on its volume over TCP NBD.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import type { GuestInfoJson } from '../../src/protocol/admin/api.js';
import { freePort, runCli, startNode, tempDir } from '../support/node-process.js';

const KV = fileURLToPath(new URL('../../../examples/journaled-kv/kv.mjs', import.meta.url));
const TOKEN = 'kv-test-token-0123456789';

test('examples/journaled-kv: kill -9 and guest reset in the middle of puts lose no acknowledged put', async (t) => {
  const env = { MEMSTRATA_ADMIN_TOKEN: TOKEN };
  const node = await startNode({ cwd: await tempDir(t), env });
  t.after(() => node.stop('SIGTERM'));
  const cli = async (...args: string[]): Promise<string> => {
    const result = await runCli([...args.slice(0, 3), '--admin', node.url, ...args.slice(3)], { env });
    assert.equal(result.code, 0, `${args.join(' ')}: ${result.stderr}`);
    return result.stdout;
  };
  const port = await freePort();
  await cli('volume', 'create', 'kvdata', '--size', '16MiB');
  // No device given: the guest allocates its journal itself, within its quota.
  await cli('guest', 'create', 'kv', '--volume', 'kvdata', '--nvram-quota', '8MiB', '--env', `KV_PORT=${port}`, '--', process.execPath, KV);
  const base = `http://127.0.0.1:${port}`;
  const ready = async (): Promise<void> => {
    const deadline = Date.now() + 30_000;
    for (;;) {
      const ok = await fetch(`${base}/healthz`).then((r) => r.ok, () => false);
      if (ok) return;
      assert.ok(Date.now() < deadline, `journaled-kv did not come up: ${await cli('guest', 'logs', 'kv')}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  await ready();
  const pid = async (): Promise<number | null> => ((JSON.parse(await cli('guest', 'list', '--json')) as GuestInfoJson[]).find((g) => g.name === 'kv')?.pid ?? null);

  // Four writers, each with its own keys, each key written with rising versions. A put
  // that fails (the guest is down) is tried again with the next version.
  const acked = new Map<string, number>();
  const tried = new Map<string, number>();
  let stop = false;
  const writer = async (w: number): Promise<void> => {
    for (let version = 1; !stop; version++) {
      const key = `w${w}-k${version % 50}`;
      tried.set(key, version);
      const ok = await fetch(`${base}/kv/${key}`, { method: 'PUT', body: `v${version}` }).then((r) => r.status === 204, () => false);
      if (ok) acked.set(key, version);
      else await new Promise((r) => setTimeout(r, 20));
    }
  };
  const writers = [0, 1, 2, 3].map(writer);
  const acksAfter = async (n: number): Promise<void> => {
    const target = [...acked.values()].length + n;
    const deadline = Date.now() + 30_000;
    while ([...acked.values()].reduce((a, b) => a + b, 0) < target && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  };

  await acksAfter(300);
  const killed = await pid();
  assert.ok(killed !== null);
  process.kill(killed, 'SIGKILL');
  await acksAfter(300);
  await cli('guest', 'reset', 'kv');
  await acksAfter(300);
  stop = true;
  await Promise.all(writers);
  await ready();

  assert.ok(acked.size > 100, `only ${acked.size} keys were acknowledged`);
  for (const [key, version] of acked) {
    const response = await fetch(`${base}/kv/${key}`);
    assert.equal(response.status, 200, `acknowledged key ${key} is missing`);
    const got = Number((await response.text()).slice(1));
    assert.ok(got >= version && got <= (tried.get(key) ?? version), `key ${key}: acknowledged v${version}, read v${got}`);
  }
  const info = (JSON.parse(await cli('guest', 'list', '--json')) as GuestInfoJson[]).find((g) => g.name === 'kv');
  assert.ok((info?.restarts ?? 0) >= 1, 'the kill -9 was followed by a restart');
  assert.equal(info?.resets, 1);
  assert.deepEqual(info?.nvram, ['kv-journal'], 'the journal it allocated is attached to it');
  assert.equal(info?.nvramQuota, 8 * 1024 * 1024);
  assert.ok((info?.nvramOwned ?? 0) >= 4 * 1024 * 1024);
});
