// Hostile NBD clients against a real node process: one that never reads its replies,
// one that trickles a request a byte at a time, one that opens thousands of
// connections, one that declares huge lengths, one that stops mid-handshake. In each, the
// node's memory (its RSS, sampled from /proc all along) stays within the bound the README
// promises for the defaults (256 MiB over what the node used before), a well-behaved
// client keeps being served meanwhile (its requests complete, its data reads back), and
// the node stays up (/healthz). Settings go through the environment so that a node
// without them still starts (and shows what the tests guard against).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { RawNbd, optionBytes, requestBytes, rssOf } from '../support/nbd-raw.js';
import { CMD, ERRNO, OPT, REP } from '../../src/protocol/nbd/spec.js';

const GiB = 2 ** 30;
const MiB = 2 ** 20;
const KiB = 1024;
/** What the README promises against any one client with the default settings. */
const BOUND = 256 * MiB;

type Ctx = { after(fn: () => unknown): void };

async function node(t: Ctx, env: NodeJS.ProcessEnv = {}): Promise<NodeProcess> {
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir, env });
  t.after(() => n.stop('SIGKILL'));
  return n;
}

/** Samples the node's RSS until stopped; `peak` is the largest seen. */
class RssWatch {
  peak = 0;
  private running = true;
  private readonly done: Promise<void>;
  constructor(pid: number) {
    this.done = (async () => {
      while (this.running) {
        try {
          this.peak = Math.max(this.peak, await rssOf(pid));
        } catch {
          return;
        }
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
  }
  async stop(): Promise<number> {
    this.running = false;
    await this.done;
    return this.peak;
  }
}

/** The node's RSS once it has served a client that touched the whole volume: cache and buffers at their working size. */
async function baseline(n: NodeProcess): Promise<number> {
  const warm = (await RawNbd.attach(n.nbd)).nbd;
  for (let at = 0; at < 64 * MiB; at += 4 * MiB) warm.request(CMD.READ, { offset: at, length: 4 * MiB });
  for (let at = 0; at < 64 * MiB; at += 4 * MiB) assert.equal((await warm.next()).error, 0);
  await warm.call(CMD.WRITE, { offset: 60 * MiB, data: randomBytes(MiB) });
  warm.destroy();
  return rssOf(n.proc.pid ?? 0);
}

/** A well-behaved client: writes, reads back and checks `rounds` blocks of `size` bytes in its own region. */
async function wellBehaved(n: NodeProcess, rounds: number, size = 64 * KiB, region = 48 * MiB): Promise<void> {
  const { nbd } = await RawNbd.attach(n.nbd);
  try {
    for (let i = 0; i < rounds; i++) {
      const offset = region + (i % 64) * size;
      const data = randomBytes(size);
      assert.equal((await nbd.call(CMD.WRITE, { offset, data })).error, 0);
      const back = await nbd.call(CMD.READ, { offset, length: size });
      assert.equal(back.error, 0);
      assert.ok(back.data?.equals(data), 'the well-behaved client reads back what it wrote');
    }
    assert.equal((await nbd.call(CMD.FLUSH)).error, 0);
  } finally {
    nbd.destroy();
  }
}

async function healthy(n: NodeProcess): Promise<void> {
  assert.equal((await fetch(`${n.url}/healthz`)).status, 200);
}

async function metric(n: NodeProcess, name: string): Promise<number> {
  const text = await (await fetch(`${n.url}/metrics`)).text();
  const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text);
  return m === null ? Number.NaN : Number(m[1]);
}

test('hostile: a client that pipelines large READs on several connections and never reads a reply', async (t) => {
  const n = await node(t);
  const before = await baseline(n);
  const watch = new RssWatch(n.proc.pid ?? 0);
  const hogs: RawNbd[] = [];
  for (let c = 0; c < 4; c++) {
    const { nbd } = await RawNbd.attach(n.nbd);
    t.after(() => nbd.destroy());
    nbd.stopReading();
    // 8 READs of 16 MiB each: 128 MiB asked per connection, 512 MiB in all.
    for (let i = 0; i < 8; i++) nbd.request(CMD.READ, { offset: (i % 3) * 16 * MiB, length: 16 * MiB });
    hogs.push(nbd);
  }
  await wellBehaved(n, 40);
  await healthy(n);
  const peak = await watch.stop();
  t.diagnostic(`RSS ${(before / MiB).toFixed(0)} MiB before, peak ${(peak / MiB).toFixed(0)} MiB`);
  assert.ok(peak - before < BOUND, `the node grew by ${((peak - before) / MiB).toFixed(0)} MiB`);
  assert.ok((await metric(n, 'memstrata_nbd_paused_connections')) >= 1, 'the hogs are not being read');
  const held = await metric(n, 'memstrata_nbd_inflight_bytes');
  assert.ok(held > 0 && held <= 96 * MiB + 5 * 256 * KiB, `${held} bytes in flight`);
  // The hogs are answered once they read.
  for (const hog of hogs) hog.startReading();
  for (const hog of hogs) assert.equal((await hog.next()).error, 0);
});

test('hostile: clients that never read 1 MiB READs sent from cache memory hold its slots, yet a reclaim of the cache completes and every reply still holds what was read', async (t) => {
  const n = await node(t);
  // 8 MiB of known bytes, cached in DRAM: READs of them are sent from the cache's own
  // memory (readViews), whose slots stay pinned until the socket has sent them.
  const data = randomBytes(8 * MiB);
  const writer = (await RawNbd.attach(n.nbd)).nbd;
  for (let at = 0; at < data.length; at += MiB) assert.equal((await writer.call(CMD.WRITE, { offset: at, data: data.subarray(at, at + MiB) })).error, 0);
  writer.destroy();
  const viewsBefore = await metric(n, 'memstrata_cache_view_reads_total');
  const hogs: RawNbd[] = [];
  // Each READ's offset by its cookie: NBD lets a server answer out of order, and this one
  // does (a READ whose line is being written back takes the slower path, and the READs
  // after it are answered first).
  const asked: Map<bigint, number>[] = [];
  for (let c = 0; c < 4; c++) {
    const { nbd } = await RawNbd.attach(n.nbd);
    t.after(() => nbd.destroy());
    nbd.stopReading();
    const offsets = new Map<bigint, number>();
    for (let i = 0; i < 16; i++) {
      const offset = ((c * 5 + i) % 8) * MiB;
      offsets.set(nbd.request(CMD.READ, { offset, length: MiB }), offset);
    }
    hogs.push(nbd);
    asked.push(offsets);
  }
  // Until the replies back up: the hogs' sockets are full, slots are held.
  let pinned = 0;
  for (let i = 0; i < 500 && pinned === 0; i++) {
    await new Promise((r) => setTimeout(r, 10));
    pinned = await metric(n, 'memstrata_cache_pinned_slots');
  }
  assert.ok(pinned > 0, 'no cache slot is held by a reply');
  assert.ok((await metric(n, 'memstrata_cache_view_reads_total')) > viewsBefore, 'no READ was sent from cache memory');
  // The DRAM cache gives all but 4 MiB back to the partition table and takes it again,
  // while slots are held: the reclaim waits for no reply, and the memory of the extents
  // it takes is new, so the held replies keep their bytes.
  const table = (await (await fetch(`${n.url}/v1/tables/partition`)).json()) as { rows: { medium: string; kind: string; length: number }[] };
  const cacheBytes = table.rows.filter((r) => r.medium === 'dram' && r.kind === 'cache').reduce((sum, r) => sum + r.length, 0);
  const resize = async (bytes: number): Promise<void> => {
    const response = await fetch(`${n.url}/v1/partition/resize`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ medium: 'dram', kind: 'cache', bytes }) });
    assert.equal(response.status, 200, await response.text());
  };
  await resize(4 * MiB);
  await wellBehaved(n, 40);
  await resize(cacheBytes);
  await wellBehaved(n, 40);
  await healthy(n);
  // The hogs read at last: each reply holds the bytes written, not another line's.
  for (const [c, hog] of hogs.entries()) {
    hog.startReading();
    const offsets = asked[c] ?? new Map<bigint, number>();
    for (let i = 0; i < 16; i++) {
      const reply = await hog.next();
      assert.equal(reply.error, 0);
      const at = offsets.get(reply.cookie);
      assert.ok(at !== undefined, `hog ${c}: a reply to cookie ${reply.cookie}, which was not asked or was answered twice`);
      offsets.delete(reply.cookie);
      assert.ok(reply.data?.equals(data.subarray(at, at + MiB)), `hog ${c}, cookie ${reply.cookie}: not the bytes written at ${at}`);
    }
  }
  for (const hog of hogs) hog.destroy();
  let left = pinned;
  for (let i = 0; i < 500 && left !== 0; i++) {
    await new Promise((r) => setTimeout(r, 10));
    left = await metric(n, 'memstrata_cache_pinned_slots');
  }
  assert.equal(left, 0, 'slots still held once every reply was sent');
});

test('hostile: clients that pipeline long TRIMs, WRITE_ZEROES and BLOCK_STATUS on several connections', async (t) => {
  const n = await node(t);
  // A volume of its own, so that zeroing it never touches the well-behaved client's data.
  const created = await fetch(`${n.url}/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'big', size: '1GiB' }) });
  assert.equal(created.status, 201);
  const before = await baseline(n);
  const watch = new RssWatch(n.proc.pid ?? 0);
  const hogs: RawNbd[] = [];
  const kinds = [CMD.TRIM, CMD.WRITE_ZEROES, CMD.TRIM, CMD.BLOCK_STATUS];
  for (let c = 0; c < 2; c++) {
    const { nbd } = await RawNbd.attach(n.nbd, { meta: ['base:allocation'], name: 'big' });
    t.after(() => nbd.destroy());
    // The whole volume, 32 times per connection: 16 pieces of 64 MiB each to zero.
    for (let i = 0; i < 32; i++) nbd.request(kinds[i % 4] ?? CMD.TRIM, { offset: 0, length: GiB });
    hogs.push(nbd);
  }
  await wellBehaved(n, 40);
  await healthy(n);
  for (const hog of hogs) for (let i = 0; i < 32; i++) assert.equal((await hog.next()).error, 0);
  const peak = await watch.stop();
  t.diagnostic(`RSS ${(before / MiB).toFixed(0)} MiB before, peak ${(peak / MiB).toFixed(0)} MiB`);
  // Within half the bound: these requests make the node hold their charges (a few MiB)
  // and storage's bookkeeping for the 2 pieces being zeroed (a few MiB each, and the
  // garbage it leaves until the next collection); with a piece of each request in
  // storage at once it was some 200 MiB.
  assert.ok(peak - before < BOUND / 2, `the node grew by ${((peak - before) / MiB).toFixed(0)} MiB`);
});

test('hostile: a client that pipelines 32 MiB CACHEs on several connections of a node without a cache', async (t) => {
  const n = await node(t, { MEMSTRATA_CACHE_ENABLED: 'false' });
  // Data everywhere, so that every CACHE reads the file (zero chunks read without I/O).
  const { nbd: filler } = await RawNbd.attach(n.nbd);
  for (let at = 0; at < 64 * MiB; at += 4 * MiB) assert.equal((await filler.call(CMD.WRITE, { offset: at, data: randomBytes(4 * MiB) })).error, 0);
  filler.destroy();
  const before = await baseline(n);
  const watch = new RssWatch(n.proc.pid ?? 0);
  const hogs: RawNbd[] = [];
  for (let c = 0; c < 4; c++) {
    const { nbd } = await RawNbd.attach(n.nbd);
    t.after(() => nbd.destroy());
    for (let i = 0; i < 128; i++) nbd.request(CMD.CACHE, { offset: (i % 2) * 32 * MiB, length: 32 * MiB });
    hogs.push(nbd);
  }
  await wellBehaved(n, 40);
  await healthy(n);
  for (const hog of hogs) for (let i = 0; i < 128; i++) assert.equal((await hog.next()).error, 0);
  const peak = await watch.stop();
  t.diagnostic(`RSS ${(before / MiB).toFixed(0)} MiB before, peak ${(peak / MiB).toFixed(0)} MiB`);
  assert.ok(peak - before < BOUND, `the node grew by ${((peak - before) / MiB).toFixed(0)} MiB`);
});

test('hostile: a client that floods options and never reads the answers', async (t) => {
  const n = await node(t);
  const before = await baseline(n);
  const watch = new RssWatch(n.proc.pid ?? 0);
  const flood = await RawNbd.open(n.nbd);
  t.after(() => flood.destroy());
  await flood.greet();
  flood.stopReading();
  // 400k NBD_OPT_LIST (6.4 MB): each answer is several times larger than the question.
  const batch = Buffer.concat(Array.from({ length: 10_000 }, () => optionBytes(OPT.LIST)));
  for (let i = 0; i < 40; i++) flood.socket.write(batch);
  await wellBehaved(n, 40);
  await healthy(n);
  const peak = await watch.stop();
  t.diagnostic(`RSS ${(before / MiB).toFixed(0)} MiB before, peak ${(peak / MiB).toFixed(0)} MiB`);
  assert.ok(peak - before < 64 * MiB, `the node grew by ${((peak - before) / MiB).toFixed(0)} MiB`);
});

test('hostile: a client that trickles a WRITE one byte at a time is served in the end, and others meanwhile', async (t) => {
  const n = await node(t);
  const before = await baseline(n);
  const { nbd: slow } = await RawNbd.attach(n.nbd);
  t.after(() => slow.destroy());
  const data = randomBytes(8 * KiB);
  const bytes = requestBytes(CMD.WRITE, { cookie: 77n, offset: 2 * MiB + 3, data });
  const trickle = (async () => {
    for (let i = 0; i < bytes.length; i++) {
      slow.socket.write(bytes.subarray(i, i + 1));
      await new Promise((r) => setImmediate(r));
    }
  })();
  await wellBehaved(n, 60);
  await trickle;
  const reply = await slow.next();
  assert.deepEqual([reply.cookie, reply.error], [77n, 0]);
  const back = await slow.call(CMD.READ, { offset: 2 * MiB + 3, length: data.length });
  assert.ok(back.data?.equals(data));
  await healthy(n);
  assert.ok((await rssOf(n.proc.pid ?? 0)) - before < BOUND);
});

test('hostile: a client that opens thousands of connections gets no more than nbd.maxConnections; connected clients go on', async (t) => {
  const n = await node(t);
  const before = await baseline(n);
  const watch = new RssWatch(n.proc.pid ?? 0);
  // A client connected before the flood keeps being served through it.
  const { nbd: good } = await RawNbd.attach(n.nbd);
  t.after(() => good.destroy());
  const flood: RawNbd[] = [];
  t.after(() => {
    for (const c of flood) c.destroy();
  });
  const opening = Array.from({ length: 2000 }, async () => {
    try {
      const c = await RawNbd.open(n.nbd);
      flood.push(c);
    } catch {
      // refused or reset: what the node does past its limit
    }
  });
  let served = 0;
  const serving = (async () => {
    for (let i = 0; i < 100; i++) {
      const data = randomBytes(4 * KiB);
      assert.equal((await good.call(CMD.WRITE, { offset: 30 * MiB + i * 4096, data })).error, 0);
      const back = await good.call(CMD.READ, { offset: 30 * MiB + i * 4096, length: 4096 });
      assert.ok(back.data?.equals(data));
      served++;
    }
  })();
  await Promise.all(opening);
  await serving;
  assert.equal(served, 100);
  // Every connection past the limit was closed by the node as soon as it was accepted
  // (some may still wait in the kernel's accept queue: a bound on the test, not the node).
  const open = (): number => flood.filter((c) => !c.ended).length;
  const deadline = Date.now() + 10_000;
  while (open() > 127 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  assert.ok(flood.length > 1000, `${flood.length} connections were made`);
  assert.ok(open() <= 127, `${open()} of ${flood.length} connections still open`);
  const refused = await metric(n, 'memstrata_nbd_refused_connections_total');
  assert.ok(refused >= flood.length - 127, `${refused} refused of ${flood.length}`);
  await healthy(n);
  const peak = await watch.stop();
  t.diagnostic(`RSS ${(before / MiB).toFixed(0)} MiB before, peak ${(peak / MiB).toFixed(0)} MiB`);
  assert.ok(peak - before < BOUND, `the node grew by ${((peak - before) / MiB).toFixed(0)} MiB`);
  // Once the flood goes away, new clients get in again.
  for (const c of flood) c.destroy();
  const deadline2 = Date.now() + 10_000;
  for (;;) {
    try {
      const { nbd } = await RawNbd.attach(n.nbd);
      assert.equal((await nbd.call(CMD.READ, { length: 512 })).error, 0);
      nbd.destroy();
      break;
    } catch (error) {
      if (Date.now() > deadline2) throw error;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
});

test('hostile: a client that declares huge lengths: 32 MiB WRITEs it never finishes on many connections, 4 GiB requests', async (t) => {
  const n = await node(t);
  const before = await baseline(n);
  const watch = new RssWatch(n.proc.pid ?? 0);
  const partial: RawNbd[] = [];
  for (let c = 0; c < 12; c++) {
    const { nbd } = await RawNbd.attach(n.nbd);
    t.after(() => nbd.destroy());
    const header = requestBytes(CMD.WRITE, { cookie: 1n, offset: 0, length: 32 * MiB });
    nbd.socket.write(header);
    // All but the last byte of the payload, then nothing: the WRITE never completes.
    const chunk = Buffer.alloc(MiB, 0xab);
    for (let i = 0; i < 31; i++) nbd.socket.write(chunk);
    nbd.socket.write(chunk.subarray(0, MiB - 1));
    partial.push(nbd);
  }
  // Lengths a client may declare but the node must not take at their word.
  const { nbd: liar } = await RawNbd.attach(n.nbd, { structured: true });
  t.after(() => liar.destroy());
  assert.equal((await liar.call(CMD.READ, { length: 0xffffffff })).error, ERRNO.EOVERFLOW);
  assert.equal((await liar.call(CMD.TRIM, { length: 0xffffffff })).error, ERRNO.EINVAL);
  assert.equal((await liar.call(CMD.CACHE, { length: 0xffffffff })).error, ERRNO.EOVERFLOW);
  const { nbd: bigOption } = await RawNbd.attach(n.nbd);
  t.after(() => bigOption.destroy());
  const huge = requestBytes(CMD.WRITE, { cookie: 2n, length: 0xffffffff });
  bigOption.socket.write(huge);
  assert.ok(await bigOption.closedWithin(), 'a WRITE longer than any block the node takes is a broken stream');
  const option = await RawNbd.open(n.nbd);
  t.after(() => option.destroy());
  await option.greet();
  const head = optionBytes(OPT.LIST);
  head.writeUInt32BE(0xffffffff, 12);
  option.socket.write(head);
  // Answered at its header; its data is dropped as it comes, however much of it comes.
  assert.equal((await option.reply()).type, REP.ERR_TOO_BIG, 'an option longer than the node takes is refused');
  const junk = Buffer.alloc(MiB, 0xcd);
  for (let i = 0; i < 64; i++) option.socket.write(junk);

  await wellBehaved(n, 40);
  await healthy(n);
  const peak = await watch.stop();
  t.diagnostic(`RSS ${(before / MiB).toFixed(0)} MiB before, peak ${(peak / MiB).toFixed(0)} MiB`);
  assert.ok(peak - before < BOUND, `the node grew by ${((peak - before) / MiB).toFixed(0)} MiB`);
});

test('hostile: clients that stop mid-handshake are cut after nbd.handshakeTimeout; others are served meanwhile', async (t) => {
  const n = await node(t, { MEMSTRATA_NBD_HANDSHAKE_TIMEOUT: '1s' });
  const stalled: RawNbd[] = [];
  t.after(() => {
    for (const c of stalled) c.destroy();
  });
  for (let i = 0; i < 50; i++) {
    const c = await RawNbd.open(n.nbd);
    stalled.push(c);
    if (i % 3 === 0) continue; // not even the client flags
    await c.greet();
    if (i % 3 === 1) continue; // flags, then nothing
    c.socket.write(optionBytes(OPT.GO).subarray(0, 10)); // half an option header
  }
  await wellBehaved(n, 20);
  // A bound on the test, not on the node: the node's deadline is 1 s.
  const deadline = Date.now() + 15_000;
  while (stalled.some((c) => !c.ended) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  assert.equal(stalled.filter((c) => !c.ended).length, 0, 'every stalled handshake was cut');
  assert.ok((await metric(n, 'memstrata_nbd_handshake_timeouts_total')) >= 50);
  await healthy(n);
});
