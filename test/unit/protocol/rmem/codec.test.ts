import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import * as codec from '../../../../src/protocol/rmem/codec.js';
import { FrameParser, type Frame } from '../../../../src/protocol/rmem/parser.js';
import { HEADER_SIZE, MAX_DATA, MAX_RANGES, OP, SESSION_SECRET_SIZE, STATUS, VERSION } from '../../../../src/protocol/rmem/spec.js';

const tag = { hi: 0x01020304, lo: 0xfffffffe };

/** Parses whole encoded frames back into their (header, body) form. */
function parse(direction: 'request' | 'response', ...buffers: Buffer[]): Frame[] {
  const frames: Frame[] = [];
  const parser = new FrameParser(direction, {
    onFrame: (f) => frames.push({ ...f, body: Buffer.from(f.body) }),
    onFatal: (e) => {
      throw e;
    },
  });
  parser.feed(Buffer.concat(buffers));
  return frames;
}

function one(direction: 'request' | 'response', ...buffers: Buffer[]): Frame {
  const frames = parse(direction, ...buffers);
  assert.equal(frames.length, 1);
  const frame = frames[0]!;
  assert.deepEqual([frame.tagHi, frame.tagLo], [tag.hi, tag.lo], 'tag survives');
  return frame;
}

const u64 = fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER });
const key = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
const medium = fc.constantFrom('dram' as const, 'flash' as const);
const access = fc.record({ regionId: u64, key, offset: u64, length: fc.nat({ max: 0xffffffff }) });

test('HELLO round-trips both ways, with and without a session secret', () => {
  const secret = fc.option(fc.uint8Array({ minLength: SESSION_SECRET_SIZE, maxLength: SESSION_SECRET_SIZE }), { nil: undefined });
  fc.assert(
    fc.property(fc.string({ minLength: 1, maxLength: 20 }), fc.string({ maxLength: 40 }), secret, (serverId, token, bytes) => {
      const hello = { version: VERSION, serverId, token, ...(bytes === undefined ? {} : { secret: Buffer.from(bytes) }) };
      const frame = one('request', codec.encodeHelloRequest(tag, hello));
      assert.equal(frame.op, OP.HELLO);
      assert.deepEqual(codec.decodeHelloRequest(frame.body), hello);
    }),
  );
  const reply = { version: VERSION, resumed: true, leaseMs: 30000, maxBody: 1 << 24, sessionId: 2n ** 63n + 5n, nodeId: 'ms-12345678', secret: Buffer.alloc(SESSION_SECRET_SIZE, 7) };
  assert.deepEqual(codec.decodeHelloReply(one('response', codec.encodeHelloReply(tag, reply)).body), reply);
});

test('a HELLO of another version is refused as VERSION whatever its body, and secrets are 0 or 32 bytes', () => {
  for (const version of [0, 1, 3, 0xffff]) {
    const frame = one('request', codec.encodeHelloRequest(tag, { version, serverId: 'x', token: '' }));
    assert.throws(() => codec.decodeHelloRequest(frame.body), { code: 'MS_RMEM_VERSION' });
    // A version 1 HELLO has no secret field at all.
    assert.throws(() => codec.decodeHelloRequest(frame.body.subarray(0, frame.body.length - 1)), { code: 'MS_RMEM_VERSION' });
  }
  const short = one('request', codec.encodeHelloRequest(tag, { version: VERSION, serverId: 'x', token: '', secret: Buffer.alloc(31) }));
  assert.throws(() => codec.decodeHelloRequest(short.body), { code: 'MS_RMEM_PROTOCOL' });
  const reply = codec.encodeHelloReply(tag, { version: VERSION, resumed: false, leaseMs: 1, maxBody: 1, sessionId: 1n, nodeId: 'n', secret: Buffer.alloc(0) });
  assert.throws(() => codec.decodeHelloReply(one('response', reply).body), { code: 'MS_RMEM_PROTOCOL' }, 'a reply always carries a secret');
});

test('CAPACITY round-trips', () => {
  fc.assert(
    fc.property(fc.array(fc.record({ medium, total: u64, partition: u64, available: u64, growable: u64, used: u64 }), { maxLength: 4 }), (entries) => {
      const request = one('request', codec.encodeEmptyRequest(OP.CAPACITY, tag));
      codec.decodeEmpty(request.body, 'CAPACITY');
      const frame = one('response', codec.encodeCapacityReply(tag, entries));
      assert.equal(frame.word, STATUS.OK);
      assert.deepEqual(codec.decodeCapacityReply(frame.body), structuredClone(entries));
    }),
  );
});

test('BIND round-trips for every placement', () => {
  const placement = fc.oneof(
    fc.record({ kind: fc.constant('medium' as const), medium }),
    fc.record({ kind: fc.constant('class' as const), class: fc.constantFrom('highest' as const, 'capacity' as const) }),
    fc.record({ kind: fc.constant('address' as const), medium, address: u64 }),
  );
  fc.assert(
    fc.property(u64, placement, (size, p) => {
      assert.deepEqual(codec.decodeBindRequest(one('request', codec.encodeBindRequest(tag, { size, placement: p })).body), structuredClone({ size, placement: p }));
    }),
  );
  fc.assert(
    fc.property(u64, key, u64, fc.array(fc.record({ medium, start: u64, length: u64 }), { maxLength: 5 }), (regionId, k, size, ranges) => {
      const reply = { regionId, key: k, size, ranges };
      assert.deepEqual(codec.decodeBindReply(one('response', codec.encodeBindReply(tag, reply)).body), structuredClone(reply));
    }),
  );
});

test('READ, WRITE, READV, WRITEV and FREE round-trip', () => {
  fc.assert(
    fc.property(access, fc.uint8Array({ maxLength: 64 }), (a, data) => {
      assert.deepEqual(codec.decodeReadRequest(one('request', codec.encodeReadRequest(tag, a)).body), structuredClone(a));
      const write = one('request', codec.encodeWriteHead(tag, a, data.length), Buffer.from(data));
      const decoded = codec.decodeWriteRequest(write.body);
      assert.deepEqual({ ...decoded, data: [...decoded.data] }, { regionId: a.regionId, key: a.key, offset: a.offset, data: [...data] });
      assert.deepEqual(codec.decodeFreeRequest(one('request', codec.encodeFreeRequest(tag, a)).body), { regionId: a.regionId, key: a.key });
    }),
  );
  fc.assert(
    fc.property(fc.array(fc.record({ regionId: u64, key, offset: u64, length: fc.nat({ max: 16 }) }), { minLength: 1, maxLength: 8 }), (entries) => {
      assert.deepEqual(codec.decodeReadvRequest(one('request', codec.encodeReadvRequest(tag, entries)).body), structuredClone(entries));
      const data = Buffer.alloc(entries.reduce((s, e) => s + e.length, 0), 0x5a);
      const writev = codec.decodeWritevRequest(one('request', codec.encodeWritevHead(tag, entries), data).body);
      assert.deepEqual(writev.entries, structuredClone(entries));
      assert.ok(writev.data.equals(data));
    }),
  );
});

test('replies: empty, data and error frames carry op, status and tag', () => {
  const empty = one('response', codec.encodeEmptyReply(OP.WRITE, tag));
  assert.deepEqual([empty.op, empty.word, empty.body.length], [OP.WRITE, STATUS.OK, 0]);
  const data = Buffer.alloc(HEADER_SIZE + 5);
  codec.writeResponseHeader(data, OP.READ, STATUS.OK, tag, 5);
  data.write('hello', HEADER_SIZE);
  assert.equal(one('response', data).body.toString(), 'hello');
  const error = one('response', codec.encodeErrorReply(OP.FREE, STATUS.VIOLATION, tag, 'not yours'));
  assert.deepEqual([error.op, error.word, error.body.toString()], [OP.FREE, STATUS.VIOLATION, 'not yours']);
  const long = one('response', codec.encodeErrorReply(OP.FREE, STATUS.IO, tag, 'x'.repeat(5000)));
  assert.equal(long.body.length, 1024, 'error messages are capped');
});

test('decoders refuse malformed bodies with coded errors', () => {
  const bad: [() => unknown, string][] = [
    [() => codec.decodeHelloRequest(Buffer.alloc(1)), 'MS_RMEM_PROTOCOL'],
    [() => codec.decodeHelloRequest(Buffer.from([0, 2, 0])), 'MS_RMEM_PROTOCOL'],
    [() => codec.decodeHelloRequest(Buffer.from([0, 2, 0, 0, 0, 0, 0, 0])), 'MS_RMEM_PROTOCOL'], // empty server id
    [() => codec.decodeHelloRequest(Buffer.from([0, 2, 0, 0, 65, ...Buffer.alloc(68)])), 'MS_RMEM_PROTOCOL'], // id too long
    [() => codec.decodeHelloRequest(Buffer.from([0, 2, 0, 0, 1, 97, 0, 5, 1])), 'MS_RMEM_PROTOCOL'], // token shorter than said
    [() => codec.decodeHelloRequest(Buffer.from([0, 2, 0, 0, 1, 97, 0, 0])), 'MS_RMEM_PROTOCOL'], // no secret length
    [() => codec.decodeHelloRequest(Buffer.from([0, 2, 0, 0, 1, 97, 0, 0, 0, 9])), 'MS_RMEM_PROTOCOL'], // trailing byte
    [() => codec.decodeBindRequest(Buffer.alloc(17)), 'MS_RMEM_PROTOCOL'],
    [() => codec.decodeBindRequest(Buffer.from([...Buffer.alloc(8), 0, 7, ...Buffer.alloc(8)])), 'MS_RMEM_INVALID'], // medium 7
    [() => codec.decodeBindRequest(Buffer.from([...Buffer.alloc(8), 1, 9, ...Buffer.alloc(8)])), 'MS_RMEM_INVALID'], // class 9
    [() => codec.decodeBindRequest(Buffer.from([...Buffer.alloc(8), 3, 0, ...Buffer.alloc(8)])), 'MS_RMEM_INVALID'], // placement 3
    [() => codec.decodeReadRequest(Buffer.alloc(27)), 'MS_RMEM_PROTOCOL'],
    [() => codec.decodeWriteRequest(Buffer.alloc(23)), 'MS_RMEM_PROTOCOL'],
    [() => codec.decodeReadvRequest(Buffer.from([0, 0])), 'MS_RMEM_PROTOCOL'], // zero entries
    [() => codec.decodeReadvRequest(Buffer.from([0x04, 0x01])), 'MS_RMEM_PROTOCOL'], // 1025 entries
    [() => codec.decodeReadvRequest(Buffer.from([0, 1, ...Buffer.alloc(27)])), 'MS_RMEM_PROTOCOL'],
    [() => codec.decodeWritevRequest(Buffer.from([0, 1, ...Buffer.alloc(24), 0, 0, 0, 4, 1, 2])), 'MS_RMEM_PROTOCOL'], // data shorter than said
    [() => codec.decodeFreeRequest(Buffer.alloc(17)), 'MS_RMEM_PROTOCOL'],
    [() => codec.decodeEmpty(Buffer.alloc(1), 'KEEPALIVE'), 'MS_RMEM_PROTOCOL'],
    [() => codec.decodeCapacityReply(Buffer.from([1, 0])), 'MS_RMEM_PROTOCOL'],
    [() => codec.decodeBindReply(Buffer.alloc(25)), 'MS_RMEM_PROTOCOL'],
  ];
  for (const [fn, code] of bad) assert.throws(fn, { code }, fn.toString());
});

test('64-bit fields at or above 2^53 never decode as a small number: they are refused as invalid', () => {
  const body = Buffer.alloc(28, 0xff);
  assert.throws(() => codec.decodeReadRequest(body), { code: 'MS_RMEM_INVALID' });
  assert.equal(codec.replySize(OP.READ, body), codec.ERROR_REPLY_SIZE, 'priced as the error reply it gets');
});

test('replySize bounds the reply a request can get, and never exceeds what its op alone allows', () => {
  const body = (frame: Buffer) => frame.subarray(20);
  const read = body(codec.encodeReadRequest({ hi: 0, lo: 1 }, { regionId: 1, key: 2n, offset: 0, length: 5000 }));
  assert.equal(codec.replySize(OP.READ, read), 20 + 5000);
  const readv = body(codec.encodeReadvRequest({ hi: 0, lo: 1 }, [{ regionId: 1, key: 2n, offset: 0, length: 70_000 }, { regionId: 1, key: 2n, offset: 0, length: 30_000 }]));
  assert.equal(codec.replySize(OP.READV, readv), 20 + 100_000);
  const tooBig = body(codec.encodeReadRequest({ hi: 0, lo: 1 }, { regionId: 1, key: 2n, offset: 0, length: MAX_DATA + 1 }));
  assert.equal(codec.replySize(OP.READ, tooBig), codec.ERROR_REPLY_SIZE, 'refused with TOO_BIG: an error reply');
  assert.equal(codec.replySize(OP.READ, Buffer.alloc(3)), codec.ERROR_REPLY_SIZE, 'malformed: an error reply');
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 20 }), fc.uint8Array({ maxLength: 64 }), (op, bytes) => {
      const size = codec.replySize(op, Buffer.from(bytes));
      assert.ok(size >= codec.ERROR_REPLY_SIZE);
      assert.ok(size <= codec.maxReplySize(op));
    }),
  );
  // A BIND reply of the most ranges a region may have fits its op's bound.
  const ranges = Array.from({ length: MAX_RANGES }, (_, i) => ({ medium: 'dram' as const, start: i * 4096, length: 4096 }));
  assert.ok(codec.encodeBindReply({ hi: 0, lo: 1 }, { regionId: 1, key: 1n, size: 4096, ranges }).length <= codec.maxReplySize(OP.BIND));
});

test('a 64-bit field beyond 2^53 - 1 (a JAPPEND target offset of 2^64 - 1) is an invalid argument, answered INVALID, never IO', async () => {
  // Issue 11 item 13: the offset was read as a lossy number and failed later, as IO.
  const { statusOf } = await import('../../../../src/protocol/rmem/errors.js');
  const name = Buffer.from('vol');
  const body = Buffer.alloc(6 + 5 + name.length + 8 + 4);
  body.writeUInt32BE(1, 0);
  body.writeUInt16BE(1, 4);
  body.writeUInt32BE(4, 6);
  body.writeUInt8(name.length, 10);
  name.copy(body, 11);
  body.writeBigUInt64BE(2n ** 64n - 1n, 11 + name.length);
  assert.throws(() => codec.decodeJappendRequest(body), (error: unknown) => {
    assert.equal((error as { code?: string }).code, 'MS_RMEM_INVALID');
    assert.equal(statusOf(error), STATUS.INVALID);
    return true;
  });
  body.writeBigUInt64BE(2n ** 53n - 1n, 11 + name.length);
  assert.equal(codec.decodeJappendRequest(body).entries[0]?.target?.offset, Number.MAX_SAFE_INTEGER);
});
