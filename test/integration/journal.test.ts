// NVRAM journals over rmem against a real node: operations, fencing between clients,
// bad input, and crash consistency under kill -9.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { connect } from 'node:net';
import { join } from 'node:path';
import { RmemClient } from '../../src/client/rmem-client.js';
import * as codec from '../../src/protocol/rmem/codec.js';
import { OP, STATUS, VERSION } from '../../src/protocol/rmem/spec.js';
import { FrameParser } from '../../src/protocol/rmem/parser.js';
import { runCli, startNode, tempDir, type NodeProcess } from '../support/node-process.js';

type Ctx = { after(fn: () => Promise<unknown>): void };

async function createDevice(n: NodeProcess, name: string, size: string, policy: string): Promise<void> {
  const response = await fetch(`${n.url}/v1/nvram`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name, size, policy }) });
  assert.equal(response.status, 201, await response.text());
}

async function client(t: Ctx, n: NodeProcess, id: string): Promise<RmemClient> {
  const c = await RmemClient.connect({ ...n.rmem, serverId: id, reconnect: false });
  t.after(() => c.close());
  return c;
}

test('journal over rmem: open, append with targets, read, trim, info; a full device refuses', async (t) => {
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir });
  t.after(() => n.stop('SIGKILL'));
  await createDevice(n, 'j', '1MiB', 'local');
  const c = await client(t, n, 'writer');
  const journal = await c.journalOpen('j', 1);
  assert.deepEqual([journal.info.epoch, journal.info.lastSeq, journal.info.policy], [1, 0, 'local']);
  const acks = await c.journalAppend(journal, [
    { payload: Buffer.from('begin') },
    { payload: Buffer.alloc(4096, 7), target: { volume: 'default', offset: 8192 } },
  ]);
  assert.deepEqual(acks.map((a) => a.seq), [1, 2]);
  assert.ok(Math.abs(acks[0]!.timestamp / 1000 - Date.now()) < 60_000, 'timestamps are microseconds since the epoch');
  const many = await Promise.all(Array.from({ length: 32 }, (_, i) => c.journalAppend(journal, [{ payload: Buffer.from(`r${i}`) }])));
  assert.deepEqual(many.map((a) => a[0]!.seq).sort((x, y) => x - y), Array.from({ length: 32 }, (_, i) => i + 3));
  const records = await c.journalRead(journal, 2, 3);
  assert.deepEqual(records.map((r) => r.seq), [2, 3, 4]);
  assert.deepEqual(records[0]!.target, { volume: 'default', offset: 8192 });
  await c.journalTrim(journal, 10);
  const info = await c.journalInfo(journal);
  assert.deepEqual([info.firstSeq, info.lastSeq], [11, 34]);
  await assert.rejects(c.journalAppend(journal, [{ payload: Buffer.alloc(2 * 2 ** 20) }]), { code: 'MS_NVRAM_FULL' });
  await assert.rejects(c.journalOpen('missing', 1), { code: 'MS_NVRAM_NOT_FOUND' });

  const dump = (await (await fetch(`${n.url}/v1/nvram/j/records?from=11&max=2`)).json()) as { records: { seq: number; payload: string }[] };
  // The 32 appends left in order on one connection, so record 3 + i carries r{i}.
  assert.deepEqual(dump.records.map((r) => [r.seq, Buffer.from(r.payload, 'base64').toString()]), [[11, 'r8'], [12, 'r9']]);
  // cut-journal refuses a journal of a data directory a node runs in (it holds the lock).
  const cut = await runCli(['nvram', 'cut-journal', join(dir, 'memstrata-data', 'nvram', 'j.journal'), '--dry-run']);
  assert.equal(cut.code, 1, cut.stdout);
  assert.match(cut.stderr, /MS_NODE_LOCKED/);
  // The journal file shows in the metrics: a 16 MiB ring (the least), and its syncs.
  const metrics = await (await fetch(`${n.url}/metrics`)).text();
  assert.match(metrics, /memstrata_nvram_journal_bytes\{device="j",what="ring"\} 16777216/);
  const syncs = Number(/memstrata_nvram_journal_events\{device="j",what="syncs"\} (\d+)/.exec(metrics)?.[1]);
  assert.ok(syncs >= 2 && syncs <= 36, `${syncs} journal syncs for 35 appends, a trim and the open`);
});

test('pipelined JAPPENDs whose bodies arrive whole in one socket read (taken into pooled buffers): every record reads back with its own bytes', async (t) => {
  const n = await startNode({ cwd: await tempDir(t) });
  t.after(() => n.stop('SIGKILL'));
  await createDevice(n, 'ja', '8MiB', 'volatile');
  await createDevice(n, 'jb', '8MiB', 'volatile');
  const c = await client(t, n, 'pipeliner');
  const ja = await c.journalOpen('ja', 1);
  const jb = await c.journalOpen('jb', 1);
  const sent = { a: [] as Buffer[], b: [] as Buffer[] };
  for (let round = 0; round < 10; round++) {
    // Two journals alternated in one tick: one JAPPEND each, written together, so most
    // bodies (over 4 KiB) are whole in a read the node reuses.
    const acks: Promise<unknown>[] = [];
    for (let i = 0; i < 60; i++) {
      const pa = randomBytes(4100 + Math.floor(Math.random() * 3000));
      const pb = randomBytes(4100 + Math.floor(Math.random() * 3000));
      sent.a.push(pa);
      sent.b.push(pb);
      acks.push(c.journalAppend(ja, [{ payload: pa }]), c.journalAppend(jb, [{ payload: pb }]));
    }
    await Promise.all(acks);
  }
  for (const [journal, list] of [[ja, sent.a], [jb, sent.b]] as const) {
    const got: Buffer[] = [];
    for (let from = 1; got.length < list.length; ) {
      const records = await c.journalRead(journal, from, 1024, 8 * 2 ** 20);
      if (records.length === 0) break;
      for (const r of records) got.push(Buffer.from(r.payload));
      from = (records.at(-1)?.seq ?? from) + 1;
    }
    assert.equal(got.length, list.length);
    list.forEach((payload, i) => assert.ok(got[i]?.equals(payload), `record ${i + 1} of ${journal.device} holds its own bytes`));
  }
});

test('fencing between clients: after a newer open, the older one cannot append, and nothing it sent shows', async (t) => {
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir });
  t.after(() => n.stop('SIGKILL'));
  await createDevice(n, 'f', '1MiB', 'volatile');
  const old = await client(t, n, 'primary');
  const oldJournal = await old.journalOpen('f', 5);
  await old.journalAppend(oldJournal, [{ payload: Buffer.from('before failover') }]);
  const fresh = await client(t, n, 'standby');
  const newJournal = await fresh.journalOpen('f', 6);
  await assert.rejects(old.journalAppend(oldJournal, [{ payload: Buffer.from('zombie') }]), { code: 'MS_NVRAM_FENCED' });
  await assert.rejects(old.journalTrim(oldJournal, 1), { code: 'MS_NVRAM_FENCED' });
  await assert.rejects(old.journalOpen('f', 5), { code: 'MS_NVRAM_FENCED' });
  await fresh.journalAppend(newJournal, [{ payload: Buffer.from('after failover') }]);
  const all = await fresh.journalRead(newJournal, 0);
  assert.deepEqual(all.map((r) => [r.seq, r.payload.toString(), r.epoch]), [[1, 'before failover', 5], [2, 'after failover', 6]]);
});

test('bad journal input is refused with errors and the device stays usable', async (t) => {
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir });
  t.after(() => n.stop('SIGKILL'));
  await createDevice(n, 'b', '1MiB', 'local');
  const socket = connect(n.rmem.port, n.rmem.host);
  const replies: { op: number; word: number; lo: number; body: Buffer }[] = [];
  const parser = new FrameParser('response', { onFrame: (f) => replies.push({ op: f.op, word: f.word, lo: f.tagLo, body: Buffer.from(f.body) }), onFatal: () => socket.destroy() });
  socket.on('data', (c: Buffer) => parser.feed(c));
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  t.after(async () => socket.destroy());
  socket.write(codec.encodeHelloRequest({ hi: 0, lo: 1 }, { version: VERSION, serverId: 'raw', token: '' }));
  socket.write(codec.encodeJopenRequest({ hi: 0, lo: 2 }, 'b', 1));
  // The handle exists once JOPEN is answered (requests in flight are not ordered).
  for (let i = 0; i < 1000 && !replies.some((r) => r.lo === 2); i++) await new Promise((r) => setTimeout(r, 20));
  const appendParts = codec.encodeJappendRequest({ hi: 0, lo: 3 }, 1, [{ payload: Buffer.from('good'), target: undefined }]);
  const broken = Buffer.concat(appendParts);
  broken.writeUInt32BE(999, 26); // the entry claims 999 payload bytes; the frame has 4
  socket.write(broken);
  socket.write(codec.encodeHandleRequest(OP.JINFO, { hi: 0, lo: 4 }, 77)); // a handle never opened
  socket.write(Buffer.concat(codec.encodeJappendRequest({ hi: 0, lo: 5 }, 1, [{ payload: Buffer.from('still fine'), target: { volume: 'x'.repeat(100), offset: 0 } }])));
  socket.write(Buffer.concat(codec.encodeJappendRequest({ hi: 0, lo: 6 }, 1, [{ payload: Buffer.from('still fine'), target: undefined }])));
  for (let i = 0; i < 1000 && replies.length < 6; i++) await new Promise((r) => setTimeout(r, 20));
  assert.equal(replies.length, 6, 'every request answered within 20 s');
  const byTag = new Map(replies.map((r) => [r.lo, r]));
  assert.equal(byTag.get(2)?.word, STATUS.OK);
  assert.equal(byTag.get(3)?.word, STATUS.PROTOCOL);
  assert.equal(byTag.get(4)?.word, STATUS.INVALID);
  assert.equal(byTag.get(5)?.word, STATUS.INVALID);
  assert.equal(byTag.get(6)?.word, STATUS.OK);
  assert.deepEqual(codec.decodeJappendReply(byTag.get(6)!.body).map((a) => a.seq), [1], 'the refused appends took no sequence numbers');
});

test('crash consistency: kill -9 at random moments; every acknowledged record comes back intact and in order', async (t) => {
  const dir = await tempDir(t);
  const payloadOf = (seqHint: number, k: number) => createHash('sha256').update(`${seqHint}:${k}`).digest();
  const acked = new Map<number, string>(); // seq -> hex payload
  const attempted = new Set<string>();
  let epoch = 1;
  for (let round = 0; round < 4; round++) {
    const n = await startNode({ cwd: dir });
    t.after(() => n.stop('SIGKILL'));
    if (round === 0) await createDevice(n, 'crash', '4MiB', 'local');
    const c = await RmemClient.connect({ ...n.rmem, serverId: `w${round}`, reconnect: false, timeoutMs: 3000 });
    const journal = await c.journalOpen('crash', ++epoch);
    // Everything acknowledged before is there, intact, in order, and nothing else.
    // Page through: a JREAD returns at most 4096 records.
    const back: Awaited<ReturnType<RmemClient["journalRead"]>> = [];
    for (let from = 0; ; ) {
      const page = await c.journalRead(journal, from, 4096, 16 * 2 ** 20);
      if (page.length === 0) break;
      back.push(...page);
      from = page.at(-1)!.seq + 1;
    }
    back.forEach((r, i) => {
      assert.equal(r.seq, (back[0]?.seq ?? 0) + i, 'in order without gaps');
      assert.ok(attempted.has(r.payload.toString('hex')), `record ${r.seq} was never written`);
    });
    const bySeq = new Map(back.map((r) => [r.seq, r.payload.toString('hex')]));
    for (const [seq, hex] of acked) assert.equal(bySeq.get(seq), hex, `acknowledged record ${seq} lost or changed`);
    // Trim what was verified so the 4 MiB device does not fill up over the rounds.
    if (back.length > 0) await c.journalTrim(journal, back.at(-1)!.seq);
    acked.clear();

    let stop = false;
    let k = 0;
    const writers = Array.from({ length: 32 }, async () => {
      while (!stop) {
        const payload = payloadOf(round, k++);
        attempted.add(payload.toString('hex'));
        try {
          const [ack] = await c.journalAppend(journal, [{ payload }]);
          if (ack !== undefined) acked.set(ack.seq, payload.toString('hex'));
        } catch {
          return; // the node was killed
        }
      }
    });
    await new Promise((resolve) => setTimeout(resolve, 100 + Math.floor(Math.random() * 300)));
    assert.equal(await n.stop('SIGKILL'), 'SIGKILL');
    stop = true;
    await Promise.all(writers);
    await c.close();
    assert.ok(acked.size > 0, `round ${round} acknowledged some appends`);
  }
});

test('a device that is a volume\'s write log is not open to rmem clients', async (t) => {
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir });
  t.after(() => n.stop('SIGKILL'));
  await createDevice(n, 'wl', '1MiB', 'local');
  const volume = await fetch(`${n.url}/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'jv', size: '4MiB', writeLog: 'wl' }) });
  assert.equal(volume.status, 201, await volume.text());
  const again = await fetch(`${n.url}/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'jv2', size: '4MiB', writeLog: 'wl' }) });
  assert.equal(again.status, 400, 'one volume per write log');
  await createDevice(n, 'mwl', '1MiB', 'mirrored');
  const mirrored = await fetch(`${n.url}/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'jv3', size: '4MiB', writeLog: 'mwl' }) });
  // A mirrored write log needs its partner to hold the replica as the node's own first.
  assert.equal(mirrored.status, 503);
  assert.match(await mirrored.text(), /MS_NVRAM_PARTNER_DOWN.*not in sync with its mirror partner/);
  const c = await client(t, n, 'intruder');
  await assert.rejects(c.journalOpen('wl', 99), (error: Error & { code?: string }) => {
    assert.equal(error.code, 'MS_RMEM_INVALID');
    assert.match(error.message, /write log of volume jv/);
    return true;
  });
});
