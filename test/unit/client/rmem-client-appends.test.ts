// RmemClient's journal appends against a scripted rmem server in this process, which
// records every request frame as it arrives: appends made in one tick leave as one
// JAPPEND, in call order, and each caller gets its own part of the answer; the wire keeps
// the order the calls were made in; a failure fails each append it carried; an append the
// node would refuse on its own leaves alone, so it fails alone.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Socket } from 'node:net';
import fc from 'fast-check';
import { RmemClient, type Journal } from '../../../src/client/rmem-client.js';
import * as codec from '../../../src/protocol/rmem/codec.js';
import { FrameParser } from '../../../src/protocol/rmem/parser.js';
import { OP, STATUS, VERSION } from '../../../src/protocol/rmem/spec.js';

type Ctx = { after(fn: () => unknown): void };

interface Seen {
  op: number;
  /** JAPPEND: the handle and each entry's payload as text and target offset. */
  handle?: number;
  payloads?: string[];
  offsets?: number[];
}

/**
 * A node that answers HELLO, JOPEN (handle = epoch), JAPPEND (numbers per handle, from 1)
 * and JTRIM; `fail` makes the next JAPPENDs fail with that status.
 */
async function scriptedNode(t: Ctx): Promise<{ port: number; seen: Seen[]; fail: { status: number | undefined } }> {
  const seen: Seen[] = [];
  const fail: { status: number | undefined } = { status: undefined };
  const next = new Map<number, number>();
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    const parser = new FrameParser('request', {
      onFrame: (f) => {
        const tag = { hi: f.tagHi, lo: f.tagLo };
        if (f.op === OP.HELLO) {
          socket.write(codec.encodeHelloReply(tag, { version: VERSION, resumed: false, leaseMs: 60_000, maxBody: 1 << 24, sessionId: 1n, nodeId: 'scripted', secret: Buffer.alloc(32, 1) }));
          return;
        }
        if (f.op === OP.JAPPEND) {
          let request: ReturnType<typeof codec.decodeJappendRequest>;
          try {
            request = codec.decodeJappendRequest(f.body);
          } catch {
            seen.push({ op: f.op, payloads: ['<malformed>'] });
            socket.write(codec.encodeErrorReply(f.op, STATUS.PROTOCOL, tag, 'malformed'));
            return;
          }
          const { handle, entries } = request;
          seen.push({ op: f.op, handle, payloads: entries.map((e) => e.payload.toString()), offsets: entries.map((e) => e.target?.offset ?? -1) });
          // As the node: a target name over 64 bytes fails the whole request.
          const status = entries.some((e) => Buffer.byteLength(e.target?.volume ?? '') > 64) ? STATUS.INVALID : fail.status;
          if (status !== undefined) {
            socket.write(codec.encodeErrorReply(f.op, status, tag, 'scripted failure'));
            return;
          }
          const first = next.get(handle) ?? 1;
          next.set(handle, first + entries.length);
          socket.write(codec.encodeJappendReply(tag, entries.map((_, i) => ({ seq: first + i, timestamp: 1 }))));
          return;
        }
        seen.push({ op: f.op });
        if (f.op === OP.JOPEN) {
          const { epoch } = codec.decodeJopenRequest(f.body);
          socket.write(codec.encodeJopenReply(tag, epoch, { epoch, size: 1 << 20, used: 0, firstSeq: 0, lastSeq: 0, policy: 'volatile' }));
          return;
        }
        socket.write(codec.encodeEmptyReply(f.op, tag));
      },
      onFatal: () => socket.destroy(),
    });
    socket.on('data', (chunk: Buffer) => parser.feed(chunk));
    socket.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(async () => {
    for (const s of sockets) s.destroy();
    await new Promise((resolve) => server.close(resolve));
  });
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('no port');
  return { port: address.port, seen, fail };
}

async function connected(t: Ctx): Promise<{ client: RmemClient; seen: Seen[]; fail: { status: number | undefined }; one: Journal; two: Journal }> {
  const node = await scriptedNode(t);
  const client = await RmemClient.connect({ port: node.port, serverId: 'appends', reconnect: false, keepalive: false });
  t.after(() => client.close());
  const one = await client.journalOpen('d', 1);
  const two = await client.journalOpen('e', 2);
  node.seen.length = 0;
  return { client, ...node, one, two };
}

const text = (s: string) => ({ payload: Buffer.from(s) });

test('appends made in one tick leave as one JAPPEND in call order, and each caller gets its own numbers', async (t) => {
  const { client, seen, one } = await connected(t);
  const answers = await Promise.all([client.journalAppend(one, [text('a')]), client.journalAppend(one, [text('b'), text('c')]), client.journalAppend(one, [text('d')])]);
  assert.deepEqual(answers.map((a) => a.map((r) => r.seq)), [[1], [2, 3], [4]]);
  assert.deepEqual(seen, [{ op: OP.JAPPEND, handle: one.handle, payloads: ['a', 'b', 'c', 'd'], offsets: [-1, -1, -1, -1] }]);
  // The next tick's appends are a request of their own.
  assert.deepEqual((await client.journalAppend(one, [text('e')])).map((r) => r.seq), [5]);
  assert.equal(seen.length, 2);
});

test('the wire keeps call order: another journal, or any other request, sends the appends made before it first', async (t) => {
  const { client, seen, one, two } = await connected(t);
  const done = Promise.all([
    client.journalAppend(one, [text('a')]),
    client.journalAppend(two, [text('x')]),
    client.journalAppend(one, [text('b')]),
    client.journalTrim(one, 1),
    client.journalAppend(one, [text('c')]),
    client.journalAppend(one, [text('d')]),
  ]);
  await done;
  assert.deepEqual(
    seen.map((s) => (s.op === OP.JAPPEND ? `${s.handle}:${s.payloads?.join('')}` : `op${s.op}`)),
    [`${one.handle}:a`, `${two.handle}:x`, `${one.handle}:b`, `op${OP.JTRIM}`, `${one.handle}:cd`],
  );
});

test('a failure fails every append it carried; the next tick goes on', async (t) => {
  const { client, seen, fail, one } = await connected(t);
  fail.status = STATUS.FULL;
  const results = await Promise.allSettled([client.journalAppend(one, [text('a')]), client.journalAppend(one, [text('b')])]);
  assert.deepEqual(results.map((r) => (r.status === 'rejected' ? (r.reason as { code: string }).code : 'ok')), ['MS_NVRAM_FULL', 'MS_NVRAM_FULL']);
  assert.equal(seen.length, 1);
  fail.status = undefined;
  assert.deepEqual((await client.journalAppend(one, [text('c')])).map((r) => r.seq), [1]);
});

test('an append the node would refuse on its own (a long target name, an empty append, a large record) leaves alone, and the others are answered', async (t) => {
  const { client, seen, one } = await connected(t);
  const long = { payload: Buffer.from('t'), target: { volume: 'v'.repeat(65), offset: 0 } };
  const results = await Promise.allSettled([
    client.journalAppend(one, [text('a')]),
    client.journalAppend(one, [long]),
    client.journalAppend(one, []),
    client.journalAppend(one, [{ payload: Buffer.alloc(64 * 1024, 0x6c) }]),
    client.journalAppend(one, [text('b')]),
  ]);
  assert.deepEqual(results.map((r) => (r.status === 'rejected' ? (r.reason as { code: string }).code : 'ok')), ['ok', 'MS_RMEM_INVALID', 'MS_RMEM_PROTOCOL', 'ok', 'ok']);
  // Each of those went alone; 'a' and 'b' (made around them) did too, in call order.
  const appends = seen.filter((s) => s.op === OP.JAPPEND).map((s) => s.payloads?.map((p) => (p.length > 1024 ? `${p.length}B` : p)).join(','));
  assert.deepEqual(appends, ['a', 't', '<malformed>', `${64 * 1024}B`, 'b']);
});

test('an append whose entry cannot be encoded (a target offset out of range) fails alone: the appends and the request made around it in the same tick are answered', async (t) => {
  const { client, seen, one } = await connected(t);
  const bad = { payload: Buffer.from('bad'), target: { volume: 'v', offset: -1 } };
  const results = await Promise.allSettled([client.journalAppend(one, [text('a')]), client.journalAppend(one, [bad]), client.journalAppend(one, [text('b')]), client.journalTrim(one, 0)]);
  assert.deepEqual(results.map((r) => r.status), ['fulfilled', 'rejected', 'fulfilled', 'fulfilled']);
  assert.ok((results[1] as PromiseRejectedResult).reason instanceof RangeError);
  assert.deepEqual(seen.map((s) => (s.op === OP.JAPPEND ? s.payloads?.join('') : `op${s.op}`)), ['ab', `op${OP.JTRIM}`]);
  // Bad arguments reject; they never throw at the caller.
  const thrown = client.journalAppend(one, [{ payload: 'not bytes' as unknown as Uint8Array }]);
  await assert.rejects(thrown);
});

test('each append is encoded as its call found it: a target object the caller changes after the call is not read again', async (t) => {
  const node = await scriptedNode(t);
  const offsets: number[] = [];
  const client = await RmemClient.connect({ port: node.port, serverId: 'targets', reconnect: false, keepalive: false });
  t.after(() => client.close());
  const journal = await client.journalOpen('d', 1);
  const target = { volume: 'vol', offset: 0 };
  const calls = [];
  for (let i = 0; i < 3; i++) {
    target.offset = i * 4096;
    calls.push(client.journalAppend(journal, [{ payload: Buffer.from(`w${i}`), target }]));
  }
  await Promise.all(calls);
  for (const s of node.seen) offsets.push(...(s.offsets ?? []));
  assert.deepEqual(offsets, [0, 4096, 8192]);
});

test('any mix of appends, journals and other requests in one tick: each caller gets the numbers of its own records, in call order per journal', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(fc.oneof(fc.record({ kind: fc.constant('append' as const), journal: fc.integer({ min: 0, max: 1 }), records: fc.integer({ min: 1, max: 3 }) }), fc.record({ kind: fc.constant('trim' as const) })), { minLength: 1, maxLength: 20 }), async (calls) => {
      const afters: (() => unknown)[] = [];
      try {
        const { client, seen, one, two } = await connected({ after: (fn) => afters.push(fn) });
        const journals = [one, two] as const;
        let label = 0;
        const expected: { journal: number; labels: string[] }[] = [];
        const promises = calls.map((c) => {
          if (c.kind === 'trim') return client.journalTrim(one, 0).then(() => undefined);
          const labels = Array.from({ length: c.records }, () => `r${label++}`);
          expected.push({ journal: c.journal, labels });
          return client.journalAppend(journals[c.journal] as Journal, labels.map(text));
        });
        const answers = (await Promise.all(promises)).filter((a) => a !== undefined);
        // What the node numbered each record, from the frames it saw in order.
        const numbered = new Map<string, number>();
        const counters = new Map<number, number>();
        for (const s of seen) {
          if (s.op !== OP.JAPPEND || s.handle === undefined) continue;
          for (const p of s.payloads ?? []) {
            const n = (counters.get(s.handle) ?? 0) + 1;
            counters.set(s.handle, n);
            numbered.set(p, n);
          }
        }
        assert.equal(answers.length, expected.length);
        expected.forEach((e, i) => {
          assert.deepEqual(answers[i]?.map((a) => a.seq), e.labels.map((l) => numbered.get(l)));
        });
        // Per journal, records were numbered in the order the calls were made.
        for (const j of [0, 1]) {
          const labels = expected.filter((e) => e.journal === j).flatMap((e) => e.labels);
          assert.deepEqual(labels.map((l) => numbered.get(l)), labels.map((_, i) => i + 1));
        }
      } finally {
        for (const fn of afters.reverse()) await fn();
      }
    }),
    { numRuns: 40 },
  );
});
