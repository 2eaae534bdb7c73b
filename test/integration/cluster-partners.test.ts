// Mirror partners chosen by the cluster (issue 14, item 4), with a real etcd and three
// nodes that have no mirror.partner: a device's replica goes to another zone before a node
// with more room, and among other zones to the most room; when the replica's node is lost
// for good, the primary names a new one and fills it, and the old replica's copy goes when
// its node returns; and the device then survives the loss of its primary too, with every
// acknowledged record once, in order.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MultipathJournal, RmemClient } from '../../src/client/index.js';
import type { NodeInfo } from '../../src/protocol/admin/api.js';
import { missingEtcd, startEtcd, type EtcdProcess } from '../support/etcd.js';
import { appenders, checkExactlyOnce, readAll } from '../support/journal-load.js';
import { runCli, startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { clusterMember, createMirrored, memberIds, ownershipReader } from '../support/cluster-nodes.js';
import { nvramDevice, until } from '../support/nvram-probe.js';

type Ctx = { after(fn: () => unknown): void };

function member(t: Ctx, etcd: EtcdProcess, id: string, zone: string, dram: string, dir?: string): Promise<NodeProcess> {
  return clusterMember(t, etcd, { cluster: 'pc', id, zone, dram, ...(dir === undefined ? {} : { dir }) });
}

function create(node: NodeProcess, name: string): Promise<void> {
  return createMirrored(node, name, '32MiB');
}

test('the cluster chooses mirror partners: another zone first, then the most room; a replica lost for good is replaced and filled, its old copy removed when it returns; the device then survives its primary', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  // a and b share zone z1, b with the most room; c is alone in z2 with the least.
  const a = await member(t, etcd, 'node-a', 'z1', '192MiB');
  const b = await member(t, etcd, 'node-b', 'z1', '384MiB');
  const dirC = await tempDir(t);
  const c = await member(t, etcd, 'node-c', 'z2', '128MiB', dirC);
  const record = ownershipReader(t, etcd, 'pc');
  for (const n of [a, c]) await until('three members', () => memberIds(n), (ids) => ids.length === 3);

  // a's device: c, in the other zone, although b has more room. c's device: a and b are
  // both in another zone; b has more room.
  await create(a, 'ma');
  await create(c, 'mc');
  await until('ma in sync on node-c', () => record('ma'), (r) => r?.primary === 'node-a' && r.replica === 'node-c' && r.inSync);
  await until('mc in sync on node-b', () => record('mc'), (r) => r?.primary === 'node-c' && r.replica === 'node-b' && r.inSync);
  assert.equal((await nvramDevice(c, 'ma'))?.role, 'replica');
  assert.equal((await nvramDevice(b, 'mc'))?.role, 'replica');
  const info = (await (await fetch(`${a.url}/v1/node`)).json()) as NodeInfo;
  assert.equal(info.mirror.chosen, true);
  assert.deepEqual(info.mirror.links.map((l) => [l.node, l.up, l.devices]), [['node-c', true, ['ma']]]);
  const status = await runCli(['status', '--admin', a.url]);
  assert.match(status.stdout, /partners chosen by the cluster: node-c at \S+ up \(ma\)/);
  const cluster = await runCli(['cluster', 'status', '--admin', a.url]);
  assert.match(cluster.stdout, /ma\s+node-a\s+primary\s+mirrored\s+\d+\s+\S+\s+node-c/);
  assert.match(await (await fetch(`${a.url}/metrics`)).text(), /memstrata_mirror_link_up\{partner="node-c"\} 1/);

  // 32 appenders on ma, with a path to every node (a 32 MiB device holds about 400,000 of their records).
  const journal = await MultipathJournal.open({
    device: 'ma',
    serverId: 'chosen',
    epoch: 1,
    paths: [{ name: 'a', ...a.rmem }, { name: 'b', ...b.rmem }, { name: 'c', ...c.rmem }],
    timeoutMs: 1000,
    failoverTimeoutMs: 30_000,
  });
  t.after(() => journal.close());
  const load = appenders(journal, 32);
  await until('appends mirrored to node-c', () => Promise.resolve(load.count()), (n) => n >= 500, 30_000);

  // The replica's node is lost for good: a degrades, and once c has been out of the member
  // list for a lease, names b (the only member left) and fills it.
  await c.stop('SIGKILL');
  const lostAt = load.count();
  await until('ma in sync on node-b', () => record('ma'), (r) => r?.primary === 'node-a' && r.replica === 'node-b' && r.inSync, 30_000);
  assert.equal((await nvramDevice(b, 'ma'))?.role, 'replica');
  await until('appends go on', () => Promise.resolve(load.count()), (n) => n >= lostAt + 500, 30_000);
  // Meanwhile b, mc's replica, took mc over once c's lease ended, and mirrors it again:
  // to c if c is back before b chose another partner, else to a.
  const mc = await until('b took mc over and mirrors it', () => record('mc'), (r) => r?.primary === 'node-b' && r.term === 2, 30_000);
  // c comes back: its copy of ma is named by nobody now, and goes; so does its copy of mc
  // unless b still names c its replica.
  const c2 = await member(t, etcd, 'node-c', 'z2', '128MiB', dirC);
  await until('the stale copy of ma on node-c is removed', () => nvramDevice(c2, 'ma'), (d) => d === undefined, 20_000);
  await until('node-c says why', () => Promise.resolve(c2.logs.some((l) => l.msg === 'NVRAM copy removed: the cluster no longer names this node for it' && l.device === 'ma')), (said) => said, 5000);
  const mcAgain = await until('mc in sync again', () => record('mc'), (r) => r?.primary === 'node-b' && r.inSync, 30_000);
  await until('node-c holds mc only as the named replica', () => nvramDevice(c2, 'mc'), (d) => (mcAgain?.replica === 'node-c' ? d?.role === 'replica' : d === undefined), 20_000);
  console.log(`# mc: taken over by node-b, replica ${mc?.replica ?? '-'} then ${mcAgain?.replica ?? '-'}`);

  // Then the primary is lost: b, the replica the cluster chose, takes over with every record.
  await a.stop('SIGKILL');
  const before = load.count();
  await until('b takes over', () => record('ma'), (r) => r?.primary === 'node-b', 30_000);
  await until('appends on node-b', () => Promise.resolve(load.count()), (n) => n >= before + 300, 30_000);
  await load.stop();
  assert.deepEqual(load.failures, []);
  const reader = await RmemClient.connect({ ...b.rmem, serverId: 'reader', reconnect: false });
  t.after(() => reader.close());
  checkExactlyOnce(await readAll(reader, await reader.journalOpen('ma', 1)), load.acked, journal.writerId);
});

test('a node outside the cluster is refused at HELLO by a member that chooses partners, and no replica is made for it', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const a = await member(t, etcd, 'node-a', 'z1', '128MiB');
  // An outsider: same token (none), no etcd, mirror.partner pointed at a.
  const outsider = await startNode({ cwd: await tempDir(t), args: ['--node-id', 'outsider', '--mirror-partner', `${a.mirror.host}:${a.mirror.port}`, '--set', 'mirror.timeout=500ms'] });
  t.after(() => outsider.stop('SIGKILL'));
  await create(outsider, 'intruder');
  const refused = (): Promise<number> => Promise.resolve(outsider.logs.filter((l) => l.msg === 'mirror partner refused HELLO' && /not a member of cluster pc/.test(String(l.message))).length);
  await until('the outsider is refused at HELLO', refused, (n) => n > 0, 10_000);
  assert.equal(await nvramDevice(a, 'intruder'), undefined, 'no replica was made for a node outside the cluster');
  const info = (await (await fetch(`${outsider.url}/v1/node`)).json()) as NodeInfo;
  assert.equal(info.mirror.link, 'down');
});
