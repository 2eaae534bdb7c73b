import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { NbdServerParser, type NbdRequest } from '../../../../src/protocol/nbd/parser.js';
import { decodeInfoRequest, decodeMetaContextRequest } from '../../../../src/protocol/nbd/codec.js';
import { CMD, IHAVEOPT, MAX_OPTION_LENGTH, OPT, REQUEST_MAGIC } from '../../../../src/protocol/nbd/spec.js';

function option(opt: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const head = Buffer.alloc(16);
  head.writeBigUInt64BE(IHAVEOPT, 0);
  head.writeUInt32BE(opt, 8);
  head.writeUInt32BE(data.length, 12);
  return Buffer.concat([head, data]);
}

function request(type: number, offset: number, length: number, cookie: number, data = Buffer.alloc(0), flags = 0): Buffer {
  const head = Buffer.alloc(28);
  head.writeUInt32BE(REQUEST_MAGIC, 0);
  head.writeUInt16BE(flags, 4);
  head.writeUInt16BE(type, 6);
  head.writeUInt32BE(0, 8);
  head.writeUInt32BE(cookie, 12);
  head.writeBigUInt64BE(BigInt(offset), 16);
  head.writeUInt32BE(length, 24);
  return Buffer.concat([head, data]);
}

function goPayload(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name);
  const buf = Buffer.alloc(4 + n.length + 2 + infos.length * 2);
  buf.writeUInt32BE(n.length, 0);
  n.copy(buf, 4);
  buf.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((info, i) => buf.writeUInt16BE(info, 6 + n.length + i * 2));
  return buf;
}

/**
 * A session stand-in: answers every option by resuming, GO by starting transmission;
 * records a request when it is whole (a WRITE once its payload is in).
 */
function session() {
  const events: string[] = [];
  const requests: NbdRequest[] = [];
  const record = (r: NbdRequest): void => {
    requests.push({ ...r, data: Buffer.from(r.data) });
    events.push(`request ${r.type} ${r.offset} ${r.length}`);
  };
  const parser: NbdServerParser = new NbdServerParser({
    onClientFlags: (flags) => events.push(`flags ${flags}`),
    onOption: (opt, data) => {
      events.push(`option ${opt} ${data.length}`);
      if (opt === OPT.GO) parser.startTransmission();
      else parser.resume();
    },
    onOversizedOption: (opt, length) => {
      events.push(`oversized ${opt} ${length}`);
      parser.resume();
    },
    onRequest: (r) => {
      if (r.type !== CMD.WRITE) record(r);
    },
    onPayload: record,
    onFatal: (e) => events.push(`fatal ${e.message}`),
  });
  return { parser, events, requests };
}

const flags = Buffer.from([0, 0, 0, 3]);
const stream = Buffer.concat([
  flags,
  option(OPT.STRUCTURED_REPLY),
  option(OPT.LIST),
  option(OPT.GO, goPayload('vol', [3])),
  request(CMD.WRITE, 4096, 10, 1, Buffer.from('0123456789')),
  request(CMD.READ, 0, 512, 2),
  request(CMD.FLUSH, 0, 0, 3),
  request(CMD.WRITE, 2 ** 40, 3, 4, Buffer.from('abc'), 1),
]);

test('a whole conversation in one chunk parses in order, options waiting for their answers', () => {
  const s = session();
  s.parser.feed(stream);
  assert.deepEqual(s.events, [
    'flags 3',
    `option ${OPT.STRUCTURED_REPLY} 0`,
    `option ${OPT.LIST} 0`,
    `option ${OPT.GO} 11`,
    'request 1 4096 10',
    'request 0 0 512',
    'request 3 0 0',
    `request 1 ${2 ** 40} 3`,
  ]);
  assert.equal(s.requests[0]!.data.toString(), '0123456789');
  assert.equal(s.requests[3]!.flags, 1);
});

test('the conversation split at every byte boundary parses the same', () => {
  const whole = session();
  whole.parser.feed(stream);
  for (let cut = 0; cut <= stream.length; cut++) {
    const split = session();
    split.parser.feed(stream.subarray(0, cut));
    split.parser.feed(stream.subarray(cut));
    assert.deepEqual(split.events, whole.events, `cut at ${cut}`);
    assert.deepEqual(split.requests.map((r) => r.data.toString()), whole.requests.map((r) => r.data.toString()));
  }
});

test('bytes sent before an option is answered wait for the answer', () => {
  const events: string[] = [];
  const parser = new NbdServerParser({
    onClientFlags: () => events.push('flags'),
    onOption: (opt) => events.push(`option ${opt}`),
    onOversizedOption: (opt) => events.push(`oversized ${opt}`),
    onRequest: (r) => events.push(`request ${r.type}`),
    onPayload: () => events.push('payload'),
    onFatal: (e) => events.push(`fatal ${e.message}`),
  });
  parser.feed(Buffer.concat([flags, option(OPT.GO, goPayload('')), request(CMD.READ, 0, 1, 1)]));
  assert.deepEqual(events, ['flags', `option ${OPT.GO}`], 'the request waits');
  parser.startTransmission();
  assert.deepEqual(events, ['flags', `option ${OPT.GO}`, 'request 0']);
});

test('garbage is fatal once: a wrong option magic, a wrong request magic, an oversized WRITE', () => {
  const badOption = session();
  badOption.parser.feed(Buffer.concat([flags, Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')]));
  assert.deepEqual(badOption.events, ['flags 3', 'fatal option does not start with IHAVEOPT']);

  const badRequest = session();
  badRequest.parser.feed(Buffer.concat([flags, option(OPT.GO, goPayload('')), Buffer.alloc(28, 0xee), request(CMD.READ, 0, 1, 1)]));
  assert.match(badRequest.events.at(-1)!, /^fatal bad request magic/);
  assert.equal(badRequest.requests.length, 0);

  const hugeWrite = session();
  hugeWrite.parser.feed(Buffer.concat([flags, option(OPT.GO, goPayload('')), request(CMD.WRITE, 0, 64 * 1024 * 1024, 1)]));
  assert.match(hugeWrite.events.at(-1)!, /^fatal WRITE of 67108864 bytes/);
});

test('an option longer than MAX_OPTION_LENGTH is reported at its header and its payload dropped, split anywhere; the next option parses', () => {
  const big = Buffer.alloc(MAX_OPTION_LENGTH + 5, 0xab);
  const input = Buffer.concat([flags, option(OPT.LIST, big), option(OPT.GO, goPayload('vol')), request(CMD.READ, 0, 512, 1)]);
  const whole = session();
  whole.parser.feed(input);
  assert.deepEqual(whole.events, ['flags 3', `oversized ${OPT.LIST} ${big.length}`, `option ${OPT.GO} 9`, 'request 0 0 512']);
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 1, max: input.length - 1 }), { maxLength: 6 }), (cuts) => {
      const s = session();
      let from = 0;
      for (const at of [...new Set(cuts)].sort((a, b) => a - b)) {
        s.parser.feed(Buffer.from(input.subarray(from, at)));
        from = at;
      }
      s.parser.feed(Buffer.from(input.subarray(from)));
      assert.deepEqual(s.events, whole.events);
    }),
    { numRuns: 100 },
  );
  // A header declaring 4 GiB: nothing is kept of what follows, however much comes.
  const huge = session();
  const head = option(OPT.INFO);
  head.writeUInt32BE(0xffffffff, 12);
  huge.parser.feed(Buffer.concat([flags, head]));
  for (let i = 0; i < 64; i++) huge.parser.feed(Buffer.alloc(65536, 7));
  assert.deepEqual(huge.events, ['flags 3', `oversized ${OPT.INFO} 4294967295`]);
  assert.equal(huge.parser.atBoundary, false);
});

test('fuzz: random bytes after the flags never throw out of the parser', () => {
  fc.assert(
    fc.property(fc.array(fc.uint8Array({ maxLength: 64 }), { maxLength: 20 }), (chunks) => {
      const s = session();
      s.parser.feed(flags);
      for (const c of chunks) s.parser.feed(Buffer.from(c));
    }),
    { numRuns: 300 },
  );
});

test('option payload decoders check every length', () => {
  assert.deepEqual(decodeInfoRequest(goPayload('disk', [0, 3])), { name: 'disk', infos: [0, 3] });
  assert.throws(() => decodeInfoRequest(Buffer.from([0, 0, 0, 9, 1, 2])), { code: 'MS_NBD_PROTOCOL' });
  assert.throws(() => decodeInfoRequest(Buffer.concat([goPayload('a', [1]), Buffer.from([0])])), { code: 'MS_NBD_PROTOCOL' });
  assert.throws(() => decodeInfoRequest(goPayload('a\0b')), { code: 'MS_NBD_PROTOCOL' });
  const meta = Buffer.concat([Buffer.from([0, 0, 0, 1]), Buffer.from('d'), Buffer.from([0, 0, 0, 1, 0, 0, 0, 15]), Buffer.from('base:allocation')]);
  assert.deepEqual(decodeMetaContextRequest(meta), { name: 'd', queries: ['base:allocation'] });
  assert.throws(() => decodeMetaContextRequest(meta.subarray(0, meta.length - 1)), { code: 'MS_NBD_PROTOCOL' });
  assert.throws(() => decodeMetaContextRequest(Buffer.concat([meta, Buffer.from([1])])), { code: 'MS_NBD_PROTOCOL' });
});

// ---- holding: the session admits each request before the parser reads on ----

const transmission = Buffer.concat([flags, option(OPT.GO, goPayload(''))]);

/** A session that holds after every request header and records what the parser did when. */
function holdingSession() {
  const events: string[] = [];
  const allocated: number[] = [];
  const parser: NbdServerParser = new NbdServerParser({
    onClientFlags: () => undefined,
    onOption: () => parser.startTransmission(),
    onOversizedOption: () => assert.fail('oversized'),
    onRequest: (r) => {
      events.push(`header ${r.type} ${r.cookie.lo}`);
      parser.hold();
    },
    onPayload: (r) => events.push(`payload ${r.cookie.lo} ${r.data.toString()}`),
    onFatal: (e) => events.push(`fatal ${e.message}`),
    allocate: (length) => {
      allocated.push(length);
      return Buffer.alloc(length + 7); // larger than asked, as a pool's size class is
    },
  });
  return { parser, events, allocated };
}

test('holding: nothing after a request header is read until release, not even its WRITE payload', () => {
  const s = holdingSession();
  s.parser.feed(Buffer.concat([transmission, request(CMD.WRITE, 0, 5, 1, Buffer.from('hello')), request(CMD.READ, 0, 1, 2)]));
  assert.deepEqual(s.events, ['header 1 1']);
  assert.deepEqual(s.allocated, [], 'no payload buffer before the session admits the WRITE');
  assert.equal(s.parser.holding, true);
  assert.equal(s.parser.atBoundary, false);
  s.parser.release();
  assert.deepEqual(s.events, ['header 1 1', 'payload 1 hello', 'header 0 2']);
  assert.deepEqual(s.allocated, [5]);
  s.parser.release();
  assert.equal(s.parser.atBoundary, true);
});

test('holding: input fed while held waits behind what was held, in order', () => {
  const s = holdingSession();
  s.parser.feed(Buffer.concat([transmission, request(CMD.READ, 0, 1, 1), request(CMD.READ, 0, 1, 2)]));
  s.parser.feed(request(CMD.WRITE, 0, 2, 3, Buffer.from('ab')));
  assert.deepEqual(s.events, ['header 0 1']);
  for (let i = 0; i < 4; i++) s.parser.release();
  assert.deepEqual(s.events, ['header 0 1', 'header 0 2', 'header 1 3', 'payload 3 ab']);
});

test('holding: any chunking and any release schedule yield the same requests, payloads copied out of the chunks', () => {
  const body = Buffer.concat([
    request(CMD.WRITE, 4096, 10, 1, Buffer.from('0123456789')),
    request(CMD.READ, 0, 512, 2),
    request(CMD.WRITE, 0, 0, 3),
    request(CMD.FLUSH, 0, 0, 4),
    request(CMD.WRITE, 2 ** 40, 3, 5, Buffer.from('abc'), 1),
  ]);
  const expected = ['header 1 1', 'payload 1 0123456789', 'header 0 2', 'header 1 3', 'payload 3 ', 'header 3 4', 'header 1 5', 'payload 5 abc'];
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 1, max: body.length }), { maxLength: 12 }), fc.array(fc.boolean(), { minLength: 40, maxLength: 40 }), (cuts, releaseAfter) => {
      const s = holdingSession();
      const chunks: Buffer[] = [];
      const points = [...new Set(cuts)].sort((a, b) => a - b);
      let from = 0;
      for (const p of points) {
        chunks.push(Buffer.from(body.subarray(from, p)));
        from = p;
      }
      chunks.push(Buffer.from(body.subarray(from)));
      s.parser.feed(transmission);
      let i = 0;
      for (const c of chunks) {
        s.parser.feed(c);
        if (releaseAfter[i++ % releaseAfter.length] === true) s.parser.release();
      }
      for (let k = 0; k < 20; k++) s.parser.release();
      assert.deepEqual(s.events, expected);
      assert.ok(s.parser.atBoundary);
    }),
    { numRuns: 300 },
  );
});

test('a WRITE payload never shares memory with the chunk it came in', () => {
  const seen: Buffer[] = [];
  const chunk = Buffer.concat([transmission, request(CMD.WRITE, 0, 4, 1, Buffer.from('data'))]);
  const parser: NbdServerParser = new NbdServerParser({
    onClientFlags: () => undefined,
    onOption: () => parser.startTransmission(),
    onOversizedOption: () => assert.fail('oversized'),
    onRequest: () => undefined,
    onPayload: (r) => seen.push(r.data),
    onFatal: () => assert.fail('fatal'),
  });
  parser.feed(chunk);
  chunk.fill(0); // the socket's chunk is gone (or reused): the payload must not change
  assert.equal(seen[0]?.toString(), 'data');
});

test('release from inside a callback carries on in the same pass; stop() ignores the rest', () => {
  const events: string[] = [];
  const parser: NbdServerParser = new NbdServerParser({
    onClientFlags: () => undefined,
    onOption: () => parser.startTransmission(),
    onOversizedOption: () => assert.fail('oversized'),
    onRequest: (r) => {
      events.push(`header ${r.cookie.lo}`);
      parser.hold();
      parser.release();
      if (r.type === CMD.DISC) parser.stop();
    },
    onPayload: () => events.push('payload'),
    onFatal: () => events.push('fatal'),
  });
  parser.feed(Buffer.concat([transmission, request(CMD.READ, 0, 1, 1), request(CMD.DISC, 0, 0, 2), request(CMD.READ, 0, 1, 3)]));
  parser.feed(Buffer.alloc(40, 0xee));
  assert.deepEqual(events, ['header 1', 'header 2']);
});

test('discardPayload: a refused WRITE has its payload read and dropped, then is reported with empty data; what follows parses', () => {
  const events: string[] = [];
  const allocated: number[] = [];
  const parser: NbdServerParser = new NbdServerParser({
    onClientFlags: () => undefined,
    onOption: () => parser.startTransmission(),
    onOversizedOption: () => assert.fail('oversized'),
    onRequest: (r) => {
      events.push(`header ${r.cookie.lo}`);
      if (r.cookie.lo === 1) parser.discardPayload();
      if (r.cookie.lo === 3) parser.hold();
    },
    onPayload: (r) => events.push(`payload ${r.cookie.lo} ${r.data.length}`),
    onFatal: (e) => events.push(`fatal ${e.message}`),
    allocate: (length) => {
      allocated.push(length);
      return Buffer.alloc(length);
    },
  });
  parser.feed(transmission);
  const refused = request(CMD.WRITE, 0, 100_000, 1, Buffer.alloc(100_000, 1));
  parser.feed(refused.subarray(0, 5000));
  assert.deepEqual(events, ['header 1']);
  parser.feed(refused.subarray(5000));
  assert.deepEqual(events, ['header 1', 'payload 1 0']);
  parser.feed(Buffer.concat([request(CMD.WRITE, 0, 3, 2, Buffer.from('abc')), request(CMD.WRITE, 0, 2, 3, Buffer.from('de'))]));
  assert.deepEqual(events, ['header 1', 'payload 1 0', 'header 2', 'payload 2 3', 'header 3']);
  // Held at a WRITE header, the session may still refuse it before releasing.
  parser.discardPayload();
  parser.release();
  assert.deepEqual(events, ['header 1', 'payload 1 0', 'header 2', 'payload 2 3', 'header 3', 'payload 3 0']);
  assert.deepEqual(allocated, [3], 'no buffer for a dropped payload');
  assert.ok(parser.atBoundary);
});

test('transient chunks (a read buffer reused after each feed): options answered later, holds and releases at any point yield what whole chunks do', () => {
  // A socket read into one buffer of the connection's own (net/socket-input.ts) overwrites
  // it once feed() returns: the parser must copy whatever it keeps, and an option payload
  // the session answers later.
  const conversation = Buffer.concat([
    flags,
    option(OPT.STRUCTURED_REPLY),
    option(OPT.INFO, goPayload('volume-one', [3, 1])),
    option(OPT.GO, goPayload('vol', [3])),
    request(CMD.WRITE, 4096, 10, 1, Buffer.from('0123456789')),
    request(CMD.READ, 0, 512, 2),
    request(CMD.WRITE, 0, 70, 3, Buffer.alloc(70, 'w')),
    request(CMD.FLUSH, 0, 0, 4),
    request(CMD.WRITE, 2 ** 40, 3, 5, Buffer.from('abc'), 1),
    request(CMD.READ, 8192, 4096, 6),
  ]);
  /** A session that answers options only when told, and may hold after any request. */
  const lazySession = (holds: boolean[]) => {
    const events: string[] = [];
    const unanswered: Array<{ opt: number; data: Buffer }> = [];
    let n = 0;
    const parser: NbdServerParser = new NbdServerParser({
      onClientFlags: (f) => events.push(`flags ${f}`),
      onOption: (opt, data) => unanswered.push({ opt, data }),
      onOversizedOption: () => assert.fail('oversized'),
      onRequest: (r) => {
        events.push(`header ${r.type} ${r.cookie.lo} ${r.offset} ${r.length} ${r.flags}`);
        if (holds[n++ % holds.length] === true) parser.hold();
      },
      onPayload: (r) => events.push(`payload ${r.cookie.lo} ${r.data.toString('hex')}`),
      onFatal: (e) => events.push(`fatal ${e.message}`),
    });
    const answer = (): void => {
      const next = unanswered.shift();
      if (next === undefined) return;
      // What the session reads of the payload when it answers, after later feeds.
      events.push(`option ${next.opt} ${next.data.toString('hex')}`);
      if (next.opt === OPT.GO) parser.startTransmission();
      else parser.resume();
    };
    return { parser, events, answer, pending: () => unanswered.length };
  };
  const reference = lazySession([false]);
  reference.parser.feed(conversation);
  for (let k = 0; k < 10; k++) {
    reference.answer();
    reference.parser.release();
  }
  assert.ok(reference.parser.atBoundary);
  fc.assert(
    fc.property(
      fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1, maxLength: 40 }),
      fc.array(fc.boolean(), { minLength: 1, maxLength: 10 }),
      fc.array(fc.constantFrom('answer', 'release', 'both', 'none'), { minLength: 1, maxLength: 20 }),
      fc.boolean(),
      (sizes, holds, steps, useTargets) => {
        const s = lazySession(holds);
        const readBuffer = Buffer.alloc(64);
        let at = 0;
        let i = 0;
        while (at < conversation.length) {
          // A socket reads into the parser's payload target when it offers one (as an own-buffer input does).
          const target = useTargets ? s.parser.payloadTarget() : undefined;
          const into = target ?? readBuffer;
          const n = Math.min(sizes[i % sizes.length] ?? 1, conversation.length - at, into.length);
          conversation.copy(into, 0, at, at + n);
          s.parser.feed(into.subarray(0, n), true);
          readBuffer.fill(0xee); // the next read lands here
          at += n;
          const step = steps[i % steps.length];
          if (step === 'answer' || step === 'both') s.answer();
          if (step === 'release' || step === 'both') s.parser.release();
          i++;
        }
        for (let k = 0; k < 20; k++) {
          s.answer();
          s.parser.release();
        }
        assert.deepEqual(s.events, reference.events);
        assert.ok(s.parser.atBoundary);
      },
    ),
    { numRuns: 400 },
  );
});

test('payloadTarget: the rest of a WRITE payload while it is being read, nothing between messages, in options or while holding; bytes read into it are not copied again', () => {
  let held = false;
  const payloads: Buffer[] = [];
  const parser: NbdServerParser = new NbdServerParser({
    onClientFlags: () => undefined,
    onOption: (opt) => (opt === OPT.GO ? parser.startTransmission() : parser.resume()),
    onOversizedOption: () => assert.fail('oversized'),
    onRequest: () => {
      if (held) parser.hold();
    },
    onPayload: (r) => payloads.push(r.data),
    onFatal: (e) => assert.fail(e),
  });
  parser.feed(Buffer.concat([flags, option(OPT.GO, goPayload('vol'))]).subarray(0, 10));
  assert.equal(parser.payloadTarget(), undefined, 'in the handshake');
  parser.feed(Buffer.concat([flags, option(OPT.GO, goPayload('vol'))]).subarray(10));
  assert.equal(parser.payloadTarget(), undefined, 'between messages');
  const data = Buffer.from('0123456789abcdef');
  const write = request(CMD.WRITE, 0, data.length, 1, data);
  parser.feed(write.subarray(0, 28 + 4));
  const target = parser.payloadTarget();
  assert.equal(target?.length, 12, 'the rest of the payload');
  data.copy(target, 0, 4, 10);
  const marked = (target).subarray(0, 6);
  parser.feed(marked, true);
  assert.equal(parser.payloadTarget()?.byteOffset, (target).byteOffset + 6, 'moved on by what was read into it');
  parser.feed(data.subarray(10), true);
  assert.equal(payloads.length, 1);
  assert.ok(payloads[0]?.equals(data));
  assert.equal(payloads[0]?.buffer, target?.buffer, 'the payload is the buffer read into');
  held = true;
  parser.feed(write.subarray(0, 28 + 4));
  assert.equal(parser.payloadTarget(), undefined, 'while holding at a WRITE header');
  held = false;
  parser.release();
  assert.equal(parser.payloadTarget()?.length, 12, 'after release, once the payload is being read');
  parser.hold();
  assert.equal(parser.payloadTarget(), undefined, 'while holding in a payload');
  parser.release();
  assert.equal(parser.payloadTarget()?.length, 12, 'after release');
  parser.feed(data.subarray(4), true);
  assert.equal(payloads.length, 2);
  assert.ok(payloads[1]?.equals(data));
});
