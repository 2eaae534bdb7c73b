// The cluster on a real etcd (issue 14, items 1-3): nodes register under their lease,
// `memstrata cluster status` lists them, a host finds nodes by watching their records
// (FIG. 14) and loses one whose lease ends, and etcd itself going away and coming back
// neither stops the nodes serving nor leaves them out of the cluster.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { MemstrataError } from '../../src/errors.js';
import { HierarchyMemory, type MemberChange } from '../../src/host/hierarchy-memory.js';
import type { ClusterJson } from '../../src/protocol/admin/api.js';
import { RmemClient } from '../../src/client/rmem-client.js';
import { openEtcd } from '../../src/client/etcd.js';
import { missingEtcd, startEtcd, type EtcdProcess } from '../support/etcd.js';
import { runCli, startNode, tempDir, type NodeProcess } from '../support/node-process.js';

type Ctx = { after(fn: () => Promise<unknown>): void };
const LEASE_S = 2;

/** Waits (bounded) for state that settles on timers and watches. */
async function until<T>(probe: () => Promise<T | undefined> | T | undefined, what: string, ms: number): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > end) assert.fail(`not within ${ms} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function clusterNode(t: Ctx, etcd: EtcdProcess, zone: string, dir?: string): Promise<NodeProcess> {
  const node = await startNode({ cwd: dir ?? (await tempDir(t)), args: ['--etcd', etcd.url, '--zone', zone, '--set', `cluster.lease=${LEASE_S}s`, '--set', 'cluster.name=test'] });
  t.after(async () => {
    node.proc.kill('SIGCONT');
    await node.stop('SIGKILL');
  });
  return node;
}

async function view(node: NodeProcess): Promise<ClusterJson> {
  return (await (await fetch(`${node.url}/v1/cluster`)).json()) as ClusterJson;
}

function idOf(node: NodeProcess): string {
  const line = node.logs.find((l) => l.msg === 'joined the cluster');
  const key = typeof line?.key === 'string' ? line.key : '';
  return key.slice(key.lastIndexOf('/') + 1);
}

test('three nodes register in etcd within 1 s of starting, with zones, services and lease; cluster status lists them; a stopped node leaves at once', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const nodes: NodeProcess[] = [];
  for (const zone of ['a', 'b', 'c']) {
    const node = await clusterNode(t, etcd, zone);
    // The admin API listens before the node joins; the member must follow within a second.
    await until(async () => ((await view(node)).members.some((m) => m.self) ? true : undefined), `node in zone ${zone} is visible in the cluster`, 1000);
    nodes.push(node);
  }
  const first = nodes[0];
  assert.ok(first !== undefined);
  const seen = await view(first);
  assert.equal(seen.enabled, true);
  assert.equal(seen.self?.state, 'member');
  assert.deepEqual(seen.members.map((m) => m.zone).sort(), ['a', 'b', 'c']);
  for (const [i, node] of nodes.entries()) {
    const member = seen.members.find((m) => m.id === idOf(node));
    assert.ok(member !== undefined, `node ${i} listed`);
    assert.equal(member.services.rmem, `${node.rmem.host}:${node.rmem.port}`);
    assert.equal(member.services.nbd, `${node.nbd.host}:${node.nbd.port}`);
    assert.ok(member.leaseSeconds !== null && member.leaseSeconds >= 0 && member.leaseSeconds <= LEASE_S);
    assert.ok(member.capacity.some((c) => c.medium === 'dram' && c.capacity === 64 * 2 ** 20));
  }
  const text = await runCli(['cluster', 'status', '--admin', first.url]);
  assert.equal(text.code, 0, text.stderr);
  assert.match(text.stdout, /Cluster test \(etcd http:\/\/127\.0\.0\.1:\d+\): node \S+ is a member, lease/);
  for (const node of nodes) assert.match(text.stdout, new RegExp(`^${idOf(node)}( \\*)?\\s+[abc]\\s`, 'm'));

  // A clean stop revokes the lease: the record goes at once, not a lease later.
  const last = nodes[2];
  assert.ok(last !== undefined);
  const lastId = idOf(last);
  await last.stop('SIGTERM');
  await until(async () => ((await view(first)).members.some((m) => m.id === lastId) ? undefined : true), 'a stopped node leaves the member list', 1000);
  // kill -9: the record stays until the lease ends.
  const second = nodes[1];
  assert.ok(second !== undefined);
  const secondId = idOf(second);
  await second.stop('SIGKILL');
  assert.ok((await view(first)).members.some((m) => m.id === secondId), 'a killed node is a member until its lease ends');
  await until(async () => ((await view(first)).members.some((m) => m.id === secondId) ? undefined : true), 'a killed node leaves when its lease ends', LEASE_S * 1000 + 1500);
});

test('a host finds the members through etcd, takes a node that joins later within 1 s, and loses one whose lease ends', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const a = await clusterNode(t, etcd, 'a');
  await until(async () => ((await view(a)).self?.state === 'member' ? true : undefined), 'node a joined', 5000);
  const memory = await HierarchyMemory.open({ serverId: 'host-1', localDram: 64 * 1024, cluster: { etcd: etcd.url, name: 'test' }, nodeLoss: { probeMs: 100 } });
  t.after(() => memory.close());
  const changes: MemberChange[] = [];
  memory.on('member', (c) => changes.push(c));
  const aId = idOf(a);
  assert.deepEqual([...new Set(memory.discovery().filter((r) => r.device !== 'local').map((r) => r.device))], [aId], 'the member listed at open is in the discovery table');

  // A node that joins later: in the discovery table within a second of joining, and it takes allocations.
  const bDir = await tempDir(t);
  const b = await clusterNode(t, etcd, 'b', bDir);
  await until(async () => ((await view(b)).self?.state === 'member' ? true : undefined), 'node b joined', 5000);
  const bId = idOf(b);
  await until(() => (memory.discovery().some((r) => r.device === bId && r.medium === 'dram' && r.offered > 0) ? true : undefined), 'node b in the host\'s discovery table', 1000);
  const onB = await memory.alloc(64 * 1024, { device: bId, medium: 'dram' });
  const data = Buffer.alloc(64 * 1024, 0xb7);
  await onB.write(0, data);
  await memory.flush();
  assert.ok((await onB.read(0, data.length)).equals(data));
  assert.ok(onB.mapping().every((row) => row.device === bId));
  const onA = await memory.alloc(16 * 1024, { device: aId });
  await onA.write(0, Buffer.alloc(16 * 1024, 0xa1));

  // kill -9 of b: lost when its lease ends (not before, since nothing asks it), and no new allocation goes there.
  await b.stop('SIGKILL');
  await until(() => (changes.some((c) => c.node === bId && c.change === 'left') ? true : undefined), 'the host sees b leave', LEASE_S * 1000 + 1500);
  assert.equal(memory.discovery().find((r) => r.device === bId)?.state, 'lost');
  await assert.rejects(onB.read(0, 4096), (e: MemstrataError) => e.code === 'MS_HOST_NODE_LOST');
  await assert.rejects(memory.alloc(4096, { device: bId }), (e: MemstrataError) => e.code === 'MS_HOST_NO_CAPACITY');
  assert.ok((await onA.read(0, 16 * 1024)).equals(Buffer.alloc(16 * 1024, 0xa1)), 'a is untouched');
  await onB.free();

  // b comes back (same data directory and id, new ports): a member again, and it takes allocations again.
  const b2 = await clusterNode(t, etcd, 'b', bDir);
  assert.equal(await until(async () => ((await view(b2)).self?.state === 'member' ? idOf(b2) : undefined), 'node b joined again', 8000), bId);
  await until(() => (memory.discovery().some((r) => r.device === bId && r.state === 'ok' && r.offered > 0) ? true : undefined), 'b usable again', 3000);
  const again = await memory.alloc(4096, { device: bId });
  await again.write(0, Buffer.alloc(4096, 0x22));
  await memory.flush();
  assert.ok((await again.read(0, 4096)).equals(Buffer.alloc(4096, 0x22)));
});

test('etcd stopped and started again: nodes keep serving while it is away, resume their lease when it is back, and a host loses nothing', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const node = await clusterNode(t, etcd, 'a');
  await until(async () => ((await view(node)).self?.state === 'member' ? true : undefined), 'joined', 5000);
  const firstLease = (await view(node)).self?.lease;
  const memory = await HierarchyMemory.open({ serverId: 'host-outage', localDram: 64 * 1024, cluster: { etcd: etcd.url, name: 'test' } });
  t.after(() => memory.close());
  const changes: MemberChange[] = [];
  memory.on('member', (c) => changes.push(c));
  const segment = await memory.alloc(32 * 1024, { device: idOf(node) });
  await segment.write(0, Buffer.alloc(32 * 1024, 0x5c));
  await memory.flush();

  await etcd.stop('SIGKILL');
  // Past the lease: the node no longer counts on it, says why, and still serves its clients.
  const away = await until(async () => {
    const v = await view(node);
    return v.self?.lease === null ? v : undefined;
  }, 'the node sees its lease go', LEASE_S * 1000 + 2000);
  assert.equal(away.self?.state, 'joining');
  assert.match(away.self?.problem ?? '', /etcd/);
  assert.match(away.problem ?? '', /cannot list the cluster's members/);
  const client = await RmemClient.connect({ host: node.rmem.host, port: node.rmem.port, serverId: 'during-outage' });
  const region = await client.bind(4096, { medium: 'dram' });
  await client.write(region, 0, Buffer.alloc(4096, 7));
  assert.ok((await client.read(region, 0, 4096)).equals(Buffer.alloc(4096, 7)));
  await client.close();
  assert.ok((await segment.read(0, 32 * 1024)).equals(Buffer.alloc(32 * 1024, 0x5c)), 'the host reads its memory while etcd is away');
  const metrics = await (await fetch(`${node.url}/metrics`)).text();
  assert.match(metrics, /memstrata_cluster_member\{cluster="test",state="joining"\} 1/);

  // etcd back: it gives the leases it knew a fresh TTL, so the node resumes the same lease
  // and its record never left; the host, which watched throughout, saw nobody go.
  await etcd.restart();
  const back = await until(async () => {
    const v = await view(node);
    return v.self?.state === 'member' && v.members.some((m) => m.self) ? v : undefined;
  }, 'a member again', LEASE_S * 1000 + 2000);
  assert.equal(back.self?.lease, firstLease);
  assert.equal(back.members.length, 1);
  await memory.refresh();
  assert.deepEqual(changes.filter((c) => c.change !== 'unusable'), []);
  assert.equal(segment.lost, false);
  await segment.write(0, Buffer.alloc(4096, 0x6d));
  await memory.flush();
  assert.ok((await segment.read(0, 4096)).equals(Buffer.alloc(4096, 0x6d)));
});

test('hostile etcd contents and history: a compacted history, records deleted, nested or garbled by hand, a frozen etcd; the host and the nodes carry on', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const a = await clusterNode(t, etcd, 'a');
  await until(async () => ((await view(a)).self?.state === 'member' ? true : undefined), 'node a joined', 5000);
  const aId = idOf(a);
  const memory = await HierarchyMemory.open({ serverId: 'host-hostile', localDram: 64 * 1024, cluster: { etcd: etcd.url, name: 'test' } });
  let closed = false;
  t.after(async () => {
    if (!closed) await memory.close();
  });
  const changes: MemberChange[] = [];
  memory.on('member', (c) => changes.push(c));
  const client = openEtcd({ endpoints: [etcd.url] });
  t.after(() => Promise.resolve(client.close()));

  // History compacted, then etcd restarted: the host's watch cannot resume from its revision; it lists the members again.
  await client.put('/unrelated/1').value('x').exec();
  const put = await client.put('/unrelated/2').value('y').exec();
  await client.kv.compact({ revision: put.header.revision, physical: true });
  await etcd.stop('SIGKILL');
  await etcd.restart();
  const b = await clusterNode(t, etcd, 'b');
  await until(async () => ((await view(b)).self?.state === 'member' ? true : undefined), 'node b joined', 8000);
  const bId = idOf(b);
  await until(() => (memory.discovery().some((r) => r.device === bId && r.state === 'ok') ? true : undefined), 'the host follows membership after the compaction', 5000);

  // A record deleted by hand comes back: the node reads its own record back and writes it again.
  await client.delete().key(`/memstrata/test/nodes/${aId}`).exec();
  await until(async () => ((await client.get(`/memstrata/test/nodes/${aId}`).string()) !== null ? true : undefined), 'node a wrote its record again', 6000);

  // A nested key is nobody's record; a garbled record of a member makes the host drop that member.
  await client.put(`/memstrata/test/nodes/nested/${aId}`).value('{}').exec();
  await client.put(`/memstrata/test/nodes/${bId}`).value('not json').exec();
  await until(() => (changes.some((c) => c.node === bId && c.change === 'left') ? true : undefined), 'the host drops the member whose record is garbled', 3000);
  const status = await runCli(['cluster', 'status', '--admin', a.url]);
  assert.equal(status.code, 0, status.stderr);
  assert.match(status.stdout, /Records skipped[\s\S]*nested/);
  await client.delete().key(`/memstrata/test/nodes/nested/${aId}`).exec();

  // etcd frozen: closing the host does not wait for it.
  etcd.pause();
  t.after(async () => {
    etcd.resume();
  });
  const started = Date.now();
  await memory.close();
  closed = true;
  assert.ok(Date.now() - started < 8000, `close took ${Date.now() - started} ms with etcd frozen`);
  etcd.resume();
});
