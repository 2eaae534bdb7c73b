// The rmem service of a real node process, driven by RmemClient and by raw sockets.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { connect, createServer, type Socket } from 'node:net';
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { RmemClient, type Region } from '../../src/client/rmem-client.js';
import type { ServersJson, PartitionTableJson } from '../../src/protocol/admin/api.js';
import * as codec from '../../src/protocol/rmem/codec.js';
import { OP, STATUS, VERSION } from '../../src/protocol/rmem/spec.js';
import { FrameParser, type Frame } from '../../src/protocol/rmem/parser.js';
import { runCli, startNode, tempDir, type NodeProcess } from '../support/node-process.js';

async function node(t: { after(fn: () => Promise<unknown>): void }, args: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<NodeProcess> {
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir, args, env });
  t.after(() => n.stop('SIGKILL'));
  return n;
}

async function client(t: { after(fn: () => Promise<unknown>): void }, n: NodeProcess, serverId: string, extra: Partial<Parameters<typeof RmemClient.connect>[0]> = {}): Promise<RmemClient> {
  const c = await RmemClient.connect({ ...n.rmem, serverId, ...extra });
  t.after(() => c.close());
  return c;
}

async function servers(n: NodeProcess): Promise<ServersJson> {
  return (await (await fetch(`${n.url}/v1/servers`)).json()) as ServersJson;
}

async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 8000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** A stand-in node on loopback: `onFrame` answers each request frame on its socket. Resolves with its port; closed after the test. */
async function standIn(t: { after(fn: () => Promise<unknown>): void }, onFrame: (socket: Socket, frame: Frame) => void): Promise<number> {
  const sockets = new Set<Socket>();
  const fake = createServer((socket) => {
    sockets.add(socket);
    const parser = new FrameParser('request', {
      onFrame: (frame) => {
        onFrame(socket, frame);
      },
      onFatal: () => socket.destroy(),
    });
    socket.on('data', (chunk: Buffer) => parser.feed(chunk));
    socket.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => fake.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    for (const s of sockets) s.destroy();
    return new Promise<void>((resolve) => fake.close(() => resolve()));
  });
  return (fake.address() as { port: number }).port;
}

/** What a stand-in node answers to HELLO: a new session. */
function helloReply(frame: Frame, secret = Buffer.alloc(32)): Buffer {
  return codec.encodeHelloReply({ hi: frame.tagHi, lo: frame.tagLo }, { version: VERSION, resumed: false, leaseMs: 30000, maxBody: 1 << 24, sessionId: 1n, nodeId: 'fake', secret });
}

test('isolation: server B cannot read, write or free what A holds, even guessing ids and keys', async (t) => {
  const n = await node(t);
  const a = await client(t, n, 'srv-a');
  const b = await client(t, n, 'srv-b');
  const region = await a.bind(64 * 1024, { medium: 'dram' });
  const secret = randomBytes(64 * 1024);
  await a.write(region, 0, secret);

  await assert.rejects(b.read(region, 0, 16), { code: 'MS_RMEM_VIOLATION' }, 'exact id and key, wrong server');
  await assert.rejects(b.write(region, 0, Buffer.alloc(16)), { code: 'MS_RMEM_VIOLATION' });
  await assert.rejects(b.free(region), { code: 'MS_RMEM_VIOLATION' });
  await assert.rejects(b.readv([{ region, offset: 0, length: 16 }]), { code: 'MS_RMEM_VIOLATION' });
  await assert.rejects(b.writev([{ region, offset: 0, data: Buffer.alloc(4) }]), { code: 'MS_RMEM_VIOLATION' });
  for (let id = 0; id < 64; id++) {
    const guess: Region = { regionId: id, key: randomBytes(8).readBigUInt64BE(0), size: 4096, ranges: [] };
    await assert.rejects(b.read(guess, 0, 1), { code: 'MS_RMEM_VIOLATION' });
    await assert.rejects(a.read({ ...region, key: guess.key }, 0, 1), { code: 'MS_RMEM_VIOLATION' }, 'A with a wrong key');
  }
  assert.ok((await a.read(region, 0, secret.length)).equals(secret), "A's data is untouched");

  // What A frees, B gets back as zeros, and A can no longer reach.
  await a.free(region);
  await assert.rejects(a.read(region, 0, 1), { code: 'MS_RMEM_VIOLATION' }, 'use after free');
  await assert.rejects(a.free(region), { code: 'MS_RMEM_VIOLATION' }, 'double free');
  const reused = await b.bind(64 * 1024, { medium: 'dram' });
  assert.ok((await b.read(reused, 0, reused.size)).every((x) => x === 0));
  assert.equal(reused.ranges[0]!.start, region.ranges[0]!.start, 'the same physical memory was handed over');
});

test('requests in one READV/WRITEV and range errors', async (t) => {
  const n = await node(t);
  const a = await client(t, n, 'srv-a');
  const r1 = await a.bind(8192, { medium: 'dram' });
  const r2 = await a.bind(8192, { medium: 'flash' });
  await a.writev([
    { region: r1, offset: 10, data: Buffer.from('first') },
    { region: r2, offset: 8000, data: Buffer.from('second') },
  ]);
  const [x, y] = await a.readv([
    { region: r1, offset: 10, length: 5 },
    { region: r2, offset: 8000, length: 6 },
  ]);
  assert.equal(x!.toString(), 'first');
  assert.equal(y!.toString(), 'second');
  // Large reads (pooled reply buffers on the node) and readInto a caller's buffer.
  const big = await a.bind(3 * 2 ** 20, { medium: 'dram' });
  const pattern = randomBytes(big.size);
  await a.write(big, 0, pattern);
  assert.ok((await a.read(big, 4096, 2 ** 20 + 7)).equals(pattern.subarray(4096, 4096 + 2 ** 20 + 7)));
  const into = Buffer.alloc(2 ** 20);
  for (const offset of [0, 12345, 2 * 2 ** 20]) {
    assert.equal(await a.readInto(big, offset, into), into.length);
    assert.ok(into.equals(pattern.subarray(offset, offset + into.length)), `readInto at ${offset}`);
  }
  const several = await Promise.all([0, 1, 2].map((k) => a.read(big, k * 2 ** 20, 2 ** 20)));
  several.forEach((chunk, k) => assert.ok(chunk.equals(pattern.subarray(k * 2 ** 20, (k + 1) * 2 ** 20)), `concurrent 1 MiB read ${k}`));
  await assert.rejects(a.read(r1, 8190, 4), { code: 'MS_RMEM_RANGE' });
  await assert.rejects(a.writev([{ region: r1, offset: 0, data: Buffer.from('a') }, { region: r2, offset: 8192, data: Buffer.from('b') }]), { code: 'MS_RMEM_RANGE' });
  assert.equal((await a.read(r1, 0, 1))[0], 0, 'a refused WRITEV wrote nothing');
  await assert.rejects(a.bind(0, { medium: 'dram' }), { code: 'MS_RMEM_INVALID' });
  await assert.rejects(a.read(r1, 0, 17 * 1024 * 1024), { code: 'MS_RMEM_TOO_BIG' });
});

test('capacity: exhaustion returns lack of capacity, and the tables show nothing leaked', async (t) => {
  const n = await node(t, ['--set', 'partition.dram.server.max=24MiB', '--set', 'partition.dram.cache.min=32MiB']);
  const a = await client(t, n, 'srv-a');
  const before = (await a.capacity()).find((c) => c.medium === 'dram')!;
  assert.equal(before.partition, 16 * 2 ** 20);
  assert.equal(before.growable, 8 * 2 ** 20, 'may grow to its 24MiB maximum');
  const regions: Region[] = [];
  for (;;) {
    try {
      regions.push(await a.bind(2 ** 20, { medium: 'dram' }));
    } catch (error) {
      assert.equal((error as { code?: string }).code, 'MS_RMEM_NO_CAPACITY');
      break;
    }
  }
  assert.equal(regions.length, 24);
  const full = (await servers(n)).allocation;
  assert.equal(full.rows.length, 24);
  for (const r of regions) await a.free(r);
  const after = await servers(n);
  assert.deepEqual(after.allocation.rows, []);
  const partition = (await (await fetch(`${n.url}/v1/tables/partition`)).json()) as PartitionTableJson;
  assert.deepEqual(partition.rows.filter((r) => r.kind === 'server' && r.owner !== null), [], 'no server extent still owned');
  const dram = (await a.capacity()).find((c) => c.medium === 'dram')!;
  assert.equal(dram.used, 0);
  assert.equal(dram.available + dram.growable, 24 * 2 ** 20);
});

test('a bind that outgrows free memory takes extents from the storage cache, which gives them back', async (t) => {
  const n = await node(t);
  const a = await client(t, n, 'big');
  // dram: 64MiB = cache 32 + server 16 + nvram 4 + free 12; 40MiB needs 12 free + 12 from the cache.
  const region = await a.bind(40 * 2 ** 20, { medium: 'dram' });
  assert.equal(region.size, 40 * 2 ** 20);
  const info = (await (await fetch(`${n.url}/v1/node`)).json()) as { cache: { slots: { dram: number } }; usage: { medium: string; kinds: { cache: { bytes: number } } }[] };
  assert.equal(info.usage.find((u) => u.medium === 'dram')?.kinds.cache.bytes, 20 * 2 ** 20);
  assert.equal(info.cache.slots.dram, 320, 'the cache holds 20MiB of 64KiB lines');
  assert.ok(n.logs.some((l) => l.msg === 'cache gave extents back to the partition table'));
});

test('leases: a killed client loses its regions after the lease; a reconnect within it keeps them', async (t) => {
  // 2 s: long enough for the reconnect below (a close, the admin API polled, a new
  // connection) on a loaded machine, short enough to wait out for the killed client.
  const n = await node(t, ['--rmem-lease', '2s']);

  // A client process that binds, writes, and is then killed.
  const script = `
    const { RmemClient } = await import(${JSON.stringify(new URL('../../src/client/rmem-client.js', import.meta.url).href)});
    const c = await RmemClient.connect({ host: '127.0.0.1', port: ${n.rmem.port}, serverId: 'doomed' });
    const r = await c.bind(3 * 2 ** 20, { class: 'capacity' });
    await c.write(r, 0, Buffer.alloc(4096, 9));
    console.log('bound');
    setInterval(() => {}, 1000);`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.after(() => child.kill('SIGKILL'));
  await new Promise<void>((resolve) => child.stdout.once('data', () => resolve()));
  assert.equal((await servers(n)).allocation.rows.length > 0, true);
  child.kill('SIGKILL');
  await until('the killed server to be removed', async () => ((await servers(n)).sessions.length === 0 && (await servers(n)).allocation.rows.length === 0 ? true : undefined));
  // The log line travels through the node's stdout pipe: it may arrive after the tables change.
  await until('the lease expiry to be logged', () => Promise.resolve(n.logs.some((l) => l.msg === 'rmem lease expired; regions freed and zeroed' && l.server === 'doomed') ? true : undefined));

  // Within the lease: a new connection with the same server id and the session's secret resumes the session.
  const first = await RmemClient.connect({ ...n.rmem, serverId: 'srv-a', reconnect: false });
  const region = await first.bind(8192, { medium: 'dram' });
  await first.write(region, 0, Buffer.from('kept across reconnect'));
  await first.close();
  await until('the node to see the connection closed', async () => ((await servers(n)).sessions[0]?.state === 'disconnected' ? true : undefined));
  const second = await client(t, n, 'srv-a', { sessionSecret: first.session.secret });
  assert.equal(second.session.resumed, true);
  assert.equal((await second.read(region, 0, 21)).toString(), 'kept across reconnect');
});

test('sessions are named by more than their id: resuming or taking one over needs its secret, and a refusal leaves it untouched', async (t) => {
  const n = await node(t, ['--rmem-lease', '5s']);
  // No reconnecting by itself: the takeover below would otherwise be taken back.
  const owner = await client(t, n, 'tenant-a', { reconnect: false });
  const region = await owner.bind(8192, { medium: 'dram' });
  await owner.write(region, 0, Buffer.from('mine'));
  // Another tenant who knows the id (and the shared way in) but not the secret.
  await assert.rejects(RmemClient.connect({ ...n.rmem, serverId: 'tenant-a', reconnect: false }), { code: 'MS_RMEM_SECRET' }, 'no secret');
  assert.equal(owner.session.secret.length, 32);
  const guess = Buffer.from(owner.session.secret);
  guess[0] = (guess[0] ?? 0) ^ 1;
  await assert.rejects(RmemClient.connect({ ...n.rmem, serverId: 'tenant-a', reconnect: false, sessionSecret: guess }), { code: 'MS_RMEM_SECRET' }, 'a wrong secret');
  // The session was not touched: same connection, same regions.
  assert.equal(owner.connected, true);
  assert.equal((await owner.read(region, 0, 4)).toString(), 'mine');
  assert.equal((await servers(n)).sessions.find((s) => s.serverId === 'tenant-a')?.state, 'connected');
  // Also while it is disconnected within its lease.
  const lost = new Promise<void>((resolve) => owner.once('disconnected', () => resolve()));
  const raw = await rawExchange(n, [codec.encodeHelloRequest({ hi: 0, lo: 1 }, { version: VERSION, serverId: 'tenant-a', token: '' })]);
  assert.deepEqual(raw.map((r) => r.word), [STATUS.SECRET]);
  // Whoever holds the secret takes the session over, regions and all; the older connection is closed.
  const again = await client(t, n, 'tenant-a', { sessionSecret: owner.session.secret, reconnect: false });
  assert.equal(again.session.resumed, true);
  assert.deepEqual(again.session.secret, owner.session.secret);
  assert.equal((await again.read(region, 0, 4)).toString(), 'mine');
  await lost;
  const metrics = await (await fetch(`${n.url}/metrics`)).text();
  assert.match(metrics, /memstrata_rmem_errors_total\{op="HELLO"\} 3/);
});

test('the client presents its secret when it reconnects by itself', async (t) => {
  const n = await node(t, ['--rmem-lease', '5s']);
  const c = await client(t, n, 'srv-s');
  const region = await c.bind(4096, { medium: 'dram' });
  await c.write(region, 0, Buffer.from('ok'));
  const reconnected = new Promise<void>((resolve) => c.once('reconnected', resolve));
  // The node closes the connection when another HELLO with the secret takes the session over;
  // that one then leaves, and the client resumes by itself with the secret it kept.
  const thief = await RmemClient.connect({ ...n.rmem, serverId: 'srv-s', sessionSecret: c.session.secret, reconnect: false, keepalive: false });
  await thief.close();
  await reconnected;
  assert.equal(c.session.resumed, true);
  assert.equal((await c.read(region, 0, 2)).toString(), 'ok');
});

test('the client reconnects by itself after a cut connection and resumes its session', async (t) => {
  const n = await node(t, ['--rmem-lease', '3s']);
  // A proxy between client and node whose connections the test can cut.
  const links = new Set<Socket>();
  const proxy = createServer((downstream) => {
    const upstream = connect(n.rmem.port, n.rmem.host);
    links.add(downstream);
    links.add(upstream);
    downstream.pipe(upstream).pipe(downstream);
    const end = () => {
      downstream.destroy();
      upstream.destroy();
    };
    downstream.on('close', end).on('error', end);
    upstream.on('close', end).on('error', end);
  });
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    for (const s of links) s.destroy();
    return new Promise<void>((resolve) => proxy.close(() => resolve()));
  });
  const port = (proxy.address() as { port: number }).port;
  const c = await RmemClient.connect({ host: '127.0.0.1', port, serverId: 'srv-r', timeoutMs: 5000 });
  t.after(() => c.close());
  const region = await c.bind(4096, { medium: 'dram' });
  await c.write(region, 0, Buffer.from('survives'));
  const disconnected = new Promise<void>((resolve) => c.once('disconnected', () => resolve()));
  const reconnected = new Promise<void>((resolve) => c.once('reconnected', resolve));
  for (const s of links) s.destroy();
  await disconnected;
  // A request issued while the link is down waits for the resumed session.
  const read = c.read(region, 0, 8);
  assert.equal((await read).toString(), 'survives');
  await reconnected;
  assert.equal(c.session.resumed, true);
});

test('keepalives hold a quiet session; without them the node closes it after the lease', async (t) => {
  // 1.5 s: a client sends a keepalive after a third of the lease without a request, so a
  // stall of either process up to about a second still finds the session held.
  const n = await node(t, ['--rmem-lease', '1500ms']);
  const kept = await client(t, n, 'quiet-kept');
  const region = await kept.bind(4096, { medium: 'dram' });
  const dropped = await RmemClient.connect({ ...n.rmem, serverId: 'quiet-dropped', keepalive: false, reconnect: false });
  t.after(() => dropped.close());
  await dropped.bind(4096, { medium: 'dram' });
  const lost = new Promise<void>((resolve) => dropped.once('disconnected', () => resolve()));
  await new Promise((resolve) => setTimeout(resolve, 4500));
  assert.equal(kept.connected, true);
  assert.equal((await kept.read(region, 0, 1)).length, 1);
  assert.equal(dropped.connected, false, 'the silent connection was closed by the node');
  await lost;
  assert.ok(n.logs.some((l) => l.server === 'quiet-dropped' && typeof l.reason === 'string' && l.reason.startsWith('no request or keepalive')));
});

test('a request the node never answers fails with MS_RMEM_TIMEOUT, and the client stays usable', async (t) => {
  // A stand-in node that answers HELLO and then only every other request.
  let count = 0;
  const port = await standIn(t, (socket, f) => {
    if (f.op === OP.HELLO) socket.write(helloReply(f));
    else if (count++ % 2 === 1) socket.write(codec.encodeEmptyReply(f.op, { hi: f.tagHi, lo: f.tagLo }));
  });
  const c = await RmemClient.connect({ host: '127.0.0.1', port, serverId: 's', timeoutMs: 300, keepalive: false });
  t.after(() => c.close());
  await assert.rejects(c.keepalive(), { code: 'MS_RMEM_TIMEOUT' });
  await c.keepalive(); // answered
  assert.equal(c.inFlight, 0);
});

test('an error reply to readInto never lands in the caller\'s buffer, even when its message has the buffer\'s length, split across reads or whole in one', async (t) => {
  // A stand-in node that answers every READ with a VIOLATION whose message is exactly as
  // long as the read, in one write or in two.
  let split = false;
  const port = await standIn(t, (socket, f) => {
    if (f.op === OP.HELLO) {
      socket.write(helloReply(f));
      return;
    }
    const length = codec.decodeReadRequest(f.body).length;
    const reply = codec.encodeErrorReply(f.op, STATUS.VIOLATION, { hi: f.tagHi, lo: f.tagLo }, 'x'.repeat(length));
    if (!split) socket.write(reply);
    else {
      socket.write(reply.subarray(0, 30));
      setTimeout(() => socket.write(reply.subarray(30)), 20);
    }
  });
  const c = await RmemClient.connect({ host: '127.0.0.1', port, serverId: 's', keepalive: false });
  t.after(() => c.close());
  const region: Region = { regionId: 1, key: 2n, size: 1 << 20, ranges: [] };
  for (const length of [100, 4096, 60_000]) {
    for (const apart of [false, true]) {
      split = apart;
      const target = Buffer.alloc(length, 0x5a);
      await assert.rejects(c.readInto(region, 0, target), { code: 'MS_RMEM_VIOLATION' });
      assert.ok(target.every((b) => b === 0x5a), `the ${length}-byte buffer is untouched (${apart ? 'split' : 'whole'})`);
    }
  }
});

test('a resume the node refuses (SECRET) is not retried: the client reports the session lost at once', async (t) => {
  // A stand-in node: the first HELLO opens a session, then the connection drops and every later HELLO is refused.
  const hellos: (Buffer | undefined)[] = [];
  const port = await standIn(t, (socket, f) => {
    if (f.op !== OP.HELLO) return;
    hellos.push(codec.decodeHelloRequest(f.body).secret);
    if (hellos.length === 1) {
      socket.write(helloReply(f, Buffer.alloc(32, 5)));
      setImmediate(() => socket.destroy());
    } else {
      socket.end(codec.encodeErrorReply(OP.HELLO, STATUS.SECRET, { hi: f.tagHi, lo: f.tagLo }, 'not yours'));
    }
  });
  const c = await RmemClient.connect({ host: '127.0.0.1', port, serverId: 's', keepalive: false });
  t.after(() => c.close());
  await new Promise<void>((resolve) => c.once('sessionLost', resolve));
  assert.equal(c.connected, false);
  assert.equal(hellos.length, 2, 'one resume attempt, not retried');
  assert.equal(hellos[0], undefined, 'the first HELLO opens a session');
  assert.deepEqual(hellos[1], Buffer.alloc(32, 5), 'the resume presents the secret the node gave');
  await assert.rejects(c.keepalive(), { code: 'MS_RMEM_DISCONNECTED' });
});

test('a token is required when configured; version and order of HELLO are checked', async (t) => {
  const n = await node(t, [], { MEMSTRATA_RMEM_TOKEN: 's3cret' });
  await assert.rejects(RmemClient.connect({ ...n.rmem, serverId: 'x', reconnect: false }), { code: 'MS_RMEM_AUTH' });
  await assert.rejects(RmemClient.connect({ ...n.rmem, serverId: 'x', token: 'wrong', reconnect: false }), { code: 'MS_RMEM_AUTH' });
  const ok = await client(t, n, 'x', { token: 's3cret' });
  assert.equal((await ok.capacity()).length, 2);

  const replies = await rawExchange(n, [
    codec.encodeEmptyRequest(OP.CAPACITY, { hi: 0, lo: 1 }),
    codec.encodeEmptyRequest(99, { hi: 0, lo: 2 }),
    codec.encodeHelloRequest({ hi: 0, lo: 3 }, { version: 1, serverId: 'y', token: 's3cret' }),
  ]);
  assert.deepEqual(replies.map((r) => [r.tagLo, r.word]), [[1, STATUS.NO_SESSION], [2, STATUS.UNSUPPORTED], [3, STATUS.VERSION]]);
});

test('many clients with mixed binds, reads, writes and frees agree with a model', async (t) => {
  const n = await node(t);
  const clients = await Promise.all(['c0', 'c1', 'c2', 'c3', 'c4', 'c5'].map((id) => client(t, n, id)));
  const op = fc.oneof(
    fc.record({ op: fc.constant('bind' as const), pages: fc.integer({ min: 1, max: 40 }), medium: fc.constantFrom('dram' as const, 'flash' as const) }),
    fc.record({ op: fc.constant('write' as const), pick: fc.nat(), offset: fc.nat({ max: 200_000 }), length: fc.integer({ min: 1, max: 9000 }), seed: fc.nat({ max: 255 }) }),
    fc.record({ op: fc.constant('read' as const), pick: fc.nat(), offset: fc.nat({ max: 200_000 }), length: fc.integer({ min: 1, max: 9000 }) }),
    fc.record({ op: fc.constant('free' as const), pick: fc.nat() }),
  );
  const scripts = fc.sample(fc.array(op, { minLength: 30, maxLength: 60 }), { numRuns: clients.length, seed: 42 });
  await Promise.all(
    clients.map(async (c, k) => {
      const held: { region: Region; model: Buffer }[] = [];
      for (const step of scripts[k]!) {
        if (step.op === 'bind') {
          const region = await c.bind(step.pages * 4096, { medium: step.medium });
          held.push({ region, model: Buffer.alloc(region.size) });
          continue;
        }
        const entry = held[step.pick % Math.max(1, held.length)];
        if (entry === undefined) continue;
        if (step.op === 'free') {
          await c.free(entry.region);
          held.splice(held.indexOf(entry), 1);
          continue;
        }
        const offset = step.offset % entry.region.size;
        const length = Math.min(step.length, entry.region.size - offset);
        if (step.op === 'write') {
          const data = Buffer.alloc(length, step.seed);
          data[0] = k;
          // Several writes in flight on one connection at once.
          await Promise.all([c.write(entry.region, offset, data), c.read(entry.region, 0, 1)]);
          data.copy(entry.model, offset);
        } else {
          const got = await c.read(entry.region, offset, length);
          assert.ok(got.equals(entry.model.subarray(offset, offset + length)), `client ${k} read differs from its model`);
        }
      }
      for (const { region, model } of held) assert.ok((await c.read(region, 0, region.size)).equals(model));
    }),
  );
});

test('the client reads its socket into one buffer it reuses: replies of every size to read, readInto and readv, many in flight, keep their own bytes after later reads', async (t) => {
  const n = await node(t);
  const c = await client(t, n, 'reuse');
  const size = 256 * 1024;
  const region = await c.bind(size, { medium: 'dram' });
  const content = randomBytes(size);
  await c.write(region, 0, content.subarray(0, size / 2));
  await c.write(region, size / 2, content.subarray(size / 2));
  const batch = (seed: number) =>
    fc.sample(fc.record({ how: fc.constantFrom('read', 'readInto', 'readv'), offset: fc.nat({ max: size - 1 }), length: fc.oneof(fc.integer({ min: 1, max: 1024 }), fc.integer({ min: 1025, max: 9000 }), fc.integer({ min: 30_000, max: 70_000 })) }), { numRuns: 300, seed }).map((r) => ({ ...r, length: Math.min(r.length, size - r.offset) }));
  const issue = (reads: ReturnType<typeof batch>) =>
    Promise.all(
      reads.map(async ({ how, offset, length }) => {
        if (how === 'read') return [await c.read(region, offset, length)];
        if (how === 'readv') {
          const half = Math.floor(length / 2);
          return c.readv([{ region, offset, length: half }, { region, offset: offset + half, length: length - half }]);
        }
        const target = Buffer.alloc(length);
        await c.readInto(region, offset, target);
        return [target];
      }),
    );
  const first = batch(1);
  const got = await issue(first);
  await issue(batch(2)); // more reads land in the client's socket buffer meanwhile
  first.forEach(({ how, offset, length }, i) => {
    assert.ok(Buffer.concat(got[i]!).equals(content.subarray(offset, offset + length)), `${how} of ${length} bytes at ${offset} holds other bytes after later reads`);
  });
});

test('fuzz: thousands of random and mutated frames never disturb the node or a well-behaved client', async (t) => {
  const n = await node(t);
  const good = await client(t, n, 'good');
  const region = await good.bind(65536, { medium: 'dram' });
  const pattern = randomBytes(65536);
  await good.write(region, 0, pattern);
  let stop = false;
  let checks = 0;
  const watcher = (async () => {
    while (!stop) {
      const offset = checks % 60000;
      assert.ok((await good.read(region, offset, 4096)).equals(pattern.subarray(offset, offset + 4096)), 'good client saw wrong data');
      checks++;
    }
  })();

  const templates = (i: number): Buffer[] => [
    codec.encodeHelloRequest({ hi: 0, lo: i }, { version: VERSION, serverId: `fuzz-${i % 7}`, token: '' }),
    codec.encodeBindRequest({ hi: 0, lo: i }, { size: (i % 50) * 4096, placement: { kind: 'medium', medium: 'dram' } }),
    codec.encodeReadRequest({ hi: 0, lo: i }, { regionId: region.regionId, key: region.key, offset: i, length: 64 }),
    Buffer.concat([codec.encodeWriteHead({ hi: 0, lo: i }, { regionId: region.regionId, key: region.key, offset: 0 }, 16), Buffer.alloc(16, 1)]),
    codec.encodeReadvRequest({ hi: 0, lo: i }, [{ regionId: i, key: BigInt(i), offset: 0, length: 8 }]),
    codec.encodeFreeRequest({ hi: 0, lo: i }, { regionId: region.regionId, key: region.key }),
    codec.encodeEmptyRequest(OP.CAPACITY, { hi: 0, lo: i }),
  ];
  const rng = fc.sample(fc.tuple(fc.nat(), fc.nat(), fc.uint8Array({ minLength: 1, maxLength: 48 })), { numRuns: 3000, seed: 7 });
  let sent = 0;
  const burst = (conn: number): Buffer[] => {
    const frames: Buffer[] = [];
    // Each connection starts well (HELLO), then gets a burst of valid, mutated and random frames.
    frames.push(templates(conn)[0]!);
    for (let k = 0; k < 50; k++) {
      const [a, b, junk] = rng[conn * 50 + k]!;
      const base = Buffer.from(templates(a)[a % 7]!);
      const kind = b % 4;
      if (kind === 0) frames.push(base);
      else if (kind === 1) {
        const at = 8 + (a % Math.max(1, base.length - 8));
        base[at] = (base[at] ?? 0) ^ (1 + (b % 255)); // flip a byte past the magic
        frames.push(base);
      } else if (kind === 2) frames.push(base.subarray(0, Math.max(20, a % base.length)));
      else frames.push(Buffer.from(junk));
      sent++;
    }
    return frames;
  };
  for (let batch = 0; batch < 6; batch++) {
    await Promise.all(Array.from({ length: 10 }, (_, i) => rawExchange(n, burst(batch * 10 + i), 150)));
  }
  stop = true;
  await watcher;
  assert.ok(sent >= 3000);
  assert.ok(checks > 0);
  assert.equal((await fetch(`${n.url}/healthz`)).status, 200);
  assert.ok((await good.read(region, 0, 65536)).equals(pattern), 'the well-behaved client still reads its data');
  // Servers the fuzzer created are visible and harmless; the good one is still connected.
  assert.ok((await servers(n)).sessions.some((s) => s.serverId === 'good' && s.state === 'connected'));
});

test('CLI: memstrata servers and memstrata rmem capacity', async (t) => {
  const n = await node(t);
  const a = await client(t, n, 'srv-cli');
  await a.bind(2 ** 20, { medium: 'flash' });
  const list = await runCli(['servers', '--admin', n.url]);
  assert.equal(list.code, 0, list.stderr);
  assert.match(list.stdout, /rmem sessions\nSERVER ID +STATE +REMOTE +SINCE +REGIONS FREED IN\nsrv-cli +connected +127\.0\.0\.1:\d+/);
  assert.match(list.stdout, /srv-cli +1 +flash +0x[0-9a-f]{8} to 0x[0-9a-f]{8} +1MiB/);
  const json = JSON.parse((await runCli(['servers', '--admin', n.url, '--json'])).stdout) as ServersJson;
  assert.equal(json.allocation.rows[0]?.serverId, 'srv-cli');

  const capacity = await runCli(['rmem', 'capacity', '--node', `${n.rmem.host}:${n.rmem.port}`]);
  assert.equal(capacity.code, 0, capacity.stderr);
  assert.match(capacity.stdout, /MEDIUM +TOTAL +SERVER PARTITION +AVAILABLE +GROWABLE +USED\ndram +64MiB +16MiB +16MiB +44MiB +0\nflash +128MiB +32MiB +31MiB +88MiB +0/);
  const capJson = JSON.parse((await runCli(['rmem', 'capacity', '--node', `${n.rmem.host}:${n.rmem.port}`, '--json'])).stdout) as { capacity: { medium: string }[] };
  assert.deepEqual(capJson.capacity.map((c) => c.medium), ['dram', 'flash']);
  const metrics = await (await fetch(`${n.url}/metrics`)).text();
  assert.match(metrics, /memstrata_rmem_requests_total\{op="BIND"\} 1/);
  assert.match(metrics, /memstrata_rmem_sessions\{state="connected"\} 1/);
  assert.match(metrics, /memstrata_server_memory_bytes\{medium="flash"\} 1048576/);
  const refused = await runCli(['rmem', 'capacity', '--node', '127.0.0.1:1']);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /^memstrata: MS_RMEM_UNREACHABLE: cannot reach rmem at 127\.0\.0\.1:1/);
});

/** Sends raw frames on a fresh connection and collects the replies until it closes or goes quiet. */
async function rawExchange(n: NodeProcess, frames: Buffer[], quietMs = 300): Promise<{ op: number; word: number; tagLo: number }[]> {
  const socket = connect(n.rmem.port, n.rmem.host);
  const replies: { op: number; word: number; tagLo: number }[] = [];
  const parser = new FrameParser('response', {
    onFrame: (f) => replies.push({ op: f.op, word: f.word, tagLo: f.tagLo }),
    onFatal: () => socket.destroy(),
  });
  socket.on('data', (chunk: Buffer) => parser.feed(chunk));
  socket.on('error', () => undefined);
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  for (const f of frames) socket.write(f);
  await new Promise<void>((resolve) => {
    let timer = setTimeout(done, quietMs);
    function done() {
      socket.destroy();
      resolve();
    }
    socket.on('data', () => {
      clearTimeout(timer);
      timer = setTimeout(done, quietMs);
    });
    socket.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
  });
  return replies;
}
