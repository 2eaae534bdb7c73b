// NBD over TLS (issue 14, item 6; proto.md "TLS support"), driven byte by byte: the
// FORCEDTLS rules of nbd.tls=require, the upgrade itself, that no negotiation state
// survives it, certificates from another CA or none refused, and clients that stall in
// or after the TLS handshake cut by the handshake timeout.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import type { ConnectionOptions } from 'node:tls';
import { CMD, OPT, REP, SIMPLE_REPLY_MAGIC } from '../../src/protocol/nbd/spec.js';
import { makeCerts, missingOpenssl, type TestCerts } from '../support/certs.js';
import { RawNbd, infoPayload, requestBytes } from '../support/nbd-raw.js';
import { startNode, tempDir, type NodeProcess } from '../support/node-process.js';

type Ctx = { after(fn: () => Promise<void>): void };

async function tlsNode(t: Ctx, certs: TestCerts, mode: 'on' | 'require', extra: string[] = []): Promise<NodeProcess> {
  const node = await startNode({ cwd: await tempDir(t), args: ['--nbd-tls', mode, '--tls-cert', certs.cert, '--tls-key', certs.key, '--tls-ca', certs.ca, ...extra] });
  t.after(async () => {
    await node.stop('SIGKILL');
  });
  return node;
}

async function client(dir: string): Promise<ConnectionOptions> {
  const read = (name: string) => readFile(join(dir, name)).catch(() => undefined);
  const [ca, cert, key] = await Promise.all([read('ca-cert.pem'), read('client-cert.pem'), read('client-key.pem')]);
  return { ...(ca === undefined ? {} : { ca }), ...(cert === undefined || key === undefined ? {} : { cert, key }) };
}

/** Reads option replies up to the final one (ACK or an error), all for `option`, and returns its type. */
async function finalReply(raw: RawNbd, option: number): Promise<number> {
  const replies = await raw.replies();
  for (const reply of replies) assert.equal(reply.option, option);
  return replies.at(-1)?.type ?? -1;
}

test('nbd.tls=require (FORCEDTLS): every option but STARTTLS gets NBD_REP_ERR_TLS_REQD; after STARTTLS the session starts afresh over TLS and serves data', async (t) => {
  if (missingOpenssl() !== undefined) return t.skip('openssl is not installed');
  const certs = await makeCerts(t);
  const node = await tlsNode(t, certs, 'require');
  const raw = await RawNbd.open(node.nbd);
  await raw.greet();
  for (const [option, data] of [[OPT.LIST, Buffer.alloc(0)], [OPT.INFO, infoPayload('default')], [OPT.GO, infoPayload('default')], [OPT.STRUCTURED_REPLY, Buffer.alloc(0)], [OPT.SET_META_CONTEXT, Buffer.alloc(8)], [999, Buffer.alloc(0)]] as const) {
    raw.option(option, data);
    const reply = await raw.reply();
    assert.deepEqual([reply.option, reply.type], [option, REP.ERR_TLS_REQD], `option ${option} before TLS`);
  }
  raw.option(OPT.STARTTLS, Buffer.from('x'));
  assert.equal((await raw.reply()).type, REP.ERR_INVALID, 'STARTTLS carries no data');
  raw.option(OPT.STARTTLS);
  assert.equal((await raw.reply()).type, REP.ACK);
  const secure = await raw.startTls(await client(certs.dir));
  assert.ok(secure.authorized, 'the node\'s certificate checks against the CA');
  raw.option(OPT.STARTTLS);
  assert.equal((await raw.reply()).type, REP.ERR_INVALID, 'TLS is already negotiated');
  raw.option(OPT.LIST);
  assert.equal(await finalReply(raw, OPT.LIST), REP.ACK);
  raw.option(OPT.GO, infoPayload('default'));
  assert.equal(await finalReply(raw, OPT.GO), REP.ACK);
  const data = Buffer.alloc(4096, 0x6b);
  raw.socket.write(Buffer.concat([requestBytes(CMD.WRITE, { cookie: 1n, offset: 8192, data }), requestBytes(CMD.READ, { cookie: 2n, offset: 8192, length: 4096 })]));
  const written = await raw.read(16);
  assert.deepEqual([written.readUInt32BE(0), written.readUInt32BE(4), written.readUInt32BE(12)], [SIMPLE_REPLY_MAGIC, 0, 1]);
  const read = await raw.read(16);
  assert.deepEqual([read.readUInt32BE(0), read.readUInt32BE(4), read.readUInt32BE(12)], [SIMPLE_REPLY_MAGIC, 0, 2]);
  assert.ok((await raw.read(4096)).equals(data));
  raw.socket.end(requestBytes(CMD.DISC, { cookie: 3n }));
  assert.ok(await raw.closedWithin(2000));
});

test('nbd.tls=require: EXPORT_NAME without TLS ends the session; certificates of another CA, or none, fail the handshake; the node serves TLS clients meanwhile', async (t) => {
  if (missingOpenssl() !== undefined) return t.skip('openssl is not installed');
  const certs = await makeCerts(t);
  const node = await tlsNode(t, certs, 'require');
  const plain = await RawNbd.open(node.nbd);
  await plain.greet();
  plain.option(OPT.EXPORT_NAME, Buffer.from('default'));
  assert.ok(await plain.closedWithin(2000), 'EXPORT_NAME cannot be refused with an error: the session ends');
  for (const dir of [certs.rogueDir, certs.anonymousDir]) {
    const raw = await RawNbd.open(node.nbd);
    await raw.greet();
    raw.option(OPT.STARTTLS);
    assert.equal((await raw.reply()).type, REP.ACK);
    // TLS 1.3 checks the client certificate after the client's side of the handshake is done: the refusal may come on first use.
    const refused = await raw
      .startTls(await client(dir))
      .then(async () => {
        raw.option(OPT.LIST);
        await raw.reply();
        return false;
      })
      .catch(() => true);
    assert.ok(refused, `a client from ${dir} is refused`);
  }
  const good = await RawNbd.open(node.nbd);
  await good.greet();
  good.option(OPT.STARTTLS);
  assert.equal((await good.reply()).type, REP.ACK);
  await good.startTls(await client(certs.dir));
  good.option(OPT.LIST);
  assert.equal(await finalReply(good, OPT.LIST), REP.ACK);
  good.socket.destroy();
  const metrics = await (await fetch(`${node.url}/healthz`)).json() as { status: string };
  assert.equal(metrics.status, 'ok');
});

test('nbd.tls: a client that stalls before or after its TLS handshake is cut after nbd.handshakeTimeout', async (t) => {
  if (missingOpenssl() !== undefined) return t.skip('openssl is not installed');
  const certs = await makeCerts(t);
  const node = await tlsNode(t, certs, 'on', ['--set', 'nbd.handshakeTimeout=1s']);
  // STARTTLS answered, then no TLS hello at all.
  const silent = await RawNbd.open(node.nbd);
  await silent.greet();
  silent.option(OPT.STARTTLS);
  assert.equal((await silent.reply()).type, REP.ACK);
  silent.socket.removeAllListeners('data');
  const silentClosed = new Promise<void>((resolve) => silent.socket.once('close', () => resolve()));
  // TLS up, then no option.
  const idle = await RawNbd.open(node.nbd);
  await idle.greet();
  idle.option(OPT.STARTTLS);
  assert.equal((await idle.reply()).type, REP.ACK);
  await idle.startTls(await client(certs.dir));
  const started = Date.now();
  await silentClosed;
  assert.ok(await idle.closedWithin(2000), 'a TLS client that never enters transmission is cut');
  assert.ok(Date.now() - started < 10_000);
});

test('nbd.tls=on: plaintext clients are served, STARTTLS upgrades, and what was negotiated before it does not survive it', async (t) => {
  if (missingOpenssl() !== undefined) return t.skip('openssl is not installed');
  const certs = await makeCerts(t);
  const node = await tlsNode(t, certs, 'on');
  const plain = await RawNbd.open(node.nbd);
  await plain.greet();
  plain.option(OPT.LIST);
  assert.equal(await finalReply(plain, OPT.LIST), REP.ACK, 'plaintext options are answered');
  plain.option(OPT.STRUCTURED_REPLY);
  assert.equal((await plain.reply()).type, REP.ACK);
  plain.option(OPT.STRUCTURED_REPLY);
  assert.equal((await plain.reply()).type, REP.ERR_INVALID, 'negotiated once already');
  plain.option(OPT.STARTTLS);
  assert.equal((await plain.reply()).type, REP.ACK);
  await plain.startTls(await client(certs.dir));
  plain.option(OPT.STRUCTURED_REPLY);
  assert.equal((await plain.reply()).type, REP.ACK, 'structured replies are negotiated afresh after STARTTLS');
  plain.socket.destroy();
});

test('a node stops at once with clients silent in their TLS handshake (NBD after STARTTLS, rmem and mirror from the first byte)', async (t) => {
  if (missingOpenssl() !== undefined) return t.skip('openssl is not installed');
  const certs = await makeCerts(t);
  const node = await tlsNode(t, certs, 'on', ['--set', 'nbd.handshakeTimeout=60s', '--set', 'rmem.handshakeTimeout=60s', '--set', 'mirror.handshakeTimeout=60s', '--set', 'rmem.tls=require', '--set', 'mirror.tls=require']);
  const nbd = await RawNbd.open(node.nbd);
  await nbd.greet();
  nbd.option(OPT.STARTTLS);
  assert.equal((await nbd.reply()).type, REP.ACK);
  const silent = [connect(node.rmem.port, node.rmem.host), connect(node.mirror.port, node.mirror.host)];
  for (const s of silent) {
    s.on('error', () => undefined);
    await new Promise<void>((resolve) => s.once('connect', () => resolve()));
  }
  const started = Date.now();
  assert.equal(await node.stop('SIGTERM'), 0);
  assert.ok(Date.now() - started < 15_000, `stopped after ${Date.now() - started} ms, not after a 60 s handshake timeout`);
  for (const s of silent) s.destroy();
  nbd.socket.destroy();
});
