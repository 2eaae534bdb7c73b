// The NBD handshake driven byte by byte over a raw socket: option negotiation, and
// clients that abort, send garbage, or ask for what is not there.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CMD, OPT, REP, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC } from '../../src/protocol/nbd/spec.js';
import { RawNbd, infoPayload } from '../support/nbd-raw.js';
import { startNode, tempDir } from '../support/node-process.js';


function meta(name: string, queries: string[]): Buffer {
  const parts = [Buffer.alloc(4), Buffer.from(name), Buffer.alloc(4)];
  parts[0]!.writeUInt32BE(Buffer.byteLength(name), 0);
  parts[2]!.writeUInt32BE(queries.length, 0);
  for (const q of queries) {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(Buffer.byteLength(q), 0);
    parts.push(len, Buffer.from(q));
  }
  return Buffer.concat(parts);
}

test('option negotiation: LIST, INFO, unknown options and exports, meta contexts, STARTTLS, ABORT', async (t) => {
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir });
  t.after(() => n.stop('SIGKILL'));
  const raw = await RawNbd.open(n.nbd);
  t.after(async () => raw.socket.destroy());
  assert.equal(await raw.greet(), 3, 'FIXED_NEWSTYLE | NO_ZEROES');

  raw.option(OPT.LIST);
  const server = await raw.reply();
  assert.equal(server.type, REP.SERVER);
  assert.equal(server.data.toString('utf8', 4, 4 + server.data.readUInt32BE(0)), 'default');
  assert.equal((await raw.reply()).type, REP.ACK);

  raw.option(OPT.LIST, Buffer.from('x'));
  assert.equal((await raw.reply()).type, REP.ERR_INVALID);

  raw.option(OPT.INFO, infoPayload('missing'));
  const unknown = await raw.reply();
  assert.equal(unknown.type, REP.ERR_UNKNOWN);
  assert.match(unknown.data.toString(), /no export named "missing"/);

  raw.option(OPT.INFO, infoPayload('', [3]));
  const info = await raw.reply();
  assert.equal(info.type, REP.INFO);
  assert.equal(info.data.readUInt16BE(0), 0, 'NBD_INFO_EXPORT first');
  assert.equal(Number(info.data.readBigUInt64BE(2)), 64 * 2 ** 20);
  const block = await raw.reply();
  assert.deepEqual([block.data.readUInt16BE(0), block.data.readUInt32BE(2), block.data.readUInt32BE(6), block.data.readUInt32BE(10)], [3, 1, 4096, 32 * 2 ** 20]);
  assert.equal((await raw.reply()).type, REP.ACK);

  raw.option(OPT.INFO, Buffer.from([0, 0, 0, 50, 1]));
  assert.equal((await raw.reply()).type, REP.ERR_INVALID, 'a name longer than the payload');

  raw.option(99);
  assert.equal((await raw.reply()).type, REP.ERR_UNSUP);
  raw.option(OPT.STARTTLS);
  assert.equal((await raw.reply()).type, REP.ERR_POLICY);

  raw.option(OPT.SET_META_CONTEXT, meta('', ['base:allocation']));
  assert.equal((await raw.reply()).type, REP.ERR_INVALID, 'SET_META_CONTEXT before structured replies');
  raw.option(OPT.STRUCTURED_REPLY);
  assert.equal((await raw.reply()).type, REP.ACK);
  raw.option(OPT.STRUCTURED_REPLY);
  assert.equal((await raw.reply()).type, REP.ERR_INVALID, 'twice');
  raw.option(OPT.LIST_META_CONTEXT, meta('', []));
  const listed = await raw.reply();
  assert.equal(listed.type, REP.META_CONTEXT);
  assert.equal(listed.data.toString('utf8', 4), 'base:allocation');
  assert.equal((await raw.reply()).type, REP.ACK);
  raw.option(OPT.SET_META_CONTEXT, meta('', ['x-other:thing']));
  assert.equal((await raw.reply()).type, REP.ACK, 'nothing selected is not an error');
  raw.option(OPT.SET_META_CONTEXT, meta('nope', ['base:allocation']));
  assert.equal((await raw.reply()).type, REP.ERR_UNKNOWN);

  raw.option(OPT.ABORT);
  assert.equal((await raw.reply()).type, REP.ACK);
  assert.ok(await raw.closedWithin(2000));
});

test('hostile clients: unknown client flags, unknown EXPORT_NAME, garbage; others keep working', async (t) => {
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir });
  t.after(() => n.stop('SIGKILL'));

  const flags = await RawNbd.open(n.nbd);
  await flags.greet(0x80);
  assert.ok(await flags.closedWithin(2000), 'unknown client flag closes');

  const name = await RawNbd.open(n.nbd);
  await name.greet();
  name.option(OPT.EXPORT_NAME, Buffer.from('nope'));
  assert.ok(await name.closedWithin(2000), 'EXPORT_NAME for an unknown export closes');

  const garbage = await RawNbd.open(n.nbd);
  await garbage.greet();
  garbage.socket.write(Buffer.from('GET / HTTP/1.1\r\n\r\n'.repeat(10)));
  assert.ok(await garbage.closedWithin(2000), 'garbage closes');

  const quitter = await RawNbd.open(n.nbd);
  await quitter.greet();
  quitter.socket.destroy(); // a client that vanishes mid-handshake

  // A good client attaches by EXPORT_NAME (no zeroes after NO_ZEROES) and is served.
  const good = await RawNbd.open(n.nbd);
  t.after(async () => good.socket.destroy());
  await good.greet();
  good.option(OPT.EXPORT_NAME, Buffer.alloc(0));
  const attach = await good.read(10);
  assert.equal(Number(attach.readBigUInt64BE(0)), 64 * 2 ** 20);
  const req = Buffer.alloc(28);
  req.writeUInt32BE(REQUEST_MAGIC, 0);
  req.writeUInt16BE(CMD.READ, 6);
  req.writeUInt32BE(7, 12);
  req.writeBigUInt64BE(0n, 16);
  req.writeUInt32BE(4096, 24);
  const bad = Buffer.from(req);
  bad.writeUInt32BE(8, 12);
  bad.writeBigUInt64BE(BigInt(64 * 2 ** 20), 16);
  good.socket.write(Buffer.concat([req, bad]));
  // Replies may come in any order; the cookie says which is which.
  const errors = new Map<number, number>();
  for (let i = 0; i < 2; i++) {
    const reply = await good.read(16);
    assert.equal(reply.readUInt32BE(0), SIMPLE_REPLY_MAGIC);
    errors.set(reply.readUInt32BE(12), reply.readUInt32BE(4));
    if (reply.readUInt32BE(12) === 7 && reply.readUInt32BE(4) === 0) assert.ok((await good.read(4096)).every((b) => b === 0));
  }
  assert.deepEqual([errors.get(7), errors.get(8)], [0, 22], 'the good READ succeeds; the one past the end gets EINVAL');
  assert.equal((await fetch(`${n.url}/healthz`)).status, 200);
});
