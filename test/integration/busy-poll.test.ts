// node.busyPoll (src/net/busy-poll.ts) on real nodes: two partnered nodes that poll serve
// NBD, rmem and a mirrored device's appends exactly as nodes that sleep do, count the
// time they spent polling on /metrics and in `memstrata status`, and stop on SIGTERM
// while a client keeps sending (their polling never holds them open). A node with the
// defaults says polling is off and never polls.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NbdClient } from '../../src/client/nbd-client.js';
import { RmemClient } from '../../src/client/rmem-client.js';
import type { NodeInfo } from '../../src/protocol/admin/api.js';
import { freePort, runCli, startNode, tempDir } from '../support/node-process.js';
import { nvramDevice, until } from '../support/nvram-probe.js';

async function pollSeconds(url: string): Promise<number> {
  const match = /^memstrata_busy_poll_seconds_total (\S+)$/m.exec(await (await fetch(`${url}/metrics`)).text());
  assert.ok(match !== null, 'memstrata_busy_poll_seconds_total is on /metrics');
  return Number(match[1]);
}

test('busy polling: partnered nodes that poll serve NBD, rmem and mirrored appends, count the time polled, and stop on SIGTERM under load', async (t) => {
  const [portA, portB] = [await freePort(), await freePort()];
  const args = (own: number, partner: number): string[] => ['--busy-poll', '300us', '--mirror-listen', `127.0.0.1:${own}`, '--mirror-partner', `127.0.0.1:${partner}`];
  const a = await startNode({ cwd: await tempDir(t), args: args(portA, portB) });
  t.after(() => a.stop('SIGKILL'));
  const b = await startNode({ cwd: await tempDir(t), env: { MEMSTRATA_NODE_BUSY_POLL: '300' }, args: args(portB, portA).slice(2) });
  t.after(() => b.stop('SIGKILL'));
  const created = await fetch(`${a.url}/v1/nvram`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'm', size: '4MiB', policy: 'mirrored' }) });
  assert.equal(created.status, 201, await created.text());
  await until('the replica in sync', () => nvramDevice(a, 'm'), (d) => d?.mirror === 'in-sync');

  // NBD: what is written reads back.
  const nbd = await NbdClient.connect({ host: a.nbd.host, port: a.nbd.port, export: 'default' });
  t.after(() => nbd.close());
  for (let i = 0; i < 64; i++) await nbd.write(i * 4096, Buffer.alloc(4096, i + 1));
  await nbd.flush();
  for (let i = 0; i < 64; i++) assert.ok((await nbd.read(i * 4096, 4096)).equals(Buffer.alloc(4096, i + 1)), `block ${i}`);

  // rmem: server memory and the mirrored device's journal (its records go through the partner's mirror service).
  const rmem = await RmemClient.connect({ ...a.rmem, serverId: 'poll', reconnect: false });
  t.after(() => rmem.close());
  const region = await rmem.bind(64 * 1024, { medium: 'dram' });
  for (let i = 0; i < 16; i++) await rmem.write(region, i * 4096, Buffer.alloc(4096, 0x40 + i));
  for (let i = 0; i < 16; i++) assert.ok((await rmem.read(region, i * 4096, 4096)).equals(Buffer.alloc(4096, 0x40 + i)));
  const journal = await rmem.journalOpen('m', 1);
  for (let i = 0; i < 32; i++) await rmem.journalAppend(journal, [{ payload: Buffer.from(`record ${i}`) }]);
  const records = await rmem.journalRead(journal, 1);
  assert.deepEqual(records.map((r) => r.payload.toString()), Array.from({ length: 32 }, (_, i) => `record ${i}`));
  assert.equal((await nvramDevice(a, 'm'))?.mirror, 'in-sync');

  assert.ok((await pollSeconds(a.url)) > 0, 'the node that served polled');
  assert.ok((await pollSeconds(b.url)) > 0, 'the partner polled on its mirror connection');
  const status = await runCli(['status', '--admin', a.url]);
  assert.equal(status.code, 0, status.stderr);
  assert.match(status.stdout, /^busy polling +300 us after input and replies; \d+\.\d s in polling mode since start \(serving included\)$/m);
  const json = JSON.parse((await runCli(['status', '--admin', a.url, '--json'])).stdout) as { node: NodeInfo };
  assert.equal(json.node.busyPoll?.windowUs, 300);

  // SIGTERM while a client keeps the node polling: it drains and exits 0.
  let stop = false;
  const load = (async () => {
    while (!stop) {
      try {
        await rmem.read(region, 0, 4096);
      } catch {
        return;
      }
    }
  })();
  await new Promise((resolve) => setTimeout(resolve, 200));
  const code = await a.stop('SIGTERM');
  stop = true;
  await load;
  assert.equal(code, 0, 'the polling node stopped cleanly');
});

test('busy polling is off by default: the node never polls, and status says so', async (t) => {
  const n = await startNode({ cwd: await tempDir(t) });
  t.after(() => n.stop('SIGKILL'));
  const nbd = await NbdClient.connect({ host: n.nbd.host, port: n.nbd.port, export: 'default' });
  t.after(() => nbd.close());
  for (let i = 0; i < 16; i++) await nbd.write(i * 4096, Buffer.alloc(4096, i));
  assert.equal(await pollSeconds(n.url), 0);
  const status = await runCli(['status', '--admin', n.url]);
  assert.match(status.stdout, /^busy polling +off$/m);
});
