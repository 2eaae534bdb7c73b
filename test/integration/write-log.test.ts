// A volume's NVRAM write log across a shrink and a crash: records that name blocks past
// the new end are skipped at replay with a warning; the node starts and serves the rest.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NbdClient } from '../../src/client/nbd-client.js';
import { startNode, tempDir } from '../support/node-process.js';

const json = { 'content-type': 'application/json' };

test('write-log records past the end of a shrunk volume are skipped at replay; the node starts and the rest is replayed', async (t) => {
  const dir = await tempDir(t);
  const KiB = 1024;
  const first = await startNode({ cwd: dir });
  t.after(() => first.stop('SIGKILL').then(() => undefined));
  assert.equal((await fetch(`${first.url}/v1/nvram`, { method: 'POST', headers: json, body: JSON.stringify({ name: 'wl', size: '4MiB', policy: 'local' }) })).status, 201);
  const created = await fetch(`${first.url}/v1/volumes`, { method: 'POST', headers: json, body: JSON.stringify({ name: 'w', size: '2MiB', writeLog: 'wl' }) });
  assert.equal(created.status, 201, await created.text());
  const client = await NbdClient.connect({ host: first.nbd.host, port: first.nbd.port, export: 'w' });
  await client.write(64 * KiB, Buffer.alloc(4 * KiB, 0x11)); // below the new end: replayed
  await client.write(1536 * KiB, Buffer.alloc(4 * KiB, 0x22)); // past it
  await client.trim(1800 * KiB, 64 * KiB); // a zero record past it
  await client.close();
  const shrunk = await fetch(`${first.url}/v1/volumes/w/resize`, { method: 'POST', headers: json, body: JSON.stringify({ size: '1MiB' }) });
  assert.equal(shrunk.status, 200, await shrunk.text());
  assert.equal(await first.stop('SIGKILL'), 'SIGKILL');

  const second = await startNode({ cwd: dir });
  t.after(() => second.stop('SIGKILL').then(() => undefined));
  const skipped = second.logs.filter((l) => l.msg === 'write log record lies past the end of the volume; skipped');
  assert.equal(skipped.length, 2, 'the write and the zero record past the end are skipped, each with a warning');
  const back = await NbdClient.connect({ host: second.nbd.host, port: second.nbd.port, export: 'w' });
  assert.equal(back.size, 1024 * KiB);
  assert.ok((await back.read(64 * KiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 0x11)), 'the record inside the volume was replayed');
  await back.close();
});
