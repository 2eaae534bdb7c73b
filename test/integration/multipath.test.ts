// Multipath NVRAM (issue 12, item 4) against real nodes: a MultipathJournal appending from
// many lanes while (1) its active path is closed under load, and (2) the node of its active
// path is killed with kill -9 and it promotes the mirror partner. Afterwards every
// acknowledged record is on the device exactly once, no record is there twice (re-sent
// appends the device already had are answered, not appended), and the records of this
// writer are in the order the appends were made.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, connect, type Socket } from 'node:net';
import { MultipathJournal, RmemClient } from '../../src/client/index.js';
import { appenders, checkExactlyOnce, readAll } from '../support/journal-load.js';
import { freePort, startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { nvramDevice, until } from '../support/nvram-probe.js';

type Ctx = { after(fn: () => unknown): void };

async function createDevice(n: NodeProcess, name: string, policy: string): Promise<void> {
  const response = await fetch(`${n.url}/v1/nvram`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name, size: '8MiB', policy }) });
  assert.equal(response.status, 201, await response.text());
}

/** A TCP proxy in front of a node's rmem port: a path the test can cut, or stall (open, silent). */
async function proxy(t: Ctx, target: { host: string; port: number }, port = 0): Promise<{ port: number; cut(): void; stall(): void }> {
  const sockets = new Set<Socket>();
  const server = createServer((inbound) => {
    const outbound = connect(target);
    sockets.add(inbound).add(outbound);
    inbound.pipe(outbound).pipe(inbound);
    const drop = (): void => { inbound.destroy(); outbound.destroy(); };
    inbound.on('error', drop).on('close', drop);
    outbound.on('error', drop).on('close', drop);
  });
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  const address = server.address();
  const bound = typeof address === 'object' && address !== null ? address.port : 0;
  const cut = (): void => {
    server.close();
    for (const s of sockets) s.destroy();
  };
  const stall = (): void => {
    // Connections stay open and nothing moves: the node still holds their sessions.
    for (const s of sockets) {
      s.unpipe();
      s.pause();
    }
  };
  t.after(cut);
  return { port: bound, cut, stall };
}

test('multipath: the active path closed under load; the journal moves to the next path, re-sends, and every acknowledged record is there exactly once', async (t) => {
  const node = await startNode({ cwd: await tempDir(t) });
  t.after(() => node.stop('SIGKILL'));
  await createDevice(node, 'mp', 'local');
  const front = await proxy(t, node.rmem);
  const journal = await MultipathJournal.open({
    device: 'mp',
    serverId: 'multipath',
    epoch: 1,
    paths: [{ name: 'proxied', host: '127.0.0.1', port: front.port }, { name: 'direct', ...node.rmem }],
    timeoutMs: 2000,
  });
  t.after(() => journal.close());
  assert.deepEqual(journal.paths().map((p) => [p.name, p.state]), [['proxied', 'active'], ['direct', 'standby']]);
  const load = appenders(journal, 16);
  await until('appends through the first path', () => Promise.resolve(load.count()), (n) => n >= 800, 30_000);
  front.cut();
  const at = load.count();
  await until('appends through the second path', () => Promise.resolve(load.count()), (n) => n >= at + 800, 30_000);
  await load.stop();
  assert.deepEqual(load.failures, [], 'no append failed: the failover was the client\'s business');
  assert.deepEqual(journal.paths().map((p) => [p.name, p.state]), [['proxied', 'failed'], ['direct', 'active']]);
  assert.equal(journal.paths()[0]?.failures, 1);

  const reader = await RmemClient.connect({ ...node.rmem, serverId: 'reader', reconnect: false });
  t.after(() => reader.close());
  checkExactlyOnce(await readAll(reader, await reader.journalOpen('mp', 1)), load.acked, journal.writerId);
});

test('multipath: kill -9 of the active path\'s node mid-stream; with failover "promote" the journal takes the device over on the partner, and every acknowledged record is there exactly once', async (t) => {
  const [dirA, dirB] = [await tempDir(t), await tempDir(t)];
  const [portA, portB] = [await freePort(), await freePort()];
  const args = (own: number, partner: number) => ['--mirror-listen', `127.0.0.1:${own}`, '--mirror-partner', `127.0.0.1:${partner}`, '--set', 'mirror.timeout=500ms'];
  const a = await startNode({ cwd: dirA, args: args(portA, portB) });
  t.after(() => a.stop('SIGKILL'));
  const b = await startNode({ cwd: dirB, args: args(portB, portA) });
  t.after(() => b.stop('SIGKILL'));
  await createDevice(a, 'm', 'mirrored');
  await until('primary in sync', () => nvramDevice(a, 'm'), (d) => d?.mirror === 'in-sync');

  const journal = await MultipathJournal.open({
    device: 'm',
    serverId: 'multipath',
    epoch: 1,
    paths: [{ name: 'primary', ...a.rmem }, { name: 'partner', ...b.rmem, partner: true }],
    failover: 'promote',
    timeoutMs: 1000,
  });
  t.after(() => journal.close());
  const promoted: number[] = [];
  journal.on('promoted', (epoch) => promoted.push(epoch));
  const load = appenders(journal, 16);
  await until('appends on the primary', () => Promise.resolve(load.count()), (n) => n >= 800, 30_000);
  await a.stop('SIGKILL');
  const at = load.count();
  await until('appends on the promoted partner', () => Promise.resolve(load.count()), (n) => n >= at + 800, 30_000);
  await load.stop();
  assert.deepEqual(load.failures, []);
  assert.deepEqual(promoted, [2]);
  assert.equal(journal.epoch, 2);
  assert.deepEqual(journal.paths().map((p) => [p.name, p.state]), [['primary', 'failed'], ['partner', 'active']]);
  assert.equal((await nvramDevice(b, 'm'))?.role, 'primary');

  const reader = await RmemClient.connect({ ...b.rmem, serverId: 'reader', reconnect: false });
  t.after(() => reader.close());
  checkExactlyOnce(await readAll(reader, await reader.journalOpen('m', 2)), load.acked, journal.writerId);
});

test('multipath: a stalled path (open, no answers) fails over on its request timeout; a journal whose only path died comes back with it', async (t) => {
  const node = await startNode({ cwd: await tempDir(t) });
  t.after(() => node.stop('SIGKILL'));
  await createDevice(node, 'st', 'volatile');
  const front = await proxy(t, node.rmem);
  const journal = await MultipathJournal.open({ device: 'st', serverId: 'stall', epoch: 1, timeoutMs: 500, paths: [{ name: 'stalls', host: '127.0.0.1', port: front.port }, { name: 'direct', ...node.rmem }] });
  t.after(() => journal.close());
  const load = appenders(journal, 8);
  await until('appends through the first path', () => Promise.resolve(load.count()), (n) => n >= 300, 30_000);
  // The node keeps the stalled connection's session: reconnecting must not need its secret.
  front.stall();
  const at = load.count();
  await until('appends after the stall', () => Promise.resolve(load.count()), (n) => n >= at + 300, 30_000);
  await load.stop();
  assert.deepEqual(load.failures, []);
  assert.deepEqual(journal.paths().map((p) => p.state), ['failed', 'active']);

  // One path only: cut, pending appends fail after the failover time; back, the next append works.
  const lone = await proxy(t, node.rmem);
  const single = await MultipathJournal.open({ device: 'st', serverId: 'lone', epoch: 1, timeoutMs: 300, failoverTimeoutMs: 800, probeMs: 100, paths: [{ name: 'only', host: '127.0.0.1', port: lone.port }] });
  t.after(() => single.close());
  await single.append([{ payload: Buffer.from('before') }]);
  lone.cut();
  await assert.rejects(single.append([{ payload: Buffer.from('while down') }]), { code: 'MS_NVRAM_NO_PATH' });
  await proxy(t, node.rmem, lone.port);
  const [ack] = await single.append([{ payload: Buffer.from('after') }]);
  assert.ok(ack !== undefined && ack.seq > 0);
  assert.equal((await single.read(ack.seq))[0]?.payload.toString(), 'after');
});

test('multipath: with more than the device remembers in flight when a path stalls, the client holds the rest back, and every append lands once', async (t) => {
  const node = await startNode({ cwd: await tempDir(t) });
  t.after(() => node.stop('SIGKILL'));
  await createDevice(node, 'many', 'volatile');
  const front = await proxy(t, node.rmem);
  const journal = await MultipathJournal.open({ device: 'many', serverId: 'many', epoch: 1, timeoutMs: 500, paths: [{ name: 'stalls', host: '127.0.0.1', port: front.port }, { name: 'direct', ...node.rmem }] });
  t.after(() => journal.close());
  await journal.append([{ payload: Buffer.from('first') }]);
  front.stall();
  // 12 appends of 100 records each at once: 1200 outstanding, more than the 1024 answers a device keeps per writer.
  const batches = Array.from({ length: 12 }, (_, b) => journal.append(Array.from({ length: 100 }, (_, i) => ({ payload: Buffer.from(`b${b}-${i}`) }))));
  const acks = (await Promise.all(batches)).flat();
  assert.equal(acks.length, 1200);
  const reader = await RmemClient.connect({ ...node.rmem, serverId: 'reader', reconnect: false });
  t.after(() => reader.close());
  const records = await readAll(reader, await reader.journalOpen('many', 1));
  const texts = records.map((r) => Buffer.from(r.payload).toString());
  assert.equal(new Set(texts).size, texts.length, 'no record twice');
  assert.equal(texts.length, 1201);
});
