// memstrata's own NBD client against memstrata's NBD service.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createServer } from 'node:net';
import { NbdClient } from '../../src/client/nbd-client.js';
import { CMD } from '../../src/protocol/nbd/spec.js';
import { runCli, startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { RawNbd, requestBytes } from '../support/nbd-raw.js';

type Ctx = { after(fn: () => Promise<unknown>): void };

async function node(t: Ctx): Promise<NodeProcess> {
  const n = await startNode({ cwd: await tempDir(t) });
  t.after(() => n.stop('SIGKILL'));
  return n;
}

test('NBD client: handshake, pipelined reads and writes against a model, FUA, flush, trim', async (t) => {
  const n = await node(t);
  const client = await NbdClient.connect({ uri: `nbd://${n.nbd.host}:${n.nbd.port}/` });
  t.after(() => client.close());
  assert.equal(client.exportName, '');
  assert.equal(client.size, 64 * 2 ** 20);
  assert.deepEqual([client.readOnly, client.canFlush, client.canFua, client.canTrim], [false, true, true, true]);
  assert.equal(client.blockSizes.preferred, 4096);

  // 128 writes in flight at once, at unaligned offsets and lengths, checked against a model.
  // Writes in flight together are not ordered (NBD), so each has a 64 KiB slot of its own.
  const model = Buffer.alloc(8 * 2 ** 20);
  const ops: Promise<void>[] = [];
  for (let i = 0; i < 128; i++) {
    const within = Math.floor(Math.random() * 60000);
    const data = randomBytes(1 + Math.floor(Math.random() * (65536 - within)));
    data.copy(model, i * 65536 + within);
    ops.push(client.write(i * 65536 + within, data, { fua: i % 4 === 0 }));
  }
  await Promise.all(ops);
  await client.flush();
  const reads = await Promise.all(Array.from({ length: 64 }, (_, i) => client.read(i * 131072, 131072)));
  assert.ok(Buffer.concat(reads).equals(model), 'what was written reads back');
  await client.trim(0, 1 << 20);
  assert.ok((await client.read(0, 1 << 20)).every((b) => b === 0), 'trimmed space reads as zeros here');

  await assert.rejects(client.read(client.size - 10, 11), { code: 'MS_VOLUME_RANGE' });
  await assert.rejects(client.write(-1, Buffer.alloc(1)), { code: 'MS_VOLUME_RANGE' });
});

test('WRITE hits in DRAM are stored at once (memstrata_cache_writes_now_total, memstrata status), FUA writes never are, and reads see each', async (t) => {
  // Dirty data is not written back by age during the test: a write-back holds the line's
  // lock, and the path declines (correctly) while it does.
  const n = await startNode({ cwd: await tempDir(t), args: ['--set', 'cache.maxDirtyAge=1h'] });
  t.after(() => n.stop('SIGKILL'));
  const client = await NbdClient.connect({ uri: `nbd://${n.nbd.host}:${n.nbd.port}/` });
  t.after(() => client.close());
  const counted = async (): Promise<number> => {
    const text = await (await fetch(`${n.url}/metrics`)).text();
    return Number(/^memstrata_cache_writes_now_total (\S+)$/m.exec(text)?.[1] ?? NaN);
  };
  const before = await counted();
  await client.write(0, Buffer.alloc(65536, 1)); // a miss: the line is admitted on the ordinary path
  assert.equal(await counted(), before);
  await client.write(0, Buffer.alloc(65536, 2)); // a hit
  assert.equal(await counted(), before + 1);
  await client.write(0, Buffer.alloc(65536, 3), { fua: true }); // FUA: written back and synced first
  assert.equal(await counted(), before + 1);
  await client.write(100, Buffer.alloc(50, 9)); // a hit in part of a valid sector
  assert.equal(await counted(), before + 2);
  const back = await client.read(0, 4096);
  assert.ok(back.subarray(0, 100).every((b) => b === 3) && back.subarray(100, 150).every((b) => b === 9) && back.subarray(150).every((b) => b === 3));
  const status = await runCli(['status', '--admin', n.url]);
  assert.match(status.stdout, new RegExp(`writes stored at once ${before + 2}\\b`));
});

test('NBD client: read-only exports, unknown exports, a server that is not NBD, and a lost connection give coded errors', async (t) => {
  const n = await node(t);
  const response = await fetch(`${n.url}/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'ro', size: '1MiB', readOnly: true }) });
  assert.equal(response.status, 201);
  const ro = await NbdClient.connect({ host: n.nbd.host, port: n.nbd.port, export: 'ro' });
  t.after(() => ro.close());
  assert.equal(ro.readOnly, true);
  await assert.rejects(ro.write(0, Buffer.alloc(512)), { code: 'MS_VOLUME_READ_ONLY' });
  assert.equal((await ro.read(0, 4096)).length, 4096);

  await assert.rejects(NbdClient.connect({ uri: `nbd://${n.nbd.host}:${n.nbd.port}/missing` }), (error: Error & { code?: string }) => {
    assert.equal(error.code, 'MS_VOLUME_NOT_FOUND');
    assert.match(error.message, /no export "missing"/);
    return true;
  });
  await assert.rejects(NbdClient.connect({ uri: 'http://example/x' }), { code: 'MS_CONFIG_INVALID' });
  // The admin API speaks HTTP, not NBD.
  const admin = new URL(n.url);
  await assert.rejects(NbdClient.connect({ host: admin.hostname, port: Number(admin.port), connectTimeoutMs: 2000 }), (error: Error & { code?: string }) => {
    assert.ok(['MS_NBD_HANDSHAKE', 'MS_NBD_DISCONNECTED'].includes(error.code ?? ''), error.message);
    return true;
  });
  // Nothing listening.
  const closed = createServer();
  await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
  const port = (closed.address() as { port: number }).port;
  await new Promise<void>((resolve) => closed.close(() => resolve()));
  await assert.rejects(NbdClient.connect({ host: '127.0.0.1', port }), { code: 'MS_NBD_DISCONNECTED' });

  // The server dies with requests in flight: they fail, and so does everything after.
  const client = await NbdClient.connect({ host: n.nbd.host, port: n.nbd.port });
  const inFlight = Array.from({ length: 32 }, (_, i) => client.write(i * 65536, randomBytes(65536)).then(() => 'ok', (e: unknown) => (e as { code?: string }).code));
  await n.stop('SIGKILL');
  const outcomes = await Promise.all(inFlight);
  assert.ok(outcomes.every((o) => o === 'ok' || o === 'MS_NBD_DISCONNECTED'), outcomes.join(','));
  await assert.rejects(client.read(0, 512), { code: 'MS_NBD_DISCONNECTED' });
  await client.close();
});

test('WRITE payloads read straight into their buffers: writes of up to 4 MiB, all in flight, on three connections, among clients that leave 4 MiB WRITEs unfinished and go, read back intact', async (t) => {
  const n = await node(t);
  const MiB = 2 ** 20;
  const region = 16 * MiB;
  const writers = await Promise.all([0, 1, 2].map(() => NbdClient.connect({ uri: `nbd://${n.nbd.host}:${n.nbd.port}/` })));
  t.after(() => Promise.all(writers.map((w) => w.close())));
  let going = true;
  // Clients that send a 4 MiB WRITE's header and part of its payload, then end or reset:
  // their payload buffers go back to the node's pool while the writers' fill.
  const leavers = (async () => {
    for (let i = 0; going; i++) {
      const { nbd } = await RawNbd.attach(n.nbd);
      nbd.socket.write(requestBytes(CMD.WRITE, { cookie: 1n, offset: 0, length: 4 * MiB }));
      nbd.socket.write(Buffer.alloc(Math.floor(Math.random() * 3 * MiB), 0xee));
      await new Promise((r) => setTimeout(r, Math.random() * 20));
      if (i % 2 === 0) nbd.socket.end();
      else nbd.destroy();
    }
  })();
  const models = await Promise.all(
    writers.map(async (w, k) => {
      const model = Buffer.alloc(region);
      const base = k * region;
      const writes: Promise<void>[] = [];
      for (let at = 0; at < region; ) {
        const length = Math.min(region - at, 1 + Math.floor(Math.random() * (Math.random() < 0.5 ? 64 * 1024 : 4 * MiB)));
        const data = randomBytes(length);
        data.copy(model, at);
        writes.push(w.write(base + at, data));
        at += length;
      }
      await Promise.all(writes);
      return model;
    }),
  );
  going = false;
  await leavers;
  for (const [k, w] of writers.entries()) {
    await w.flush();
    const back = Buffer.concat(await Promise.all(Array.from({ length: 16 }, (_, i) => w.read(k * region + i * MiB, MiB))));
    assert.ok(back.equals(models[k] as Buffer), `connection ${k} reads back what it wrote`);
  }
});
