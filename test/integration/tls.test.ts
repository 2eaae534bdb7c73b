// TLS on the links that can cross machines, besides NBD (issue 14, item 6): rmem and the
// mirror from the first byte, the admin API over HTTPS, and etcd over https with client
// certificates. Each refuses plaintext, and a certificate of another CA or none where the
// node has tls.ca; tokens still apply on top.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { request as httpsRequest } from 'node:https';
import { connect } from 'node:net';
import { join } from 'node:path';
import type { MemstrataError } from '../../src/errors.js';
import { RmemClient } from '../../src/client/rmem-client.js';
import { HierarchyMemory } from '../../src/host/hierarchy-memory.js';
import { makeCerts, missingOpenssl, type TestCerts } from '../support/certs.js';
import { missingEtcd, startEtcd } from '../support/etcd.js';
import { freePort, runCli, startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { nvramDevice, until } from '../support/nvram-probe.js';

type Ctx = { after(fn: () => Promise<unknown>): void };

const tlsArgs = (certs: TestCerts, mutual = true): string[] => ['--tls-cert', certs.cert, '--tls-key', certs.key, ...(mutual ? ['--tls-ca', certs.ca] : [])];

async function pems(dir: string): Promise<{ ca: Buffer; cert: Buffer; key: Buffer }> {
  const [ca, cert, key] = await Promise.all(['ca-cert.pem', 'client-cert.pem', 'client-key.pem'].map((f) => readFile(join(dir, f))));
  return { ca: ca ?? Buffer.alloc(0), cert: cert ?? Buffer.alloc(0), key: key ?? Buffer.alloc(0) };
}

async function started(t: Ctx, args: string[], dir?: string): Promise<NodeProcess> {
  const node = await startNode({ cwd: dir ?? (await tempDir(t)), args });
  t.after(() => node.stop('SIGKILL'));
  return node;
}

test('rmem.tls=require: a client with the CA and its certificate is served; plaintext, a foreign certificate and none are refused; the token still applies', async (t) => {
  if (missingOpenssl() !== undefined) return t.skip('openssl is not installed');
  const certs = await makeCerts(t);
  const node = await started(t, [...tlsArgs(certs), '--set', 'rmem.tls=require', '--set', 'rmem.token=tok-1234']);
  const good = await pems(certs.dir);
  const client = await RmemClient.connect({ ...node.rmem, serverId: 'tls-app', token: 'tok-1234', tls: good, reconnect: false });
  const region = await client.bind(8192, { medium: 'dram' });
  await client.write(region, 0, Buffer.alloc(8192, 0x3e));
  assert.ok((await client.read(region, 0, 8192)).equals(Buffer.alloc(8192, 0x3e)));
  await client.close();
  const refused = async (options: Parameters<typeof RmemClient.connect>[0], why: string): Promise<void> => {
    await assert.rejects(RmemClient.connect({ connectTimeoutMs: 2000, reconnect: false, ...options }), (e: MemstrataError) => e.code === 'MS_RMEM_UNREACHABLE' || e.code === 'MS_RMEM_AUTH', why);
  };
  await refused({ ...node.rmem, serverId: 'plain', token: 'tok-1234' }, 'plaintext');
  const rogue = await pems(certs.rogueDir);
  await refused({ ...node.rmem, serverId: 'rogue', token: 'tok-1234', tls: rogue }, 'a certificate of another CA');
  await refused({ ...node.rmem, serverId: 'anonymous', token: 'tok-1234', tls: { ca: good.ca } }, 'no certificate');
  await assert.rejects(RmemClient.connect({ ...node.rmem, serverId: 'wrong-token', token: 'nope', tls: good, reconnect: false }), (e: MemstrataError) => e.code === 'MS_RMEM_AUTH');
  // The client checks the node too: a CA that did not sign the node's certificate fails.
  await refused({ ...node.rmem, serverId: 'distrust', token: 'tok-1234', tls: { ...good, ca: await readFile(join(certs.rogueDir, '..', 'rogue-ca', 'ca-cert.pem')) } }, 'a node the client\'s CA did not sign');
  const again = await RmemClient.connect({ ...node.rmem, serverId: 'tls-app-2', token: 'tok-1234', tls: good, reconnect: false });
  assert.ok((await again.capacity()).length > 0, 'the node still serves');
  await again.close();
});

test('mirror.tls=require: two partners mirror over TLS; a plaintext mirror client gets no HELLO answered', async (t) => {
  if (missingOpenssl() !== undefined) return t.skip('openssl is not installed');
  const certs = await makeCerts(t);
  const [portA, portB] = [await freePort(), await freePort()];
  const args = (own: number, partner: number): string[] => [...tlsArgs(certs), '--set', 'mirror.tls=require', '--mirror-listen', `127.0.0.1:${own}`, '--mirror-partner', `127.0.0.1:${partner}`, '--set', 'mirror.timeout=500ms'];
  const a = await started(t, args(portA, portB));
  const b = await started(t, args(portB, portA));
  const created = await fetch(`${a.url}/v1/nvram`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'm', size: '4MiB', policy: 'mirrored' }) });
  assert.equal(created.status, 201);
  await until('the primary in sync over TLS', () => nvramDevice(a, 'm'), (d) => d?.mirror === 'in-sync');
  const writer = await RmemClient.connect({ ...a.rmem, serverId: 'app', reconnect: false });
  const journal = await writer.journalOpen('m', 1);
  for (let i = 0; i < 20; i++) await writer.journalAppend(journal, [{ payload: Buffer.from(`record ${i}`) }]);
  await writer.close();
  await until('the replica holds the records', () => nvramDevice(b, 'm'), (d) => d?.role === 'replica' && d.lastSeq === 20);
  // A plaintext peer: its HELLO bytes are no TLS hello; it is dropped without an answer.
  const plain = connect(portB, '127.0.0.1');
  plain.on('error', () => undefined);
  await new Promise<void>((resolve) => plain.once('connect', () => resolve()));
  plain.write(Buffer.alloc(64, 1));
  const answered = await new Promise<boolean>((resolve) => {
    plain.once('data', () => resolve(true));
    plain.once('close', () => resolve(false));
  });
  assert.equal(answered, false);
  assert.equal((await nvramDevice(a, 'm'))?.mirror, 'in-sync', 'the pair is undisturbed');
});

test('admin.tls=true: the CLI and clients reach the admin API over HTTPS with the CA; plain HTTP gets no answer', async (t) => {
  if (missingOpenssl() !== undefined) return t.skip('openssl is not installed');
  const certs = await makeCerts(t);
  const node = await started(t, [...tlsArgs(certs, false), '--set', 'admin.tls=true']);
  assert.match(node.url, /^https:\/\/127\.0\.0\.1:\d+$/);
  const status = await runCli(['status', '--json', '--admin', node.url], { env: { ...process.env, NODE_EXTRA_CA_CERTS: certs.ca } });
  assert.equal(status.code, 0, status.stderr);
  assert.match(status.stdout, /"id": "ms-/);
  const distrusted = await runCli(['status', '--admin', node.url], { env: { ...process.env, NODE_EXTRA_CA_CERTS: '' } });
  assert.notEqual(distrusted.code, 0, 'a CLI that does not trust the CA refuses the node');
  const ca = await readFile(certs.ca);
  const health = await new Promise<string>((resolve, reject) => {
    const req = httpsRequest(`${node.url}/healthz`, { ca }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve(body));
    });
    req.on('error', reject);
    req.end();
  });
  assert.equal(health, '{"status":"ok"}');
  await assert.rejects(fetch(node.url.replace('https:', 'http:') + '/healthz', { signal: AbortSignal.timeout(3000) }));
});

test('etcd over https with client certificates: a node with rmem.tls joins, and a host finds it and borrows memory over TLS', async (t) => {
  if (missingOpenssl() !== undefined || missingEtcd() !== undefined) return t.skip('openssl or etcd-server is not installed');
  const certs = await makeCerts(t);
  const etcd = await startEtcd(t, certs);
  assert.match(etcd.url, /^https:/);
  const node = await started(t, [...tlsArgs(certs), '--etcd', etcd.url, '--set', 'cluster.name=tls', '--set', 'rmem.tls=require']);
  await until('the node joined over https', async () => (await (await fetch(`${node.url}/v1/cluster`)).json()) as { self: { state: string } | null }, (v) => v.self?.state === 'member');
  const good = await pems(certs.dir);
  const memory = await HierarchyMemory.open({ serverId: 'tls-host', localDram: 64 * 1024, cluster: { etcd: etcd.url, name: 'tls', tls: good } });
  t.after(() => memory.close());
  const segment = await memory.alloc(64 * 1024, { medium: 'dram' });
  assert.ok(segment.mapping().every((row) => row.device !== 'local'));
  await segment.write(0, Buffer.alloc(64 * 1024, 0x77));
  await memory.flush();
  assert.ok((await segment.read(0, 64 * 1024)).equals(Buffer.alloc(64 * 1024, 0x77)));
  // Without the client certificate, etcd refuses the host.
  await assert.rejects(HierarchyMemory.open({ serverId: 'no-cert', localDram: 64 * 1024, cluster: { etcd: etcd.url, name: 'tls', tls: { ca: good.ca } } }));
});
