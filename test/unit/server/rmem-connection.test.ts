// The rmem service in this process, over a medium whose reads the test holds or fails,
// driven by RmemClient over loopback: what the connection does with buffers and budget
// when pieces of one request finish at different times.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect } from 'node:net';
import pino from 'pino';
import { RmemClient } from '../../../src/client/rmem-client.js';
import { StorageError } from '../../../src/errors.js';
import type { MediumName } from '../../../src/kinds.js';
import { AllocationTable } from '../../../src/memory/allocation-table.js';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import { PartitionTable } from '../../../src/memory/partition-table.js';
import { ServerMemory } from '../../../src/memory/server-memory.js';
import { DeviceManager } from '../../../src/nvram/device-manager.js';
import { IDLE_RESERVE, RmemService } from '../../../src/server/rmem-service.js';
import * as codec from '../../../src/protocol/rmem/codec.js';
import { FrameParser, type Frame } from '../../../src/protocol/rmem/parser.js';
import { OP, STATUS, VERSION } from '../../../src/protocol/rmem/spec.js';
import { countingPoll } from '../../support/counting-poll.js';
import type { BusyPoll } from '../../../src/net/busy-poll.js';

const E = 1024 * 1024;
const log = pino({ level: process.env.TEST_LOG ?? 'silent' });

/** DRAM whose reads at chosen addresses fail at once, or wait until the test lets them go. */
class ScriptedMedium extends DramMedium {
  override readonly name: MediumName = 'dram';
  readonly failAt = new Set<number>();
  readonly holdAt = new Map<number, { target: Uint8Array; go: (fill: number) => void }>();
  readonly holding = new Set<number>();
  /** While set, zeroing waits until the test lets it go (heldZeroes). */
  holdZeroes = false;
  readonly heldZeroes: (() => void)[] = [];

  override async zero(offset: number, length: number): Promise<void> {
    if (this.holdZeroes) await new Promise<void>((resolve) => this.heldZeroes.push(resolve));
    return super.zero(offset, length);
  }

  /** Scripted addresses decline the synchronous path (it cannot wait): the read goes async. */
  override readSync(offset: number, target: Uint8Array): void {
    if (this.failAt.has(offset) || this.holding.has(offset)) throw new StorageError('MS_MEDIUM_IO', `scripted address ${offset}: read it asynchronously`);
    super.readSync(offset, target);
  }

  override async read(offset: number, target: Uint8Array): Promise<void> {
    if (this.failAt.has(offset)) throw new StorageError('MS_MEDIUM_IO', `scripted failure at ${offset}`);
    if (this.holding.has(offset)) {
      // Held: when let go, the read lands in `target` (filled with `fill`), as a slow device would.
      await new Promise<void>((resolve) => {
        this.holdAt.set(offset, {
          target,
          go: (fill) => {
            target.fill(fill);
            resolve();
          },
        });
      });
      return;
    }
    return super.read(offset, target);
  }
}

interface ServiceOptions {
  leaseMs?: number;
  token?: string;
  maxInFlightBytes?: number;
  maxInFlightBytesTotal?: number;
  drainDeadlineMs?: number;
  maxConnectionsPerClient?: number;
  busyPoll?: BusyPoll;
}

async function service(t: { after(fn: () => Promise<void>): void }, leaseOrOptions: number | ServiceOptions = 30_000) {
  const options: ServiceOptions = typeof leaseOrOptions === 'number' ? { leaseMs: leaseOrOptions } : leaseOrOptions;
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-rmemconn-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const medium = new ScriptedMedium({ capacity: 32 * E, extentSize: E });
  await medium.open();
  const partition = new PartitionTable([
    { name: 'dram', capacity: 32 * E, extentSize: E, initial: { cache: 0, server: 16 * E, nvram: 0 }, bounds: { cache: { min: 0, max: 32 * E }, server: { min: 0, max: 32 * E }, nvram: { min: 0, max: 0 } } },
  ]);
  const allocation = new AllocationTable();
  const memory = new ServerMemory({ partition, allocation, media: [medium] });
  const nvram = new DeviceManager({ dataDir: dir, partition, media: [medium], log });
  const rmem = new RmemService({
    memory,
    nvram,
    log,
    nodeId: 'unit',
    leaseMs: options.leaseMs ?? 30_000,
    token: options.token,
    maxInFlight: 64,
    maxInFlightBytes: options.maxInFlightBytes ?? 32 * E,
    maxInFlightBytesTotal: options.maxInFlightBytesTotal ?? 64 * E,
    maxConnections: 64,
    maxConnectionsPerClient: options.maxConnectionsPerClient ?? 64,
    handshakeTimeoutMs: 5000,
    busyPoll: options.busyPoll,
    ...(options.drainDeadlineMs === undefined ? {} : { drainDeadlineMs: options.drainDeadlineMs }),
  });
  const address = await rmem.listen({ host: '127.0.0.1', port: 0 });
  t.after(async () => {
    // Whatever a failed test left held goes on, so the service can drain and close.
    medium.holdZeroes = false;
    for (const go of medium.heldZeroes.splice(0)) go();
    for (const held of medium.holdAt.values()) held.go(0);
    await rmem.close();
  });
  return { rmem, medium, address, memory, allocation, partition };
}

test('a READV with a failed entry keeps its reply buffer until every entry has stopped writing into it', async (t) => {
  const { medium, address } = await service(t);
  const client = await RmemClient.connect({ ...address, serverId: 'srv', keepalive: false });
  t.after(() => client.close());
  const failing = await client.bind(4096, { medium: 'dram' });
  const slow = await client.bind(64 * 1024, { medium: 'dram' });
  const other = await client.bind(100 * 1024, { medium: 'dram' });
  await client.write(other, 0, Buffer.alloc(other.size, 0x11));
  medium.failAt.add(failing.ranges[0]!.start);
  medium.holding.add(slow.ranges[0]!.start);
  medium.holding.add(other.ranges[0]!.start);

  // The slow entry is still reading into the reply buffer when its sibling fails.
  const readv = client.readv([
    { region: failing, offset: 0, length: 4096 },
    { region: slow, offset: 0, length: 64 * 1024 },
  ]);
  const failed = readv.then(
    () => assert.fail('the READV should fail'),
    (error: unknown) => (error as { code?: string }).code,
  );
  await until(() => medium.holdAt.has(slow.ranges[0]!.start));
  // A READ of the same size class, served while the READV's slow entry still writes.
  const read = client.read(other, 0, other.size);
  await until(() => medium.holdAt.has(other.ranges[0]!.start));
  // Both land in the same tick: a buffer shared between them would carry the slow entry's bytes.
  medium.holdAt.get(other.ranges[0]!.start)?.go(0x11);
  medium.holdAt.get(slow.ranges[0]!.start)?.go(0xee);
  const data = await read;
  assert.equal(await failed, 'MS_MEDIUM_IO');
  assert.ok(data.every((b) => b === 0x11), 'the READ carries only its own data');
});

async function until(probe: () => boolean): Promise<void> {
  while (!probe()) await new Promise((resolve) => setImmediate(resolve));
}

test('a BIND still running when its lease expires is undone: nothing of it stays bound', async (t) => {
  const { rmem, medium, address, allocation, partition, memory } = await service(t, 100);
  const client = await RmemClient.connect({ ...address, serverId: 'srv', keepalive: false, reconnect: false });
  medium.holdZeroes = true;
  const bind = client.bind(3 * E, { medium: 'dram' }).catch(() => undefined);
  await until(() => medium.heldZeroes.length > 0);
  // The server goes away while its BIND zeroes the extents it takes.
  await client.close();
  await bind;
  await untilAsync(async () => rmem.sessionsInfo().length === 0);
  medium.holdZeroes = false;
  for (const go of medium.heldZeroes.splice(0)) go();
  // Binds, frees and releases take turns: once another server's FREE is answered, the BIND and the release are over.
  await barrier(address);
  assert.equal(memory.regionCount(), 0);
  assert.deepEqual(allocation.rows(), [], 'no region left in the allocation table');
  assert.deepEqual(partition.rows().filter((r) => r.owner !== null), [], 'no extent left held');
});

test('a new session of the same server id (resumed=false) cannot reach the old session\'s regions, even before they are zeroed', async (t) => {
  const { rmem, medium, address } = await service(t, 100);
  const first = await RmemClient.connect({ ...address, serverId: 'srv', keepalive: false, reconnect: false });
  const region = await first.bind(64 * 1024, { medium: 'dram' });
  await first.write(region, 0, Buffer.from('old session data'));
  // Another server's BIND holds the queue of binds, frees and releases (it zeroes what it takes), so
  // the release at srv's lease expiry has not reached srv's region yet.
  const other = await RmemClient.connect({ ...address, serverId: 'other', reconnect: false });
  t.after(() => other.close());
  medium.holdZeroes = true;
  const otherBind = other.bind(2 * E, { medium: 'dram' });
  await until(() => medium.heldZeroes.length > 0);
  await first.close();
  await untilAsync(async () => rmem.sessionsInfo().every((s) => s.serverId !== 'srv'));
  const second = await RmemClient.connect({ ...address, serverId: 'srv', reconnect: false });
  t.after(() => second.close());
  assert.equal(second.session.resumed, false);
  await assert.rejects(second.read(region, 0, 16), { code: 'MS_RMEM_VIOLATION' }, 'read with the old key');
  await assert.rejects(second.write(region, 0, Buffer.from('x')), { code: 'MS_RMEM_VIOLATION' }, 'write with the old key');
  await assert.rejects(second.free(region), { code: 'MS_RMEM_VIOLATION' }, 'free with the old key');
  medium.holdZeroes = false;
  for (const go of medium.heldZeroes.splice(0)) go();
  await otherBind;
  await barrier(address);
  await assert.rejects(second.read(region, 0, 16), { code: 'MS_RMEM_VIOLATION' }, 'and after the release');
});

/** Resolves once everything queued in server memory before it (binds, frees, releases) is done. */
async function barrier(address: { host: string; port: number }): Promise<void> {
  const probe = await RmemClient.connect({ ...address, serverId: 'barrier', keepalive: false, reconnect: false });
  await assert.rejects(probe.free({ regionId: 999_999, key: 0n, size: 4096, ranges: [] }), { code: 'MS_RMEM_VIOLATION' });
  await probe.close();
}

async function untilAsync(probe: () => Promise<boolean>): Promise<void> {
  for (let i = 0; i < 2000; i++) {
    if (await probe()) return;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  throw new Error('condition not reached');
}

/** A raw rmem connection: frames out as the test writes them, replies collected by tag. */
async function raw(t: { after(fn: () => void): void }, address: { host: string; port: number }) {
  const socket = connect(address.port, address.host);
  socket.on('error', () => undefined);
  t.after(() => socket.destroy());
  const replies = new Map<number, Frame>();
  let closed = false;
  const parser = new FrameParser('response', {
    onFrame: (f) => replies.set(f.tagLo, { ...f, body: Buffer.from(f.body) }),
    onFatal: () => socket.destroy(),
  });
  socket.on('data', (chunk: Buffer) => parser.feed(chunk));
  socket.on('close', () => (closed = true));
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  const reply = async (tag: number): Promise<Frame> => {
    await untilAsync(async () => replies.has(tag) || closed);
    const f = replies.get(tag);
    assert.ok(f !== undefined, `reply ${tag} before the connection closed`);
    return f;
  };
  return {
    socket,
    replies,
    closed: () => closed,
    reply,
    async hello(serverId: string, token = ''): Promise<void> {
      socket.write(codec.encodeHelloRequest({ hi: 0, lo: 1 }, { version: VERSION, serverId, token }));
      assert.equal((await reply(1)).word, STATUS.OK);
    },
    async bind(size: number): Promise<codec.BindReply> {
      socket.write(codec.encodeBindRequest({ hi: 0, lo: 2 }, { size, placement: { kind: 'medium', medium: 'dram' } }));
      const f = await reply(2);
      assert.equal(f.word, STATUS.OK);
      return codec.decodeBindReply(f.body);
    },
  };
}

/** Two READs of 4 MiB less 64 bytes on an 8 MiB region, each held in storage until the test lets it go. */
function hogReads(socket: NodeJS.WritableStream, medium: ScriptedMedium, region: codec.BindReply): void {
  const start = region.ranges[0]!.start;
  medium.holding.add(start);
  medium.holding.add(start + 4 * E);
  const read = (lo: number, offset: number): Buffer => codec.encodeReadRequest({ hi: 0, lo }, { regionId: region.regionId, key: region.key, offset, length: 4 * E - 64 });
  socket.write(Buffer.concat([read(10, 0), read(11, 4 * E)]));
}

/** Resolves with what `promise` resolves with, or fails if it has not settled within `ms` (a hang, not a slow machine). */
async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: still waiting after ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, hang]);
  } finally {
    clearTimeout(timer);
  }
}

test('shutdown: a client that never reads its replies is cut at the drain deadline, and close() finishes', async (t) => {
  const { rmem, address, medium } = await service(t, { drainDeadlineMs: 100 });
  const reader = await RmemClient.connect({ ...address, serverId: 'reader', keepalive: false, reconnect: false });
  const nonreader = await raw(t, address);
  await nonreader.hello('nonreader');
  const region = await nonreader.bind(4 * E);
  nonreader.socket.removeAllListeners('data');
  nonreader.socket.pause();
  const frames: Buffer[] = [];
  for (let i = 0; i < 8; i++) frames.push(codec.encodeReadRequest({ hi: 0, lo: 10 + i }, { ...region, offset: 0, length: 4 * E }));
  nonreader.socket.write(Buffer.concat(frames));
  // Its replies fill the socket buffers: READs stay in flight, their budget held.
  await untilAsync(async () => rmem.load().bytesInFlight >= 16 * E);
  // A request in flight (held in storage) on a client that reads is answered before its connection ends.
  const small = await reader.bind(4096, { medium: 'dram' });
  medium.holding.add(small.ranges[0]!.start);
  const read = reader.read(small, 0, 4096);
  await until(() => medium.holdAt.has(small.ranges[0]!.start));
  const closing = rmem.close();
  medium.holdAt.get(small.ranges[0]!.start)?.go(7);
  await within(closing, 20_000, 'rmem.close() with a client that does not read');
  assert.ok((await read).every((b) => b === 7));
  await untilAsync(async () => rmem.load().connections === 0);
  await reader.close();
});

test('before HELLO a frame is priced for an error reply at most, whatever its op: unadmitted headers hold a few KiB each, and a tenant with the token is served', async (t) => {
  const { rmem, address } = await service(t, { token: 'the-token' });
  // Each declares a 4 KiB body and sends none of it: a JREAD could get 16 MiB, a BIND 1 MiB, in a session.
  const ops = [OP.JREAD, OP.BIND, OP.KEEPALIVE, OP.READV];
  const squatters = await Promise.all(Array.from({ length: 20 }, () => raw(t, address)));
  for (const [i, s] of squatters.entries()) {
    const header = Buffer.alloc(20);
    codec.writeRequestHeader(header, ops[i % ops.length] ?? OP.JREAD, { hi: 0, lo: 1 }, 4096);
    s.socket.write(header);
  }
  const each = 4096 + codec.HANDSHAKE_REPLY_SIZE;
  await untilAsync(async () => rmem.load().bytesInFlight === 20 * each);
  assert.ok(each < 6 * 1024, `${each} bytes for an unadmitted frame`);
  const tenant = await RmemClient.connect({ ...address, serverId: 'tenant', token: 'the-token', keepalive: false, reconnect: false });
  t.after(() => tenant.close());
  const region = await tenant.bind(64 * 1024, { medium: 'dram' });
  await tenant.write(region, 0, Buffer.from('served'));
  assert.equal((await tenant.read(region, 0, 6)).toString(), 'served');
  // A whole frame before HELLO is answered NO_SESSION, and costs no more than its price meanwhile.
  const early = await raw(t, address);
  early.socket.write(codec.encodeHandleRequest(OP.JINFO, { hi: 0, lo: 5 }, 1));
  assert.equal((await early.reply(5)).word, STATUS.NO_SESSION);
});

test('before HELLO a connection has one request in flight: one that pipelines thousands of frames and reads no reply holds about 5 KiB of the budget', async (t) => {
  // Review finding: unadmitted connections could hold maxInFlight error replies each (261 KiB).
  const { rmem, address } = await service(t, { token: 'the-token' });
  const pipeliner = await raw(t, address);
  pipeliner.socket.pause();
  // Enough that the replies fill the socket buffers both ways, so they are held unwritten.
  const frame = codec.encodeHandleRequest(OP.JINFO, { hi: 0, lo: 10 }, 1);
  pipeliner.socket.write(Buffer.concat(Array.from({ length: 300_000 }, () => frame)));
  await untilAsync(async () => rmem.load().paused === 1 && rmem.load().bytesInFlight > 0);
  const held = rmem.load().bytesInFlight;
  assert.ok(held > 0 && held <= 6 * 1024, `an unadmitted connection holds ${held} bytes of the service budget`);
});

test('while one client holds the whole service budget, another client\'s HELLO and modest requests are served from the idle reserve', async (t) => {
  const { rmem, medium, address } = await service(t, { maxInFlightBytes: 8 * E, maxInFlightBytesTotal: 8 * E });
  const other = await RmemClient.connect({ ...address, serverId: 'other', keepalive: false, reconnect: false });
  t.after(() => other.close());
  const small = await other.bind(4096, { medium: 'dram' });
  const hog = await raw(t, address);
  await hog.hello('hog');
  // Two READs held in storage hold all but a few bytes of the 8 MiB the service allows.
  hogReads(hog.socket, medium, await hog.bind(8 * E));
  await untilAsync(async () => rmem.load().bytesInFlight > 8 * E - 1024);
  const late = await within(RmemClient.connect({ ...address, serverId: 'late', keepalive: false, reconnect: false }), 20_000, 'HELLO while the budget is full');
  t.after(() => late.close());
  // A BIND's reply lists at most MAX_RANGES ranges: it is priced within the reserve too.
  assert.ok(codec.maxReplySize(OP.BIND) + 18 <= IDLE_RESERVE);
  const bound = await within(late.bind(4096, { medium: 'dram' }), 20_000, 'BIND while the budget is full');
  await within(late.write(bound, 0, Buffer.alloc(16, 1)), 20_000, 'a new client\'s WRITE while the budget is full');
  await within(other.write(small, 0, Buffer.alloc(4096, 9)), 20_000, 'WRITE while the budget is full');
  assert.ok((await within(other.read(small, 0, 4096), 20_000, 'READ while the budget is full')).every((b) => b === 9));
});

test('a connection whose request waits for the service budget longer than a lease is not treated as lost, and is served once the budget frees', async (t) => {
  const leaseMs = 200;
  const { rmem, medium, address } = await service(t, { leaseMs, maxInFlightBytes: 8 * E, maxInFlightBytesTotal: 8 * E });
  // The hog's two READs are held in storage: the service budget is full, and stays full after the
  // node cuts the hog (it sends nothing more) at its lease.
  const hog = await raw(t, address);
  await hog.hello('hog');
  hogReads(hog.socket, medium, await hog.bind(8 * E));
  await untilAsync(async () => rmem.load().bytesInFlight > 8 * E - 1024);
  // The victim sends no keepalives, so it comes after the hog is set up: its HELLO and BIND
  // go through the idle reserve, and its WRITE follows at once (set up before the hog, it
  // was cut when the hog's setup took longer than a lease on a loaded machine).
  const victim = await RmemClient.connect({ ...address, serverId: 'victim', keepalive: false, reconnect: false });
  t.after(() => victim.close());
  const region = await victim.bind(2 * E, { medium: 'dram' });
  let lost = false;
  victim.on('disconnected', () => (lost = true));
  // 1 MiB is more than the idle reserve: the victim's WRITE waits for the budget.
  const write = victim.write(region, 0, Buffer.alloc(E, 5));
  let settled = false;
  write.then(() => (settled = true), () => (settled = true));
  await untilAsync(async () => rmem.budget.waiters === 1);
  await untilAsync(async () => hog.closed());
  // Several lease checks pass while the victim waits.
  await new Promise((resolve) => setTimeout(resolve, 4 * leaseMs));
  assert.equal(settled, false, 'the WRITE still waits for the budget');
  assert.equal(lost, false, 'the waiting connection was not treated as lost');
  for (const h of medium.holdAt.values()) h.go(0);
  await write;
  assert.ok((await victim.read(region, 0, E)).every((b) => b === 5));
  assert.equal(lost, false);
});

test('one remote address holds at most rmem.maxConnectionsPerClient connections; one more is closed on arrival, before HELLO', async (t) => {
  const { rmem, address } = await service(t, { maxConnectionsPerClient: 2 });
  const first = await RmemClient.connect({ ...address, serverId: 'a', keepalive: false, reconnect: false });
  const second = await raw(t, address);
  const third = await raw(t, address);
  await untilAsync(async () => third.closed());
  assert.equal(rmem.load().refusedPerClient, 1);
  assert.equal(second.closed(), false);
  await first.close();
  await untilAsync(async () => rmem.load().connections === 1);
  const again = await RmemClient.connect({ ...address, serverId: 'b', keepalive: false, reconnect: false });
  await again.close();
});

test('a client that pipelines small READs without end, reading its replies in bursts, makes the node hold little unparsed: reading stops while the parser waits', async (t) => {
  // The parser stops after a frame that had to queue and goes on a microtask later; the
  // flow lets reading go on as soon as its queue empties. Reading must wait for the
  // parser too, or what arrives meanwhile piles up in its backlog without bound.
  const { rmem, address } = await service(t);
  const client = await raw(t, address);
  await client.hello('flood');
  const region = await client.bind(4 * E);
  const frames = Buffer.concat(Array.from({ length: 2048 }, (_, i) => codec.encodeReadRequest({ hi: 1, lo: 100 + i }, { regionId: region.regionId, key: region.key, offset: (i * 4096) % (4 * E - 4096), length: 4096 })));
  let stop = false;
  const writer = (async () => {
    while (!stop && !client.closed()) {
      if (!client.socket.write(frames)) {
        await new Promise<void>((resolve) => {
          client.socket.once('drain', resolve);
          client.socket.once('close', resolve);
        });
      }
    }
  })();
  client.socket.pause();
  let most = 0;
  const end = Date.now() + 3000;
  while (Date.now() < end) {
    await new Promise((resolve) => setTimeout(resolve, 3));
    client.socket.resume();
    await new Promise((resolve) => setImmediate(resolve));
    client.socket.pause();
    most = Math.max(most, rmem.unparsedBytes());
  }
  stop = true;
  assert.equal(client.closed(), false, 'the flood was served, not cut');
  assert.ok(client.replies.size > 1000, `${client.replies.size} replies`);
  client.socket.destroy();
  await writer;
  assert.ok(most < 512 * 1024, `the node held ${most} bytes unparsed`);
});

test('with busy polling, each request pokes the poll twice: its input, and its reply once written', async (t) => {
  const poll = countingPoll(t);
  const { address } = await service(t, { busyPoll: poll });
  const client = await RmemClient.connect({ ...address, serverId: 'polled', keepalive: false });
  t.after(() => client.close());
  const region = await client.bind(4096, { medium: 'dram' });
  const before = poll.pokes;
  for (let i = 0; i < 5; i++) await client.read(region, 0, 4096);
  assert.ok(poll.pokes - before >= 10, `${poll.pokes - before} pokes for 5 requests one at a time`);
});
