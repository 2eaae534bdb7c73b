// Mirror partners chosen by the cluster, under faults (issue 14, item 4; found by an
// adversarial review): a primary that lost records in a crash waits for its replica rather
// than replacing it; a device is mirrored even when the member the cluster would pick
// cannot take the replica (no room left by a choice a second earlier, a partner set by
// hand, an address that leads nowhere) or hangs without closing its connection; and etcd
// compacted and restarted under load takes no node down.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { MultipathJournal, RmemClient } from '../../src/client/index.js';
import { openEtcd } from '../../src/client/etcd.js';
import { journalKeeping } from '../support/faults.js';
import { missingEtcd, startEtcd, type EtcdProcess } from '../support/etcd.js';
import { appenders, checkExactlyOnce, readAll } from '../support/journal-load.js';
import { tempDir, type NodeProcess } from '../support/node-process.js';
import { LEASE_S, clusterMember, createMirrored, memberIds, ownershipReader } from '../support/cluster-nodes.js';
import { nvramDevice, until } from '../support/nvram-probe.js';

type Ctx = { after(fn: () => unknown): void };

function member(t: Ctx, etcd: EtcdProcess, id: string, zone: string, dir: string, extra: readonly string[] = []): Promise<NodeProcess> {
  return clusterMember(t, etcd, { cluster: 'pf', id, zone, dir, extra });
}

test('a primary that lost acknowledged records in a crash, its replica away for longer than a lease, does not replace it: it waits, and serves every record once the replica is back', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const record = ownershipReader(t, etcd, 'pf');
  const [dirA, dirB, dirC] = [await tempDir(t), await tempDir(t), await tempDir(t)];
  const a = await member(t, etcd, 'node-a', 'z1', dirA);
  const b = await member(t, etcd, 'node-b', 'z2', dirB);
  const c = await member(t, etcd, 'node-c', 'z1', dirC);
  await until('three members', () => memberIds(a), (ids) => ids.length === 3);
  await createMirrored(a, 'm', '4MiB');
  await until('m in sync on node-b', () => record('m'), (r) => r?.primary === 'node-a' && r.replica === 'node-b' && r.inSync);
  await until('primary in sync', () => nvramDevice(a, 'm'), (d) => d?.mirror === 'in-sync');

  const w = await RmemClient.connect({ ...a.rmem, serverId: 'app', reconnect: false, timeoutMs: 5000 });
  const j = await w.journalOpen('m', 1);
  for (let i = 1; i <= 100; i++) await w.journalAppend(j, [{ payload: Buffer.from(`record ${i}`) }]);
  w.close();
  // Every one of the 100 was acknowledged, while node-b held it (in sync).
  await a.stop('SIGKILL');
  // As in mirror.test.ts: the OS lost the file's unsynced tail (a power cut); keep 60 records.
  const path = join(dirA, 'memstrata-data', 'nvram', 'm.journal');
  await writeFile(path, journalKeeping(await readFile(path), (r) => r.flags !== 0 || r.seq <= 60));
  // The replica stops cleanly before a's lease ends (so it cannot take over); its copy is vaulted.
  assert.equal(await b.stop('SIGTERM'), 0);

  const a2 = await member(t, etcd, 'node-a', 'z1', dirA);
  assert.equal((await nvramDevice(a2, 'm'))?.state, 'recovering');
  // Well past the lease and its grace: the record still names node-b, and node-c got nothing.
  await new Promise((r) => setTimeout(r, 4 * LEASE_S * 1000 + 2000));
  assert.deepEqual([(await record('m'))?.replica, (await record('m'))?.inSync], ['node-b', false]);
  assert.equal(await nvramDevice(c, 'm'), undefined, 'no new replica for a primary that lacks records');
  assert.equal((await nvramDevice(a2, 'm'))?.state, 'recovering');

  // node-b comes back with the only copy of records 61..100: node-a takes them back.
  const b2 = await member(t, etcd, 'node-b', 'z2', dirB);
  await until('m in sync on node-b again', () => record('m'), (r) => r?.replica === 'node-b' && r.inSync, 30_000);
  assert.equal(b2.logs.some((l) => l.msg === 'NVRAM copy removed: the cluster no longer names this node for it'), false);
  const reader = await RmemClient.connect({ ...a2.rmem, serverId: 'reader', reconnect: false, timeoutMs: 5000 });
  t.after(() => reader.close());
  const records = await readAll(reader, await reader.journalOpen('m', 2));
  assert.deepEqual(records.map((x) => Buffer.from(x.payload).toString()), Array.from({ length: 100 }, (_, i) => `record ${i + 1}`));
});

test('two devices made within a second, room on each of two members for one of them: both are mirrored', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const record = ownershipReader(t, etcd, 'pf');
  const a = await member(t, etcd, 'node-a', 'z1', await tempDir(t), ['--dram-size', '256MiB']);
  // b and c in the other zone: b has room for one 32 MiB replica (40 MiB), c for one too (36 MiB).
  const b = await member(t, etcd, 'node-b', 'z2', await tempDir(t), ['--set', 'partition.dram.nvram.max=40MiB']);
  const c = await member(t, etcd, 'node-c', 'z2', await tempDir(t), ['--set', 'partition.dram.nvram.max=36MiB']);
  await until('three members', () => memberIds(a), (ids) => ids.length === 3);
  await createMirrored(a, 'm1', '32MiB');
  await createMirrored(a, 'm2', '32MiB');
  await until('both mirrored', async () => [await record('m1'), await record('m2')], (rs) => rs.every((r) => r?.inSync === true), 40_000);
  const replicas = [(await record('m1'))?.replica, (await record('m2'))?.replica].sort();
  assert.deepEqual(replicas, ['node-b', 'node-c'], 'one on each');
  for (const [n, id] of [[b, 'node-b'], [c, 'node-c']] as const) {
    const held = [await nvramDevice(n, 'm1'), await nvramDevice(n, 'm2')].filter((d) => d !== undefined);
    assert.equal(held.length, 1, `${id} holds one replica`);
  }
});

test('a member with mirror.partner set by hand is never chosen, though it has the most room in another zone', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const record = ownershipReader(t, etcd, 'pf');
  const a = await member(t, etcd, 'node-a', 'z1', await tempDir(t));
  const x = await member(t, etcd, 'node-x', 'z1', await tempDir(t));
  // h mirrors by hand to x (as docs/cluster.md allows: "A mix works for mirroring"), in the other zone, with the most room.
  const h = await member(t, etcd, 'node-h', 'z2', await tempDir(t), ['--dram-size', '512MiB', '--mirror-partner', `${x.mirror.host}:${x.mirror.port}`, '--set', 'mirror.partnerId=node-x']);
  await until('three members', () => memberIds(a), (ids) => ids.length === 3);
  await createMirrored(a, 'm', '4MiB');
  await until('m mirrored', () => record('m'), (r) => r?.inSync === true, 20_000);
  assert.equal((await record('m'))?.replica, 'node-x');
  assert.equal(await nvramDevice(h, 'm'), undefined);
  assert.equal(a.logs.some((l) => l.msg === 'mirror partner refused HELLO'), false, 'node-h was never tried');
});

test('a member record whose mirror address leads nowhere, with the most room: the replica it cannot take goes to another member', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const record = ownershipReader(t, etcd, 'pf');
  const a = await member(t, etcd, 'node-a', 'z1', await tempDir(t));
  const b = await member(t, etcd, 'node-b', 'z2', await tempDir(t));
  await until('two members', () => memberIds(a), (ids) => ids.length === 2);
  const client = openEtcd({ endpoints: [etcd.url] });
  t.after(() => client.close());
  const real = JSON.parse((await client.get('/memstrata/pf/nodes/node-b').string()) ?? '{}') as Record<string, unknown> & { capacity: { nvramRoom?: number }[]; services: Record<string, string> };
  const ghost = { ...real, id: 'node-ghost', zone: 'z3', services: { ...real.services, mirror: '127.0.0.1:9' }, capacity: real.capacity.map((m) => ({ ...m, nvramRoom: 1024 * 1024 * 1024 })), mirrored: [] };
  const lease = client.lease(10);
  t.after(() => lease.revoke().catch(() => undefined));
  await lease.put('/memstrata/pf/nodes/node-ghost').value(JSON.stringify(ghost));
  await until('ghost is a member', () => memberIds(a), (ids) => ids.includes('node-ghost'));
  await createMirrored(a, 'm', '4MiB');
  await until('the ghost is named first', () => record('m'), (r) => r?.replica === 'node-ghost');
  // A member all along, it cannot be brought in sync: after 3 leases the cluster names node-b.
  await until('m mirrored on node-b', () => record('m'), (r) => r?.replica === 'node-b' && r.inSync, 30_000);
  assert.equal((await nvramDevice(b, 'm'))?.role, 'replica');
  assert.ok(a.logs.some((l) => l.device === 'm' && /could not be brought in sync/.test(String(l.msg))));
});

test('an idle device whose replica hangs (SIGSTOP, no reset): the link notices, and once the replica has left the members the cluster names another', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const record = ownershipReader(t, etcd, 'pf');
  const a = await member(t, etcd, 'node-a', 'z1', await tempDir(t));
  const b = await member(t, etcd, 'node-b', 'z2', await tempDir(t), ['--dram-size', '256MiB']);
  await until('two members', () => memberIds(a), (ids) => ids.length === 2);
  await createMirrored(a, 'm', '4MiB');
  await until('m in sync on node-b', () => record('m'), (r) => r?.replica === 'node-b' && r.inSync);
  const x = await member(t, etcd, 'node-x', 'z2', await tempDir(t));
  await until('x is a member', () => memberIds(a), (ids) => ids.includes('node-x'));
  b.proc.kill('SIGSTOP');
  // No append comes: the link's idle probe finds node-b silent, and the device degrades.
  await until('node-a notices', () => nvramDevice(a, 'm'), (d) => d?.mirror === 'degraded', 10_000);
  await until('m mirrored on node-x', () => record('m'), (r) => r?.replica === 'node-x' && r.inSync, 30_000);
  assert.equal((await nvramDevice(x, 'm'))?.role, 'replica');
});

test('etcd compacted and restarted three times under load: every node stays up, the devices are in sync again, every acknowledged record once', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const record = ownershipReader(t, etcd, 'pf');
  const a = await member(t, etcd, 'node-a', 'z1', await tempDir(t));
  const b = await member(t, etcd, 'node-b', 'z2', await tempDir(t));
  const c = await member(t, etcd, 'node-c', 'z3', await tempDir(t));
  await until('three members', () => memberIds(a), (ids) => ids.length === 3);
  await createMirrored(a, 'ma', '32MiB');
  await createMirrored(b, 'mb', '32MiB');
  await until('ma in sync', () => record('ma'), (r) => r?.inSync === true);
  await until('mb in sync', () => record('mb'), (r) => r?.inSync === true);
  const journal = await MultipathJournal.open({ device: 'ma', serverId: 'chaos', epoch: 1, paths: [{ name: 'a', ...a.rmem }, { name: 'b', ...b.rmem }, { name: 'c', ...c.rmem }], timeoutMs: 1000, failoverTimeoutMs: 30_000 });
  t.after(() => journal.close());
  const load = appenders(journal, 8);
  const client = openEtcd({ endpoints: [etcd.url] });
  t.after(() => client.close());
  for (let round = 0; round < 3; round++) {
    await new Promise((r) => setTimeout(r, 1500));
    await client.put('/unrelated/1').value(String(round)).exec();
    const put = await client.put('/unrelated/2').value(String(round)).exec();
    await client.kv.compact({ revision: put.header.revision, physical: true });
    await etcd.stop('SIGKILL');
    await new Promise((r) => setTimeout(r, 300));
    await etcd.restart();
  }
  await new Promise((r) => setTimeout(r, 3000));
  for (const n of [a, b, c]) assert.equal(n.proc.exitCode, null, `a node exited: ${n.proc.exitCode}`);
  await until('ma in sync again', () => record('ma'), (r) => r?.inSync === true, 30_000);
  await until('mb in sync again', () => record('mb'), (r) => r?.inSync === true, 30_000);
  await load.stop();
  // Appends refused while etcd was away (fenced, and those behind them voided) end their lane: that is the promise, not a breach of it.
  for (const failure of load.failures) assert.match(failure, /ownership|fenced|partner|become void/i);
  const reader = await RmemClient.connect({ ...a.rmem, serverId: 'reader', reconnect: false });
  t.after(() => reader.close());
  const rj = await reader.journalOpen('ma', 1);
  checkExactlyOnce(await readAll(reader, rj), load.acked, journal.writerId);
  await until('a fresh append is acknowledged', () => reader.journalAppend(rj, [{ payload: Buffer.from('after') }]).then(() => 'ok', (e: unknown) => (e instanceof Error ? e.message : String(e))), (v) => v === 'ok', 20_000);
  const crashed = [a, b, c].flatMap((n) => n.logs.filter((l) => /Failed to find watcher|uncaught/i.test(JSON.stringify(l))));
  assert.deepEqual(crashed, []);
});
