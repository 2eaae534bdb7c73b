import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import * as codec from '../../../../src/protocol/rmem/codec.js';
import { FrameParser, type Frame } from '../../../../src/protocol/rmem/parser.js';
import { OP } from '../../../../src/protocol/rmem/spec.js';

function collect(direction: 'request' | 'response' = 'request', maxBody?: number) {
  const frames: Frame[] = [];
  const fatal: string[] = [];
  const parser = new FrameParser(
    direction,
    {
      onFrame: (f) => frames.push({ ...f, body: Buffer.from(f.body) }),
      onFatal: (e) => fatal.push(`${e.code}: ${e.message}`),
    },
    maxBody,
  );
  return { parser, frames, fatal };
}

const sample = (): Buffer[] => [
  codec.encodeHelloRequest({ hi: 0, lo: 1 }, { version: 1, serverId: 'srv-a', token: 't' }),
  codec.encodeReadRequest({ hi: 0, lo: 2 }, { regionId: 7, key: 99n, offset: 4096, length: 512 }),
  Buffer.concat([codec.encodeWriteHead({ hi: 0, lo: 3 }, { regionId: 7, key: 99n, offset: 0 }, 10), Buffer.from('0123456789')]),
  codec.encodeEmptyRequest(OP.KEEPALIVE, { hi: 1, lo: 4 }),
  codec.encodeWritevHead({ hi: 0, lo: 5 }, [{ regionId: 1, key: 2n, offset: 3, length: 0 }]),
];

test('several frames in one chunk come out in order', () => {
  const { parser, frames, fatal } = collect();
  parser.feed(Buffer.concat(sample()));
  assert.deepEqual(fatal, []);
  assert.deepEqual(frames.map((f) => [f.op, f.tagHi, f.tagLo]), [[OP.HELLO, 0, 1], [OP.READ, 0, 2], [OP.WRITE, 0, 3], [OP.KEEPALIVE, 1, 4], [OP.WRITEV, 0, 5]]);
  assert.equal(codec.decodeWriteRequest(frames[2]!.body).data.toString(), '0123456789');
});

test('a stream split at every byte boundary parses the same', () => {
  const stream = Buffer.concat(sample());
  const whole = collect();
  whole.parser.feed(stream);
  for (let cut = 0; cut <= stream.length; cut++) {
    const split = collect();
    split.parser.feed(stream.subarray(0, cut));
    split.parser.feed(stream.subarray(cut));
    assert.deepEqual(split.frames, whole.frames, `cut at ${cut}`);
  }
});

test('a stream fed one byte at a time, or in random pieces, parses the same', () => {
  const stream = Buffer.concat(sample());
  const whole = collect();
  whole.parser.feed(stream);
  const bytewise = collect();
  for (const byte of stream) bytewise.parser.feed(Buffer.from([byte]));
  assert.deepEqual(bytewise.frames, whole.frames);
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 1, max: stream.length }), { maxLength: 10 }), (cuts) => {
      const pieces = collect();
      const points = [...new Set(cuts)].sort((a, b) => a - b);
      let at = 0;
      for (const p of [...points, stream.length]) {
        pieces.parser.feed(stream.subarray(at, p));
        at = p;
      }
      assert.deepEqual(pieces.frames, whole.frames);
    }),
  );
});

test('a bad magic or an oversized body is fatal once, and later input is ignored', () => {
  const bad = collect();
  const frame = codec.encodeEmptyRequest(OP.KEEPALIVE, { hi: 0, lo: 1 });
  bad.parser.feed(Buffer.concat([frame, Buffer.from('GET / HTTP/1.1\r\n\r\n'), frame]));
  assert.equal(bad.frames.length, 1);
  assert.equal(bad.fatal.length, 1);
  assert.match(bad.fatal[0]!, /^MS_RMEM_PROTOCOL: bad frame magic 0x47455420/);
  assert.ok(bad.parser.broken);

  const big = collect('request', 100);
  const head = codec.encodeWriteHead({ hi: 0, lo: 1 }, { regionId: 1, key: 1n, offset: 0 }, 200);
  big.parser.feed(head);
  assert.match(big.fatal[0]!, /exceeds the limit of 100/);

  const swapped = collect('request');
  swapped.parser.feed(codec.encodeEmptyReply(OP.KEEPALIVE, { hi: 0, lo: 1 }));
  assert.equal(swapped.fatal.length, 1, 'a response is not a request');
});

test('fuzz: random bytes never throw out of the parser', () => {
  fc.assert(
    fc.property(fc.array(fc.uint8Array({ maxLength: 64 }), { maxLength: 20 }), (chunks) => {
      const { parser } = collect('request', 1024);
      for (const chunk of chunks) parser.feed(Buffer.from(chunk));
    }),
    { numRuns: 500 },
  );
});

test('a body that spans chunks is assembled into the buffer bodyTarget offers, and detach hands it back', () => {
  const target = Buffer.alloc(10);
  const frames: Frame[] = [];
  const parser = new FrameParser('response', {
    onFrame: (f) => frames.push(f),
    onFatal: (e) => {
      throw e;
    },
    bodyTarget: (_op, _word, _hi, lo, length) => (lo === 1 && length === 10 ? target : undefined),
  });
  const reply = Buffer.alloc(30);
  codec.writeResponseHeader(reply, OP.READ, 0, { hi: 0, lo: 1 }, 10);
  reply.write('0123456789', 20);
  parser.feed(reply.subarray(0, 25));
  parser.feed(reply.subarray(25));
  assert.equal(frames[0]!.body, target, 'the body is the offered buffer itself');
  assert.equal(target.toString(), '0123456789');

  const other = Buffer.alloc(30);
  codec.writeResponseHeader(other, OP.READ, 0, { hi: 0, lo: 1 }, 10);
  other.write('abcdefghij', 20);
  target.fill(0);
  parser.feed(other.subarray(0, 23));
  parser.detach(target); // the reader gave up: its buffer must not be written any more
  parser.feed(other.subarray(23));
  assert.equal(frames[1]!.body.toString(), 'abcdefghij');
  assert.notEqual(frames[1]!.body, target);
  assert.equal(target.subarray(3).every((b) => b === 0), true, 'nothing written after detach');
});

test('admission: a body that spans chunks is not allocated until admitted, and input held meanwhile parses the same', () => {
  const stream = Buffer.concat([...sample(), Buffer.concat([codec.encodeWriteHead({ hi: 0, lo: 6 }, { regionId: 1, key: 1n, offset: 0 }, 5000), Buffer.alloc(5000, 7)]), ...sample()]);
  const whole = collect();
  whole.parser.feed(stream);
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 1, max: stream.length }), { maxLength: 12 }), fc.array(fc.boolean(), { minLength: 1, maxLength: 30 }), (cuts, answers) => {
      const frames: Frame[] = [];
      const asked: number[] = [];
      let turn = 0;
      const parser = new FrameParser('request', {
        onFrame: (f) => frames.push({ ...f, body: Buffer.from(f.body) }),
        onFatal: (e) => {
          throw e;
        },
        admitBody: (_op, length) => {
          asked.push(length);
          return answers[turn++ % answers.length] ?? true;
        },
      });
      const points = [...new Set(cuts)].sort((a, b) => a - b);
      let at = 0;
      for (const p of [...points, stream.length]) {
        parser.feed(stream.subarray(at, p));
        at = p;
        // Admission comes later, between chunks, as a budget frees up.
        if (parser.holding && turn % 2 === 0) parser.resume();
      }
      while (parser.holding) parser.resume();
      assert.deepEqual(frames, whole.frames);
      assert.ok(asked.every((n) => n > 0));
    }),
    { numRuns: 300 },
  );
});

test('admission: a held parser allocates nothing and parses nothing more until resume()', () => {
  const frames: Frame[] = [];
  let admit = false;
  const parser = new FrameParser('request', {
    onFrame: (f) => frames.push(f),
    onFatal: (e) => {
      throw e;
    },
    admitBody: () => admit,
  });
  const write = Buffer.concat([codec.encodeWriteHead({ hi: 0, lo: 1 }, { regionId: 1, key: 1n, offset: 0 }, 100), Buffer.alloc(100, 1)]);
  const keepalive = codec.encodeEmptyRequest(OP.KEEPALIVE, { hi: 0, lo: 2 });
  parser.feed(write.subarray(0, 30));
  assert.ok(parser.holding);
  parser.feed(write.subarray(30));
  parser.feed(keepalive);
  assert.equal(frames.length, 0, 'nothing after the held body is parsed');
  admit = true;
  parser.resume();
  assert.deepEqual(frames.map((f) => f.tagLo), [1, 2]);
  assert.equal(parser.holding, false);
});

test('maxBody can be raised between frames (after a handshake)', () => {
  const { parser, frames, fatal } = collect('request', 64);
  const hello = codec.encodeHelloRequest({ hi: 0, lo: 1 }, { version: 1, serverId: 'srv-a', token: 't' });
  const write = Buffer.concat([codec.encodeWriteHead({ hi: 0, lo: 2 }, { regionId: 1, key: 1n, offset: 0 }, 100), Buffer.alloc(100)]);
  parser.feed(hello);
  parser.maxBody = 1024;
  parser.feed(write);
  assert.deepEqual(fatal, []);
  assert.equal(frames.length, 2);
  parser.maxBody = 64;
  parser.feed(write);
  assert.equal(fatal.length, 1);
});

test('accepting: the parser stops after a frame the owner cannot take, keeps the rest as bytes, and parses it on resume', () => {
  const stream = Buffer.concat(sample());
  const whole = collect();
  whole.parser.feed(stream);
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 1, max: stream.length }), { maxLength: 8 }), fc.array(fc.boolean(), { minLength: 1, maxLength: 20 }), (cuts, answers) => {
      const frames: Frame[] = [];
      let turn = 0;
      let stops = 0;
      let resumes = 0;
      const parser = new FrameParser('request', {
        onFrame: (f) => {
          assert.equal(parser.waiting, false, 'no frame comes out while stopped');
          frames.push({ ...f, body: Buffer.from(f.body) });
        },
        onFatal: (e) => {
          throw e;
        },
        accepting: () => {
          const yes = answers[turn++ % answers.length] ?? true;
          if (!yes) stops++;
          return yes;
        },
      });
      const points = [...new Set(cuts)].sort((a, b) => a - b);
      let at = 0;
      for (const p of [...points, stream.length]) {
        parser.feed(stream.subarray(at, p));
        at = p;
        if (parser.waiting && turn % 3 === 0) {
          resumes++;
          parser.resume();
        }
      }
      while (parser.waiting) {
        resumes++;
        parser.resume();
      }
      assert.deepEqual(frames, whole.frames);
      // Stopped exactly once per refusal, and resumed each time.
      assert.equal(resumes, stops);
    }),
    { numRuns: 300 },
  );
});

test('transient chunks (a read buffer reused after each feed, or the rest of a body read into): no body aliases the buffer, bodies kept as given or in the buffers offered, holds and stops anywhere, still equal the stream', () => {
  // A socket read into one buffer of the connection's own (net/socket-input.ts) overwrites
  // it once feed() returns: no body or byte kept may alias it.
  const stream = Buffer.concat([...sample(), Buffer.concat([codec.encodeWriteHead({ hi: 0, lo: 6 }, { regionId: 1, key: 1n, offset: 0 }, 300), Buffer.alloc(300, 7)]), ...sample(), Buffer.concat([codec.encodeWriteHead({ hi: 0, lo: 7 }, { regionId: 1, key: 1n, offset: 0 }, 2000), Buffer.alloc(2000, 9)]), ...sample()]);
  const whole = collect();
  whole.parser.feed(stream);
  fc.assert(
    fc.property(
      fc.oneof(fc.array(fc.integer({ min: 1, max: 128 }), { minLength: 1, maxLength: 30 }), fc.array(fc.integer({ min: 1, max: 4096 }), { minLength: 1, maxLength: 5 })),
      fc.array(fc.boolean(), { minLength: 1, maxLength: 20 }),
      fc.array(fc.boolean(), { minLength: 1, maxLength: 20 }),
      fc.boolean(),
      fc.boolean(),
      (sizes, admits, accepts, offerTargets, readIntoBodies) => {
        const frames: Frame[] = [];
        let a = 0;
        let b = 0;
        const readBuffer = Buffer.alloc(4096);
        const offered = new Set<Buffer>();
        const neverHeld = admits.every((x) => x) && accepts.every((x) => x);
        const parser = new FrameParser('request', {
          onFrame: (f) => {
            assert.notEqual(f.body.buffer, readBuffer.buffer, 'no body aliases the read buffer');
            // Without holds or stops (which copy what waits), an offered buffer takes every
            // body, whole in a read or not: no other copy.
            if (offerTargets && neverHeld && f.body.length > 0) assert.equal(offered.has(f.body), true, 'the body is in the buffer bodyTarget offered');
            frames.push(f); // kept as given
          },
          onFatal: (e) => {
            throw e;
          },
          admitBody: () => admits[a++ % admits.length] ?? true,
          accepting: () => accepts[b++ % accepts.length] ?? true,
          bodyTarget: (_op, _word, _hi, _lo, length) => {
            if (!offerTargets) return undefined;
            const target = Buffer.alloc(length);
            offered.add(target);
            return target;
          },
        });
        let at = 0;
        let i = 0;
        while (at < stream.length) {
          // A socket reads into the rest of a body being assembled when the parser offers it (as an own-buffer input does).
          const rest = readIntoBodies ? parser.bodyRest() : undefined;
          assert.ok(rest === undefined || rest.length > 0, 'the rest of a body offered holds at least a byte');
          const into = rest ?? readBuffer;
          const n = Math.min(sizes[i++ % sizes.length] ?? 1, stream.length - at, into.length);
          stream.copy(into, 0, at, at + n);
          parser.feed(into.subarray(0, n), true);
          readBuffer.fill(0xee); // the next read lands here
          at += n;
          if ((parser.holding || parser.waiting) && i % 2 === 0) parser.resume();
        }
        while (parser.holding || parser.waiting) parser.resume();
        assert.deepEqual(frames.map((f) => ({ ...f, body: Buffer.from(f.body) })), whole.frames);
      },
    ),
    { numRuns: 400 },
  );
});
