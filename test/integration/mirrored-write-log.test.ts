// A volume whose write log is a `mirrored` NVRAM device, between two real nodes: a WRITE
// is acknowledged once the partner holds its record, so a FLUSH costs no sync, and what
// was acknowledged durable survives a kill -9 of the node even when the node's own
// journal file lost everything it had not synced: the volume stays `recovering` (not
// served, not resized, not removed) until the partner has given the records back, then
// replays them.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { NbdClient } from '../../src/client/nbd-client.js';
import { parseJournal } from '../../src/nvram/journal-file.js';
import { journalKeeping } from '../support/faults.js';
import { RECORD_FLAG } from '../../src/protocol/journal/record.js';
import type { VolumeInfo } from '../../src/protocol/admin/api.js';
import { freePort, startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { nvramDevice, until } from '../support/nvram-probe.js';
import { rng } from '../support/rng.js';

const json = { 'content-type': 'application/json' };
const BLOCK = 4096;
const BLOCKS = 1024; // a 4 MiB volume, as large as the log: checkpoints run
const LANES = 8; // lane i writes the blocks i, i + LANES, ...: one block's writes are in order

const post = (n: NodeProcess, path: string, body: unknown) => fetch(`${n.url}${path}`, { method: 'POST', headers: json, body: JSON.stringify(body) });

async function volume(n: NodeProcess, name: string): Promise<VolumeInfo | undefined> {
  const list = (await (await fetch(`${n.url}/v1/volumes`)).json()) as { volumes: VolumeInfo[] };
  return list.volumes.find((v) => v.name === name);
}

function contentOf(block: number, version: number): Buffer {
  const digest = createHash('sha256').update(`block ${block} version ${version}`).digest();
  return Buffer.concat(Array.from({ length: BLOCK / digest.length }, () => digest));
}

/** What the writers did to each block: versions sent in order, and the newest one acknowledged durable. */
interface History {
  sent: Map<number, number[]>;
  durable: Map<number, number>;
}

type Ctx = Parameters<typeof tempDir>[0];

/** Two nodes that are each other's mirror partner, each started (again) by its function and killed at the end. */
async function partners(t: Ctx) {
  const [dirA, dirB] = [await tempDir(t), await tempDir(t)];
  const [portA, portB] = [await freePort(), await freePort()];
  const start = async (dir: string, own: number, partner: number): Promise<NodeProcess> => {
    const n = await startNode({ cwd: dir, args: ['--mirror-listen', `127.0.0.1:${own}`, '--mirror-partner', `127.0.0.1:${partner}`, '--set', 'mirror.timeout=500ms'] });
    t.after(() => n.stop('SIGKILL').then(() => undefined));
    return n;
  };
  return { dirA, startA: () => start(dirA, portA, portB), startB: () => start(dirB, portB, portA) };
}

/**
 * Two partnered nodes, a `policy` device `mwl` on A in sync with its replica on B, and a
 * 4 MiB volume `v` on A whose write log it is. Eight lanes on two connections write
 * random blocks of their own again and again (each write a new version), every third
 * with FUA, and flush after every eighth; A is killed with -9 at a random moment.
 */
async function crashUnderWriters(t: Ctx, policy: 'mirrored' | 'mirrored+local') {
  const { dirA, startA, startB } = await partners(t);
  const a = await startA();
  const b = await startB();
  assert.equal((await post(a, '/v1/nvram', { name: 'mwl', size: '4MiB', policy })).status, 201);
  await until('primary in sync', () => nvramDevice(a, 'mwl'), (d) => d?.mirror === 'in-sync');
  const created = await post(a, '/v1/volumes', { name: 'v', size: String(BLOCKS * BLOCK), writeLog: 'mwl' });
  assert.equal(created.status, 201, await created.text());
  // The partner's replica is the partner's to keep, never a write log there.
  await until('replica on the partner', () => nvramDevice(b, 'mwl'), (d) => d?.role === 'replica');
  const onReplica = await post(b, '/v1/volumes', { name: 'x', size: '1MiB', writeLog: 'mwl' });
  assert.equal(onReplica.status, 400);
  assert.equal(((await onReplica.json()) as { error: { code: string } }).error.code, 'MS_VOLUME_INVALID');

  const seed = Number(process.env.TEST_SEED ?? Date.now() % 100_000);
  console.log(`# ${policy}: seed ${seed} (TEST_SEED replays it)`);
  const random = rng(seed);
  const clients = [
    await NbdClient.connect({ host: a.nbd.host, port: a.nbd.port, export: 'v' }),
    await NbdClient.connect({ host: a.nbd.host, port: a.nbd.port, export: 'v' }),
  ];
  const history: History = { sent: new Map(), durable: new Map() };
  let version = 0;
  let sentCount = 0;
  let stop = false;
  const lane = async (client: NbdClient, own: number) => {
    const acked: [number, number][] = [];
    const durableAt = (block: number, v: number): void => {
      if ((history.durable.get(block) ?? 0) < v) history.durable.set(block, v);
    };
    try {
      for (let n = 1; !stop; n++) {
        const block = own + LANES * Math.floor(random() * (BLOCKS / LANES));
        const v = ++version;
        const fua = n % 3 === 0;
        history.sent.set(block, [...(history.sent.get(block) ?? []), v]);
        sentCount++;
        await client.write(block * BLOCK, contentOf(block, v), { fua });
        acked.push([block, v]);
        if (fua) durableAt(block, v);
        if (n % 8 === 0) {
          const covered = acked.splice(0);
          await client.flush();
          for (const [b, w] of covered) durableAt(b, w);
        }
      }
    } catch {
      // The node was killed under it.
    }
  };
  const lanes = Array.from({ length: LANES }, (_, i) => lane(clients[i % 2] as NbdClient, i));
  await new Promise((resolve) => setTimeout(resolve, 300 + Math.floor(random() * 700)));
  assert.equal(await a.stop('SIGKILL'), 'SIGKILL');
  stop = true;
  await Promise.all(lanes);
  for (const c of clients) await c.close().catch(() => undefined);
  console.log(`# ${sentCount} writes sent to ${history.sent.size} blocks, ${history.durable.size} blocks with a durable version when killed`);
  assert.ok(history.durable.size > 0, 'the workload made something durable before the kill');
  return { dirA, b, startA, startB, history };
}

/**
 * Each block holds its newest durable version or a version sent after it (never an older
 * one: a replay must not put an older record over newer data), a block never made
 * durable holds zeros or a version sent; the log is trimmed.
 */
async function check(n: NodeProcess, history: History): Promise<void> {
  const reader = await NbdClient.connect({ host: n.nbd.host, port: n.nbd.port, export: 'v' });
  const image = await reader.read(0, BLOCKS * BLOCK);
  await reader.close();
  const zeros = Buffer.alloc(BLOCK);
  for (let block = 0; block < BLOCKS; block++) {
    const got = image.subarray(block * BLOCK, (block + 1) * BLOCK);
    const floor = history.durable.get(block);
    const allowed = (history.sent.get(block) ?? []).filter((v) => floor === undefined || v >= floor);
    const ok = (floor === undefined && got.equals(zeros)) || allowed.some((v) => got.equals(contentOf(block, v)));
    assert.ok(ok, `block ${block}: ${floor === undefined ? 'holds something never written' : `lost version ${floor}, acknowledged durable, or holds an older one`}`);
  }
  assert.equal((await nvramDevice(n, 'mwl'))?.records, 0, 'the replay trimmed the log');
}

test('mirrored write log: FUA writes and writes before a FLUSH survive kill -9 at a random moment and the loss of the unsynced journal; the volume is recovering until the partner gives the records back', async (t) => {
  const { dirA, b, startA, startB, history } = await crashUnderWriters(t, 'mirrored');
  // The OS lost what the node had not synced (as after a power cut): a mirrored journal
  // syncs its markers (epoch, trim) but not its records, so cut it after the last marker.
  const path = join(dirA, 'memstrata-data', 'nvram', 'mwl.journal');
  const image = await readFile(path);
  const { records } = parseJournal(image);
  const lastMarker = records.findLastIndex((r) => (r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) !== 0);
  console.log(`# journal cut after its last marker: ${records.length - lastMarker - 1} records only the partner holds`);
  await writeFile(path, journalKeeping(image, (_, i) => i <= lastMarker));
  // The partner stops cleanly meanwhile; its replica goes to its vault.
  assert.equal(await b.stop('SIGTERM'), 0);

  let again = await startA();
  const waiting = await volume(again, 'v');
  assert.equal(waiting?.state, 'recovering');
  assert.match(waiting.failure ?? '', /waits for the mirror partner/);
  await assert.rejects(NbdClient.connect({ host: again.nbd.host, port: again.nbd.port, export: 'v' }), /recovering/);
  const resized = await post(again, '/v1/volumes/v/resize', { size: '64MiB' });
  assert.equal(resized.status, 503);
  assert.equal(((await resized.json()) as { error: { code: string } }).error.code, 'MS_VOLUME_RECOVERING');
  const removed = await fetch(`${again.url}/v1/volumes/v`, { method: 'DELETE' });
  assert.equal(removed.status, 503);
  assert.equal(((await removed.json()) as { error: { code: string } }).error.code, 'MS_VOLUME_RECOVERING');
  // A clean stop while it waits keeps the journal as it is (no vault from a device that
  // knows less than its partner), and the next start waits again.
  assert.equal(await again.stop('SIGTERM'), 0);
  again = await startA();
  assert.equal((await volume(again, 'v'))?.state, 'recovering');

  await startB();
  await until('volume recovered', () => volume(again, 'v'), (v) => v?.state === 'ready', 30_000);
  await check(again, history);
  assert.ok(again.logs.some((l) => l.msg === 'volume recovered from its mirrored write log and served again'));
});

test('mirrored+local write log: FUA writes and writes before a FLUSH survive kill -9 at a random moment; the volume is replayed from its own synced journal', async (t) => {
  const { startA, history } = await crashUnderWriters(t, 'mirrored+local');
  const again = await startA();
  // Every record was synced before it was acknowledged: nothing to wait for.
  assert.equal((await volume(again, 'v'))?.state, 'ready');
  await check(again, history);
});

test('a mirrored write log whose partner is gone for good: the volume waits, until an operator accepts the local journal; the partner, back later with more records at the older epoch, is reset from this node', async (t) => {
  const { dirA, startA, startB } = await partners(t);
  const a = await startA();
  const b = await startB();
  assert.equal((await post(a, '/v1/nvram', { name: 'mwl', size: '4MiB', policy: 'mirrored' })).status, 201);
  await until('primary in sync', () => nvramDevice(a, 'mwl'), (d) => d?.mirror === 'in-sync');
  assert.equal((await post(a, '/v1/volumes', { name: 'v', size: '1MiB', writeLog: 'mwl' })).status, 201);
  const client = await NbdClient.connect({ host: a.nbd.host, port: a.nbd.port, export: 'v' });
  for (let i = 0; i < 16; i++) await client.write(i * BLOCK, contentOf(i, 1), { fua: true });
  // The journal writes behind the acknowledgements land (polled: a fixed wait lost the
  // last of them to the kill on a loaded machine).
  const path = join(dirA, 'memstrata-data', 'nvram', 'mwl.journal');
  const isUser = (r: { flags: number }): boolean => (r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) === 0;
  const userRecords = async (): Promise<number> => {
    try {
      return parseJournal(await readFile(path)).records.filter(isUser).length;
    } catch {
      return 0; // read while a write was under way
    }
  };
  await until('the 16 records in the node\'s journal file', userRecords, (count) => count === 16);
  assert.equal(await a.stop('SIGKILL'), 'SIGKILL');
  await client.close().catch(() => undefined);
  // The node's file lost its last 8 records (unsynced); the partner, which holds all 16,
  // stops cleanly (vaulted) and stays away.
  const image = await readFile(path);
  const user = parseJournal(image).records.filter(isUser);
  assert.equal(user.length, 16);
  await writeFile(path, journalKeeping(image, (r) => !isUser(r) || r.seq <= (user[7]?.seq ?? 0)));
  assert.equal(await b.stop('SIGTERM'), 0);

  let again = await startA();
  assert.equal((await volume(again, 'v'))?.state, 'recovering');
  assert.match((await volume(again, 'v'))?.failure ?? '', /accept-local/);
  assert.equal((await post(again, '/v1/nvram/nope/accept-local', {})).status, 404);
  const epochBefore = (await nvramDevice(again, 'mwl'))?.epoch ?? 0;
  const accepted = await post(again, '/v1/nvram/mwl/accept-local', {});
  assert.equal(accepted.status, 200, await accepted.text());
  await until('volume served from the local journal', () => volume(again, 'v'), (v) => v?.state === 'ready');
  const epoch = (await nvramDevice(again, 'mwl'))?.epoch ?? 0;
  assert.ok(epoch > epochBefore, 'under a newer epoch');
  assert.equal((await post(again, '/v1/nvram/mwl/accept-local', {})).status, 400, 'nothing left to accept');
  assert.ok(again.logs.some((l) => l.msg === 'NVRAM device accepted without its mirror partner: it serves its own journal file, and records only the partner held are given up'));
  const writer = await NbdClient.connect({ host: again.nbd.host, port: again.nbd.port, export: 'v' });
  await writer.write(0, contentOf(0, 2), { fua: true }); // after the acceptance
  await writer.write(12 * BLOCK, contentOf(12, 2), { fua: true });
  await writer.close();

  // The old partner comes back with all 16 records at the older epoch: it is reset from
  // this node, never taken back.
  await startB();
  await until('in sync again', () => nvramDevice(again, 'mwl'), (d) => d?.mirror === 'in-sync' && d.epoch === epoch);
  assert.equal(again.logs.some((l) => l.msg === 'took records from the mirror partner that this node lost in a crash'), false);
  // And what was acknowledged since survives a crash of this node, the partner up.
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(await again.stop('SIGKILL'), 'SIGKILL');
  again = await startA();
  await until('volume served', () => volume(again, 'v'), (v) => v?.state === 'ready');
  const reader = await NbdClient.connect({ host: again.nbd.host, port: again.nbd.port, export: 'v' });
  const zeros = Buffer.alloc(BLOCK);
  for (let i = 0; i < 16; i++) {
    const expected = i === 0 || i === 12 ? contentOf(i, 2) : i < 8 ? contentOf(i, 1) : zeros;
    assert.ok((await reader.read(i * BLOCK, BLOCK)).equals(expected), `block ${i}`);
  }
  await reader.close();
});
