// Mirrored NVRAM devices between two real nodes on loopback: failover after kill -9 of
// the primary, the old primary coming back as a replica, and a partner that is down
// (degrade or refuse, as configured), then returns and is brought up to date.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import { RmemClient, type Journal } from '../../src/client/rmem-client.js';
import { journalKeeping } from '../support/faults.js';
import { encodeRecord } from '../../src/protocol/journal/record.js';
import * as m from '../../src/protocol/mirror/codec.js';
import { FrameParser, type Frame } from '../../src/protocol/rmem/parser.js';
import { freePort, startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { nvramDevice, until } from '../support/nvram-probe.js';

type Ctx = { after(fn: () => Promise<unknown>): void };

async function createDevice(n: NodeProcess, name: string, policy: string): Promise<void> {
  const response = await fetch(`${n.url}/v1/nvram`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name, size: '4MiB', policy }) });
  assert.equal(response.status, 201, await response.text());
}



function pair(dirA: string, dirB: string, portA: number, portB: number, extra: readonly string[] = []) {
  const args = (own: number, partner: number) => ['--mirror-listen', `127.0.0.1:${own}`, '--mirror-partner', `127.0.0.1:${partner}`, '--set', 'mirror.timeout=500ms', ...extra];
  return {
    a: () => startNode({ cwd: dirA, args: args(portA, portB) }),
    b: () => startNode({ cwd: dirB, args: args(portB, portA) }),
  };
}

async function readAll(c: RmemClient, journal: Journal): Promise<{ seq: number; payload: Buffer; epoch: number }[]> {
  const out: { seq: number; payload: Buffer; epoch: number }[] = [];
  for (;;) {
    const batch = await c.journalRead(journal, (out.at(-1)?.seq ?? 0) + 1);
    if (batch.length === 0) return out;
    out.push(...batch);
  }
}

async function client(t: Ctx, n: NodeProcess, id: string): Promise<RmemClient> {
  const c = await RmemClient.connect({ ...n.rmem, serverId: id, reconnect: false, timeoutMs: 5000 });
  t.after(() => c.close());
  return c;
}

/** Two partnered nodes with a `mirrored` device `m` created on the first, its replica in sync. */
async function mirroredPair(t: Ctx) {
  const [dirA, dirB] = [await tempDir(t), await tempDir(t)];
  const nodes = pair(dirA, dirB, await freePort(), await freePort());
  const a = await nodes.a();
  t.after(() => a.stop('SIGKILL'));
  const b = await nodes.b();
  t.after(() => b.stop('SIGKILL'));
  await createDevice(a, 'm', 'mirrored');
  await until('primary in sync', () => nvramDevice(a, 'm'), (d) => d?.mirror === 'in-sync');
  return { nodes, dirA, a, b };
}

test('mirror failover: kill -9 the primary mid-stream; the partner, opened with a newer epoch, has every acknowledged record and goes on', async (t) => {
  const { nodes, a, b } = await mirroredPair(t);
  assert.equal((await nvramDevice(b, 'm'))?.role, 'replica');

  const writer = await RmemClient.connect({ ...a.rmem, serverId: 'app', reconnect: false, timeoutMs: 5000 });
  const journal = await writer.journalOpen('m', 1);
  const payloadOf = (i: number) => createHash('sha256').update(`m:${i}`).digest();
  const acked = new Map<number, string>();
  const written = new Set<string>();
  let next = 0;
  let stop = false;
  const lane = async () => {
    while (!stop) {
      const i = next++;
      const payload = payloadOf(i);
      written.add(payload.toString('hex'));
      try {
        const [ack] = await writer.journalAppend(journal, [{ payload }]);
        acked.set(ack!.seq, payload.toString('hex'));
      } catch {
        return;
      }
    }
  };
  const lanes = Array.from({ length: 32 }, () => lane());
  await until('records acknowledged', () => Promise.resolve(acked.size), (n) => n >= 1500, 30000);
  await a.stop('SIGKILL');
  stop = true;
  await Promise.all(lanes);
  writer.close();

  const standby = await client(t, b, 'standby');
  const taken = await standby.journalOpen('m', 2);
  const records = await readAll(standby, taken);
  const bySeq = new Map(records.map((r) => [r.seq, r.payload.toString('hex')]));
  for (const [seq, hex] of acked) assert.equal(bySeq.get(seq), hex, `acknowledged record ${seq} is on the partner, intact`);
  assert.deepEqual(records.map((r) => r.seq), records.map((_, i) => i + 1), 'in order, with no gap');
  for (const r of records) assert.ok(written.has(r.payload.toString('hex')), `record ${r.seq} was written by the client`);

  // The partner is the primary now; its own partner (the old primary) is down, so it degrades.
  const [after] = await standby.journalAppend(taken, [{ payload: Buffer.from('after failover') }]);
  assert.equal(after?.seq, records.length + 1);
  const now = await nvramDevice(b, 'm');
  assert.deepEqual([now?.role, now?.mirror, now?.epoch], ['primary', 'degraded', 2]);
  const metrics = await (await fetch(`${b.url}/metrics`)).text();
  assert.match(metrics, /memstrata_nvram_degraded 1/);
  assert.match(metrics, /memstrata_mirror_link_up\{partner="[^"]+"\} 0/);

  // The old primary comes back: it finds a newer epoch on the partner and becomes its replica.
  const back = await nodes.a();
  t.after(() => back.stop('SIGKILL'));
  await until('new primary in sync again', () => nvramDevice(b, 'm'), (d) => d?.mirror === 'in-sync');
  const replica = await until('old primary is a replica', () => nvramDevice(back, 'm'), (d) => d?.role === 'replica' && d.state === 'ready');
  assert.deepEqual([replica?.lastSeq, replica?.epoch], [after?.seq, 2]);
  const dump = (await (await fetch(`${back.url}/v1/nvram/m/records?from=${after.seq}&max=1`)).json()) as { records: { payload: string }[] };
  assert.equal(Buffer.from(dump.records[0]!.payload, 'base64').toString(), 'after failover');
  // The stale writer's epoch is fenced on both nodes.
  const zombie = await client(t, back, 'zombie');
  await assert.rejects(zombie.journalOpen('m', 1), { code: 'MS_NVRAM_FENCED' });
});

test('partner down: mirrored devices degrade (the default) or refuse, and a returning partner is brought up to date', async (t) => {
  const [dirA, dirB, dirC] = [await tempDir(t), await tempDir(t), await tempDir(t)];
  const [portA, portB] = [await freePort(), await freePort()];
  const degrade = pair(dirA, dirB, portA, portB);
  const a = await degrade.a();
  t.after(() => a.stop('SIGKILL'));
  await createDevice(a, 'd', 'mirrored');
  await createDevice(a, 'dl', 'mirrored+local');
  assert.equal((await nvramDevice(a, 'd'))?.mirror, 'degraded');
  const c = await client(t, a, 'app');
  const jd = await c.journalOpen('d', 1);
  const jdl = await c.journalOpen('dl', 1);
  for (let i = 0; i < 20; i++) await c.journalAppend(jd, [{ payload: Buffer.from(`alone ${i}`) }]);
  await c.journalAppend(jdl, [{ payload: Buffer.from('alone, local') }]);
  assert.ok(a.logs.some((l) => l.msg === 'mirrored NVRAM device waits for its partner' && l.mode === 'degraded'));
  const info = (await (await fetch(`${a.url}/v1/node`)).json()) as { mirror: { link: string; onPartnerDown: string } };
  assert.deepEqual([info.mirror.link, info.mirror.onPartnerDown], ['down', 'degrade']);

  // The partner starts: both devices are resynced, and appends are mirrored again.
  const b = await degrade.b();
  t.after(() => b.stop('SIGKILL'));
  await until('resynced', () => nvramDevice(a, 'd'), (d) => d?.mirror === 'in-sync');
  await until('resynced', () => nvramDevice(a, 'dl'), (d) => d?.mirror === 'in-sync');
  await c.journalAppend(jd, [{ payload: Buffer.from('mirrored') }]);
  const replica = await nvramDevice(b, 'd');
  assert.deepEqual([replica?.role, replica?.lastSeq, replica?.records], ['replica', 21, 21]);
  assert.equal((await nvramDevice(b, 'dl'))?.lastSeq, 1);

  // The partner goes away again: the next appends still succeed, degraded, and it is logged.
  await b.stop('SIGKILL');
  await c.journalAppend(jd, [{ payload: Buffer.from('degraded again') }]);
  await until('degraded', () => nvramDevice(a, 'd'), (d) => d?.mirror === 'degraded');
  assert.ok(a.logs.some((l) => typeof l.msg === 'string' && l.msg.startsWith('mirror link down')));

  // A node configured to refuse: appends fail with a coded error while the partner is away.
  const refuse = pair(dirC, dirB, await freePort(), await freePort(), ['--set', 'mirror.onPartnerDown=refuse']);
  const r = await refuse.a();
  t.after(() => r.stop('SIGKILL'));
  await createDevice(r, 'r', 'mirrored');
  assert.equal((await nvramDevice(r, 'r'))?.mirror, 'refusing');
  const rc = await client(t, r, 'app');
  const jr = await rc.journalOpen('r', 1);
  await assert.rejects(rc.journalAppend(jr, [{ payload: Buffer.from('no partner') }]), (error: Error & { code?: string }) => {
    assert.equal(error.code, 'MS_NVRAM_PARTNER_DOWN');
    assert.match(error.message, /partner is unreachable/);
    return true;
  });
  assert.equal((await nvramDevice(r, 'r'))?.lastSeq, null, 'a refused append leaves nothing behind');
});

test('a mirrored primary that lost records in a crash waits for its partner, then takes the records back', async (t) => {
  const { nodes, dirA, a, b } = await mirroredPair(t);
  const c = await RmemClient.connect({ ...a.rmem, serverId: 'app', reconnect: false, timeoutMs: 5000 });
  const journal = await c.journalOpen('m', 1);
  for (let i = 1; i <= 100; i++) await c.journalAppend(journal, [{ payload: Buffer.from(`record ${i}`) }]);
  c.close();
  await a.stop('SIGKILL');
  // The OS lost the file's unsynced tail (as after a power cut): keep its first 60 records.
  const path = join(dirA, 'memstrata-data', 'nvram', 'm.journal');
  await writeFile(path, journalKeeping(await readFile(path), (r) => r.flags !== 0 || r.seq <= 60));
  // The partner stops cleanly meanwhile; its replica goes to the vault.
  assert.equal(await b.stop('SIGTERM'), 0);

  const again = await nodes.a();
  t.after(() => again.stop('SIGKILL'));
  assert.equal((await nvramDevice(again, 'm'))?.state, 'recovering');
  const early = await client(t, again, 'early');
  await assert.rejects(early.journalOpen('m', 2), { code: 'MS_NVRAM_RECOVERING' });

  const partner = await nodes.b();
  t.after(() => partner.stop('SIGKILL'));
  const recovered = await until('recovered from the partner', () => nvramDevice(again, 'm'), (d) => d?.state === 'ready' && d.mirror === 'in-sync');
  assert.equal(recovered?.lastSeq, 100);
  const w = await client(t, again, 'writer');
  const j = await w.journalOpen('m', 2);
  const records = await readAll(w, j);
  assert.deepEqual(records.map((r) => r.payload.toString()), Array.from({ length: 100 }, (_, i) => `record ${i + 1}`));
  const [next] = await w.journalAppend(j, [{ payload: Buffer.from('next') }]);
  assert.equal(next?.seq, 101);
  assert.ok(again.logs.some((l) => l.msg === 'took records from the mirror partner that this node lost in a crash'));
});

test('a replica removed on the partner while the device is idle: the primary\'s idle probe finds it gone and fills it again', async (t) => {
  const { a, b } = await mirroredPair(t);
  const writer = await RmemClient.connect({ ...a.rmem, serverId: 'idle', reconnect: false, timeoutMs: 5000 });
  t.after(() => writer.close());
  const journal = await writer.journalOpen('m', 1);
  for (let i = 0; i < 20; i++) await writer.journalAppend(journal, [{ payload: Buffer.from(`idle ${i}`) }]);
  const removed = await fetch(`${b.url}/v1/nvram/m`, { method: 'DELETE' });
  assert.ok(removed.ok, await removed.text());
  // No append comes: only the probe can tell the primary its replica is gone.
  await until('the replica is back on the partner with every record', () => nvramDevice(b, 'm'), (d) => d?.role === 'replica' && d.records === 20, 10_000);
  assert.ok(a.logs.some((l) => l.why === 'the partner no longer holds the replica'));
  assert.equal((await nvramDevice(a, 'm'))?.mirror, 'in-sync');
});

test('the mirror service refuses bad input with coded statuses and keeps serving', async (t) => {
  const dir = await tempDir(t);
  const n = await startNode({ cwd: dir, args: ['--set', 'mirror.token=s3cret'] });
  t.after(() => n.stop('SIGKILL'));
  await createDevice(n, 'own', 'local');
  const open = async () => {
    const socket = connect(n.mirror.port, n.mirror.host);
    const replies: Frame[] = [];
    let closed = false;
    const parser = new FrameParser({ magic: m.MIRROR_RESPONSE_MAGIC }, { onFrame: (f) => replies.push({ ...f, body: Buffer.from(f.body) }), onFatal: () => socket.destroy() });
    socket.on('data', (chunk: Buffer) => parser.feed(chunk));
    socket.on('close', () => (closed = true));
    socket.on('error', () => undefined);
    await new Promise<void>((resolve) => socket.once('connect', resolve));
    t.after(async () => socket.destroy());
    const ask = async (op: number, tag: number, body: Buffer): Promise<Frame> => {
      socket.write(m.request(op, tag, body));
      return until(`reply ${tag}`, () => Promise.resolve(replies.find((r) => r.tagLo === tag)), (r) => r !== undefined) as Promise<Frame>;
    };
    return { socket, ask, isClosed: () => closed };
  };

  const first = await open();
  assert.equal((await first.ask(m.MOP.STATE, 1, m.encodeName('own'))).word, m.MSTATUS.PROTOCOL, 'HELLO comes first');
  const wrong = await open();
  assert.equal((await wrong.ask(m.MOP.HELLO, 1, m.encodeHello({ version: 1, nodeId: 'x', token: 'guess' }))).word, m.MSTATUS.AUTH);
  await until('closed after a bad token', () => Promise.resolve(wrong.isClosed()), (v) => v);
  const old = await open();
  assert.equal((await old.ask(m.MOP.HELLO, 1, m.encodeHello({ version: 9, nodeId: 'x', token: 's3cret' }))).word, m.MSTATUS.PROTOCOL);

  const p = await open();
  assert.equal((await p.ask(m.MOP.HELLO, 1, m.encodeHello({ version: 1, nodeId: 'partner', token: 's3cret' }))).word, m.MSTATUS.OK);
  const reset = { name: 'rep', policy: 'mirrored', medium: 'dram', size: 1 << 20, epoch: 1, trimmedTo: 0, firstSeq: 1 } as const;
  assert.equal((await p.ask(m.MOP.RESET, 2, m.encodeReset(reset))).word, m.MSTATUS.OK);
  const rec = (seq: number) => encodeRecord({ seq, timestamp: seq, epoch: 1, flags: 0, target: undefined, payload: Buffer.from(`p${seq}`) });
  const corrupt = m.encodeAppend('rep', 1, rec(1));
  corrupt[corrupt.length - 1] = (corrupt[corrupt.length - 1] ?? 0) ^ 1;
  assert.equal((await p.ask(m.MOP.APPEND, 3, corrupt)).word, m.MSTATUS.PROTOCOL, 'a record failing its checksum');
  assert.equal((await p.ask(m.MOP.APPEND, 4, m.encodeAppend('rep', 1, rec(2)))).word, m.MSTATUS.GAP);
  assert.equal((await p.ask(m.MOP.APPEND, 5, m.encodeAppend('nope', 1, rec(1)))).word, m.MSTATUS.NOT_FOUND);
  assert.equal((await p.ask(m.MOP.RESET, 6, m.encodeReset({ ...reset, name: 'own' }))).word, m.MSTATUS.CONFLICT, 'a local device is not a replica');
  assert.equal((await p.ask(m.MOP.APPEND, 7, m.encodeAppend('own', 1, rec(1)))).word, m.MSTATUS.CONFLICT);
  assert.equal((await p.ask(99, 8, Buffer.alloc(3))).word, m.MSTATUS.PROTOCOL);
  assert.equal((await p.ask(m.MOP.APPEND, 9, m.encodeAppend('rep', 1, Buffer.concat([rec(1), rec(2)])))).word, m.MSTATUS.OK, 'the replica still takes good records');
  const state = m.decodeState((await p.ask(m.MOP.STATE, 10, m.encodeName('rep'))).body);
  assert.deepEqual([state?.role, state?.lastSeq], ['replica', 2]);

  // Garbage that breaks the framing closes that connection only.
  const junk = await open();
  junk.socket.write(Buffer.from('GET / HTTP/1.1\r\nHost: memstrata\r\nAccept: */*\r\n\r\n'));
  await until('closed after garbage', () => Promise.resolve(junk.isClosed()), (v) => v);
  assert.equal((await p.ask(m.MOP.STATE, 11, m.encodeName('own'))).word, m.MSTATUS.OK);
  assert.equal((await fetch(`${n.url}/healthz`)).status, 200);
});
