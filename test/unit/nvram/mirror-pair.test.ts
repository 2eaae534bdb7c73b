// A mirrored pair in one process: node A's DeviceManager and Mirroring, node B's
// DeviceManager and MirrorService, on loopback. What the pair promises when the link
// goes (issue 11 items 8 and 10).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import { PartitionTable } from '../../../src/memory/partition-table.js';
import { DeviceManager } from '../../../src/nvram/device-manager.js';
import { parseJournal, type JournalSink } from '../../../src/nvram/journal-file.js';
import { MirrorService } from '../../../src/nvram/mirror-service.js';
import { Mirroring } from '../../../src/nvram/mirroring.js';
import { RECORD_FLAG, decodeOne } from '../../../src/protocol/journal/record.js';
import { startProxy } from '../../support/tcp-proxy.js';

const MiB = 1024 * 1024;
const log = pino({ level: 'silent' });

type Ctx = { after(fn: () => Promise<void> | void): void };

async function manager(t: Ctx, journalWrap?: (sink: JournalSink) => JournalSink, dataDir?: string, capacity = 16 * MiB): Promise<DeviceManager> {
  const dir = dataDir ?? (await mkdtemp(join(tmpdir(), 'memstrata-pair-')));
  if (dataDir === undefined) t.after(() => rm(dir, { recursive: true, force: true }));
  const medium = new DramMedium({ capacity, extentSize: MiB });
  await medium.open();
  const partition = new PartitionTable([
    { name: 'dram', capacity, extentSize: MiB, initial: { cache: 0, server: 0, nvram: capacity / 2 }, bounds: { cache: { min: 0, max: capacity }, server: { min: 0, max: 0 }, nvram: { min: 0, max: capacity } } },
  ]);
  const nvram = new DeviceManager({ dataDir: dir, partition, media: [medium], log, ...(journalWrap === undefined ? {} : { journalWrap }) });
  await nvram.open();
  t.after(() => nvram.close());
  return nvram;
}

/** Node B's mirror service on its DeviceManager, on `address` (port 0: any). */
async function serveB(t: Ctx, nvram: DeviceManager, at: { host: string; port: number }, partnerId?: string): Promise<{ mirror: MirrorService; address: { host: string; port: number } }> {
  const mirror = new MirrorService({
    nvram, nodeId: 'b', token: undefined, log, partnerId,
    maxInFlight: 64, maxInFlightBytes: 64 * MiB, maxInFlightBytesTotal: 128 * MiB, maxConnections: 16, maxConnectionsPerClient: 4, handshakeTimeoutMs: 5000, stallTimeoutMs: 5000,
  });
  const address = await mirror.listen(at);
  t.after(() => mirror.close());
  return { mirror, address };
}

async function partnerB(t: Ctx, partnerId?: string, capacity?: number): Promise<{ nvram: DeviceManager; mirror: MirrorService; address: { host: string; port: number } }> {
  const nvram = await manager(t, undefined, undefined, capacity);
  return { nvram, ...(await serveB(t, nvram, { host: '127.0.0.1', port: 0 }, partnerId)) };
}

/** Node A mirroring to B (degrade when the link goes), with a mirrored device `name` in sync. */
async function pair(t: Ctx, name: string, policy: 'mirrored' | 'mirrored+local', journalWrap?: (sink: JournalSink) => JournalSink, size = MiB) {
  const capacity = Math.max(16 * MiB, 4 * size);
  const b = await partnerB(t, undefined, capacity);
  const a = await manager(t, journalWrap, undefined, capacity);
  const mirroring = new Mirroring({ nvram: a, partner: b.address, onPartnerDown: 'degrade', nodeId: 'a', token: undefined, timeoutMs: 500, retryMs: 20, log });
  mirroring.start();
  t.after(() => mirroring.close());
  await a.create(name, size, policy);
  const device = a.get(name);
  await until(() => device.info().mirror === 'in-sync', 'in sync');
  return { a, b, device, mirroring };
}

async function until(probe: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 2000; i++) {
    if (probe()) return;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  throw new Error(`${what}: not reached in 10 s`);
}

test('losing the partner syncs a mirrored device\'s journal: records only the partner held become durable here', async (t) => {
  let syncs = 0;
  const counting = (sink: JournalSink): JournalSink => ({
    ...sink,
    datasync: async () => {
      await sink.datasync();
      syncs++;
    },
  });
  const { a, b, device } = await pair(t, 'm', 'mirrored', counting);
  await device.open(1);
  const before = syncs;
  for (let i = 0; i < 5; i++) await device.append(1, [{ payload: Buffer.from(`held by the partner ${i}`) }]);
  assert.equal(syncs, before, 'in sync, a mirrored append does not wait for a local sync');
  await b.mirror.close();
  await until(() => device.info().mirror === 'degraded', 'degraded');
  await until(() => syncs > before, 'the journal is synced after the partner is lost');
  const records = parseJournal(await readFile(join(a.dir, 'm.journal'))).records.filter((r) => (r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) === 0);
  assert.deepEqual(records.map((r) => r.payload.toString()), Array.from({ length: 5 }, (_, i) => `held by the partner ${i}`));
});

/** A raw mirror connection that has said HELLO as `nodeId`. */
async function rawPeer(t: Ctx, address: { host: string; port: number }, nodeId: string, expectHello = 0): Promise<(op: number, body: Buffer) => Promise<{ status: number; body: Buffer }>> {
  const { connect } = await import('node:net');
  const m = await import('../../../src/protocol/mirror/codec.js');
  const { FrameParser } = await import('../../../src/protocol/rmem/parser.js');
  const socket = connect(address.port, address.host);
  socket.on('error', () => undefined);
  t.after(() => { socket.destroy(); });
  const waiting = new Map<number, (reply: { status: number; body: Buffer }) => void>();
  const parser = new FrameParser({ magic: m.MIRROR_RESPONSE_MAGIC }, {
    onFrame: (f) => waiting.get(f.tagLo)?.({ status: f.word, body: Buffer.from(f.body) }),
    onFatal: () => socket.destroy(),
  }, m.MIRROR_MAX_BODY);
  socket.on('data', (chunk: Buffer) => parser.feed(chunk));
  await new Promise((resolve) => socket.once('connect', resolve));
  let tag = 1;
  const ask = (op: number, body: Buffer) =>
    new Promise<{ status: number; body: Buffer }>((resolve) => {
      const mine = tag++;
      waiting.set(mine, resolve);
      socket.write(m.request(op, mine, body));
    });
  assert.equal((await ask(m.MOP.HELLO, m.encodeHello({ version: m.MIRROR_VERSION, nodeId, token: '' }))).status, expectHello);
  return ask;
}

test('a replica takes APPENDs and TRIMs only from the connection of its last RESET: an older connection cannot add records after a newer RESET', async (t) => {
  const m = await import('../../../src/protocol/mirror/codec.js');
  const { encodeRecord } = await import('../../../src/protocol/journal/record.js');
  const b = await partnerB(t);
  const reset = m.encodeReset({ name: 'r', policy: 'mirrored', medium: 'dram', size: MiB, epoch: 1, trimmedTo: 0, firstSeq: 1 });
  const record = (seq: number) => encodeRecord({ seq, timestamp: seq, epoch: 1, flags: 0, target: undefined, payload: Buffer.from(`r${seq}`) });
  const old = await rawPeer(t, b.address, 'primary-before');
  assert.equal((await old(m.MOP.RESET, reset)).status, m.MSTATUS.OK);
  assert.equal((await old(m.MOP.APPEND, m.encodeAppend('r', 1, record(1)))).status, m.MSTATUS.OK);
  const fresh = await rawPeer(t, b.address, 'primary-after');
  assert.equal((await fresh(m.MOP.RESET, reset)).status, m.MSTATUS.OK);
  const stale = await old(m.MOP.APPEND, m.encodeAppend('r', 1, record(1)));
  assert.notEqual(stale.status, m.MSTATUS.OK, 'the older connection is refused');
  assert.match(m.errorMessage(stale.body), /newer mirror connection/);
  assert.notEqual((await old(m.MOP.TRIM, m.encodeTrim('r', 1, 1))).status, m.MSTATUS.OK);
  assert.equal(b.nvram.get('r').info().lastSeq, null, 'nothing of the older connection shows after the newer RESET');
  assert.equal((await fresh(m.MOP.APPEND, m.encodeAppend('r', 1, record(1)))).status, m.MSTATUS.OK);
  assert.equal(b.nvram.get('r').info().lastSeq, 1);
});

test('with mirror.partnerId, the mirror service admits only that node, and the link mirrors only to a node that answers with it', async (t) => {
  const m = await import('../../../src/protocol/mirror/codec.js');
  const b = await partnerB(t, 'a');
  await rawPeer(t, b.address, 'intruder', m.MSTATUS.AUTH);
  await rawPeer(t, b.address, 'a', m.MSTATUS.OK);
  // Node a expects its partner to be `c`: the node at that address is `b`, so a does not mirror to it.
  const a = await manager(t);
  const mirroring = new Mirroring({ nvram: a, partner: b.address, onPartnerDown: 'degrade', nodeId: 'a', token: undefined, partnerId: 'c', timeoutMs: 1000, retryMs: 50, log });
  mirroring.start();
  t.after(() => mirroring.close());
  await a.create('m', MiB, 'mirrored');
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(mirroring.info().link, 'down');
  assert.equal(a.get('m').info().mirror, 'degraded');
  assert.equal(b.nvram.find('m'), undefined, 'no replica was made on the wrong node');
});

test('split brain under degrade: the demoted old primary keeps its journal aside (diverged), with the records it acknowledged alone, and says so', async (t) => {
  // Issue 11 item 11: the demoted primary deleted its journal, and 30 acknowledged records with it.
  const { a, b, device } = await pair(t, 'm', 'mirrored');
  await device.open(1);
  for (let i = 1; i <= 3; i++) await device.append(1, [{ payload: Buffer.from(`both ${i}`) }]);
  // A partition: the link goes; A goes on alone (degrade), B's replica is taken over.
  await b.mirror.close();
  await until(() => device.info().mirror === 'degraded', 'degraded');
  for (let i = 4; i <= 6; i++) await device.append(1, [{ payload: Buffer.from(`a alone ${i}`) }]);
  await b.nvram.openJournal('m', 2);
  // The partition heals: A finds B newer and becomes its replica.
  await serveB(t, b.nvram, b.address);
  await until(() => a.list()[0]?.diverged === 1, 'the list says a journal was kept aside');
  assert.equal(device.role, 'replica');
  const { records, file } = await a.divergedRecords('m', 0, 100);
  assert.match(file, /m\.diverged-\d+$/);
  assert.deepEqual(records.map((r) => r.payload.toString()), ['both 1', 'both 2', 'both 3', 'a alone 4', 'a alone 5', 'a alone 6']);
  // Kept aside even once the device is gone here: listed and readable.
  await a.remove('m');
  assert.deepEqual((await a.divergedJournals()).map((d) => [d.name, d.files.length]), [['m', 1]]);
  assert.equal((await a.divergedRecords('m', 4, 100)).records.length, 3);
});

test('the replica of a write log belongs to the node too: no client of the partner node can take it over', async (t) => {
  // Issue 11 item 5, partner side: any rmem client could open the replica with a newer epoch and demote the owner's device.
  const { a, b, device } = await pair(t, 'wl', 'mirrored+local');
  // The volume layer claims it (as WriteLogIo.claim does): the replica is reset as node-owned.
  a.claimedBy = (name) => (name === 'wl' ? 'vol' : undefined);
  device.refreshReplica();
  await until(() => b.nvram.find('wl')?.nodeOwned === true && device.info().mirror === 'in-sync', 'replica reset as node-owned');
  await assert.rejects(b.nvram.openJournal('wl', 99), { code: 'MS_NVRAM_INVALID', message: /write log of the mirror partner/ });
  assert.equal(b.nvram.get('wl').role, 'replica');
  await device.open(device.epoch);
  const [appended] = await device.append(device.epoch, [{ payload: Buffer.from('still mirrored') }]);
  assert.equal(appended?.seq, 1, 'the owner keeps writing and mirroring');
  // The mark survives a clean restart of the partner node.
  const { dirname } = await import('node:path');
  await b.mirror.close();
  await b.nvram.close();
  const restarted = await manager(t, undefined, dirname(b.nvram.dir));
  assert.equal(restarted.find('wl')?.nodeOwned, true);
  await assert.rejects(restarted.openJournal('wl', 100), { code: 'MS_NVRAM_INVALID' });
  await serveB(t, restarted, b.address);
  await until(() => device.info().mirror === 'in-sync', 'in sync with the restarted partner');
  // Released (the volume removed): clients may take the replica over again.
  a.claimedBy = () => undefined;
  device.refreshReplica();
  await until(() => restarted.find('wl')?.nodeOwned === false && device.info().mirror === 'in-sync', 'replica reset as free');
});

test('a mirrored pair under random partitions, heals and takeovers: every acknowledged record is served by the node that serves the device, or kept aside and shown; nothing else is readable; epochs fence', async () => {
  // Issue 11: "A mirrored pair under partitions". Node A is the primary and mirrors to B
  // (degrade when cut); B's replica may be taken over while cut. Appends go one at a time.
  const fc = (await import('fast-check')).default;
  const { readFile: read } = await import('node:fs/promises');
  let run = 0;
  await fc.assert(
    fc.asyncProperty(fc.array(fc.constantFrom('appendA', 'appendA', 'appendB', 'cut', 'heal', 'takeover'), { minLength: 4, maxLength: 14 }), async (events) => {
      const name = `m${run++}`;
      const inner: (() => Promise<void> | void)[] = [];
      const ctx: Ctx = { after: (fn) => { inner.push(fn); } };
      try {
        const { a, b, device: devA } = await pair(ctx, name, 'mirrored+local');
        await devA.open(1);
        let service: MirrorService | undefined = b.mirror;
        let epochB = 0;
        const acked = new Set<string>();
        const tried = new Set<string>();
        let k = 0;
        // The schedule ends healed, so the pair has settled who serves.
        for (const event of [...events, 'heal']) {
          const devB = b.nvram.find(name);
          if (event === 'appendA' && devA.role === 'primary') {
            const payload = `a${k++}`;
            tried.add(payload);
            await devA.append(1, [{ payload: Buffer.from(payload) }]).then(() => acked.add(payload), () => undefined);
          } else if (event === 'appendB' && devB?.role === 'primary') {
            const payload = `b${k++}`;
            tried.add(payload);
            await devB.append(epochB, [{ payload: Buffer.from(payload) }]).then(() => acked.add(payload), () => undefined);
          } else if (event === 'cut' && service !== undefined) {
            await service.close();
            service = undefined;
            await until(() => devA.role !== 'primary' || devA.info().mirror !== 'in-sync', 'cut seen');
          } else if (event === 'heal' && service === undefined) {
            const keptBefore = a.divergedCounts().get(name) ?? 0;
            service = (await serveB(ctx, b.nvram, b.address)).mirror;
            // Back in sync, or A found B newer and became its replica (its journal kept aside).
            await until(() => (devA.role === 'primary' && devA.info().mirror === 'in-sync') || (a.divergedCounts().get(name) ?? 0) > keptBefore || (devA.role === 'replica' && keptBefore > 0), 'healed');
          } else if (event === 'takeover' && service === undefined && devB?.role === 'replica' && !devB.recovering) {
            epochB = devB.epoch + 1;
            await b.nvram.openJournal(name, epochB);
          }
        }
        // Who serves the device now, and what A kept aside.
        const devB = b.nvram.find(name);
        const serving = devB?.role === 'primary' ? devB : devA;
        const served = (await serving.collect(0, 1e6, 1e9)).map((buf) => decodeOne(buf)).filter((r) => (r.flags & RECORD_FLAG.VOID) === 0).map((r) => r.payload.toString());
        const kept: string[] = [];
        for (const file of await a.divergedOf(name)) {
          kept.push(...parseJournal(await read(file)).records.filter((r) => (r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM | RECORD_FLAG.VOID)) === 0).map((r) => r.payload.toString()));
        }
        for (const payload of acked) assert.ok(served.includes(payload) || kept.includes(payload), `${events.join(' ')}: acknowledged ${payload} is neither served nor kept aside`);
        for (const payload of served) assert.ok(acked.has(payload), `${events.join(' ')}: ${payload} is served but was never acknowledged`);
        assert.equal(new Set(served).size, served.length, 'no record served twice');
        if (kept.length > 0) assert.ok((a.list().find((d) => d.name === name)?.diverged ?? 0) > 0, 'what was kept aside is shown');
        // Epochs fence: once A knows B took over, A's writer of epoch 1 cannot append.
        if (devA.role === 'replica') await assert.rejects(devA.append(1, [{ payload: Buffer.from('late') }]));
      } catch (error) {
        // fast-check reports the schedule; say what broke too.
        console.log(`# schedule ${events.join(' ')}: ${(error as Error).message}`);
        throw error;
      } finally {
        for (const fn of inner.reverse()) await fn();
      }
    }),
    { numRuns: process.env.MEMSTRATA_SOAK === '1' ? 200 : 25 },
  );
});

// ---- a mirrored device as a volume's write log ----

async function writeLogOn(nvram: DeviceManager) {
  const { WriteLogIo } = await import('../../../src/storage/write-log.js');
  const { DirectVolumeIo } = await import('../../../src/storage/volume-io.js');
  const { Volume } = await import('../../../src/storage/volume-manager.js');
  const { MemoryStore } = await import('../../support/memory-store.js');
  const io = new WriteLogIo(new DirectVolumeIo(), nvram, log);
  nvram.claimedBy = (d) => io.owner(d);
  const store = new MemoryStore(MiB);
  const volume = new Volume('v', false, new Date().toISOString(), store, 'wl');
  return { io, store, volume };
}

test('a mirrored write log is claimed only once the partner holds its replica as the node\'s own: with the link down the claim is refused, and a claim that returns has made the replica node-owned', async (t) => {
  const { a, b, device } = await pair(t, 'wl', 'mirrored');
  const { io } = await writeLogOn(a);
  // Claimed while the link is down, the replica would stay free on the partner, and a
  // client there could take it over and demote the volume's log.
  await b.mirror.close();
  await until(() => device.info().mirror === 'degraded', 'link down');
  await assert.rejects(io.claim('v', 'wl'), { code: 'MS_NVRAM_PARTNER_DOWN' });
  assert.equal(io.owner('wl'), undefined, 'a refused claim leaves the device free');
  await serveB(t, b.nvram, b.address);
  await until(() => device.info().mirror === 'in-sync', 'in sync again');
  await io.claim('v', 'wl');
  assert.equal(b.nvram.get('wl').nodeOwned, true, 'the replica is node-owned when the claim returns');
  await assert.rejects(b.nvram.openJournal('wl', 99), { code: 'MS_NVRAM_INVALID' });
});

test('a write log that is a replica of the partner\'s device is never replayed into the volume: the volume stays recovering', async (t) => {
  const { b, device } = await pair(t, 'wl', 'mirrored');
  await device.open(1);
  // The partner's copy holds a record aimed at a volume v of the partner node.
  await device.append(1, [{ target: { volume: 'v', offset: 0 }, payload: Buffer.alloc(4096, 0x42) }]);
  await until(() => (b.nvram.get('wl').info().lastSeq ?? 0) >= 1, 'the replica holds it');
  const { io, store, volume } = await writeLogOn(b.nvram);
  await io.recover(volume);
  assert.match(volume.recovering?.why ?? '', /replica/);
  const block = Buffer.alloc(4096);
  await store.read(0, block);
  assert.ok(block.every((x) => x === 0), 'nothing of the replica reached the volume');
  assert.equal(b.nvram.get('wl').info().records, 1, 'and nothing was trimmed');
  // The volume may only be removed, which trims nothing of the partner's.
  assert.equal(volume.recovering?.removable, true);
  await io.discard(volume);
  assert.equal(b.nvram.get('wl').info().records, 1);
});

test('a resync syncs a mirrored journal before it resets the replica: acknowledged records are never on neither node\'s stable copy', async (t) => {
  const gate: { hold?: Promise<void> } = {};
  let release = (): void => undefined;
  let syncsDone = 0;
  const gated = (sink: JournalSink): JournalSink => ({
    ...sink,
    datasync: async () => {
      if (gate.hold !== undefined) await gate.hold; // a slow disk
      await sink.datasync();
      syncsDone++;
    },
  });
  const { a, b, device } = await pair(t, 'wl', 'mirrored', gated);
  const { io, volume } = await writeLogOn(a);
  await io.claim('v', 'wl');
  gate.hold = new Promise<void>((resolve) => (release = resolve));
  const before = syncsDone;
  for (let i = 0; i < 5; i++) await io.write(volume, i * 4096, Buffer.alloc(4096, 0x61 + i), true); // FUA: B holds them
  await io.flush(volume); // in sync: no sync here
  const acked = device.lastSeq;
  await until(() => (b.nvram.get('wl').info().lastSeq ?? 0) >= acked, 'B holds every acknowledged record');
  const seen: { atReset?: { synced: number } } = {};
  const original = b.nvram.resetReplica.bind(b.nvram);
  b.nvram.resetReplica = async (reset, feeder) => {
    seen.atReset ??= { synced: syncsDone - before };
    await original(reset, feeder);
  };
  // The link drops for a moment; B keeps its replica in memory.
  await b.mirror.close();
  await until(() => device.info().mirror !== 'in-sync', 'link down');
  await serveB(t, b.nvram, b.address);
  await new Promise((resolve) => setTimeout(resolve, 300));
  const atReset = (): { synced: number } | undefined => seen.atReset;
  assert.equal(atReset(), undefined, 'no RESET while the records the replica holds are not synced here');
  release();
  await until(() => device.info().mirror === 'in-sync', 'in sync again');
  assert.ok((atReset()?.synced ?? 0) > 0, 'the journal was synced before the RESET');
});

test('a mirrored+local write log keeps its own records at a resync: the partner\'s extra records, never acknowledged here, and its older trim point are not taken back', async (t) => {
  const m = await import('../../../src/protocol/mirror/codec.js');
  const { encodeRecord } = await import('../../../src/protocol/journal/record.js');
  const { a, b, device, mirroring } = await pair(t, 'wl', 'mirrored+local');
  const { io, volume } = await writeLogOn(a);
  await io.claim('v', 'wl');
  for (let i = 0; i < 4; i++) await io.write(volume, i * 4096, Buffer.alloc(4096, 0x61 + i), false);
  const last = device.lastSeq;
  const written = await device.collect(0, 100, MiB);
  await device.trim(device.epoch, last); // a checkpoint: the data is in the store
  mirroring.close();
  // The partner is left with the records from before the trim and one more that this
  // node never acknowledged (as after a crash with an append in flight).
  const extra = encodeRecord({ seq: last + 1, timestamp: 1, epoch: device.epoch, flags: 0, target: { volume: 'v', offset: 0 }, payload: Buffer.alloc(4096, 0x7a) });
  const peer = await rawPeer(t, b.address, 'a-before-its-crash');
  const reset = m.encodeReset({ name: 'wl', policy: 'mirrored+local', medium: a.mediumOf('wl'), size: MiB, epoch: device.epoch, trimmedTo: 0, firstSeq: 1, nodeOwned: true });
  assert.equal((await peer(m.MOP.RESET, reset)).status, m.MSTATUS.OK);
  assert.equal((await peer(m.MOP.APPEND, m.encodeAppend('wl', device.epoch, Buffer.concat([...written, extra])))).status, m.MSTATUS.OK);
  assert.equal(b.nvram.get('wl').info().lastSeq, last + 1);
  const again = new Mirroring({ nvram: a, partner: b.address, onPartnerDown: 'degrade', nodeId: 'a', token: undefined, timeoutMs: 500, retryMs: 20, log });
  again.start();
  t.after(() => again.close());
  await until(() => device.info().mirror === 'in-sync', 'in sync again');
  assert.equal(device.lastSeq, last, 'the partner\'s extra record was not taken');
  assert.equal(device.trimPoint, last, 'the trim point stayed');
  assert.equal(device.info().records, 0, 'no record already replayed came back');
  await until(() => b.nvram.get('wl').info().records === 0 && b.nvram.get('wl').trimPoint === last, 'the replica was reset to this node\'s copy');
});

test('a resync that meets a fenced journal is tried again once the repair has rewritten it: the device is mirrored again while the link stays up', async (t) => {
  const { FaultPlan, faultyJournal } = await import('../../support/faults.js');
  const plan = new FaultPlan();
  const b = await partnerB(t);
  const a = await manager(t, faultyJournal(plan));
  const mirroring = new Mirroring({ nvram: a, partner: b.address, onPartnerDown: 'refuse', nodeId: 'a', token: undefined, timeoutMs: 500, retryMs: 20, log });
  mirroring.start();
  t.after(() => mirroring.close());
  await a.create('m', MiB, 'mirrored');
  const device = a.get('m');
  await until(() => device.info().mirror === 'in-sync', 'in sync');
  await device.open(1);
  for (let i = 0; i < 3; i++) await device.append(1, [{ payload: Buffer.from(`r${i}`) }]);
  // A passing disk error: the sync when the link drops fails, and so does the first rewrite.
  plan.fail({ op: 'journal.datasync', fault: 'EIO' });
  plan.fail({ op: 'journal.write', fault: 'EIO' });
  await b.mirror.close();
  await until(() => device.info().mirror === 'refusing', 'link down');
  await until(() => plan.injected === 2, 'both faults hit');
  // The partner comes back while the journal is fenced; the next repair succeeds.
  await serveB(t, b.nvram, b.address);
  await until(() => device.info().mirror === 'in-sync', 'mirrored again');
  const [appended] = await device.append(1, [{ payload: Buffer.from('after the heal') }]);
  assert.equal(appended?.seq, 4);
  await until(() => b.nvram.get('m').info().lastSeq === 4, 'the replica has it');
});

// ---- accept-local: a mirrored write log's partner gone for good ----

const BLOCK = 4096;

/**
 * Node A back from a crash with a `mirrored` write log `wl` (epoch `epochA`, records 1..localCount
 * for volume v, block i = 0x61 + i), recovering; its old partner B holding a node-owned
 * replica at `epochB` with the `partner` records, unreachable for now. A's first journal
 * sink can be held (`gate.hold`) to stand for a slow disk.
 */
async function backFromCrash(t: Ctx, opts: { epochA: number; epochB: number; localCount: number; partner: Buffer[] }) {
  const { copyFile, mkdir } = await import('node:fs/promises');
  const { encodeRecord } = await import('../../../src/protocol/journal/record.js');
  const m = await import('../../../src/protocol/mirror/codec.js');
  const before = await mkdtemp(join(tmpdir(), 'memstrata-pair-before-'));
  t.after(() => rm(before, { recursive: true, force: true }));
  const src = await manager(t, undefined, before);
  await src.create('wl', MiB, 'mirrored');
  const d = src.get('wl');
  await d.open(opts.epochA);
  for (let i = 0; i < opts.localCount; i++) await d.append(opts.epochA, [{ target: { volume: 'v', offset: i * BLOCK }, payload: Buffer.alloc(BLOCK, 0x61 + i) }]);
  const dirA = await mkdtemp(join(tmpdir(), 'memstrata-pair-crashed-'));
  t.after(() => rm(dirA, { recursive: true, force: true }));
  await mkdir(join(dirA, 'nvram'), { recursive: true });
  for (const f of ['wl.json', 'wl.journal']) await copyFile(join(before, 'nvram', f), join(dirA, 'nvram', f)); // no vault: a crash
  const b = await partnerB(t);
  const peer = await rawPeer(t, b.address, 'a-before-its-crash');
  const reset = m.encodeReset({ name: 'wl', policy: 'mirrored', medium: 'dram', size: MiB, epoch: opts.epochB, trimmedTo: 0, firstSeq: 1, nodeOwned: true });
  assert.equal((await peer(m.MOP.RESET, reset)).status, m.MSTATUS.OK);
  const records = opts.partner.map((payload, i) => encodeRecord({ seq: i + 1, timestamp: 1, epoch: opts.epochB, flags: 0, target: { volume: 'v', offset: i * BLOCK }, payload }));
  assert.equal((await peer(m.MOP.APPEND, m.encodeAppend('wl', opts.epochB, Buffer.concat(records)))).status, m.MSTATUS.OK);
  await b.mirror.close(); // unreachable, its replica kept
  const gate: { hold?: Promise<void> } = {};
  let sinks = 0;
  const gatedFirst = (sink: JournalSink): JournalSink => (sinks++ > 0 ? sink : { ...sink, datasync: async () => { if (gate.hold !== undefined) await gate.hold; await sink.datasync(); } });
  const a = await manager(t, gatedFirst, dirA);
  const device = a.get('wl');
  assert.equal(device.recovering, true);
  const { io, store, volume } = await writeLogOn(a);
  await io.recover(volume);
  assert.ok(volume.recovering !== undefined, 'the volume waits');
  const mirroring = new Mirroring({ nvram: a, partner: b.address, onPartnerDown: 'degrade', nodeId: 'a', token: undefined, timeoutMs: 500, retryMs: 20, log });
  mirroring.start();
  t.after(() => mirroring.close());
  return { a, b, device, io, store, volume, gate };
}

async function blocksOf(store: { read(at: number, target: Buffer): Promise<void> }, count: number): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    const block = Buffer.alloc(BLOCK);
    await store.read(i * BLOCK, block);
    out.push(block[0] ?? 0);
  }
  return out;
}

test('accept-local while the old partner comes back: no resync runs until the newer epoch is durable, nothing of the partner\'s is taken back, and the volume is served from the local journal', async (t) => {
  const partner = [0, 1, 2, 3].map((i) => Buffer.alloc(BLOCK, 0x61 + i));
  const s = await backFromCrash(t, { epochA: 5, epochB: 5, localCount: 2, partner });
  let release = (): void => undefined;
  s.gate.hold = new Promise<void>((resolve) => (release = resolve)); // the marker's sync is slow
  const accepted = s.a.acceptLocal('wl');
  await new Promise((resolve) => setTimeout(resolve, 50));
  await serveB(t, s.b.nvram, s.b.address); // the old partner is back right then
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.equal(s.device.lastSeq, 2, 'no resync took the partner\'s records while the acceptance ran');
  release();
  assert.equal((await accepted).epoch, 6);
  await until(() => s.volume.recovering === undefined && s.device.info().mirror === 'in-sync', 'served and mirrored');
  assert.equal(s.device.epoch, 6, 'the epoch never goes back');
  assert.equal(s.device.lastSeq, 2);
  assert.deepEqual(await blocksOf(s.store, 4), [0x61, 0x62, 0, 0], 'the local records replayed, the partner\'s given up');
  await until(() => s.b.nvram.get('wl').info().epoch === 6 && s.b.nvram.get('wl').info().lastSeq === 2, 'the replica reset from this node');
});

test('a device that served since (accepted without its partner) never takes the partner\'s copy back, even at the same epoch with more records', async (t) => {
  // The partner is one epoch ahead of this node's file (its epoch reached the partner, the
  // marker was lost here): after the acceptance both say 6.
  const partner = [0, 1, 2, 3].map(() => Buffer.alloc(BLOCK, 0xee));
  const s = await backFromCrash(t, { epochA: 5, epochB: 6, localCount: 2, partner });
  await s.a.acceptLocal('wl');
  await until(() => s.volume.recovering === undefined, 'served');
  assert.equal(s.device.epoch, 6);
  await s.io.write(s.volume, 2 * BLOCK, Buffer.alloc(BLOCK, 0x99), true); // acknowledged after the acceptance
  await serveB(t, s.b.nvram, s.b.address);
  await until(() => s.device.info().mirror === 'in-sync', 'mirrored again');
  assert.equal(s.device.lastSeq, 3);
  const records = (await s.device.read(0)).map((r) => decodeOne(r).payload[0]);
  assert.deepEqual(records, [0x99], 'this node\'s record (the replay trimmed the others), not the partner\'s');
  assert.deepEqual(await blocksOf(s.store, 3), [0x61, 0x62, 0x99]);
});

test('accept-local racing a resync that demotes the device (the partner holds a newer epoch): neither waits for the other forever', async (t) => {
  const s = await backFromCrash(t, { epochA: 5, epochB: 7, localCount: 2, partner: [Buffer.alloc(BLOCK, 0x77)] });
  // The resync has decided to demote and is about to ask the device manager for it.
  const demote = s.a.demote.bind(s.a);
  let demoting = false;
  s.a.demote = async (name, why) => {
    demoting = true;
    await new Promise((resolve) => setTimeout(resolve, 100));
    return demote(name, why);
  };
  await serveB(t, s.b.nvram, s.b.address);
  await until(() => demoting, 'the resync demotes');
  const accepted = s.a.acceptLocal('wl').then(() => 'accepted', (error: unknown) => (error as { code?: string }).code ?? String(error));
  const outcome = await Promise.race([accepted, new Promise((resolve) => setTimeout(() => resolve('hung'), 5000))]);
  assert.equal(outcome, 'MS_NVRAM_INVALID', 'the device was demoted first: nothing to accept');
  await until(() => s.device.role === 'replica', 'the newer epoch wins: this node\'s copy is a replica');
  await s.a.create('other', MiB, 'local'); // the manager's queue is free
});

/** Node A mirroring to B through a proxy the test can stall and cut, with a `mirrored` device `wl` in sync. */
async function proxiedPair(t: Ctx, onPartnerDown: 'refuse' | 'degrade') {
  const b = await partnerB(t);
  const proxy = await startProxy(b.address);
  t.after(() => proxy.close());
  const a = await manager(t);
  const mirroring = new Mirroring({ nvram: a, partner: { host: proxy.host, port: proxy.port }, onPartnerDown, nodeId: 'a', token: undefined, timeoutMs: 2000, retryMs: 20, log });
  mirroring.start();
  t.after(() => mirroring.close());
  await a.create('wl', MiB, 'mirrored');
  const device = a.get('wl');
  await until(() => device.info().mirror === 'in-sync', 'in sync');
  return { a, b, device, proxy };
}

test('a mirrored write log under mirror.onPartnerDown=refuse: a FLUSH after the partner was lost, covering a plain WRITE the partner never took, fails instead of succeeding on this node alone, and succeeds once the partner is back', async (t) => {
  const { device, proxy, b } = await proxiedPair(t, 'refuse');
  const epoch = await device.fence();
  await device.append(epoch, [{ payload: Buffer.from('held') }], { sync: true });
  proxy.stall();
  // A plain WRITE: acknowledged at once, its send stuck in the stalled link.
  const [w] = await device.append(epoch, [{ payload: Buffer.from('acknowledged, never on the partner') }], { sync: false });
  assert.equal(w?.seq, 2);
  proxy.cut();
  await until(() => device.info().mirror === 'refusing', 'refusing');
  await assert.rejects(device.append(epoch, [{ payload: Buffer.from('fua') }], { sync: true }), (error: Error & { code?: string }) => error.code === 'MS_NVRAM_PARTNER_DOWN');
  await assert.rejects(device.commit(), (error: Error & { code?: string }) => error.code === 'MS_NVRAM_PARTNER_DOWN', 'the FLUSH covering record 2 fails while the partner does not hold it');
  proxy.release();
  proxy.heal();
  await until(() => device.info().mirror === 'in-sync', 'in sync again');
  await device.commit();
  assert.ok((b.nvram.get('wl').info().lastSeq ?? 0) >= 2, 'the resync gave the partner record 2');
});

test('a resync started while plain WRITEs\' sends are stuck in the link waits for them: the replica ends with every record, and the FLUSH returns', async (t) => {
  const { device, proxy, b } = await proxiedPair(t, 'degrade');
  const epoch = await device.fence();
  await device.commit();
  proxy.stall();
  let last = 0;
  for (let i = 0; i < 50; i++) {
    const [a] = await device.append(epoch, [{ payload: Buffer.from(`w${i}`) }], { sync: false });
    last = a?.seq ?? 0;
  }
  device.refreshReplica(); // a resync (STATE, RESET, push) while the APPENDs wait in the link
  const flush = device.commit();
  await new Promise((resolve) => setTimeout(resolve, 50));
  proxy.release();
  await flush;
  await until(() => device.info().mirror === 'in-sync', 'in sync');
  const replica = b.nvram.get('wl');
  await until(() => replica.info().lastSeq === last, 'the replica holds every record');
  assert.equal(replica.info().lastSeq, device.lastSeq);
});

test('the link cut while plain WRITEs\' sends wait and a FLUSH waits for them (degrade): the FLUSH returns once they are synced here', async (t) => {
  const { a, device, proxy } = await proxiedPair(t, 'degrade');
  const epoch = await device.fence();
  await device.commit();
  proxy.stall();
  for (let i = 0; i < 20; i++) await device.append(epoch, [{ payload: Buffer.from(`w${i}`) }], { sync: false });
  const flush = device.commit();
  await new Promise((resolve) => setTimeout(resolve, 20));
  proxy.cut();
  await flush;
  const file = parseJournal(await readFile(join(a.dir, 'wl.journal'))).records.filter((r) => (r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) === 0);
  assert.ok(file.length >= 20, `the journal holds ${file.length} records, not the 20 the FLUSH covered`);
});

test('mirrored appends staged in pooled buffers and sent without a copy: the partner and the journal hold every record with the bytes its append carried', async (t) => {
  for (const policy of ['mirrored', 'mirrored+local'] as const) {
    const { b, device } = await pair(t, policy === 'mirrored' ? 'ps' : 'pl', policy);
    await device.open(1);
    // Overlapping appends of 1 to 3 records, 4 to 20 KiB each, started a little apart,
    // so staging buffers are given back and taken again while others are in flight.
    const expected = new Map<number, Buffer>();
    await Promise.all(Array.from({ length: 40 }, async (_, i) => {
      if (i % 3 === 0) await new Promise((resolve) => setTimeout(resolve, i % 5));
      const entries = Array.from({ length: 1 + (i % 3) }, (_, j) => {
        const payload = Buffer.alloc(4096 + ((i * 7919 + j * 104_729) % 16_384), (i * 3 + j) % 251);
        payload.writeUInt32BE(i * 10 + j, 0);
        return { payload };
      });
      const acks = await device.append(1, entries);
      acks.forEach((ack, j) => expected.set(ack.seq, entries[j]?.payload ?? Buffer.alloc(0)));
    }));
    const replica = b.nvram.get(device.name);
    await until(() => replica.lastSeq >= Math.max(...expected.keys()), 'the replica has every record');
    for (const [where, records] of [['primary', await device.read(0, 4096)], ['replica', await replica.collect(0, 4096, 64 * MiB)]] as const) {
      assert.equal(records.length, expected.size, `${policy}: ${where} holds every record`);
      for (const bytes of records) {
        const record = decodeOne(bytes);
        assert.ok(record.payload.equals(expected.get(record.seq) ?? Buffer.alloc(0)), `${policy}: ${where} record ${record.seq} holds its own bytes`);
      }
    }
  }
});

test('a WRITE larger than a record through a mirrored write log goes to the partner record by record: the link stays up, the replica holds every record, and a replay gives the WRITE whole', async (t) => {
  // Review finding: its records went as one frame, larger than the partner takes, which
  // dropped the link (and, under refuse, failed the WRITE).
  const { a, b, device } = await pair(t, 'wl', 'mirrored', undefined, 48 * MiB);
  const { WriteLogIo } = await import('../../../src/storage/write-log.js');
  const { DirectVolumeIo } = await import('../../../src/storage/volume-io.js');
  const { Volume } = await import('../../../src/storage/volume-manager.js');
  const { MemoryStore } = await import('../../support/memory-store.js');
  const io = new WriteLogIo(new DirectVolumeIo(), a, log);
  await io.claim('v', 'wl');
  const volume = new Volume('v', false, new Date().toISOString(), new MemoryStore(32 * MiB), 'wl');
  const data = Buffer.alloc(17 * MiB);
  for (let i = 0; i < data.length; i += 4096) data[i] = (i / 4096) % 251;
  await io.write(volume, MiB, data, false);
  assert.equal(device.info().mirror, 'in-sync', 'the link went down');
  assert.equal(device.lastSeq, 2, 'two records');
  assert.equal(b.nvram.get('wl').info().lastSeq, 2, 'the replica holds both');
  const fresh = new Volume('v', false, new Date().toISOString(), new MemoryStore(32 * MiB), 'wl');
  assert.equal(await io.replay(fresh), 2);
  const back = Buffer.alloc(data.length);
  await fresh.store.read(MiB, back);
  assert.ok(back.equals(data), 'the replay gives the WRITE whole');
});
