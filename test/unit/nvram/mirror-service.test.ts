// The mirror service in this process, driven by raw mirror connections over loopback:
// what its limits do at shutdown, before HELLO, and against peers that stall.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import { PartitionTable } from '../../../src/memory/partition-table.js';
import { DeviceManager } from '../../../src/nvram/device-manager.js';
import { MirrorService, type MirrorServiceOptions } from '../../../src/nvram/mirror-service.js';
import { countingPoll } from '../../support/counting-poll.js';
import * as m from '../../../src/protocol/mirror/codec.js';
import { FrameParser, type Frame } from '../../../src/protocol/rmem/parser.js';
import { encodeRecord } from '../../../src/protocol/journal/record.js';

const MiB = 1024 * 1024;
const log = pino({ level: 'silent' });

/** A device manager whose RESET never finishes (a request stuck in storage), unless `stuck` is false. */
class StuckResets extends DeviceManager {
  resets = 0;
  stuck = true;
  override resetReplica(...args: Parameters<DeviceManager['resetReplica']>): Promise<void> {
    this.resets++;
    if (!this.stuck) return super.resetReplica(...args);
    return new Promise<void>(() => undefined);
  }
}

/** DRAM whose writes copy their source only after a random pause: a source reused before its write settled shows in what the device holds. */
class SlowDram extends DramMedium {
  override async write(offset: number, source: Uint8Array): Promise<void> {
    await new Promise((resolve) => setTimeout(resolve, Math.floor(Math.random() * 3)));
    return super.write(offset, source);
  }
}

async function service(t: { after(fn: () => Promise<void>): void }, options: Partial<MirrorServiceOptions> = {}, kinds: { stuck?: boolean; Medium?: typeof DramMedium } = {}) {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-mirrorsvc-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const medium = new (kinds.Medium ?? DramMedium)({ capacity: 16 * MiB, extentSize: MiB });
  await medium.open();
  const partition = new PartitionTable([
    { name: 'dram', capacity: 16 * MiB, extentSize: MiB, initial: { cache: 0, server: 0, nvram: 8 * MiB }, bounds: { cache: { min: 0, max: 16 * MiB }, server: { min: 0, max: 0 }, nvram: { min: 0, max: 16 * MiB } } },
  ]);
  const nvram = new StuckResets({ dataDir: dir, partition, media: [medium], log });
  nvram.stuck = kinds.stuck ?? true;
  await nvram.open();
  const mirror = new MirrorService({
    nvram,
    nodeId: 'unit',
    token: undefined,
    log,
    maxInFlight: 64,
    maxInFlightBytes: 64 * MiB,
    maxInFlightBytesTotal: 128 * MiB,
    maxConnections: 64,
    maxConnectionsPerClient: 64,
    handshakeTimeoutMs: 5000,
    stallTimeoutMs: 30_000,
    ...options,
  });
  const address = await mirror.listen({ host: '127.0.0.1', port: 0 });
  t.after(() => mirror.close());
  return { mirror, nvram, address };
}

interface Peer {
  socket: Socket;
  closed(): boolean;
  /** Sends a request and waits for its reply; undefined if the connection closes first. */
  ask(op: number, tag: number, body: Buffer): Promise<Frame | undefined>;
  /** Waits for the reply tagged `tag`; undefined if the connection closes first. */
  reply(tag: number): Promise<Frame | undefined>;
}

let peers = 0;

async function peer(t: { after(fn: () => void): void }, address: { host: string; port: number }, hello = true, nodeId = `peer${++peers}`): Promise<Peer> {
  const socket = connect(address.port, address.host);
  socket.on('error', () => undefined);
  t.after(() => socket.destroy());
  const replies = new Map<number, Frame>();
  let closed = false;
  let wake: () => void = () => undefined;
  const parser = new FrameParser({ magic: m.MIRROR_RESPONSE_MAGIC }, {
    onFrame: (f) => {
      replies.set(f.tagLo, { ...f, body: Buffer.from(f.body) });
      wake();
    },
    onFatal: () => socket.destroy(),
  });
  socket.on('data', (chunk: Buffer) => parser.feed(chunk));
  socket.on('close', () => {
    closed = true;
    wake();
  });
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  const reply = async (tag: number): Promise<Frame | undefined> => {
    for (;;) {
      const found = replies.get(tag);
      if (found !== undefined || closed) return found;
      await new Promise<void>((resolve) => (wake = resolve));
    }
  };
  const ask = (op: number, tag: number, body: Buffer): Promise<Frame | undefined> => {
    socket.write(m.request(op, tag, body));
    return reply(tag);
  };
  if (hello) assert.equal((await within(ask(m.MOP.HELLO, 1, m.encodeHello({ version: m.MIRROR_VERSION, nodeId, token: '' })), 20_000, 'HELLO'))?.word, m.MSTATUS.OK);
  return { socket, closed: () => closed, ask, reply };
}

async function until(probe: () => boolean): Promise<void> {
  for (let i = 0; i < 4000; i++) {
    if (probe()) return;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  throw new Error('condition not reached');
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

test('shutdown: a request stuck in storage is cut at the drain deadline, and close() finishes', async (t) => {
  const { mirror, nvram, address } = await service(t, { drainDeadlineMs: 100 });
  const p = await peer(t, address);
  const reset = { name: 'rep', policy: 'mirrored', medium: 'dram', size: MiB, epoch: 1, trimmedTo: 0, firstSeq: 1 } as const;
  const answer = p.ask(m.MOP.RESET, 2, m.encodeReset(reset));
  await until(() => nvram.resets === 1);
  await within(mirror.close(), 20_000, 'mirror.close() with a RESET stuck in storage');
  assert.equal(await answer, undefined, 'the connection was cut before the stuck RESET was answered');
  await until(() => mirror.load().connections === 0);
});

test('before HELLO a frame is priced for an error reply at most: unadmitted FETCH headers hold a few KiB each', async (t) => {
  const { mirror, address } = await service(t);
  const squatters = await Promise.all(Array.from({ length: 10 }, () => peer(t, address, false)));
  for (const s of squatters) {
    const header = Buffer.alloc(m.MIRROR_HEADER);
    header.writeUInt32BE(m.MIRROR_REQUEST_MAGIC, 0);
    header.writeUInt16BE(m.MOP.FETCH, 4);
    header.writeUInt32BE(9, 12);
    header.writeUInt32BE(4096, 16);
    s.socket.write(header); // the body never follows
  }
  const each = 4096 + m.MIRROR_HANDSHAKE_REPLY_SIZE;
  await until(() => mirror.load().bytesInFlight === 10 * each);
  assert.ok(each < 12 * 1024, `${each} bytes for an unadmitted frame`);
  // The partner is served meanwhile.
  const partner = await peer(t, address);
  assert.equal((await partner.ask(m.MOP.STATE, 2, m.encodeName('rep')))?.word, m.MSTATUS.OK);
});

test('a request sent behind HELLO, before its reply, was priced before HELLO and is refused, not served', async (t) => {
  const { address } = await service(t);
  const p = await peer(t, address, false);
  p.socket.write(Buffer.concat([
    m.request(m.MOP.HELLO, 1, m.encodeHello({ version: m.MIRROR_VERSION, nodeId: 'eager', token: '' })),
    m.request(m.MOP.FETCH, 2, m.encodeFetch('j', 1, 8 * MiB)),
  ]));
  const answer = await p.ask(m.MOP.STATE, 3, m.encodeName('j'));
  assert.equal(answer, undefined, 'the connection ends after the refusal');
  await until(() => p.closed());
});

test('while one peer holds the whole service budget, another peer\'s requests one at a time are served from the idle reserve', async (t) => {
  const { mirror, nvram, address } = await service(t, { maxInFlightBytes: 16 * 1024, maxInFlightBytesTotal: 16 * 1024 });
  const hog = await peer(t, address);
  const reset = { name: 'rep', policy: 'mirrored', medium: 'dram', size: MiB, epoch: 1, trimmedTo: 0, firstSeq: 1 } as const;
  // RESETs stuck in storage: the first is being applied, the next ones wait in the chain, holding their budget.
  for (let i = 0; i < 4; i++) hog.socket.write(m.request(m.MOP.RESET, 10 + i, m.encodeReset(reset)));
  await until(() => nvram.resets === 1 && mirror.load().paused >= 1);
  const partner = await peer(t, address);
  assert.equal((await within(partner.ask(m.MOP.STATE, 2, m.encodeName('rep')), 20_000, 'STATE while the budget is full'))?.word, m.MSTATUS.OK);
});

test('after HELLO, a peer that begins a frame and sends no more of it is closed at the stall timeout, and its reservation comes back; an idle peer is left alone', async (t) => {
  const { mirror, address } = await service(t, { stallTimeoutMs: 100 });
  const idle = await peer(t, address);
  const stuck = await peer(t, address);
  const header = Buffer.alloc(m.MIRROR_HEADER);
  header.writeUInt32BE(m.MIRROR_REQUEST_MAGIC, 0);
  header.writeUInt16BE(m.MOP.FETCH, 4);
  header.writeUInt32BE(9, 12);
  header.writeUInt32BE(4096, 16);
  stuck.socket.write(Buffer.concat([header, Buffer.alloc(100)])); // the rest of the body never follows
  await until(() => mirror.load().bytesInFlight > 0);
  await until(() => stuck.closed());
  await until(() => mirror.load().bytesInFlight === 0);
  assert.equal(mirror.load().stalled, 1);
  // Several stall periods later, the idle peer (nothing begun, nothing unread) is still served.
  await new Promise((resolve) => setTimeout(resolve, 400));
  assert.equal(idle.closed(), false);
  assert.equal((await idle.ask(m.MOP.STATE, 2, m.encodeName('j')))?.word, m.MSTATUS.OK);
});

test('after HELLO, a peer the node stopped reading (its one request stuck in storage) is not cut as stalled, though the frame it began is half read', async (t) => {
  // Time the node spends not reading does not count: the rest of the frame may sit in
  // the node's own read-on buffer, unparsed, while the connection is paused.
  const { mirror, nvram, address } = await service(t, { stallTimeoutMs: 100, maxInFlight: 1 });
  const p = await peer(t, address);
  const reset = m.request(m.MOP.RESET, 2, m.encodeReset({ name: 'rep', policy: 'mirrored', medium: 'dram', size: MiB, epoch: 1, trimmedTo: 0, firstSeq: 1 }));
  const state = m.request(m.MOP.STATE, 3, m.encodeName('rep'));
  p.socket.write(Buffer.concat([reset, state.subarray(0, 10)])); // the RESET sticks; 10 bytes of the next header
  await until(() => nvram.resets === 1);
  await new Promise((resolve) => setTimeout(resolve, 20));
  p.socket.write(state.subarray(10)); // the rest, at once
  await new Promise((resolve) => setTimeout(resolve, 600));
  assert.equal(p.closed(), false);
  assert.equal(mirror.load().stalled, 0);
});

test('after HELLO, a peer that does not read its replies is closed at the stall timeout, and what its requests held comes back', async (t) => {
  const { mirror, nvram, address } = await service(t, { stallTimeoutMs: 100 });
  await nvram.create('j', 6 * MiB, 'volatile');
  const device = nvram.get('j');
  await device.open(1);
  for (let i = 0; i < 4; i++) await device.append(1, [{ payload: Buffer.alloc(MiB - 1024, i), target: undefined }]);
  const nonreader = await peer(t, address);
  nonreader.socket.removeAllListeners('data');
  nonreader.socket.pause();
  const frames: Buffer[] = [];
  for (let i = 0; i < 16; i++) frames.push(m.request(m.MOP.FETCH, 10 + i, m.encodeFetch('j', 1, 8 * MiB)));
  nonreader.socket.write(Buffer.concat(frames));
  await until(() => mirror.load().bytesInFlight > 0);
  await until(() => mirror.load().stalled === 1);
  await until(() => mirror.load().bytesInFlight === 0 && mirror.load().connections === 0);
});

test('one remote address holds at most mirror.maxConnectionsPerClient connections; one more is closed on arrival', async (t) => {
  const { mirror, address } = await service(t, { maxConnectionsPerClient: 2 });
  const a = await peer(t, address);
  await peer(t, address);
  const third = await peer(t, address, false);
  await until(() => third.closed());
  assert.equal(mirror.load().refusedPerClient, 1);
  a.socket.destroy();
  await until(() => mirror.load().connections === 1);
  await peer(t, address);
});

test('a device name that is a path is refused on every mirror request that names a device, before it reaches the device manager', async (t) => {
  // Issue 11 item 10: RESET's name was not validated, so `../volumes/x` made files outside nvram/.
  const { nvram, address } = await service(t);
  const p = await peer(t, address);
  const bad = ['../volumes/x', '..', 'a/b', '/etc/passwd', '.hidden', ''];
  let tag = 10;
  for (const name of bad) {
    const bodies: [number, Buffer][] = [
      [m.MOP.RESET, m.encodeReset({ name, policy: 'mirrored', medium: 'dram', size: MiB, epoch: 1, trimmedTo: 0, firstSeq: 1 })],
      [m.MOP.APPEND, m.encodeAppend(name, 1, Buffer.alloc(0))],
      [m.MOP.TRIM, m.encodeTrim(name, 1, 1)],
      [m.MOP.EPOCH, m.encodeEpoch(name, 1)],
      [m.MOP.STATE, m.encodeName(name)],
      [m.MOP.DROP, m.encodeName(name)],
      [m.MOP.FETCH, m.encodeFetch(name, 0, 1024)],
    ];
    for (const [op, body] of bodies) {
      const reply = await within(p.ask(op, tag++, body), 20_000, `op ${op} ${name}`);
      assert.equal(reply?.word, m.MSTATUS.PROTOCOL, `op ${op} with name ${JSON.stringify(name)}`);
      assert.match(m.errorMessage(reply?.body ?? Buffer.alloc(0)), /invalid device name/);
    }
  }
  assert.equal(nvram.resets, 0, 'no RESET reached the device manager');
  assert.ok(!p.closed(), 'a malformed body is answered; the connection goes on');
});

test('a HELLO from a node id closes that node\'s older connections, so what a partition left half open cannot fill its share for good; other nodes\' connections stay', async (t) => {
  // Review finding: four dead connections of the partner filled mirror.maxConnectionsPerClient for good.
  const { address } = await service(t, { maxConnectionsPerClient: 4 });
  const ghosts = await Promise.all([1, 2, 3].map(() => peer(t, address, true, 'partner')));
  const other = await peer(t, address, true, 'other');
  const fresh = await peer(t, address, true, 'partner');
  await until(() => ghosts.every((g) => g.closed()));
  assert.ok(!other.closed() && !fresh.closed());
  assert.equal((await within(fresh.ask(m.MOP.STATE, 50, m.encodeName('none')), 20_000, 'STATE'))?.word, m.MSTATUS.OK);
});

/**
 * A real device of 8 records of about 1 MiB behind a mirror service with `options`, and a
 * peer that says HELLO, asks for two 8 MiB FETCHes and reads at `rate` bytes a second.
 * Resolves with how many replies arrived whole once it is cut or all three came.
 */
async function slowReader(t: { after(fn: () => Promise<void> | void): void }, options: Partial<MirrorServiceOptions>, rate: number): Promise<{ replies: number; mirror: MirrorService }> {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-mirrorsvc-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const medium = new DramMedium({ capacity: 16 * MiB, extentSize: MiB });
  await medium.open();
  const partition = new PartitionTable([
    { name: 'dram', capacity: 16 * MiB, extentSize: MiB, initial: { cache: 0, server: 0, nvram: 12 * MiB }, bounds: { cache: { min: 0, max: 16 * MiB }, server: { min: 0, max: 0 }, nvram: { min: 0, max: 16 * MiB } } },
  ]);
  const nvram = new DeviceManager({ dataDir: dir, partition, media: [medium], log });
  await nvram.open();
  t.after(() => nvram.close());
  await nvram.create('j', 10 * MiB, 'volatile');
  const device = nvram.get('j');
  for (let i = 0; i < 8; i++) await device.append(0, [{ payload: Buffer.alloc(MiB - 1024, i) }]);
  const mirror = new MirrorService({ nvram, nodeId: 'unit', token: undefined, log, maxInFlight: 64, maxInFlightBytes: 64 * MiB, maxInFlightBytesTotal: 128 * MiB, maxConnections: 16, maxConnectionsPerClient: 4, handshakeTimeoutMs: 5000, stallTimeoutMs: 500, ...options });
  const address = await mirror.listen({ host: '127.0.0.1', port: 0 });
  t.after(() => mirror.close());
  const socket = connect(address.port, address.host);
  socket.on('error', () => undefined);
  t.after(() => { socket.destroy(); });
  let replies = 0;
  let received = 0;
  let allowed = 64 * 1024;
  const parser = new FrameParser({ magic: m.MIRROR_RESPONSE_MAGIC }, { onFrame: () => { replies++; }, onFatal: () => socket.destroy() }, m.MIRROR_MAX_BODY);
  socket.on('data', (chunk: Buffer) => {
    received += chunk.length;
    parser.feed(chunk);
    if (received >= allowed) socket.pause();
  });
  const tick = setInterval(() => {
    allowed += rate / 50;
    if (received < allowed && socket.isPaused()) socket.resume();
  }, 20);
  t.after(() => clearInterval(tick));
  await new Promise((resolve) => socket.once('connect', resolve));
  socket.write(m.request(m.MOP.HELLO, 1, m.encodeHello({ version: m.MIRROR_VERSION, nodeId: 'slow', token: '' })));
  await until(() => replies === 1);
  for (let i = 0; i < 2; i++) socket.write(m.request(m.MOP.FETCH, 10 + i, m.encodeFetch('j', 1, 8 * MiB)));
  await until(() => replies === 3 || socket.destroyed || mirror.load().stalled > 0);
  return { replies, mirror };
}

test('replies that drain slowly are being read: a peer reading two 8 MiB replies at a steady 4 MiB/s is not cut at a 500 ms stall timeout', async (t) => {
  // Review finding: only a whole reply reaching the kernel counted as progress.
  const { replies, mirror } = await slowReader(t, { stallTimeoutMs: 500 }, 4 * MiB);
  assert.equal(replies, 3, 'HELLO and both FETCH replies arrived whole');
  assert.equal(mirror.load().stalled, 0);
});

test('a peer that reads replies, but slower than the minimum rate, is cut once a reply has taken longer than the grace and its size at that rate', async (t) => {
  // Review finding: one piece per stall timeout kept a reply's budget for hours; replies have a minimum rate, as bodies do.
  const { replies, mirror } = await slowReader(t, { stallTimeoutMs: 1000, minRate: 4 * MiB }, 512 * 1024);
  assert.equal(mirror.load().stalled, 1, 'cut as a slow reader');
  assert.ok(replies < 3, 'before the replies were read whole');
});

test('a peer that trickles a body, a byte now and then inside the stall timeout, is closed once the body falls behind MIN_RATE after the grace', async (t) => {
  // Review finding: one byte per stall period kept a large reservation for ever.
  const { mirror, address } = await service(t, { stallTimeoutMs: 100 });
  const trickler = await peer(t, address);
  const header = Buffer.alloc(m.MIRROR_HEADER);
  header.writeUInt32BE(m.MIRROR_REQUEST_MAGIC, 0);
  header.writeUInt16BE(m.MOP.FETCH, 4);
  header.writeUInt32BE(9, 12);
  header.writeUInt32BE(64 * 1024, 16);
  trickler.socket.write(header);
  const drip = setInterval(() => trickler.socket.write(Buffer.alloc(1)), 40);
  t.after(() => clearInterval(drip));
  const started = performance.now();
  await until(() => trickler.closed());
  clearInterval(drip);
  const took = performance.now() - started;
  assert.equal(mirror.load().stalled, 1);
  await until(() => mirror.load().bytesInFlight === 0);
  // 100 ms of grace and the body plus its error reply at 256 KiB/s: about 0.4 s; never the 1.6 hours a byte per 40 ms would take.
  assert.ok(took < 10_000, `closed after ${Math.round(took)} ms`);
});

test('pipelined APPENDs of random records, their bytes cut at random places, reach the replica as sent: a pooled body is used again only once its records are placed', async (t) => {
  const { mirror, nvram, address } = await service(t, {}, { stuck: false, Medium: SlowDram });
  const p = await peer(t, address);
  const reset = m.encodeReset({ name: 'r', policy: 'mirrored', medium: 'dram', size: 4 * MiB, epoch: 1, trimmedTo: 0, firstSeq: 1 });
  assert.equal((await within(p.ask(m.MOP.RESET, 2, reset), 20_000, 'RESET'))?.word, m.MSTATUS.OK);
  const sent: Buffer[] = [];
  const frames: Buffer[] = [];
  for (let i = 0; i < 120; i++) {
    const records: Buffer[] = [];
    for (let k = 0; k <= i % 3; k++) {
      const seq = sent.length + 1;
      const record = encodeRecord({ seq, timestamp: seq, epoch: 1, flags: 0, target: undefined, payload: randomBytes(1000 + Math.floor(Math.random() * 12_000)) });
      records.push(record);
      sent.push(record);
    }
    frames.push(m.request(m.MOP.APPEND, 100 + i, m.encodeAppend('r', 1, Buffer.concat(records))));
  }
  // One stream cut at random places: bodies whole in a read and bodies spanning reads,
  // many parsed while the slow medium still copies those before them.
  const stream = Buffer.concat(frames);
  for (let at = 0; at < stream.length; ) {
    const n = 1 + Math.floor(Math.random() * 30_000);
    p.socket.write(stream.subarray(at, at + n));
    at += n;
  }
  for (let i = 0; i < frames.length; i++) assert.equal((await within(p.reply(100 + i), 20_000, `APPEND ${i}`))?.word, m.MSTATUS.OK, `APPEND ${i}`);
  const held = await nvram.get('r').collect(1, sent.length, 64 * MiB);
  assert.equal(held.length, sent.length);
  for (const [i, record] of sent.entries()) assert.ok(held[i]?.equals(record), `record ${i + 1} differs from what was sent`);
  // The pool was used: bodies from 4 KiB up came back to it.
  assert.ok(mirror.bodyBuffers.retained > 0);
});

test('with busy polling, each request a partner sends pokes the poll twice: its input, and its reply once written', async (t) => {
  const poll = countingPoll(t);
  const { address } = await service(t, { busyPoll: poll }, { stuck: false });
  const partner = await peer(t, address);
  const before = poll.pokes;
  for (let i = 0; i < 5; i++) assert.ok((await within(partner.ask(m.MOP.STATE, 10 + i, m.encodeName('none')), 20_000, 'STATE')) !== undefined);
  assert.ok(poll.pokes - before >= 10, `${poll.pokes - before} pokes for 5 requests one at a time`);
});
