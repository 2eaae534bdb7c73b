// A volume's NVRAM write log across resizes and crashes: a resize checkpoints the log, so
// nothing from before it is replayed over it (a shrink then a grow reads zeros past the
// old end; a write that crossed the new end keeps its part below it), and a record that
// still reaches past the end at replay is cut at the end with a warning, never replayed
// outside the volume and never a hang.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { NbdClient } from '../../src/client/nbd-client.js';
import { startNode, tempDir, type NodeProcess } from '../support/node-process.js';

const json = { 'content-type': 'application/json' };
const KiB = 1024;

async function setup(n: NodeProcess): Promise<void> {
  assert.equal((await fetch(`${n.url}/v1/nvram`, { method: 'POST', headers: json, body: JSON.stringify({ name: 'wl', size: '4MiB', policy: 'local' }) })).status, 201);
  const created = await fetch(`${n.url}/v1/volumes`, { method: 'POST', headers: json, body: JSON.stringify({ name: 'w', size: '2MiB', writeLog: 'wl' }) });
  assert.equal(created.status, 201, await created.text());
}

/** Waits until the node has seen every NBD client of the volume go (close() returns before it does). */
async function idle(n: NodeProcess, volume: string): Promise<void> {
  for (;;) {
    const list = (await (await fetch(`${n.url}/v1/volumes`)).json()) as { volumes: { name: string; connections: number }[] };
    if (list.volumes.find((v) => v.name === volume)?.connections === 0) return;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function resize(n: NodeProcess, size: string): Promise<void> {
  await idle(n, 'w');
  const response = await fetch(`${n.url}/v1/volumes/w/resize`, { method: 'POST', headers: json, body: JSON.stringify({ size }) });
  assert.equal(response.status, 200, await response.text());
}

test('a shrink, a grow and a crash: nothing from before the resize is replayed over it, and data below the end survives', async (t) => {
  const dir = await tempDir(t);
  const first = await startNode({ cwd: dir });
  t.after(() => first.stop('SIGKILL').then(() => undefined));
  await setup(first);
  const client = await NbdClient.connect({ host: first.nbd.host, port: first.nbd.port, export: 'w' });
  await client.write(64 * KiB, Buffer.alloc(4 * KiB, 0x11)); // below the new end
  await client.write(1024 * KiB - 4 * KiB, Buffer.alloc(8 * KiB, 0x33)); // crosses it
  await client.write(1536 * KiB, Buffer.alloc(4 * KiB, 0x22)); // past it
  await client.trim(1800 * KiB, 64 * KiB); // a zero record past it
  await client.close();
  await resize(first, '1MiB');
  await resize(first, '2MiB'); // grown back: what was past the old end must read as zeros
  assert.equal(await first.stop('SIGKILL'), 'SIGKILL');

  const second = await startNode({ cwd: dir });
  t.after(() => second.stop('SIGKILL').then(() => undefined));
  const back = await NbdClient.connect({ host: second.nbd.host, port: second.nbd.port, export: 'w' });
  assert.equal(back.size, 2048 * KiB);
  assert.ok((await back.read(64 * KiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 0x11)), 'a write below the new end survives');
  assert.ok((await back.read(1024 * KiB - 4 * KiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 0x33)), 'the part of a crossing write below the end survives');
  assert.ok((await back.read(1024 * KiB, 1024 * KiB)).equals(Buffer.alloc(1024 * KiB)), 'nothing from before the shrink comes back past the old end');
  await back.close();
});

test('write-log records that reach past the end at replay are cut at the end with a warning; the node starts', async (t) => {
  const dir = await tempDir(t);
  const first = await startNode({ cwd: dir });
  t.after(() => first.stop('SIGKILL').then(() => undefined));
  await setup(first);
  const client = await NbdClient.connect({ host: first.nbd.host, port: first.nbd.port, export: 'w' });
  await client.write(64 * KiB, Buffer.alloc(4 * KiB, 0x11));
  await client.write(1024 * KiB - 4 * KiB, Buffer.alloc(8 * KiB, 0x33));
  await client.write(1536 * KiB, Buffer.alloc(4 * KiB, 0x22));
  await client.trim(1800 * KiB, 64 * KiB);
  await client.flush(); // plain writes are durable in the log once flushed
  await client.close();
  assert.equal(await first.stop('SIGKILL'), 'SIGKILL');
  // The volume's size changes behind the log's back (an operator cut the data file and
  // edited the metadata; the data file's length is the size, so both are changed).
  const metaPath = join(dir, 'memstrata-data', 'volumes', 'w.json');
  const meta = JSON.parse(await readFile(metaPath, 'utf8')) as { size: number };
  meta.size = 1024 * KiB;
  await writeFile(metaPath, JSON.stringify(meta));
  await truncate(join(dir, 'memstrata-data', 'volumes', 'w.img'), 1024 * KiB);

  const second = await startNode({ cwd: dir });
  t.after(() => second.stop('SIGKILL').then(() => undefined));
  const warned = second.logs.filter((l) => l.msg === 'write log record reaches past the end of the volume; the part outside is skipped');
  assert.equal(warned.length, 3, 'the crossing write, the write past the end and the zero record past it are reported');
  const back = await NbdClient.connect({ host: second.nbd.host, port: second.nbd.port, export: 'w' });
  assert.equal(back.size, 1024 * KiB);
  assert.ok((await back.read(64 * KiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 0x11)), 'the record inside the volume was replayed');
  assert.ok((await back.read(1024 * KiB - 4 * KiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 0x33)), 'the part of the crossing record inside was replayed');
  await back.close();
});

test('a write log belongs to the node: a volatile device is refused by the volume layer, and a client handle opened before the claim can do nothing after it; what it appended is never replayed', async (t) => {
  // Issue 11 items 2, 4 and 5.
  const { RmemClient } = await import('../../src/client/rmem-client.js');
  const dir = await tempDir(t);
  const first = await startNode({ cwd: dir });
  t.after(() => first.stop('SIGKILL').then(() => undefined));
  const post = (path: string, body: unknown) => fetch(`${first.url}${path}`, { method: 'POST', headers: json, body: JSON.stringify(body) });
  for (const [name, policy] of [['vol', 'volatile'], ['wl', 'local']] as const) {
    assert.equal((await post('/v1/nvram', { name, size: '4MiB', policy })).status, 201);
  }
  const refused = await post('/v1/volumes', { name: 'x', size: '2MiB', writeLog: 'vol' });
  assert.equal(refused.status, 400);
  assert.equal(((await refused.json()) as { error: { code: string } }).error.code, 'MS_VOLUME_INVALID');
  assert.equal(((await (await fetch(`${first.url}/v1/volumes`)).json()) as { volumes: { name: string }[] }).volumes.some((v) => v.name === 'x'), false, 'nothing was created');

  // A tenant opens `wl` while it is nobody's write log and plants a record for volume w.
  const tenant = await RmemClient.connect({ ...first.rmem, serverId: 'tenant', reconnect: false });
  t.after(() => tenant.close());
  const handle = await tenant.journalOpen('wl', 1);
  await tenant.journalAppend(handle, [{ payload: Buffer.alloc(4096, 0x66), target: { volume: 'w', offset: 0 } }]);
  await setup2(first);
  for (const attempt of [
    () => tenant.journalAppend(handle, [{ payload: Buffer.alloc(4096, 0x77), target: { volume: 'w', offset: 4096 } }]),
    () => tenant.journalRead(handle, 0),
    () => tenant.journalTrim(handle, 1),
    () => tenant.journalInfo(handle),
    () => tenant.journalOpen('wl', 100),
  ]) {
    await assert.rejects(attempt(), { code: 'MS_RMEM_INVALID', message: /write log of volume w/ });
  }
  const removeDevice = await fetch(`${first.url}/v1/nvram/wl`, { method: 'DELETE' });
  assert.equal(removeDevice.status, 400, 'a write log cannot be removed');
  // A crash: replay must not write the tenant's record into w.
  assert.equal(await first.stop('SIGKILL'), 'SIGKILL');
  const second = await startNode({ cwd: dir });
  t.after(() => second.stop('SIGKILL').then(() => undefined));
  const nbd = await NbdClient.connect({ host: second.nbd.host, port: second.nbd.port, export: 'w' });
  assert.ok((await nbd.read(0, 8192)).every((b) => b === 0), 'the volume holds nothing the tenant appended');
  await nbd.close();
});

async function setup2(n: NodeProcess): Promise<void> {
  const created = await fetch(`${n.url}/v1/volumes`, { method: 'POST', headers: json, body: JSON.stringify({ name: 'w', size: '2MiB', writeLog: 'wl' }) });
  assert.equal(created.status, 201, await created.text());
}

test('a deleted volume\'s records are never replayed into a new volume of the same name on the same write log, after a crash', async (t) => {
  // Issue 11 item 4.
  const dir = await tempDir(t);
  const first = await startNode({ cwd: dir });
  t.after(() => first.stop('SIGKILL').then(() => undefined));
  await setup(first);
  const old = await NbdClient.connect({ host: first.nbd.host, port: first.nbd.port, export: 'w' });
  for (let i = 0; i < 16; i++) await old.write(i * 64 * KiB, Buffer.alloc(4 * KiB, 0xaa)); // journaled, never flushed
  await old.close();
  await idle(first, 'w');
  const removed = await fetch(`${first.url}/v1/volumes/w`, { method: 'DELETE' });
  assert.equal(removed.status, 204, await removed.text());
  await setup2(first); // a new tenant's volume w on the same device wl
  const fresh = await NbdClient.connect({ host: first.nbd.host, port: first.nbd.port, export: 'w' });
  await fresh.write(0, Buffer.alloc(4 * KiB, 0x55), { fua: true });
  await fresh.close();
  assert.equal(await first.stop('SIGKILL'), 'SIGKILL');
  const second = await startNode({ cwd: dir });
  t.after(() => second.stop('SIGKILL').then(() => undefined));
  const back = await NbdClient.connect({ host: second.nbd.host, port: second.nbd.port, export: 'w' });
  assert.ok((await back.read(0, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 0x55)), 'the new tenant\'s FUA write survives');
  for (let i = 1; i < 16; i++) assert.ok((await back.read(i * 64 * KiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB)), `block ${i} of the old volume is not replayed into the new one`);
  await back.close();
});

test('kill -9 during write-log replay, again and again: the volume ends with exactly what was acknowledged', async (t) => {
  const dir = await tempDir(t);
  const first = await startNode({ cwd: dir });
  t.after(() => first.stop('SIGKILL').then(() => undefined));
  await setup(first);
  const client = await NbdClient.connect({ host: first.nbd.host, port: first.nbd.port, export: 'w' });
  const model = Buffer.alloc(2048 * KiB);
  // Overwrites of the same blocks, so a replay applied out of order or twice would show.
  for (let i = 0; i < 400; i++) {
    const block = (i * 37) % 64;
    const data = Buffer.alloc(16 * KiB, (i % 250) + 1);
    await client.write(block * 16 * KiB, data, { fua: i % 3 === 0 });
    data.copy(model, block * 16 * KiB);
  }
  await client.flush();
  await client.close();
  assert.equal(await first.stop('SIGKILL'), 'SIGKILL');
  // Each start replays the log before serving; kill it at random moments of that.
  const { spawn } = await import('node:child_process');
  const { CLI, SMALL_MEDIA } = await import('../support/node-process.js');
  for (let round = 0; round < (process.env.MEMSTRATA_SOAK === '1' ? 20 : 3); round++) {
    const proc = spawn(process.execPath, [CLI, 'node', 'start', '--admin-listen', '127.0.0.1:0', '--rmem-listen', '127.0.0.1:0', '--nbd-listen', '127.0.0.1:0', '--mirror-listen', '127.0.0.1:0', '--log-format', 'json', ...SMALL_MEDIA], { cwd: dir, stdio: ['ignore', 'pipe', 'ignore'] });
    const exited = new Promise((resolve) => proc.once('exit', resolve));
    t.after(() => { proc.kill('SIGKILL'); });
    // The storage cache starts just before the replay: kill within a few ms of that.
    let out = '';
    await new Promise<void>((resolve) => {
      proc.stdout.on('data', (chunk: Buffer) => {
        out += chunk.toString();
        if (out.includes('storage cache started')) resolve();
      });
      void exited.then(() => resolve());
    });
    await new Promise((resolve) => setTimeout(resolve, Math.floor(Math.random() * 30)));
    proc.kill('SIGKILL');
    await exited;
    console.log(`# replay round ${round}: killed ${out.includes('write log replayed') ? 'after' : 'before or during'} the replay`);
  }
  const last = await startNode({ cwd: dir });
  t.after(() => last.stop('SIGKILL').then(() => undefined));
  const back = await NbdClient.connect({ host: last.nbd.host, port: last.nbd.port, export: 'w' });
  assert.ok((await back.read(0, 2048 * KiB)).equals(model), 'the volume holds exactly what was acknowledged');
  await back.close();
});


test('WRITE hits through a local write log are stored and journaled in the tick they arrive: counted, and after a FLUSH and kill -9 the restarted node replays them', async (t) => {
  const dir = await tempDir(t);
  // No write-back by age during the test: a write-back holds the line's lock, and the path declines while it does.
  const first = await startNode({ cwd: dir, args: ['--set', 'cache.maxDirtyAge=1h'] });
  t.after(() => first.stop('SIGKILL').then(() => undefined));
  await setup(first);
  const counted = async (): Promise<number> => {
    const text = await (await fetch(`${first.url}/metrics`)).text();
    return Number(/^memstrata_cache_writes_now_total (\S+)$/m.exec(text)?.[1] ?? NaN);
  };
  const records = async (): Promise<number> => ((await (await fetch(`${first.url}/v1/nvram`)).json()) as { devices: { name: string; lastSeq: number | null }[] }).devices.find((d) => d.name === 'wl')?.lastSeq ?? 0;
  const client = await NbdClient.connect({ host: first.nbd.host, port: first.nbd.port, export: 'w' });
  for (let i = 0; i < 8; i++) await client.write(i * 64 * KiB, Buffer.alloc(64 * KiB, 1)); // misses: the lines come in
  const before = await counted();
  const seq = await records();
  for (let i = 0; i < 8; i++) await client.write(i * 64 * KiB + 4 * KiB, Buffer.alloc(4 * KiB, 0x40 + i)); // hits
  assert.equal(await counted(), before + 8, 'the hits took the path');
  assert.equal(await records(), seq + 8, 'each with its record in the write log');
  await client.write(0, Buffer.alloc(4 * KiB, 0x99), { fua: true }); // never the path
  assert.equal(await counted(), before + 8);
  await client.flush();
  await client.close();
  assert.equal(await first.stop('SIGKILL'), 'SIGKILL');

  const second = await startNode({ cwd: dir });
  t.after(() => second.stop('SIGKILL').then(() => undefined));
  const back = await NbdClient.connect({ host: second.nbd.host, port: second.nbd.port, export: 'w' });
  assert.ok((await back.read(0, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 0x99)), 'the FUA write survives');
  for (let i = 0; i < 8; i++) {
    assert.ok((await back.read(i * 64 * KiB + 4 * KiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 0x40 + i)), `WRITE ${i}, stored at once before the FLUSH, survives kill -9`);
    assert.ok((await back.read(i * 64 * KiB + 8 * KiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 1)), `the rest of line ${i} survives`);
  }
  await back.close();
});
