// Where the cluster places replicas (issue 14, item 4; found by an adversarial review):
// devices made back to back are spread over the members with room; a replica out of date
// for a moment is not counted twice against its member's room; and a primary with
// mirror.partner set by hand, pointed at a member that lets the cluster choose, keeps the
// copy it is filling there.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RmemClient } from '../../src/client/index.js';
import { openEtcd } from '../../src/client/etcd.js';
import { missingEtcd, startEtcd, type EtcdProcess } from '../support/etcd.js';
import { tempDir, type NodeProcess } from '../support/node-process.js';
import { clusterMember, createMirrored, memberIds, ownershipReader } from '../support/cluster-nodes.js';
import { nvramDevice, until } from '../support/nvram-probe.js';
import { connect, createServer } from 'node:net';
import { MIRROR_VERSION, MOP, encodeHello, request } from '../../src/protocol/mirror/codec.js';

/** A loopback proxy that passes client->server bytes at most `rate` bytes/s (a slower network). */
async function throttle(t: Ctx, target: { host: string; port: number }, rate: number): Promise<{ host: string; port: number }> {
  const server = createServer((client) => {
    const upstream = connect(target);
    client.on('data', (chunk: Buffer) => {
      client.pause();
      upstream.write(chunk);
      setTimeout(() => client.resume(), (chunk.length / rate) * 1000);
    });
    upstream.pipe(client);
    const end = (): void => { client.destroy(); upstream.destroy(); };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => { server.close(() => resolve()); }));
  const address = server.address();
  if (typeof address !== 'object' || address === null) throw new Error('no address');
  return { host: '127.0.0.1', port: address.port };
}

type Ctx = { after(fn: () => unknown): void };

function member(t: Ctx, etcd: EtcdProcess, id: string, zone: string, dir: string, extra: readonly string[] = []): Promise<NodeProcess> {
  return clusterMember(t, etcd, { cluster: 'pp', id, zone, dir, extra });
}

test('two devices made back to back, room on each of two members for one: each is first named on a member with room for it', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const record = ownershipReader(t, etcd, 'pp');
  const a = await member(t, etcd, 'node-a', 'z1', await tempDir(t), ['--dram-size', '256MiB']);
  const b = await member(t, etcd, 'node-b', 'z2', await tempDir(t), ['--set', 'partition.dram.nvram.max=40MiB']);
  const c = await member(t, etcd, 'node-c', 'z2', await tempDir(t), ['--set', 'partition.dram.nvram.max=36MiB']);
  await until('three members', () => memberIds(a), (ids) => ids.length === 3);
  await Promise.all([createMirrored(a, 'm1', '32MiB'), createMirrored(a, 'm2', '32MiB')]);
  const first = new Map<string, string | null>();
  await until('both records exist', async () => {
    for (const d of ['m1', 'm2']) {
      const r = await record(d);
      if (r !== undefined && !first.has(d)) first.set(d, r.replica);
    }
    return first.size;
  }, (n) => n === 2, 10_000);
  await until('both mirrored', async () => [await record('m1'), await record('m2')], (rs) => rs.every((r) => r?.inSync === true), 40_000);
  assert.deepEqual([...first.values()].sort(), ['node-b', 'node-c'], 'one on each, from the first choice');
  assert.equal(a.logs.filter((l) => /could not be brought in sync/.test(String(l.msg))).length, 0, 'no replacement was needed');
  for (const n of [b, c]) assert.equal([await nvramDevice(n, 'm1'), await nvramDevice(n, 'm2')].filter((d) => d !== undefined).length, 1);
});

// The primary's record names its old partner until its first resync to the new one ends:
// the new one must not take the copy being filled for one nobody names.
test('a primary with mirror.partner set by hand, pointed at a new partner that lets the cluster choose: the copy it fills there stays, and the device is in sync', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const record = ownershipReader(t, etcd, 'pp');
  const x = await member(t, etcd, 'node-x', 'z2', await tempDir(t));
  const z = await member(t, etcd, 'node-z', 'z3', await tempDir(t));
  const dirH = await tempDir(t);
  const h = await member(t, etcd, 'node-h', 'z1', dirH, ['--mirror-partner', `${x.mirror.host}:${x.mirror.port}`, '--set', 'mirror.partnerId=node-x']);
  await until('three members', () => memberIds(h), (ids) => ids.length === 3);
  await createMirrored(h, 'm', '64MiB');
  await until('m in sync on node-x', () => record('m'), (r) => r?.replica === 'node-x' && r.inSync);
  const w = await RmemClient.connect({ ...h.rmem, serverId: 'app', reconnect: false, timeoutMs: 5000 });
  const j = await w.journalOpen('m', 1);
  const payload = Buffer.alloc(60 * 1024, 7);
  for (let i = 0; i < 700; i++) await w.journalAppend(j, [{ payload }]);
  w.close();
  // node-x is lost for good; a node that sets its partner by hand must be given a new one by hand.
  await x.stop('SIGKILL');
  await until('the record says out of date', () => record('m'), (r) => r?.inSync === false, 10_000);
  assert.equal(await h.stop('SIGTERM'), 0);
  // The new partner over a 16 MiB/s network: the 42 MiB push takes about 2.6 s.
  const slow = await throttle(t, z.mirror, 16 * 1024 * 1024);
  const h2 = await member(t, etcd, 'node-h', 'z1', dirH, ['--mirror-partner', `${slow.host}:${slow.port}`, '--set', 'mirror.partnerId=node-z']);
  let inSync = false;
  try {
    await until('m in sync on node-z', () => record('m'), (r) => r?.replica === 'node-z' && r.inSync, 30_000);
    inSync = true;
  } catch {
    inSync = false;
  }
  const removed = z.logs.filter((l) => l.msg === 'NVRAM copy removed: the cluster no longer names this node for it').length;
  const failed = h2.logs.filter((l) => l.msg === 'mirror resync failed; the device stays unmirrored until the link comes up again').length;
  assert.deepEqual({ inSync, removedOnZ: removed, resyncsFailed: failed, state: (await nvramDevice(h2, 'm'))?.mirror }, { inSync: true, removedOnZ: 0, resyncsFailed: 0, state: 'in-sync' });
});

// A replica filled once and out of date for a moment (a link blip, any resync) holds its
// extents, and its member's nvramRoom counts them already: not a second time.
test('a replica out of date for a moment is not counted twice against its member: a new device still goes to the other zone', async (t) => {
  if (missingEtcd() !== undefined) return t.skip('etcd-server is not installed');
  const etcd = await startEtcd(t);
  const record = ownershipReader(t, etcd, 'pp');
  const a = await member(t, etcd, 'node-a', 'z1', await tempDir(t), ['--dram-size', '256MiB']);
  const b = await member(t, etcd, 'node-b', 'z2', await tempDir(t), ['--set', 'partition.dram.nvram.max=80MiB']);
  await member(t, etcd, 'node-c', 'z1', await tempDir(t), ['--dram-size', '256MiB']);
  await until('three members', () => memberIds(a), (ids) => ids.length === 3);
  await createMirrored(a, 'm1', '32MiB');
  await until('m1 in sync on node-b', () => record('m1'), (r) => r?.replica === 'node-b' && r.inSync);
  const client = openEtcd({ endpoints: [etcd.url] });
  t.after(() => client.close());
  const roomOfB = async (): Promise<number> => {
    const bRecord = JSON.parse((await client.get('/memstrata/pp/nodes/node-b').string()) ?? '{}') as { capacity: { medium: string; nvramRoom?: number }[] };
    return bRecord.capacity.find((c) => c.medium === 'dram')?.nvramRoom ?? 0;
  };
  // node-b's record counts m1's replica (80 MiB less 32): room for one more 32 MiB replica.
  const room = await until('node-b counts the replica of m1', roomOfB, (r) => r < 80 * 1024 * 1024, 10_000);
  assert.ok(room >= 32 * 1024 * 1024, `node-b says it has room for m2: ${room}`);
  // node-b stays a healthy member with room for another 32 MiB replica. node-a's link to it
  // is replaced now and then (a HELLO in node-a's name closes node-a's older connection),
  // so m1 is out of date for a while, as after any link blip.
  let kicking = true;
  const kicker = (async () => {
    while (kicking) {
      const s = connect(b.mirror);
      s.on('error', () => undefined);
      s.write(request(MOP.HELLO, 1, encodeHello({ version: MIRROR_VERSION, nodeId: 'node-a', token: '' })));
      await new Promise((r) => setTimeout(r, 20));
      s.destroy();
    }
  })();
  await until('m1 out of date', () => record('m1'), (r) => r?.inSync === false, 10_000);
  await createMirrored(a, 'm2', '32MiB');
  const m2 = await until('m2 has a record', () => record('m2'), (r) => r !== undefined, 10_000);
  kicking = false;
  await kicker;
  assert.equal(m2?.replica, 'node-b', 'node-b, in the other zone, had room for m2');
});
