// The NBD service in-process against a VolumeIo the test controls (in the style of
// nbdkit's delay filter: every storage call can be held, released in any order, or left
// to fast-check's scheduler), over real loopback sockets. What is checked is what the
// node holds and what the client sees: budgets at every step, replies to everything
// admitted, and the order of the end of a conversation (DISC, EOF, shutdown).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { pino } from 'pino';
import { NbdService, IDLE_RESERVE, ZERO_SLOTS, type NbdLimits } from '../../../src/server/nbd-service.js';
import { BLOCK_STATUS_SPAN, errnoOf } from '../../../src/server/nbd-connection.js';
import { StorageError } from '../../../src/errors.js';
import type { VolumeIo } from '../../../src/storage/volume-io.js';
import { VolumeManager, type Volume } from '../../../src/storage/volume-manager.js';
import type { Extent } from '../../../src/protocol/nbd/codec.js';
import { CMD, ERRNO, OPT, REP } from '../../../src/protocol/nbd/spec.js';
import { RawNbd, optionBytes, requestBytes, type Reply } from '../../support/nbd-raw.js';
import { countingPoll } from '../../support/counting-poll.js';

const GiB = 2 ** 30;
const MiB = 2 ** 20;
const KiB = 1024;
const VOLUME_SIZE = 64 * MiB;

/** What READ returns at `offset`: a pattern, so a reply's bytes show where they came from. */
function pattern(offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (offset + i) % 251;
  return b;
}

type Kind = 'read' | 'write' | 'flush' | 'zero' | 'prefetch' | 'blockStatus';

/** A VolumeIo whose calls the test holds and releases, or hands to fast-check's scheduler. */
class ControlledIo implements VolumeIo {
  hold = false;
  scheduler: fc.Scheduler | undefined = undefined;
  readonly calls: Record<Kind, number> = { read: 0, write: 0, flush: 0, zero: 0, prefetch: 0, blockStatus: 0 };
  readonly held: (() => void)[] = [];
  readonly written = new Map<number, Buffer>();
  /** Ranges asked of zero() and blockStatus(), in call order. */
  readonly zeroed: { offset: number; length: number }[] = [];
  readonly statusAsked: number[] = [];
  /** Runs at every call, before it is held or served (a test's probe). */
  onCall: (kind: Kind) => void = () => undefined;
  inFlight = 0;
  readonly inFlightOf: Record<Kind, number> = { read: 0, write: 0, flush: 0, zero: 0, prefetch: 0, blockStatus: 0 };
  readonly peakOf: Record<Kind, number> = { read: 0, write: 0, flush: 0, zero: 0, prefetch: 0, blockStatus: 0 };

  private call(kind: Kind, run: () => void): Promise<void> {
    this.calls[kind]++;
    this.inFlight++;
    this.inFlightOf[kind]++;
    this.peakOf[kind] = Math.max(this.peakOf[kind], this.inFlightOf[kind]);
    this.onCall(kind);
    let started: Promise<unknown>;
    if (this.scheduler !== undefined) started = this.scheduler.schedule(Promise.resolve(), kind);
    else if (this.hold) started = new Promise<void>((resolve) => this.held.push(resolve));
    else started = Promise.resolve();
    return started.then(run).finally(() => {
      this.inFlight--;
      this.inFlightOf[kind]--;
    });
  }

  /** Lets `n` held calls go, oldest first. */
  release(n = Number.POSITIVE_INFINITY): void {
    for (let i = 0; i < n && this.held.length > 0; i++) this.held.shift()?.();
  }

  read(_v: Volume, offset: number, target: Buffer): Promise<void> {
    return this.call('read', () => {
      pattern(offset, target.length).copy(target);
    });
  }
  write(_v: Volume, offset: number, data: Buffer): Promise<void> {
    // Copied at once, as the cache does: the caller's buffer goes back to a pool afterwards.
    const copy = Buffer.from(data);
    return this.call('write', () => {
      this.written.set(offset, copy);
    });
  }
  flush(): Promise<void> {
    return this.call('flush', () => undefined);
  }
  zero(_v: Volume, offset: number, length: number): Promise<void> {
    this.zeroed.push({ offset, length });
    return this.call('zero', () => undefined);
  }
  prefetch(): Promise<void> {
    return this.call('prefetch', () => undefined);
  }
  blockStatus(_v: Volume, _offset: number, length: number): Extent[] {
    this.calls.blockStatus++;
    this.statusAsked.push(length);
    this.onCall('blockStatus');
    return [{ length, flags: 0 }];
  }
}

/** Buffers the service takes from its pool (READ replies, WRITE payloads) and has not given back. */
class PoolWatch {
  outstanding = 0;
  peak = 0;
  acquired = 0;
  private readonly live = new Map<Buffer, number>();
  constructor(service: NbdService) {
    const pool = service.payloadBuffers;
    const acquire = pool.acquire.bind(pool);
    const release = pool.release.bind(pool);
    pool.acquire = (size: number): Buffer => {
      const buf = acquire(size);
      this.acquired++;
      this.live.set(buf, size);
      this.outstanding += size;
      this.peak = Math.max(this.peak, this.outstanding);
      return buf;
    };
    pool.release = (buf: Buffer): void => {
      const size = this.live.get(buf);
      if (size !== undefined) {
        this.live.delete(buf);
        this.outstanding -= size;
      }
      release(buf);
    };
  }
}

interface Harness {
  service: NbdService;
  io: ControlledIo;
  address: { host: string; port: number };
  pool: PoolWatch;
  /** Connects and enters transmission; closed when the test ends. */
  attach(options?: { structured?: boolean; meta?: string[] }): Promise<RawNbd>;
}

const DEFAULT_LIMITS: NbdLimits = { maxConnections: 32, handshakeTimeoutMs: 10_000, maxInFlight: 64, maxInFlightBytes: 4 * MiB, maxInFlightBytesTotal: 64 * MiB };

async function harness(t: { after(fn: () => Promise<void>): void }, limits: Partial<NbdLimits> = {}, volumeSize = VOLUME_SIZE): Promise<Harness> {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-nbd-'));
  const volumes = new VolumeManager(dir);
  await volumes.open(volumeSize);
  const io = new ControlledIo();
  const service = new NbdService({ volumes, io, log: pino({ level: 'silent' }), limits: { ...DEFAULT_LIMITS, ...limits } });
  const pool = new PoolWatch(service);
  const address = await service.listen({ host: '127.0.0.1', port: 0 });
  const clients: RawNbd[] = [];
  // One hook, clients first: a service closing with clients still open would wait for them.
  t.after(async () => {
    for (const c of clients) c.destroy();
    io.scheduler = undefined;
    io.hold = false;
    io.release();
    await service.close();
    await volumes.close();
    await rm(dir, { recursive: true, force: true });
  });
  return {
    service,
    io,
    address,
    pool,
    attach: async (options = {}) => {
      const { nbd } = await RawNbd.attach(address, options);
      clients.push(nbd);
      return nbd;
    },
  };
}

/** Waits until `done()` holds, checking between event-loop turns; a bound on the test, not a claim about speed. */
async function until(done: () => boolean, what: string, limitMs = 5000): Promise<void> {
  const deadline = Date.now() + limitMs;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Waits until `value()` has not changed for several turns: the system has settled. */
async function settled(value: () => number): Promise<void> {
  let last = value();
  let same = 0;
  const deadline = Date.now() + 5000;
  while (same < 20 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 10));
    const now = value();
    same = now === last ? same + 1 : 0;
    last = now;
  }
}

async function replies(nbd: RawNbd, count: number): Promise<Reply[]> {
  const all: Reply[] = [];
  for (let i = 0; i < count; i++) all.push(await nbd.next());
  return all;
}

// ---- backpressure ----

test('a client that pipelines READs and never reads the replies makes the node hold no more than its budget', async (t) => {
  const h = await harness(t, { maxInFlightBytes: 4 * MiB });
  const hog = await h.attach();
  hog.stopReading();
  const count = 100;
  for (let i = 0; i < count; i++) hog.request(CMD.READ, { offset: (i % 60) * MiB, length: MiB });
  await settled(() => h.io.calls.read);
  // What the node holds in reply buffers is the connection's budget (one request over
  // it at most); the kernel's socket buffers take a few more replies, never all.
  assert.ok(h.pool.peak <= 4 * MiB + MiB, `the node held ${h.pool.peak} bytes of replies`);
  assert.ok(h.io.calls.read < count / 2, `${h.io.calls.read} of ${count} READs were dispatched while no reply was read`);
  assert.equal(h.service.flowStats.pausedNow, 1, 'the connection is not being read');

  // Meanwhile another client is served.
  const good = await h.attach();
  const read = await good.call(CMD.READ, { offset: 5 * MiB, length: 64 * KiB });
  assert.ok(read.data?.equals(pattern(5 * MiB, 64 * KiB)));

  // Once the hog reads, everything it asked for arrives, and the budget is given back.
  hog.startReading();
  const got = await replies(hog, count);
  assert.equal(new Set(got.map((r) => r.cookie)).size, count);
  assert.ok(got.every((r, i) => r.error === 0 && r.data?.length === MiB && i >= 0));
  await until(() => h.service.budget.bytes === 0 && h.pool.outstanding === 0, 'the budget to be given back');
});

test('a READ reply buffer is taken only when the READ is dispatched', async (t) => {
  const h = await harness(t, { maxInFlight: 2 });
  h.io.hold = true;
  const nbd = await h.attach();
  for (let i = 0; i < 10; i++) nbd.request(CMD.READ, { offset: i * MiB, length: MiB });
  await until(() => h.io.calls.read === 2, 'two READs in storage');
  await settled(() => h.pool.acquired);
  assert.equal(h.pool.acquired, 2, 'reply buffers for the two dispatched READs only');
  assert.equal(h.io.calls.read, 2);
  h.io.hold = false;
  h.io.release();
  const got = await replies(nbd, 10);
  assert.ok(got.every((r) => r.error === 0));
  assert.equal(h.pool.acquired, 10);
});

test('a WRITE payload is read only once the WRITE is admitted: the rest waits in the kernel, not in the node', async (t) => {
  // One 1 MiB WRITE fills the connection's budget; the next one's payload must wait.
  const h = await harness(t, { maxInFlight: 1, maxInFlightBytes: MiB });
  h.io.hold = true;
  const nbd = await h.attach();
  const payloads: Buffer[] = [];
  for (let i = 0; i < 20; i++) {
    payloads.push(Buffer.alloc(MiB, i + 1));
    nbd.request(CMD.WRITE, { offset: i * MiB, data: payloads[i] });
  }
  await until(() => h.io.calls.write === 1, 'the first WRITE in storage');
  await settled(() => h.pool.acquired);
  // The first WRITE's payload, and at most the header of the second: its payload is not
  // given a buffer until it is admitted.
  assert.equal(h.pool.acquired, 1, `${h.pool.acquired} payload buffers taken`);
  assert.ok(h.pool.peak <= MiB);
  h.io.hold = false;
  h.io.release();
  const got = await replies(nbd, 20);
  assert.ok(got.every((r) => r.error === 0));
  for (let i = 0; i < 20; i++) assert.ok(h.io.written.get(i * MiB)?.equals(payloads[i]!), `WRITE ${i} landed whole`);
  await until(() => h.service.budget.bytes === 0, 'the budget to be given back');
});

test('the service budget bounds many connections together; an idle connection still gets a small request through', async (t) => {
  const h = await harness(t, { maxInFlightBytes: 8 * MiB, maxInFlightBytesTotal: 6 * MiB });
  const hogs: RawNbd[] = [];
  for (let c = 0; c < 6; c++) {
    const hog = await h.attach();
    hog.stopReading();
    hogs.push(hog);
    for (let i = 0; i < 16; i++) hog.request(CMD.READ, { offset: i * MiB, length: MiB });
  }
  await settled(() => h.io.calls.read);
  // Six connections of 8 MiB each could hold 48 MiB; together they hold the service's 6.
  assert.ok(h.pool.peak <= 6 * MiB + 6 * IDLE_RESERVE + MiB, `the node held ${h.pool.peak} bytes of replies`);
  assert.ok(h.service.budget.bytes <= 6 * MiB + 6 * IDLE_RESERVE + MiB);

  // A well-behaved client's small request goes through on its reserve.
  const good = await h.attach();
  const small = await good.call(CMD.READ, { offset: 3 * MiB, length: 64 * KiB });
  assert.ok(small.data?.equals(pattern(3 * MiB, 64 * KiB)));
  // Its 1 MiB READ is larger than the reserve: it waits for the budget (a documented
  // limit), and is served once the hogs read their replies.
  const big = good.request(CMD.READ, { offset: 7 * MiB, length: MiB });
  for (const hog of hogs) hog.startReading();
  await Promise.all(hogs.map((hog) => replies(hog, 16)));
  const reply = await good.next();
  assert.equal(reply.cookie, big);
  assert.ok(reply.data?.equals(pattern(7 * MiB, MiB)));
  await until(() => h.service.budget.bytes === 0, 'the budget to be given back');
});

// ---- what storage does for a request ----

test('budget: a CACHE is charged for the buffer storage reads it through (up to 1 MiB), so pipelined CACHEs hold no more than the budget', async (t) => {
  const h = await harness(t, { maxInFlightBytes: 4 * MiB });
  h.io.hold = true;
  const nbd = await h.attach();
  for (let i = 0; i < 64; i++) nbd.request(CMD.CACHE, { offset: 0, length: 32 * MiB });
  await settled(() => h.io.calls.prefetch);
  // 4 MiB of budget at 1 MiB and a header each: three at once (a 512-byte charge let 64 in).
  assert.equal(h.io.calls.prefetch, 3, `${h.io.calls.prefetch} CACHEs in storage at once`);
  assert.equal(h.service.budget.bytes, 3 * (MiB + 512));
  h.io.hold = false;
  h.io.release();
  const got = await replies(nbd, 64);
  assert.ok(got.every((r) => r.error === 0));
  await until(() => h.service.budget.bytes === 0, 'the budget to be given back');
});

test('budget: a TRIM or WRITE_ZEROES is charged for what storage keeps while zeroing (4 KiB per 64 KiB, for 1 MiB at most)', async (t) => {
  const h = await harness(t, { maxInFlightBytes: MiB });
  h.io.hold = true;
  const nbd = await h.attach();
  for (let i = 0; i < 32; i++) nbd.request(i % 2 === 0 ? CMD.TRIM : CMD.WRITE_ZEROES, { offset: i * MiB, length: MiB });
  await settled(() => h.io.calls.zero);
  // 1 MiB of budget at 64 KiB and a header each: fifteen at once (a 512-byte charge let all 32 in).
  assert.equal(h.io.calls.zero, 15, `${h.io.calls.zero} zeroing requests in storage at once`);
  assert.equal(h.service.budget.bytes, 15 * (64 * KiB + 512));
  h.io.hold = false;
  h.io.release();
  const got = await replies(nbd, 32);
  assert.ok(got.every((r) => r.error === 0));
  await until(() => h.service.budget.bytes === 0, 'the budget to be given back');
});

test('zeroing: long TRIMs and WRITE_ZEROES go to storage in 64 MiB pieces, no more than ZERO_SLOTS pieces at once across all connections', async (t) => {
  const h = await harness(t, {}, GiB);
  h.io.hold = true;
  const clients = [await h.attach(), await h.attach()];
  for (const c of clients) for (let i = 0; i < 16; i++) c.request(i % 2 === 0 ? CMD.TRIM : CMD.WRITE_ZEROES, { offset: 0, length: GiB });
  await settled(() => h.io.calls.zero);
  // 32 requests in flight; their pieces wait for a slot (each took its first piece at once before).
  assert.equal(h.io.inFlightOf.zero, ZERO_SLOTS, `${h.io.inFlightOf.zero} zeroing pieces in storage at once`);
  h.io.hold = false;
  h.io.release();
  const got = await Promise.all(clients.map((c) => replies(c, 16)));
  assert.ok(got.flat().every((r) => r.error === 0));
  assert.equal(h.io.peakOf.zero, ZERO_SLOTS);
  assert.equal(h.io.calls.zero, 32 * 16, 'each request in 16 pieces');
  assert.ok(h.io.zeroed.every((z) => z.length === 64 * MiB && z.offset % (64 * MiB) === 0));
  await until(() => h.service.budget.bytes === 0, 'the budget to be given back');
});

test('zeroing: the event loop turns between two pieces, so another client is answered while zeroing that needs no I/O goes on', async (t) => {
  // Zeroing chunks that are zero already completes without I/O (storage answers in
  // microtasks), as this io does: without a turn between pieces, 1024 of them would run
  // back to back before any socket is read again.
  const h = await harness(t, {}, 4 * GiB);
  const hog = await h.attach();
  const other = await h.attach();
  const length = 4 * GiB - 64 * KiB;
  let zeroedWhenRead = -1;
  h.io.onCall = (kind) => {
    if (kind === 'zero' && h.io.calls.zero === 10) other.request(CMD.READ, { offset: 0, length: 4096 });
    if (kind === 'read') zeroedWhenRead = h.io.calls.zero;
  };
  for (let i = 0; i < 16; i++) hog.request(CMD.TRIM, { offset: 0, length });
  const answer = await other.next();
  assert.equal(answer.error, 0);
  const total = 16 * Math.ceil(length / (64 * MiB));
  t.diagnostic(`the other client's READ reached storage after ${zeroedWhenRead} of ${total} pieces`);
  assert.ok(zeroedWhenRead > 0 && zeroedWhenRead < total / 2, `the other client's READ reached storage after ${zeroedWhenRead} of ${total} pieces`);
  const got = await replies(hog, 16);
  assert.ok(got.every((r) => r.error === 0));
  assert.equal(h.io.calls.zero, total);
});

test('BLOCK_STATUS: storage is asked about 128 MiB at most, and each walk takes a turn of its own, so another client is answered meanwhile', async (t) => {
  const h = await harness(t, {}, 4 * GiB);
  const hog = await h.attach({ meta: ['base:allocation'] });
  const other = await h.attach();
  let walksWhenRead = -1;
  h.io.onCall = (kind) => {
    if (kind === 'blockStatus' && h.io.calls.blockStatus === 5) other.request(CMD.READ, { offset: 0, length: 4096 });
    if (kind === 'read') walksWhenRead = h.io.calls.blockStatus;
  };
  for (let i = 0; i < 64; i++) hog.request(CMD.BLOCK_STATUS, { offset: i * MiB, length: GiB });
  assert.equal((await other.next()).error, 0);
  t.diagnostic(`the other client's READ reached storage after ${walksWhenRead} of 64 walks`);
  assert.ok(walksWhenRead >= 5 && walksWhenRead < 32, `the other client's READ reached storage after ${walksWhenRead} of 64 walks`);
  const got = await replies(hog, 64);
  assert.ok(got.every((r) => r.error === 0));
  assert.ok(h.io.statusAsked.every((length) => length === BLOCK_STATUS_SPAN), 'each walk covers 128 MiB');
  assert.equal(BLOCK_STATUS_SPAN, 128 * MiB);
  for (const r of got) {
    // One descriptor (this io reports one): the reply covers the 128 MiB looked at.
    const extents = r.chunks[0]?.payload;
    assert.equal(extents?.readUInt32BE(4), 128 * MiB);
  }
});

// ---- the end of a conversation ----

type Op = { type: 'read' | 'write' | 'flush' | 'trim'; slot: number; size: number };

test('DISC after pipelined requests and a half-close: every request is answered, in any order storage completes them (fast-check scheduler)', async (t) => {
  const h = await harness(t);
  const op: fc.Arbitrary<Op> = fc.record({
    type: fc.constantFrom('read' as const, 'write' as const, 'flush' as const, 'trim' as const),
    slot: fc.nat(31),
    size: fc.constantFrom(1, 512, 4096, 65536, 300_000, MiB),
  });
  await fc.assert(
    fc.asyncProperty(fc.scheduler(), fc.array(op, { minLength: 1, maxLength: 24 }), fc.integer({ min: 1, max: 8 }), fc.integer({ min: 1, max: 4 }), fc.boolean(), async (s, ops, maxInFlight, budgetMiB, structured) => {
      // Limits that change per run: the service reads them through its flow limits.
      h.service.limits.maxRequests = maxInFlight;
      h.service.limits.maxBytes = budgetMiB * MiB;
      h.io.scheduler = s;
      const nbd = await h.attach({ structured });
      const expected = new Map<bigint, Op>();
      for (const o of ops) {
        const offset = o.slot * 2 * MiB;
        if (o.type === 'read') expected.set(nbd.request(CMD.READ, { offset, length: o.size }), o);
        if (o.type === 'write') expected.set(nbd.request(CMD.WRITE, { offset, data: pattern(offset + 7, o.size) }), o);
        if (o.type === 'flush') expected.set(nbd.request(CMD.FLUSH), o);
        if (o.type === 'trim') expected.set(nbd.request(CMD.TRIM, { offset, length: o.size }), o);
      }
      nbd.request(CMD.DISC);
      nbd.socket.end();
      const got: Reply[] = [];
      const reading = (async () => {
        for (let i = 0; i < expected.size; i++) got.push(await nbd.next());
        return nbd.untilEnd();
      })();
      let rest: Buffer | undefined;
      void reading.then((r) => (rest = r), () => (rest = Buffer.alloc(1)));
      const deadline = Date.now() + 10_000;
      while (rest === undefined) {
        if (Date.now() > deadline) throw new Error(`stuck: ${got.length} of ${expected.size} replies, ${s.count()} scheduled`);
        if (s.count() > 0) await s.waitNext(1);
        else await new Promise((r) => setTimeout(r, 1));
      }
      assert.equal(rest.length, 0, 'nothing after the last reply');
      assert.deepEqual(new Set(got.map((r) => r.cookie)), new Set(expected.keys()), 'each request answered once');
      assert.equal(got.length, expected.size);
      for (const r of got) {
        const o = expected.get(r.cookie)!;
        assert.equal(r.error, 0, `${o.type} failed`);
        if (o.type === 'read' && r.data !== undefined) assert.ok(r.data.equals(pattern(o.slot * 2 * MiB, o.size)));
        if (o.type === 'read' && structured) {
          const data = r.chunks.find((c) => c.type === 1);
          assert.ok(data?.payload.subarray(8).equals(pattern(o.slot * 2 * MiB, o.size)));
        }
      }
      await until(() => h.service.connectionCount === 0 && h.service.budget.bytes === 0 && h.io.inFlight === 0, 'the connection to close and give back its budget');
    }),
    { numRuns: 40 },
  );
});

test('EOF in the middle of a WRITE payload: what came before is answered, the cut WRITE is dropped, the budget comes back', async (t) => {
  const h = await harness(t);
  const nbd = await h.attach();
  const a = nbd.request(CMD.READ, { offset: 0, length: 4096 });
  const b = nbd.request(CMD.FLUSH);
  const header = Buffer.alloc(28);
  header.writeUInt32BE(0x25609513, 0);
  header.writeUInt16BE(CMD.WRITE, 6);
  header.writeUInt32BE(99, 12);
  header.writeUInt32BE(MiB, 24);
  nbd.socket.write(Buffer.concat([header, Buffer.alloc(1000, 9)]));
  nbd.socket.end();
  const got = await replies(nbd, 2);
  assert.deepEqual(new Set(got.map((r) => r.cookie)), new Set([a, b]));
  assert.equal((await nbd.untilEnd()).length, 0);
  await until(() => h.service.connectionCount === 0 && h.service.budget.bytes === 0 && h.pool.outstanding === 0, 'the budget and the payload buffer to come back');
  assert.equal(h.io.calls.write, 0);
});

test('shutdown: requests in flight finish; those waiting and those sent afterwards get ESHUTDOWN; options get NBD_REP_ERR_SHUTDOWN, ABORT its ACK', async (t) => {
  const h = await harness(t, { maxInFlight: 2 });
  h.io.hold = true;
  const nbd = await h.attach({ structured: true });
  const early: bigint[] = [];
  for (let i = 0; i < 10; i++) early.push(nbd.request(CMD.READ, { offset: i * MiB, length: 4096 }));
  await until(() => h.io.calls.read === 2, 'two READs in storage');
  const talker = await RawNbd.open(h.address);
  t.after(async () => talker.destroy());
  await talker.greet();

  const closing = h.service.close();
  const late: bigint[] = [];
  for (let i = 0; i < 3; i++) late.push(nbd.request(CMD.READ, { offset: i * MiB, length: 4096 }));
  talker.option(OPT.LIST);
  assert.equal((await talker.reply()).type, REP.ERR_SHUTDOWN);
  talker.option(OPT.ABORT);
  assert.equal((await talker.reply()).type, REP.ACK);

  h.io.release();
  h.io.hold = false;
  const got = await replies(nbd, 13);
  const errno = new Map(got.map((r) => [r.cookie, r.error]));
  assert.deepEqual(early.slice(0, 2).map((c) => errno.get(c)), [0, 0], 'the two in flight are served');
  for (const c of [...early.slice(2), ...late]) assert.equal(errno.get(c), ERRNO.ESHUTDOWN);
  assert.equal((await nbd.untilEnd()).length, 0);
  await closing;
  assert.equal(h.io.calls.read, 2, 'nothing new reached storage after the shutdown began');
});

test('shutdown: requests waiting for budget get ESHUTDOWN without waiting for it: a READ queued, a WRITE whose payload was not admitted (read and dropped), and what follows', async (t) => {
  // Hogs that never read their replies hold the whole service budget; a 1 MiB READ and a
  // 1 MiB WRITE of other clients wait for it, as long as the hogs like.
  const h = await harness(t, { maxInFlightBytes: 8 * MiB, maxInFlightBytesTotal: 6 * MiB });
  const hogs: RawNbd[] = [];
  for (let c = 0; c < 6; c++) {
    const hog = await h.attach();
    hog.stopReading();
    hogs.push(hog);
    for (let i = 0; i < 16; i++) hog.request(CMD.READ, { offset: i * MiB, length: MiB });
  }
  await settled(() => h.io.calls.read);
  const reads = h.io.calls.read;
  const reader = await h.attach({ structured: true });
  assert.equal((await reader.call(CMD.READ, { offset: 0, length: 4096 })).error, 0, 'a small READ goes through on the reserve');
  const bigRead = reader.request(CMD.READ, { offset: MiB, length: MiB });
  const writer = await h.attach();
  const bigWrite = writer.request(CMD.WRITE, { offset: 0, data: Buffer.alloc(MiB, 7) });
  const flush = writer.request(CMD.FLUSH);
  await settled(() => h.service.flowStats.pausedNow);
  assert.equal(h.io.calls.read, reads + 1, 'the 1 MiB READ waits');
  assert.equal(h.io.calls.write, 0, 'the WRITE waits');

  const closing = h.service.close();
  const read = await reader.next();
  assert.deepEqual([read.cookie, read.error], [bigRead, ERRNO.ESHUTDOWN]);
  assert.equal((await reader.untilEnd()).length, 0, 'then the connection ends cleanly');
  const written = await replies(writer, 2);
  assert.deepEqual(written.map((r) => [r.cookie, r.error]), [[bigWrite, ERRNO.ESHUTDOWN], [flush, ERRNO.ESHUTDOWN]]);
  assert.equal((await writer.untilEnd()).length, 0);
  assert.equal(h.io.calls.write, 0, 'the refused WRITE never reached storage');
  assert.equal(h.io.calls.read, reads + 1);
  // The hogs' replies never drain: they are cut at the deadline, or when they go.
  for (const hog of hogs) hog.destroy();
  await closing;
});

test('shutdown: a long TRIM stops between two 64 MiB pieces with ESHUTDOWN', async (t) => {
  const h = await harness(t, {}, GiB);
  h.io.hold = true;
  const nbd = await h.attach();
  const trim = nbd.request(CMD.TRIM, { offset: 0, length: GiB });
  await until(() => h.io.calls.zero === 1, 'the first piece in storage');
  const closing = h.service.close();
  h.io.hold = false;
  h.io.release();
  const reply = await nbd.next();
  assert.deepEqual([reply.cookie, reply.error], [trim, ERRNO.ESHUTDOWN]);
  assert.equal(h.io.calls.zero, 1, 'no piece started after the shutdown began');
  assert.equal((await nbd.untilEnd()).length, 0);
  await closing;
});

test('shutdown: NBD_OPT_EXPORT_NAME, which has no error reply, terminates the session instead of getting an option reply', async (t) => {
  const h = await harness(t);
  const client = await RawNbd.open(h.address);
  t.after(async () => client.destroy());
  await client.greet();
  const closing = h.service.close();
  // LIST shows the node still reads this connection; EXPORT_NAME comes in the same segment.
  client.socket.write(Buffer.concat([optionBytes(OPT.LIST), optionBytes(OPT.EXPORT_NAME)]));
  assert.equal((await client.reply()).type, REP.ERR_SHUTDOWN);
  const rest = await client.untilEnd();
  assert.equal(rest.length, 0, `${rest.length} bytes sent after NBD_OPT_EXPORT_NAME`);
  await closing;
  assert.equal(h.service.stats.handshakes, 0);
});

test('unknown client flags: the connection is dropped, and an EXPORT_NAME and a WRITE sent in the same segment are not acted on', async (t) => {
  const h = await harness(t);
  const client = await RawNbd.open(h.address);
  t.after(async () => client.destroy());
  await client.read(18);
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(3 | 0x80, 0);
  client.socket.write(Buffer.concat([flags, optionBytes(OPT.EXPORT_NAME), requestBytes(CMD.WRITE, { cookie: 1n, offset: 0, data: Buffer.alloc(4096, 0xee) }), requestBytes(CMD.FLUSH, { cookie: 2n })]));
  assert.equal((await client.untilEnd()).length, 0, 'nothing is answered');
  await until(() => h.service.connectionCount === 0, 'the connection to close');
  assert.equal(h.service.stats.handshakes, 0, 'the client never entered transmission');
  assert.deepEqual([h.io.calls.write, h.io.calls.flush], [0, 0]);
});

test('errnoOf: EDQUOT and EFBIG map to ENOSPC (proto.md, Error values), other storage failures to EIO', () => {
  const sys = (code: string): NodeJS.ErrnoException => Object.assign(new Error(code), { code });
  assert.equal(errnoOf(sys('ENOSPC')), ERRNO.ENOSPC);
  assert.equal(errnoOf(sys('EDQUOT')), ERRNO.ENOSPC);
  assert.equal(errnoOf(sys('EFBIG')), ERRNO.ENOSPC);
  assert.equal(errnoOf(sys('EIO')), ERRNO.EIO);
  assert.equal(errnoOf(new StorageError('MS_DATA_DIR', 'x')), ERRNO.EIO);
});

test('with busy polling, each request pokes the poll twice: its input, and its reply once written', async (t) => {
  const poll = countingPoll(t);
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-nbd-poll-'));
  const volumes = new VolumeManager(dir);
  await volumes.open(VOLUME_SIZE);
  const service = new NbdService({ volumes, io: new ControlledIo(), log: pino({ level: 'silent' }), limits: DEFAULT_LIMITS, busyPoll: poll });
  const address = await service.listen({ host: '127.0.0.1', port: 0 });
  const { nbd } = await RawNbd.attach(address);
  t.after(async () => {
    nbd.destroy();
    await service.close();
    await volumes.close();
    await rm(dir, { recursive: true, force: true });
  });
  const before = poll.pokes;
  for (let i = 0; i < 5; i++) assert.equal((await nbd.call(CMD.WRITE, { offset: i * 4096, data: Buffer.alloc(4096, i) })).error, 0);
  assert.ok(poll.pokes - before >= 10, `${poll.pokes - before} pokes for 5 requests one at a time`);
});
