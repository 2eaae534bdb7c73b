// Hostile clients against the rmem service of a real node process. In each: the node's
// memory stays within its bound (resident set from /proc, compared to a bound, never a
// time), a well-behaved client keeps being served meanwhile, and the node stays up.
//
// The bound is the one the defaults promise (README, "Bounded resources"): under 256 MiB
// of extra memory against any one client, whatever it sends.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { randomBytes } from 'node:crypto';
import { RmemClient } from '../../src/client/rmem-client.js';
import * as codec from '../../src/protocol/rmem/codec.js';
import { FrameParser, type Frame } from '../../src/protocol/rmem/parser.js';
import { MAX_BODY, OP, STATUS, VERSION } from '../../src/protocol/rmem/spec.js';
import { startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { metric, rssBytes, wellBehaved } from '../support/hostile.js';

const MiB = 2 ** 20;
/** Extra resident memory the defaults promise to stay under against one client. */
const BOUND = 256 * MiB;

/** A node with room for the tests' regions; limits are set through the environment, as an operator would. */
async function node(t: { after(fn: () => Promise<unknown>): void }, env: NodeJS.ProcessEnv = {}): Promise<NodeProcess> {
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir, args: ['--dram-size', '256MiB', '--set', 'partition.dram.server.initial=64MiB'], env });
  t.after(() => n.stop('SIGKILL'));
  return n;
}

/** A raw connection that says HELLO as `serverId` and binds one region; it then sends whatever the test wants. */
async function rawSession(n: NodeProcess, serverId: string, bindBytes = 0): Promise<{ socket: Socket; regionId: number; key: bigint; replies: Frame[] }> {
  const socket = connect(n.rmem.port, n.rmem.host);
  socket.on('error', () => undefined);
  const replies: Frame[] = [];
  let wake: () => void = () => undefined;
  const parser = new FrameParser('response', {
    onFrame: (f) => {
      replies.push({ ...f, body: Buffer.from(f.body) });
      wake();
    },
    onFatal: () => socket.destroy(),
  });
  socket.on('data', (chunk: Buffer) => parser.feed(chunk));
  const next = async (): Promise<Frame> => {
    while (replies.length === 0) await new Promise<void>((resolve) => (wake = resolve));
    const f = replies.shift();
    assert.ok(f !== undefined);
    return f;
  };
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  socket.write(codec.encodeHelloRequest({ hi: 0, lo: 1 }, { version: VERSION, serverId, token: '' }));
  assert.equal((await next()).word, STATUS.OK);
  if (bindBytes === 0) return { socket, regionId: 0, key: 0n, replies };
  socket.write(codec.encodeBindRequest({ hi: 0, lo: 2 }, { size: bindBytes, placement: { kind: 'medium', medium: 'dram' } }));
  const bound = await next();
  assert.equal(bound.word, STATUS.OK);
  const { regionId, key } = codec.decodeBindReply(bound.body);
  return { socket, regionId, key, replies };
}

async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 10_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

test('hostile: pipelines 600 READs of 1 MiB and never reads a reply; the node holds its budget, not 600 MiB', async (t) => {
  const n = await node(t);
  const good = await wellBehaved(t, n, 'good');
  const before = await rssBytes(n);
  const hostile = await rawSession(n, 'hostile', 8 * MiB);
  hostile.socket.pause(); // never reads again
  t.after(() => hostile.socket.destroy());
  const frames: Buffer[] = [];
  for (let i = 0; i < 600; i++) frames.push(codec.encodeReadRequest({ hi: 0, lo: 100 + i }, { regionId: hostile.regionId, key: hostile.key, offset: (i % 7) * MiB, length: MiB }));
  hostile.socket.write(Buffer.concat(frames));
  // The node has taken in as many READs as its budget allows (or, unbounded, all of them).
  await until('the node to serve the hostile READs', async () => ((await metric(n, 'memstrata_rmem_requests_total{op="READ"}')) >= 20 ? true : undefined));
  let peak = await rssBytes(n);
  for (let i = 0; i < 40; i++) {
    await good.check();
    peak = Math.max(peak, await rssBytes(n));
  }
  assert.ok(peak - before < BOUND, `node grew by ${((peak - before) / MiB).toFixed(0)} MiB against one client (bound ${BOUND / MiB} MiB)`);
  // One connection holds at most rmem.maxInFlightBytes (32 MiB); the good client's requests are small.
  assert.ok((await metric(n, 'memstrata_rmem_inflight_bytes')) <= 32 * MiB + 256 * 1024, 'the hostile connection holds at most its own budget');
  assert.ok((await metric(n, 'memstrata_rmem_paused_connections')) >= 1, 'the hostile connection is not being read');
  assert.ok((await metric(n, 'memstrata_rmem_requests_total{op="READ"}')) < 600, 'the node stopped reading the hostile connection');
  // Once the hostile client goes away, everything it held comes back.
  hostile.socket.destroy();
  await until('the budget to come back', async () => ((await metric(n, 'memstrata_rmem_inflight_bytes')) === 0 ? true : undefined));
  await good.check();
  assert.equal((await fetch(`${n.url}/healthz`)).status, 200);
});

test('hostile: many connections each send all but the last byte of a MAX_BODY WRITE; the service-wide cap holds', async (t) => {
  const n = await node(t);
  const good = await wellBehaved(t, n, 'good');
  const before = await rssBytes(n);
  const chunk = randomBytes(MiB);
  const sockets: Socket[] = [];
  t.after(() => {
    for (const s of sockets) s.destroy();
  });
  const body = MAX_BODY - 24;
  for (let i = 0; i < 24; i++) {
    const { socket, regionId, key } = await rawSession(n, `hostile-${i}`, 4096);
    sockets.push(socket);
    const head = Buffer.alloc(20 + 24);
    codec.writeRequestHeader(head, OP.WRITE, { hi: 0, lo: 9 }, 24 + body);
    head.writeUInt32BE(0, 20);
    head.writeUInt32BE(regionId, 24);
    head.writeBigUInt64BE(key, 28);
    socket.write(head);
    // The same megabyte again and again: the test process holds 1 MiB, the node what it reads.
    for (let sent = 0; sent < body - 1; sent += MiB) socket.write(sent + MiB <= body - 1 ? chunk : chunk.subarray(0, body - 1 - sent));
  }
  // 24 x 16 MiB is offered; wait until the node has read what it will read (or has outgrown the bound).
  let peak = 0;
  let last = -1;
  await until('the node to stop taking in bodies', async () => {
    const inflight = await metric(n, 'memstrata_rmem_inflight_bytes');
    peak = Math.max(peak, await rssBytes(n));
    const settled = inflight === last && inflight > 0;
    last = inflight;
    return settled || peak - before >= BOUND ? true : undefined;
  });
  for (let i = 0; i < 20; i++) {
    await good.check();
    peak = Math.max(peak, await rssBytes(n));
  }
  assert.ok(peak - before < BOUND, `node grew by ${((peak - before) / MiB).toFixed(0)} MiB against one client (bound ${BOUND / MiB} MiB)`);
  assert.ok((await metric(n, 'memstrata_rmem_inflight_bytes')) <= 128 * MiB + MAX_BODY, 'reserved bodies stay within the service cap');
  assert.equal((await fetch(`${n.url}/healthz`)).status, 200);
});

test('hostile: a frame trickled one byte at a time; others are served meanwhile, and the frame is served once whole', async (t) => {
  const n = await node(t);
  const good = await wellBehaved(t, n, 'good');
  const before = await rssBytes(n);
  const { socket, regionId, key } = await rawSession(n, 'trickler', 4096);
  t.after(() => socket.destroy());
  const frame = Buffer.concat([codec.encodeWriteHead({ hi: 0, lo: 5 }, { regionId, key, offset: 0 }, 4096), Buffer.alloc(4096, 3)]);
  for (let i = 0; i < 600; i++) {
    socket.write(frame.subarray(i, i + 1));
    await new Promise((resolve) => setImmediate(resolve));
    if (i % 50 === 0) await good.check();
  }
  assert.ok((await rssBytes(n)) - before < BOUND);
  // Finished one byte at a time, the frame is served like any other.
  const replies: Frame[] = [];
  const parser = new FrameParser('response', { onFrame: (f) => replies.push(f), onFatal: () => undefined });
  socket.on('data', (c: Buffer) => parser.feed(c));
  for (let i = 600; i < frame.length; i += 97) socket.write(frame.subarray(i, Math.min(frame.length, i + 97)));
  await until('the trickled WRITE to be answered', async () => (replies.some((r) => r.tagLo === 5) ? true : undefined));
  assert.equal(replies.find((r) => r.tagLo === 5)?.word, STATUS.OK);
  await good.check();
});

test('hostile: thousands of connections are refused beyond rmem.maxConnections; the connected client is served throughout', async (t) => {
  const n = await node(t, { MEMSTRATA_RMEM_MAX_CONNECTIONS: '64', MEMSTRATA_RMEM_HANDSHAKE_TIMEOUT: '1s' });
  const good = await wellBehaved(t, n, 'good');
  const before = await rssBytes(n);
  const sockets: Socket[] = [];
  t.after(() => {
    for (const s of sockets) s.destroy();
  });
  let closed = 0;
  let connected = 0;
  // In waves of 200, below the listen backlog: the kernel, not the node, would otherwise drop
  // some handshakes, leaving client sockets the node never saw.
  for (let wave = 0; wave < 2000; wave += 200) {
    await Promise.all(
      Array.from({ length: Math.min(200, 2000 - wave) }, () =>
        new Promise<void>((resolve) => {
          const s = connect(n.rmem.port, n.rmem.host);
          sockets.push(s);
          s.on('error', () => undefined);
          s.once('close', () => closed++);
          s.once('connect', () => {
            connected++;
            resolve();
          });
          s.once('close', () => resolve());
        }),
      ),
    );
  }
  await good.check();
  assert.ok((await metric(n, 'memstrata_rmem_connections')) <= 64);
  assert.ok((await metric(n, 'memstrata_rmem_refused_connections_total')) >= 1);
  // The idle ones never say HELLO: the node closes them at the handshake deadline, and a new client gets in.
  await until('the idle connections to be closed by the node', async () => (closed === 2000 ? true : undefined), 60_000);
  const refused = await metric(n, 'memstrata_rmem_refused_connections_total');
  const timedOut = await metric(n, 'memstrata_rmem_handshake_timeouts_total');
  assert.ok(connected > 1000, `${connected} of 2000 connected`);
  assert.equal(refused + timedOut, connected, 'each hostile connection was refused on arrival or timed out in its handshake');
  const late = await RmemClient.connect({ ...n.rmem, serverId: 'late', reconnect: false });
  t.after(() => late.close());
  assert.equal((await late.capacity()).length, 2);
  await good.check();
  assert.ok((await rssBytes(n)) - before < BOUND);
});

test('hostile: declared lengths beyond the limits lose the framing at once, before HELLO any body over 4 KiB does', async (t) => {
  const n = await node(t);
  const good = await wellBehaved(t, n, 'good');
  const before = await rssBytes(n);
  const closed = async (frame: Buffer): Promise<Frame[]> => {
    const socket = connect(n.rmem.port, n.rmem.host);
    socket.on('error', () => undefined);
    const replies: Frame[] = [];
    const parser = new FrameParser('response', { onFrame: (f) => replies.push({ ...f, body: Buffer.from(f.body) }), onFatal: () => undefined });
    socket.on('data', (c: Buffer) => parser.feed(c));
    await new Promise<void>((resolve) => socket.once('connect', resolve));
    socket.write(frame);
    // Closed by the node, or given up on after a while (then the assertions below fail).
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => socket.destroy(), 5000);
      socket.once('close', () => {
        clearTimeout(timer);
        resolve();
      });
    });
    return replies;
  };
  const header = (length: number): Buffer => {
    const h = Buffer.alloc(20);
    codec.writeRequestHeader(h, OP.HELLO, { hi: 0, lo: 1 }, length);
    return h;
  };
  for (const length of [0xffffffff, MAX_BODY + 1, MAX_BODY, 5000]) {
    const replies = await closed(header(length));
    assert.deepEqual(replies.map((r) => [r.op, r.word]), [[0, STATUS.PROTOCOL]], `declared ${length}`);
  }
  // 300 unadmitted connections that each declare MAX_BODY: all closed, nothing reserved.
  await Promise.all(Array.from({ length: 300 }, () => closed(header(MAX_BODY))));
  assert.equal(await metric(n, 'memstrata_rmem_inflight_bytes'), 0);
  await good.check();
  assert.ok((await rssBytes(n)) - before < BOUND);
});

test('hostile: connections that stop mid-HELLO are closed at rmem.handshakeTimeout; others are served', async (t) => {
  // All from one address: the per-client cap is lifted to the service's, which is what this test is about.
  const n = await node(t, { MEMSTRATA_RMEM_HANDSHAKE_TIMEOUT: '500ms', MEMSTRATA_RMEM_MAX_CONNECTIONS_PER_CLIENT: '256' });
  const good = await wellBehaved(t, n, 'good');
  const hello = codec.encodeHelloRequest({ hi: 0, lo: 1 }, { version: VERSION, serverId: 'half', token: '' });
  const sockets = await Promise.all(
    Array.from({ length: 100 }, async () => {
      const s = connect(n.rmem.port, n.rmem.host);
      s.on('error', () => undefined);
      await new Promise<void>((resolve) => s.once('connect', resolve));
      s.write(hello.subarray(0, 25));
      return s;
    }),
  );
  t.after(() => {
    for (const s of sockets) s.destroy();
  });
  await good.check();
  await until('the node to close the half-open connections', async () => (sockets.every((s) => s.destroyed) ? true : undefined));
  assert.ok((await metric(n, 'memstrata_rmem_handshake_timeouts_total')) >= 100);
  assert.equal(await metric(n, 'memstrata_rmem_connections'), 1, 'only the good client is left');
  await good.check();
});
