// Conformance with the NBD protocol, doc/proto.md at the NetworkBlockDevice/nbd project's
// master: one test per MUST or SHOULD that applies to this server (fixed newstyle, no
// TLS, structured replies, base:allocation), named after the rule and grouped by the
// spec's sections. Raw sockets throughout, since libnbd will not send most of the cases
// a server has to get right; pipelining across DISC with libnbd itself is in
// test/interop/nbd.test.ts.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { RawNbd, infoPayload, metaPayload, optionBytes, type Reply } from '../support/nbd-raw.js';
import { BLOCK, CMD, CMD_FLAG, ERRNO, FLAG, INFO, OPT, REP, REPLY_FLAG_DONE, REPLY_TYPE, STATE } from '../../src/protocol/nbd/spec.js';

const MiB = 2 ** 20;
const SIZE = 64 * MiB;
const EINVAL = ERRNO.EINVAL;

/** The errno of a reply, and for structured errors their message, which must be a valid string. */
function errnoOf(reply: Reply): number {
  for (const chunk of reply.chunks) {
    if ((chunk.type & 0x8000) === 0) continue;
    assert.ok(chunk.payload.length >= 6, 'an error chunk is at least 6 bytes');
    assert.notEqual(chunk.payload.readUInt32BE(0), 0, 'the error of an error chunk MUST be nonzero');
    const length = chunk.payload.readUInt16BE(4);
    assert.ok(length <= 4096, 'error message within 4096 bytes');
    assert.ok(6 + length <= chunk.payload.length, 'message length within the chunk');
  }
  return reply.error;
}

describe('NBD conformance (doc/proto.md)', () => {
  let n: NodeProcess;
  let dir: string;
  const address = (): { host: string; port: number } => n.nbd;

  const cleanups: (() => Promise<void>)[] = [];
  before(async () => {
    dir = await tempDir({ after: (fn) => cleanups.push(fn) });
    n = await startNode({ cwd: dir });
    const created = await fetch(`${n.url}/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'ro', size: '1MiB', readOnly: true }) });
    assert.equal(created.status, 201);
  });
  after(async () => {
    await n.stop('SIGKILL');
    for (const fn of cleanups) await fn();
  });

  async function attach(t: { after(fn: () => void): void }, options: { structured?: boolean; meta?: string[]; name?: string } = {}): Promise<{ nbd: RawNbd; size: number; flags: number }> {
    const a = await RawNbd.attach(address(), options);
    t.after(() => a.nbd.destroy());
    return a;
  }

  async function handshake(t: { after(fn: () => void): void }, clientFlags = 3): Promise<{ nbd: RawNbd; flags: number }> {
    const nbd = await RawNbd.open(address());
    t.after(() => nbd.destroy());
    return { nbd, flags: await nbd.greet(clientFlags) };
  }

  // ---- Handshake ----

  test('handshake: the server MUST set NBD_FLAG_FIXED_NEWSTYLE and MUST NOT set flags other than FIXED_NEWSTYLE and NO_ZEROES', async (t) => {
    const { flags } = await handshake(t);
    assert.equal(flags & 1, 1);
    assert.equal(flags & ~3, 0);
  });

  test('handshake: the server MUST close the connection if it does not recognize the client flags', async (t) => {
    const { nbd } = await handshake(t, 1 << 5);
    assert.ok(await nbd.closedWithin());
  });

  test('handshake: with NBD_FLAG_C_NO_ZEROES the server MUST NOT send the 124 zero bytes after NBD_OPT_EXPORT_NAME; without it, it sends them', async (t) => {
    const quiet = (await handshake(t, 3)).nbd;
    quiet.option(OPT.EXPORT_NAME);
    const reply = await quiet.read(10);
    assert.equal(Number(reply.readBigUInt64BE(0)), SIZE);
    // The next bytes on the wire must be a reply to our first request, not padding.
    const read = await quiet.call(CMD.READ, { length: 512 });
    assert.equal(read.error, 0);

    const padded = (await handshake(t, 1)).nbd;
    padded.option(OPT.EXPORT_NAME);
    const full = await padded.read(10 + 124);
    assert.ok(full.subarray(10).every((b) => b === 0));
    assert.equal((await padded.call(CMD.READ, { length: 512 })).error, 0);
  });

  test('handshake: NBD_OPT_EXPORT_NAME for an export that does not exist MUST terminate the session', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(OPT.EXPORT_NAME, Buffer.from('no-such-export'));
    assert.ok(await nbd.closedWithin());
  });

  test('handshake: options the server does not implement MUST get NBD_REP_ERR_UNSUP and the next option MUST still parse', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(4242, Buffer.alloc(300, 7));
    const unsup = await nbd.reply();
    assert.deepEqual([unsup.option, unsup.type], [4242, REP.ERR_UNSUP]);
    nbd.option(OPT.LIST);
    const list = await nbd.replies();
    assert.equal(list.at(-1)?.type, REP.ACK);
  });

  test('handshake: NBD_OPT_ABORT MUST be answered with NBD_REP_ACK, and data sent with it SHOULD be ignored', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(OPT.ABORT, Buffer.from('ignored'));
    assert.equal((await nbd.reply()).type, REP.ACK);
    assert.ok(await nbd.closedWithin());
  });

  test('handshake: an option with more data than the server takes gets NBD_REP_ERR_TOO_BIG (the request is too large to process), its data is skipped and the next option still parses', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(OPT.GO, Buffer.concat([infoPayload(''), Buffer.alloc(MiB, 0x61)]));
    const tooBig = await nbd.reply();
    assert.deepEqual([tooBig.option, tooBig.type], [OPT.GO, REP.ERR_TOO_BIG]);
    const { size } = await nbd.go('');
    assert.equal(size, SIZE);
    assert.equal((await nbd.call(CMD.READ, { length: 512 })).error, 0);
  });

  test('handshake: NBD_OPT_EXPORT_NAME with a name longer than the server takes: it cannot error, so the session is terminated', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(OPT.EXPORT_NAME, Buffer.alloc(100_000, 0x61));
    assert.ok(await nbd.closedWithin());
  });

  test('handshake: NBD_OPT_LIST with data SHOULD be rejected with NBD_REP_ERR_INVALID', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(OPT.LIST, Buffer.from('x'));
    assert.equal((await nbd.reply()).type, REP.ERR_INVALID);
  });

  test('handshake: NOTLS mode: NBD_OPT_STARTTLS MUST get NBD_REP_ERR_POLICY or NBD_REP_ERR_UNSUP, never NBD_REP_ERR_TLS_REQD', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(OPT.STARTTLS);
    assert.ok(([REP.ERR_POLICY, REP.ERR_UNSUP] as number[]).includes((await nbd.reply()).type));
    nbd.option(OPT.INFO, infoPayload(''));
    for (const r of await nbd.replies()) assert.notEqual(r.type, REP.ERR_TLS_REQD);
  });

  test('handshake: NBD_OPT_STRUCTURED_REPLY with data SHOULD be rejected with NBD_REP_ERR_INVALID', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(OPT.STRUCTURED_REPLY, Buffer.from([1]));
    assert.equal((await nbd.reply()).type, REP.ERR_INVALID);
  });

  test('handshake: NBD_OPT_INFO/GO: a name length larger than the option data length - 6 MUST NOT be accepted (NBD_REP_ERR_INVALID)', async (t) => {
    const { nbd } = await handshake(t);
    const payload = infoPayload('default');
    payload.writeUInt32BE(100, 0);
    nbd.option(OPT.INFO, payload);
    assert.equal((await nbd.reply()).type, REP.ERR_INVALID);
  });

  test('handshake: NBD_OPT_INFO/GO: the server MUST send NBD_INFO_EXPORT before NBD_REP_ACK, and MUST ignore information requests it does not understand', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(OPT.INFO, infoPayload('', [4242, INFO.NAME]));
    const replies = await nbd.replies();
    assert.equal(replies.at(-1)?.type, REP.ACK);
    const infos = replies.filter((r) => r.type === REP.INFO).map((r) => r.data.readUInt16BE(0));
    assert.ok(infos.includes(INFO.EXPORT));
    assert.ok(!infos.includes(4242));
    const exportInfo = replies.find((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === INFO.EXPORT);
    assert.equal(exportInfo?.data.length, 12, 'NBD_INFO_EXPORT length MUST be 12');
  });

  test('handshake: an information type SHOULD only appear once for an export, even when asked twice', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(OPT.INFO, infoPayload('', [INFO.NAME, INFO.NAME, INFO.EXPORT]));
    const types = (await nbd.replies()).filter((r) => r.type === REP.INFO).map((r) => r.data.readUInt16BE(0));
    assert.equal(types.filter((x) => x === INFO.NAME).length, 1);
    assert.equal(types.filter((x) => x === INFO.EXPORT).length, 1);
  });

  test('handshake: NBD_OPT_INFO/GO for an unknown export: NBD_REP_ERR_UNKNOWN, and the server SHOULD NOT send NBD_REP_INFO', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(OPT.GO, infoPayload('missing'));
    const replies = await nbd.replies();
    assert.deepEqual(replies.map((r) => r.type), [REP.ERR_UNKNOWN]);
  });

  test('handshake: NBD_OPT_GO after a successful NBD_OPT_INFO with the same parameters MUST reply with the same set of information', async (t) => {
    const { nbd } = await handshake(t);
    const asked = [INFO.NAME, INFO.DESCRIPTION, INFO.BLOCK_SIZE];
    nbd.option(OPT.INFO, infoPayload('ro', asked));
    const info = await nbd.replies();
    nbd.option(OPT.GO, infoPayload('ro', asked));
    const go = await nbd.replies();
    const set = (rs: typeof go): string[] => rs.map((r) => `${r.type}:${r.data.toString('hex')}`).sort();
    assert.deepEqual(set(go), set(info));
  });

  test('handshake: NBD_OPT_GO: the server MUST NOT send zero padding after NBD_REP_ACK, whatever the client flags', async (t) => {
    const { nbd } = await handshake(t, 1); // without NO_ZEROES
    await nbd.go('');
    const read = await nbd.call(CMD.READ, { length: 16 });
    assert.equal(read.error, 0);
  });

  test('handshake: NBD_INFO_NAME is the name in NBD_REP_SERVER, and NBD_INFO_DESCRIPTION is the description that NBD_OPT_LIST gives', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(OPT.LIST);
    const list = (await nbd.replies()).filter((r) => r.type === REP.SERVER);
    const described = new Map(list.map((r) => {
      const nameLength = r.data.readUInt32BE(0);
      return [r.data.toString('utf8', 4, 4 + nameLength), r.data.toString('utf8', 4 + nameLength)];
    }));
    assert.ok(described.has('ro') && described.has('default'));
    for (const name of ['ro', 'default']) {
      nbd.option(OPT.INFO, infoPayload(name, [INFO.NAME, INFO.DESCRIPTION]));
      const infos = await nbd.replies();
      const text = (type: number): string | undefined => infos.find((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === type)?.data.toString('utf8', 2);
      assert.equal(text(INFO.NAME), name);
      assert.equal(text(INFO.DESCRIPTION), described.get(name));
    }
  });

  test('handshake: error strings MUST be no longer than 4096 bytes (SHOULD be 256) and are never cut inside a UTF-8 character', async (t) => {
    const { nbd } = await handshake(t);
    // An export name of 1365 three-byte characters (4095 bytes): the error names it.
    const name = '\u20ac'.repeat(1365);
    nbd.option(OPT.INFO, infoPayload(name));
    const reply = await nbd.reply();
    assert.equal(reply.type, REP.ERR_UNKNOWN);
    assert.ok(reply.data.length <= 256, `${reply.data.length} bytes`);
    assert.equal(Buffer.from(reply.data.toString('utf8'), 'utf8').length, reply.data.length, 'valid UTF-8: decoding and encoding again keeps every byte');
    assert.ok(!reply.data.toString('utf8').includes('\ufffd'));
  });

  test('handshake: the client MAY send options back to back; each is answered in order', async (t) => {
    const { nbd } = await handshake(t);
    nbd.socket.write(Buffer.concat([optionBytes(OPT.LIST), optionBytes(9999), optionBytes(OPT.STRUCTURED_REPLY)]));
    assert.equal((await nbd.replies()).at(-1)?.type, REP.ACK);
    assert.equal((await nbd.reply()).type, REP.ERR_UNSUP);
    assert.equal((await nbd.reply()).type, REP.ACK);
  });

  // ---- Metadata querying ----

  test('meta: NBD_OPT_SET_META_CONTEXT before structured replies: the server SHOULD send NBD_REP_ERR_INVALID', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(OPT.SET_META_CONTEXT, metaPayload('', ['base:allocation']));
    assert.equal((await nbd.reply()).type, REP.ERR_INVALID);
  });

  test('meta: NBD_OPT_LIST_META_CONTEXT with zero queries MUST return every context, with id zero (SHOULD)', async (t) => {
    const { nbd } = await handshake(t);
    await nbd.negotiateStructured();
    nbd.option(OPT.LIST_META_CONTEXT, metaPayload('', []));
    const replies = await nbd.replies();
    assert.deepEqual(replies.map((r) => r.type), [REP.META_CONTEXT, REP.ACK]);
    assert.equal(replies[0]?.data.readUInt32BE(0), 0);
    assert.equal(replies[0]?.data.toString('utf8', 4), 'base:allocation');
  });

  test('meta: `base:` MUST be supported as a wildcard in NBD_OPT_LIST_META_CONTEXT', async (t) => {
    const { nbd } = await handshake(t);
    await nbd.negotiateStructured();
    nbd.option(OPT.LIST_META_CONTEXT, metaPayload('', ['base:']));
    const replies = await nbd.replies();
    assert.deepEqual(replies.map((r) => r.type), [REP.META_CONTEXT, REP.ACK]);
    assert.equal(replies[0]?.data.toString('utf8', 4), 'base:allocation');
  });

  test('meta: the query `base:` MUST be ignored by NBD_OPT_SET_META_CONTEXT (it selects nothing)', async (t) => {
    const { nbd } = await handshake(t);
    await nbd.negotiateStructured();
    const replies = await nbd.setMeta('', ['base:']);
    assert.deepEqual(replies.map((r) => r.type), [REP.ACK], 'no context selected');
    await nbd.go('');
    const status = await nbd.call(CMD.BLOCK_STATUS, { length: 4096 });
    assert.equal(errnoOf(status), EINVAL, 'BLOCK_STATUS without a selected context SHOULD get EINVAL');
  });

  test('meta: an unknown leaf in `base:` and queries of unknown namespaces MUST be ignored, not errors', async (t) => {
    const { nbd } = await handshake(t);
    await nbd.negotiateStructured();
    for (const option of [OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT]) {
      nbd.option(option, metaPayload('', ['base:nothing-here', 'x-vendor:thing', 'qemu:dirty-bitmap:b']));
      assert.deepEqual((await nbd.replies()).map((r) => r.type), [REP.ACK]);
    }
  });

  test('meta: a syntactically invalid query list (a length past the option data) MUST fail with NBD_REP_ERR_INVALID', async (t) => {
    const { nbd } = await handshake(t);
    await nbd.negotiateStructured();
    const payload = metaPayload('', ['base:allocation']);
    payload.writeUInt32BE(1000, 8);
    for (const option of [OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT]) {
      nbd.option(option, payload);
      assert.equal((await nbd.reply()).type, REP.ERR_INVALID);
    }
  });

  test('meta: NBD_OPT_SET_META_CONTEXT replies with each selected context and a unique id, then NBD_REP_ACK', async (t) => {
    const { nbd } = await handshake(t);
    await nbd.negotiateStructured();
    const replies = await nbd.setMeta('', ['base:allocation']);
    assert.deepEqual(replies.map((r) => r.type), [REP.META_CONTEXT, REP.ACK]);
    assert.equal(replies[0]?.data.toString('utf8', 4), 'base:allocation');
  });

  test('meta: NBD_OPT_SET_META_CONTEXT replaces all previous contexts, including when it fails', async (t) => {
    const { nbd } = await handshake(t);
    await nbd.negotiateStructured();
    assert.equal((await nbd.setMeta('', ['base:allocation'])).length, 2);
    const failed = await nbd.setMeta('missing', ['base:allocation']);
    assert.equal(failed.at(-1)?.type, REP.ERR_UNKNOWN);
    await nbd.go('');
    assert.equal(errnoOf(await nbd.call(CMD.BLOCK_STATUS, { length: 4096 })), EINVAL, 'the failed SET cleared the selection');
  });

  test('meta: NBD_OPT_SET_META_CONTEXT with zero queries MUST select no contexts', async (t) => {
    const { nbd } = await handshake(t);
    await nbd.negotiateStructured();
    await nbd.setMeta('', ['base:allocation']);
    assert.deepEqual((await nbd.setMeta('', [])).map((r) => r.type), [REP.ACK]);
    await nbd.go('');
    assert.equal(errnoOf(await nbd.call(CMD.BLOCK_STATUS, { length: 4096 })), EINVAL);
  });

  test('meta: contexts set for one export are not active after NBD_OPT_GO to another (BLOCK_STATUS then gets EINVAL)', async (t) => {
    const { nbd } = await handshake(t);
    await nbd.negotiateStructured();
    await nbd.setMeta('ro', ['base:allocation']);
    await nbd.go('default');
    assert.equal(errnoOf(await nbd.call(CMD.BLOCK_STATUS, { length: 4096 })), EINVAL);
  });

  test('meta: BLOCK_STATUS MUST answer one NBD_REPLY_TYPE_BLOCK_STATUS chunk per context, descriptors of nonzero length, the first N-1 summing to less than the length', async (t) => {
    const { nbd } = await attach(t, { meta: ['base:allocation'] });
    await nbd.call(CMD.WRITE, { offset: 3 * MiB, data: Buffer.alloc(64 * 1024, 1) });
    const reply = await nbd.call(CMD.BLOCK_STATUS, { offset: 0, length: 8 * MiB });
    const status = reply.chunks.filter((c) => c.type === REPLY_TYPE.BLOCK_STATUS);
    assert.equal(status.length, 1);
    const payload = status[0]!.payload;
    assert.ok(payload.length > 4 && (payload.length - 4) % 8 === 0, 'length MUST be 4 + a positive multiple of 8');
    const lengths: number[] = [];
    for (let at = 4; at < payload.length; at += 8) lengths.push(payload.readUInt32BE(at));
    assert.ok(lengths.every((l) => l > 0));
    assert.ok(lengths.slice(0, -1).reduce((a, b) => a + b, 0) < 8 * MiB);
    assert.ok(lengths.length >= 3, 'hole, data, hole');
    assert.equal((reply.chunks.at(-1)!.flags & REPLY_FLAG_DONE), REPLY_FLAG_DONE);
  });

  test('meta: BLOCK_STATUS with NBD_CMD_FLAG_REQ_ONE: exactly one descriptor, no longer than the request', async (t) => {
    const { nbd } = await attach(t, { meta: ['base:allocation'] });
    const reply = await nbd.call(CMD.BLOCK_STATUS, { offset: 40 * MiB, length: 12345, flags: CMD_FLAG.REQ_ONE });
    const chunk = reply.chunks.find((c) => c.type === REPLY_TYPE.BLOCK_STATUS)!;
    assert.equal(chunk.payload.length, 12);
    assert.ok(chunk.payload.readUInt32BE(4) <= 12345);
    assert.equal(chunk.payload.readUInt32BE(8), STATE.HOLE | STATE.ZERO);
  });

  test('meta: BLOCK_STATUS beyond the end of the export SHOULD get EINVAL', async (t) => {
    const { nbd } = await attach(t, { meta: ['base:allocation'] });
    assert.equal(errnoOf(await nbd.call(CMD.BLOCK_STATUS, { offset: SIZE - 4096, length: 8192 })), EINVAL);
  });

  test('meta: a BLOCK_STATUS reply SHOULD hold at most 2^20 descriptors, whatever length is asked', async (t) => {
    const { nbd } = await attach(t, { meta: ['base:allocation'] });
    // Every other 64 KiB chunk written, so each chunk is its own extent.
    for (let at = 0; at < 4 * MiB; at += 128 * 1024) nbd.request(CMD.WRITE, { offset: at, data: Buffer.alloc(4096, 2) });
    for (let at = 0; at < 4 * MiB; at += 128 * 1024) assert.equal((await nbd.next()).error, 0);
    const reply = await nbd.call(CMD.BLOCK_STATUS, { offset: 0, length: SIZE });
    const chunk = reply.chunks.find((c) => c.type === REPLY_TYPE.BLOCK_STATUS)!;
    assert.ok((chunk.payload.length - 4) / 8 <= 2 ** 20);
  });

  // ---- Transmission: simple and structured replies ----

  test('transmission: without structured replies the server MUST use simple replies, a READ carrying its data', async (t) => {
    const { nbd } = await attach(t);
    await nbd.call(CMD.WRITE, { offset: 5 * MiB, data: Buffer.alloc(100, 0x5a) });
    const read = await nbd.call(CMD.READ, { offset: 5 * MiB, length: 100 });
    assert.ok(read.simple);
    assert.ok(read.data?.equals(Buffer.alloc(100, 0x5a)));
  });

  test('transmission: the server MUST echo the cookie as an opaque 64-bit value', async (t) => {
    const { nbd } = await attach(t, { structured: true });
    for (const cookie of [0n, 0xffffffffffffffffn, 0x8000000000000001n, 0x0123456789abcdefn]) {
      assert.equal((await nbd.call(CMD.FLUSH, { cookie })).cookie, cookie);
      assert.equal((await nbd.call(CMD.READ, { cookie, length: 1 })).cookie, cookie);
    }
  });

  test('transmission: with structured replies the server MUST NOT use a simple reply for READ, even for an early EINVAL due to bad flags', async (t) => {
    const { nbd } = await attach(t, { structured: true });
    const reply = await nbd.call(CMD.READ, { length: 512, flags: CMD_FLAG.NO_HOLE });
    assert.equal(reply.simple, false);
    assert.equal(errnoOf(reply), EINVAL);
    assert.equal(reply.chunks.at(-1)!.flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
  });

  test('transmission: a structured READ covers the whole request within its bounds, the last chunk flagged DONE', async (t) => {
    const { nbd } = await attach(t, { structured: true });
    const data = Buffer.alloc(3000);
    for (let i = 0; i < data.length; i++) data[i] = i % 251;
    await nbd.call(CMD.WRITE, { offset: 7 * MiB + 5, data });
    const reply = await nbd.call(CMD.READ, { offset: 7 * MiB + 5, length: 3000 });
    const image = Buffer.alloc(3000, 0xee);
    let covered = 0;
    for (const chunk of reply.chunks) {
      if (chunk.type === REPLY_TYPE.OFFSET_DATA) {
        const offset = Number(chunk.payload.readBigUInt64BE(0)) - (7 * MiB + 5);
        assert.ok(offset >= 0 && offset + chunk.payload.length - 8 <= 3000);
        chunk.payload.copy(image, offset, 8);
        covered += chunk.payload.length - 8;
      } else if (chunk.type === REPLY_TYPE.OFFSET_HOLE) {
        const offset = Number(chunk.payload.readBigUInt64BE(0)) - (7 * MiB + 5);
        image.fill(0, offset, offset + chunk.payload.readUInt32BE(8));
        covered += chunk.payload.readUInt32BE(8);
      }
    }
    assert.equal(covered, 3000);
    assert.ok(image.equals(data));
    assert.equal(reply.chunks.at(-1)!.flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
  });

  // ---- Flags ----

  test('flags: NBD_FLAG_HAS_FLAGS MUST always be set; NBD_FLAG_SEND_DF MUST be clear without structured replies and set with them', async (t) => {
    const plain = await attach(t);
    assert.equal(plain.flags & FLAG.HAS_FLAGS, FLAG.HAS_FLAGS);
    assert.equal(plain.flags & FLAG.SEND_DF, 0);
    const structured = await attach(t, { structured: true });
    assert.equal(structured.flags & FLAG.SEND_DF, FLAG.SEND_DF);
  });

  test('flags: NBD_FLAG_SEND_FAST_ZERO MUST be clear when NBD_FLAG_SEND_WRITE_ZEROES is; a read-only export sets NBD_FLAG_READ_ONLY', async (t) => {
    const ro = await attach(t, { name: 'ro' });
    assert.equal(ro.flags & FLAG.READ_ONLY, FLAG.READ_ONLY);
    assert.equal(ro.flags & FLAG.SEND_WRITE_ZEROES, 0);
    assert.equal(ro.flags & FLAG.SEND_FAST_ZERO, 0);
  });

  test('flags: NBD_CMD_FLAG_FUA is valid for all commands once NBD_FLAG_SEND_FUA is advertised: the server MUST accept it', async (t) => {
    for (const structured of [false, true]) {
      const { nbd, flags } = await attach(t, structured ? { meta: ['base:allocation'] } : {});
      assert.equal(flags & FLAG.SEND_FUA, FLAG.SEND_FUA);
      const commands: [string, number, number][] = [
        ['WRITE', CMD.WRITE, 4096],
        ['READ', CMD.READ, 4096],
        ['FLUSH', CMD.FLUSH, 0],
        ['TRIM', CMD.TRIM, 4096],
        ['CACHE', CMD.CACHE, 4096],
        ['WRITE_ZEROES', CMD.WRITE_ZEROES, 4096],
      ];
      if (structured) commands.push(['BLOCK_STATUS', CMD.BLOCK_STATUS, 4096]);
      for (const [name, type, length] of commands) {
        const reply = await nbd.call(type, { flags: CMD_FLAG.FUA, offset: type === CMD.FLUSH ? 0 : 9 * MiB, length, data: type === CMD.WRITE ? Buffer.alloc(length, 3) : undefined });
        assert.equal(errnoOf(reply), 0, `${name} with FUA (${structured ? 'structured' : 'simple'} replies)`);
      }
    }
  });

  test('flags: a command flag not documented for the command, or unknown, SHOULD get EINVAL', async (t) => {
    const { nbd } = await attach(t, { structured: true });
    assert.equal(errnoOf(await nbd.call(CMD.WRITE, { flags: CMD_FLAG.DF, data: Buffer.alloc(8) })), EINVAL);
    assert.equal(errnoOf(await nbd.call(CMD.READ, { flags: CMD_FLAG.REQ_ONE, length: 8 })), EINVAL);
    assert.equal(errnoOf(await nbd.call(CMD.FLUSH, { flags: 1 << 9 })), EINVAL);
    assert.equal(errnoOf(await nbd.call(CMD.CACHE, { flags: CMD_FLAG.NO_HOLE, length: 8 })), EINVAL, 'NBD_CMD_CACHE: the server MUST reject flags it does not recognize');
  });

  test('flags: NBD_CMD_FLAG_DF: at most one content chunk, and unfragmented reads up to 65536 bytes MUST be supported', async (t) => {
    const { nbd } = await attach(t, { structured: true });
    const reply = await nbd.call(CMD.READ, { flags: CMD_FLAG.DF, length: 65536, offset: 11 * MiB });
    assert.equal(reply.error, 0);
    assert.equal(reply.chunks.filter((c) => c.type === REPLY_TYPE.OFFSET_DATA || c.type === REPLY_TYPE.OFFSET_HOLE).length, 1);
  });

  test('flags: NBD_CMD_FLAG_FAST_ZERO: the server MUST fail with ENOTSUP unless it is fast; without the flag it MUST NOT fail with ENOTSUP', async (t) => {
    const { nbd } = await attach(t);
    assert.equal((await nbd.call(CMD.WRITE_ZEROES, { offset: 12 * MiB, length: MiB, flags: CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO })).error, ERRNO.ENOTSUP);
    assert.equal((await nbd.call(CMD.WRITE_ZEROES, { offset: 12 * MiB, length: MiB, flags: CMD_FLAG.NO_HOLE })).error, 0);
    assert.equal((await nbd.call(CMD.WRITE_ZEROES, { offset: 12 * MiB, length: MiB, flags: CMD_FLAG.FAST_ZERO })).error, 0);
  });

  test('flags: NBD_FLAG_READ_ONLY: the server MUST error write operations, and SHOULD use EPERM', async (t) => {
    const { nbd } = await attach(t, { name: 'ro' });
    assert.equal((await nbd.call(CMD.WRITE, { data: Buffer.alloc(512) })).error, ERRNO.EPERM);
    assert.equal((await nbd.call(CMD.TRIM, { length: 512 })).error, ERRNO.EPERM);
    assert.equal((await nbd.call(CMD.WRITE_ZEROES, { length: 512 })).error, ERRNO.EPERM);
    assert.equal((await nbd.call(CMD.READ, { length: 512 })).error, 0);
  });

  // ---- Size constraints and error values ----

  test('size: default constraints SHOULD be minimum 1, preferred 4096, maximum payload at least 2^25; NBD_INFO_BLOCK_SIZE is 14 bytes, the sizes as the spec constrains them', async (t) => {
    const { nbd } = await handshake(t);
    nbd.option(OPT.INFO, infoPayload('', [INFO.BLOCK_SIZE]));
    const block = (await nbd.replies()).find((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === INFO.BLOCK_SIZE)!;
    assert.equal(block.data.length, 14);
    const [min, preferred, max] = [block.data.readUInt32BE(2), block.data.readUInt32BE(6), block.data.readUInt32BE(10)];
    assert.deepEqual([min, preferred], [1, 4096]);
    assert.ok(max >= 2 ** 25);
    const powerOfTwo = (v: number): boolean => v > 0 && (v & (v - 1)) === 0;
    assert.ok(powerOfTwo(min) && min <= 65536, 'minimum: a power of 2, at most 2^16');
    assert.ok(powerOfTwo(preferred) && preferred >= Math.max(min, 512), 'preferred: a power of 2, at least max(minimum, 512)');
    assert.ok(max >= preferred, 'maximum at least the preferred size');
  });

  test('size: a payload of 2^25 bytes SHOULD NOT be taken as a denial of service: a 32 MiB WRITE is served', async (t) => {
    const { nbd } = await attach(t);
    const data = Buffer.alloc(32 * MiB, 0x3c);
    assert.equal((await nbd.call(CMD.WRITE, { offset: 16 * MiB, data })).error, 0);
    const back = await nbd.call(CMD.READ, { offset: 16 * MiB, length: 32 * MiB });
    assert.ok(back.data?.equals(data));
  });

  test('errors: a write request beyond the size of the device SHOULD get ENOSPC (NBD_CMD_WRITE and NBD_CMD_WRITE_ZEROES)', async (t) => {
    const { nbd } = await attach(t);
    assert.equal((await nbd.call(CMD.WRITE, { offset: SIZE - 512, data: Buffer.alloc(1024) })).error, ERRNO.ENOSPC);
    assert.equal((await nbd.call(CMD.WRITE_ZEROES, { offset: SIZE, length: 512 })).error, ERRNO.ENOSPC);
  });

  test('errors: a read or trim request beyond the size of the device SHOULD get EINVAL', async (t) => {
    const { nbd } = await attach(t);
    assert.equal((await nbd.call(CMD.READ, { offset: SIZE - 512, length: 1024 })).error, EINVAL);
    assert.equal((await nbd.call(CMD.TRIM, { offset: SIZE, length: 512 })).error, EINVAL);
    assert.equal((await nbd.call(CMD.READ, { offset: 2n ** 63n, length: 1 })).error, EINVAL, 'an offset near 2^64');
  });

  test('errors: an unknown command SHOULD get EINVAL', async (t) => {
    const { nbd } = await attach(t, { structured: true });
    assert.equal(errnoOf(await nbd.call(99, { length: 0 })), EINVAL);
    assert.equal(errnoOf(await nbd.call(CMD.BLOCK_STATUS + 1, { length: 0 })), EINVAL);
  });

  test('errors: a READ larger than the maximum payload: EOVERFLOW with structured replies, so the client retries smaller; EINVAL with simple replies', async (t) => {
    const structured = (await attach(t, { structured: true })).nbd;
    const reply = await structured.call(CMD.READ, { length: BLOCK.MAX + 1 });
    assert.equal(errnoOf(reply), ERRNO.EOVERFLOW);
    assert.equal(reply.chunks.filter((c) => c.type === REPLY_TYPE.OFFSET_DATA).length, 0);
    const simple = (await attach(t)).nbd;
    assert.equal((await simple.call(CMD.READ, { length: BLOCK.MAX + 1 })).error, EINVAL);
  });

  test('errors: requests of length 0 SHOULD NOT make the server disconnect; TRIM and WRITE_ZEROES longer than the maximum payload SHOULD NOT either', async (t) => {
    const { nbd } = await attach(t);
    for (const type of [CMD.READ, CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES]) await nbd.call(type, { length: 0 });
    assert.equal((await nbd.call(CMD.TRIM, { offset: 0, length: SIZE })).error, 0);
    assert.equal((await nbd.call(CMD.WRITE_ZEROES, { offset: 0, length: SIZE })).error, 0);
    assert.equal((await nbd.call(CMD.READ, { length: 8 })).error, 0, 'still connected');
  });

  test('errors: ENOTSUP SHOULD NOT be used except for NBD_CMD_FLAG_FAST_ZERO, nor EOVERFLOW except for READ and oversized requests', async (t) => {
    const { nbd } = await attach(t, { meta: ['base:allocation'] });
    const seen = new Set<number>();
    for (const [type, flags] of [[CMD.READ, 0], [CMD.TRIM, 0], [CMD.CACHE, 0], [CMD.BLOCK_STATUS, 0], [CMD.WRITE_ZEROES, 0], [CMD.FLUSH, 0]] as const) {
      for (const [offset, length] of [[0, 0], [SIZE, 1], [0, 4096]] as const) seen.add(errnoOf(await nbd.call(type, { flags, offset: type === CMD.FLUSH ? 0 : offset, length: type === CMD.FLUSH ? 0 : length })));
    }
    assert.ok(!seen.has(ERRNO.ENOTSUP));
    assert.ok(!seen.has(ERRNO.EOVERFLOW));
  });

  // ---- Disconnect ----

  test('disconnect: NBD_CMD_DISC: the server MUST handle all outstanding requests, and there is no reply to the DISC', async (t) => {
    const { nbd } = await attach(t, { structured: true });
    const cookies = new Set<bigint>();
    for (let i = 0; i < 24; i++) cookies.add(nbd.request(CMD.READ, { offset: i * MiB, length: MiB }));
    // Writes with FUA and FLUSHes wait for fdatasync, so their replies come well after the
    // client's FIN has arrived.
    for (let i = 0; i < 8; i++) cookies.add(nbd.request(CMD.WRITE, { offset: 40 * MiB + i * 65536, data: Buffer.alloc(65536, i), flags: CMD_FLAG.FUA }));
    for (let i = 0; i < 4; i++) cookies.add(nbd.request(CMD.FLUSH));
    nbd.request(CMD.DISC, { cookie: 0xd15cn });
    nbd.socket.end(); // half-close, as libnbd does after DISC
    const got = new Set<bigint>();
    const replies = await (async () => {
      const all: Reply[] = [];
      for (let i = 0; i < cookies.size; i++) all.push(await nbd.next());
      return all;
    })();
    for (const r of replies) {
      assert.equal(r.error, 0);
      got.add(r.cookie);
    }
    assert.deepEqual(got, cookies);
    assert.equal((await nbd.untilEnd()).length, 0, 'nothing after the last reply: no reply to DISC');
  });

  test('disconnect: a client that half-closes without DISC still gets the replies to what it sent', async (t) => {
    const { nbd } = await attach(t);
    const cookies: bigint[] = [];
    for (let i = 0; i < 16; i++) cookies.push(nbd.request(CMD.READ, { offset: i * 65536, length: 65536 }));
    for (let i = 0; i < 4; i++) cookies.push(nbd.request(CMD.FLUSH));
    nbd.socket.end();
    const got: bigint[] = [];
    for (let i = 0; i < cookies.length; i++) got.push((await nbd.next()).cookie);
    assert.deepEqual(got.sort(), [...cookies].sort());
    await nbd.untilEnd();
  });
});

test('shutdown: the server SHOULD wait for requests in flight to be serviced, and answer the others and any received afterwards with NBD_ESHUTDOWN', async (t) => {
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir });
  t.after(() => n.stop('SIGKILL'));
  const { nbd } = await RawNbd.attach(n.nbd, { structured: true });
  t.after(() => nbd.destroy());
  // Far more than one connection's budget, not read for now: most of them wait.
  nbd.stopReading();
  const cookies = new Set<bigint>();
  for (let i = 0; i < 64; i++) cookies.add(nbd.request(CMD.READ, { offset: (i % 32) * MiB, length: MiB }));
  // Wait (a bound on the test) until the node has stopped reading the connection.
  for (let paused = 0, deadline = Date.now() + 5000; paused < 1 && Date.now() < deadline; ) {
    const text = await (await fetch(`${n.url}/metrics`)).text();
    paused = Number(/^memstrata_nbd_paused_connections (\S+)$/m.exec(text)?.[1] ?? 0);
    if (paused < 1) await new Promise((r) => setTimeout(r, 10));
  }
  const stopped = n.stop('SIGTERM');
  nbd.startReading();
  const errors = new Map<bigint, number>();
  for (let i = 0; i < cookies.size; i++) {
    const r = await nbd.next();
    errors.set(r.cookie, errnoOf(r));
  }
  assert.deepEqual(new Set(errors.keys()), cookies, 'every request is answered before the connection ends');
  const values = [...errors.values()];
  assert.ok(values.every((e) => e === 0 || e === ERRNO.ESHUTDOWN), `errnos ${[...new Set(values)].join(',')}`);
  assert.ok(values.includes(0), 'requests in flight were serviced');
  assert.ok(values.includes(ERRNO.ESHUTDOWN), 'requests not yet serviced got ESHUTDOWN');
  assert.equal((await nbd.untilEnd()).length, 0);
  assert.equal(await stopped, 0, 'the node stops cleanly');
});
