import { test } from 'node:test';
import assert from 'node:assert/strict';
import { encodeRecord } from '../../../../src/protocol/journal/record.js';
import * as m from '../../../../src/protocol/mirror/codec.js';
import { FrameParser, type Frame } from '../../../../src/protocol/rmem/parser.js';

const record = (seq: number, payload = `r${seq}`) => encodeRecord({ seq, timestamp: 1000 + seq, epoch: 2, flags: 0, target: seq % 2 === 0 ? { volume: 'v', offset: seq * 4096 } : undefined, payload: Buffer.from(payload) });

test('mirror bodies round-trip', () => {
  assert.deepEqual(m.decodeHello(m.encodeHello({ version: 1, nodeId: 'ms-a', token: 'sécret' })), { version: 1, nodeId: 'ms-a', token: 'sécret' });
  const state = { role: 'replica', policy: 'mirrored+local', recovering: true, size: 1 << 20, epoch: 7, trimmedTo: 5, lastSeq: 2 ** 40 } as const;
  assert.deepEqual(m.decodeState(m.encodeState(state)), state);
  assert.equal(m.decodeState(m.encodeState(undefined)), undefined);
  const reset = { name: 'j', policy: 'mirrored', medium: 'flash', size: 4096, epoch: 1, trimmedTo: 9, firstSeq: 10 } as const;
  assert.deepEqual(m.decodeReset(m.encodeReset(reset)), reset);
  const bytes = Buffer.concat([record(1), record(2), record(3)]);
  const append = m.decodeAppend(m.encodeAppend('j', 4, bytes));
  assert.deepEqual([append.name, append.epoch, append.records.map((r) => r.seq)], ['j', 4, [1, 2, 3]]);
  assert.deepEqual(append.records[1]?.target, { volume: 'v', offset: 8192 });
  assert.equal(Buffer.concat(append.encoded).compare(bytes), 0);
  assert.deepEqual(m.decodeTrim(m.encodeTrim('j', 3, 99)), { name: 'j', epoch: 3, upTo: 99 });
  assert.deepEqual(m.decodeEpoch(m.encodeEpoch('j', 3)), { name: 'j', epoch: 3 });
  assert.deepEqual(m.decodeFetch(m.encodeFetch('j', 5, 1024)), { name: 'j', fromSeq: 5, maxBytes: 1024 });
  assert.equal(m.decodeName(m.encodeName('j'), 'DROP'), 'j');
  assert.equal(m.errorMessage(m.errorReply(m.MOP.APPEND, m.MSTATUS.GAP, 1, 'gap here').subarray(m.MIRROR_HEADER)), 'gap here');
});

test('malformed mirror bodies fail with MS_MIRROR_PROTOCOL, never with a crash', () => {
  const bytes = Buffer.concat([record(1), record(2)]);
  const good = m.encodeAppend('j', 1, bytes);
  const flipped = Buffer.from(good);
  flipped[flipped.length - 1] = (flipped[flipped.length - 1] ?? 0) ^ 0xff;
  const cases: [string, () => unknown][] = [
    ['flipped payload byte', () => m.decodeAppend(flipped)],
    ['cut record', () => m.decodeAppend(good.subarray(0, good.length - 3))],
    ['no records', () => m.decodeAppend(m.encodeAppend('j', 1, Buffer.alloc(0)))],
    ['short hello', () => m.decodeHello(Buffer.from([0, 1, 5, 0x61]))],
    ['trailing bytes', () => m.decodeTrim(Buffer.concat([m.encodeTrim('j', 1, 1), Buffer.from([0])]))],
    ['unknown policy', () => m.decodeReset(Buffer.from(m.encodeReset({ name: 'j', policy: 'mirrored', medium: 'dram', size: 1, epoch: 1, trimmedTo: 0, firstSeq: 1 })).fill(9, 2, 3))],
    ['first seq 0', () => m.decodeReset(m.encodeReset({ name: 'j', policy: 'mirrored', medium: 'dram', size: 1, epoch: 1, trimmedTo: 0, firstSeq: 0 }))],
    ['huge u64', () => m.decodeEpoch(Buffer.concat([m.encodeName('j'), Buffer.alloc(8, 0xff)]))],
  ];
  for (const [what, fn] of cases) assert.throws(fn, { code: 'MS_MIRROR_PROTOCOL' }, what);
  // Random bodies: every decoder either decodes or throws the coded error.
  for (let i = 0; i < 2000; i++) {
    const body = Buffer.from(Array.from({ length: i % 80 }, () => Math.floor(Math.random() * 256)));
    for (const decode of [m.decodeAppend, m.decodeHello, m.decodeReset, m.decodeTrim, m.decodeEpoch, m.decodeFetch, m.decodeState]) {
      try {
        decode(body);
      } catch (error) {
        assert.equal((error as { code?: string }).code, 'MS_MIRROR_PROTOCOL');
      }
    }
  }
});

test('mirror frames parse with the shared frame parser, split anywhere', () => {
  const frames = [m.request(m.MOP.HELLO, 1, m.encodeHello({ version: 1, nodeId: 'a', token: '' })), m.request(m.MOP.APPEND, 2, m.encodeAppend('j', 1, record(1))), m.request(m.MOP.STATE, 3, m.encodeName('j'))];
  const stream = Buffer.concat(frames);
  for (let cut = 1; cut < stream.length; cut += 7) {
    const seen: Frame[] = [];
    const parser = new FrameParser({ magic: m.MIRROR_REQUEST_MAGIC }, { onFrame: (f) => seen.push({ ...f, body: Buffer.from(f.body) }), onFatal: (e) => assert.fail(e.message) });
    parser.feed(stream.subarray(0, cut));
    parser.feed(stream.subarray(cut));
    assert.deepEqual(seen.map((f) => [f.op, f.tagLo]), [[m.MOP.HELLO, 1], [m.MOP.APPEND, 2], [m.MOP.STATE, 3]]);
  }
  let fatal = false;
  new FrameParser({ magic: m.MIRROR_REQUEST_MAGIC }, { onFrame: () => assert.fail('no frame'), onFatal: () => (fatal = true) }).feed(m.reply(m.MOP.HELLO, 0, 1));
  assert.ok(fatal, 'a response magic on the request side loses the framing');
});

test('RESET carries a node-owned flag in a trailing byte, sent only when set (what older nodes read); unknown flags or more bytes are malformed', () => {
  const base = { name: 'wl', policy: 'mirrored+local' as const, medium: 'dram' as const, size: 1 << 20, epoch: 3, trimmedTo: 0, firstSeq: 1 };
  const owned = m.encodeReset({ ...base, nodeOwned: true });
  const plain = m.encodeReset(base);
  assert.equal(owned.length, plain.length + 1, 'no flags byte without a flag');
  assert.equal(m.decodeReset(owned).nodeOwned, true);
  assert.deepEqual(m.decodeReset(plain), base);
  assert.throws(() => m.decodeReset(Buffer.concat([plain, Buffer.from([0x02])])), { code: 'MS_MIRROR_PROTOCOL', message: /unknown flags/ });
  assert.throws(() => m.decodeReset(Buffer.concat([owned, Buffer.alloc(1)])), { code: 'MS_MIRROR_PROTOCOL' });
});
