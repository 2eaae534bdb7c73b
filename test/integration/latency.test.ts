// What the node shows of its request latencies: Prometheus histograms on /metrics and a
// Latency section in `memstrata status` (and its JSON), from real NBD and rmem traffic
// and the journal syncs it causes.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NbdClient } from '../../src/client/nbd-client.js';
import { RmemClient } from '../../src/client/rmem-client.js';
import type { NodeInfo } from '../../src/protocol/admin/api.js';
import { runCli, startNode, tempDir } from '../support/node-process.js';

test('request latencies: histograms per NBD command, rmem operation and journal device on /metrics, and a Latency section in status', async (t) => {
  const n = await startNode({ cwd: await tempDir(t) });
  t.after(() => n.stop('SIGKILL'));
  const post = async (path: string, body: unknown): Promise<void> => {
    const response = await fetch(`${n.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    assert.equal(response.status, 201, await response.text());
  };
  await post('/v1/nvram', { name: 'wl', size: '4MiB', policy: 'local' });
  await post('/v1/nvram', { name: 'j', size: '4MiB', policy: 'local' });
  await post('/v1/volumes', { name: 'logged', size: '8MiB', writeLog: 'wl' });

  const nbd = await NbdClient.connect({ host: n.nbd.host, port: n.nbd.port, export: 'logged' });
  t.after(() => nbd.close());
  for (let i = 0; i < 20; i++) await nbd.write(i * 4096, Buffer.alloc(4096, i));
  await nbd.flush();
  await nbd.write(0, Buffer.alloc(4096, 7), { fua: true });
  for (let i = 0; i < 10; i++) await nbd.read(i * 4096, 4096);

  const rmem = await RmemClient.connect({ ...n.rmem, serverId: 'latency' });
  t.after(() => rmem.close());
  const journal = await rmem.journalOpen('j', 1);
  for (let i = 0; i < 5; i++) await rmem.journalAppend(journal, [{ payload: Buffer.alloc(512, i) }]);

  const metrics = await (await fetch(`${n.url}/metrics`)).text();
  const series = (name: string, labels: string): number => {
    const match = new RegExp(`^${name}\\{${labels}\\} (\\S+)$`, 'm').exec(metrics);
    assert.ok(match !== null, `${name}{${labels}} is on /metrics`);
    return Number(match[1]);
  };
  assert.match(metrics, /^# TYPE memstrata_nbd_request_seconds histogram$/m);
  assert.equal(series('memstrata_nbd_request_seconds_count', 'command="WRITE"'), 21);
  assert.equal(series('memstrata_nbd_request_seconds_bucket', 'command="WRITE",le="\\+Inf"'), 21);
  assert.equal(series('memstrata_nbd_request_seconds_count', 'command="FLUSH"'), 1);
  assert.ok(series('memstrata_nbd_request_seconds_count', 'command="READ"') >= 10);
  assert.ok(series('memstrata_nbd_request_seconds_sum', 'command="WRITE"') > 0);
  // Buckets are cumulative: never fewer at a larger bound.
  const buckets = [...metrics.matchAll(/^memstrata_nbd_request_seconds_bucket\{command="WRITE",le="([^"]+)"\} (\S+)$/gm)].map((m) => Number(m[2]));
  assert.equal(buckets.length, 20);
  for (let i = 1; i < buckets.length; i++) assert.ok((buckets[i] ?? 0) >= (buckets[i - 1] ?? 0), 'cumulative');
  assert.equal(series('memstrata_rmem_request_seconds_count', 'op="JAPPEND"'), 5);
  assert.ok(series('memstrata_nvram_journal_sync_seconds_count', 'device="j"') >= 5, 'each QD1 append was a synced batch');
  assert.ok(series('memstrata_nvram_journal_sync_seconds_count', 'device="wl"') >= 2, 'the FLUSH and the FUA write synced the write log');

  const status = await runCli(['status', '--admin', n.url]);
  assert.equal(status.code, 0, status.stderr);
  assert.match(status.stdout, /^Latency since start/m);
  assert.match(status.stdout, /^nbd +WRITE +21 +\S+ +<=\S+ +<=\S+$/m);
  assert.match(status.stdout, /^rmem +JAPPEND +5 /m);
  assert.match(status.stdout, /^journal sync +j +\d+ /m);
  const json = JSON.parse((await runCli(['status', '--admin', n.url, '--json'])).stdout) as { node: NodeInfo };
  const write = json.node.latency.nbd.find((l) => l.key === 'WRITE');
  assert.equal(write?.count, 21);
  assert.ok(write !== undefined && write.p50Seconds !== null && write.p99Seconds !== null && write.p50Seconds <= write.p99Seconds);

  // A device removed while appends run has no series left, not even from its last syncs.
  for (let round = 0; round < 3; round++) {
    await post('/v1/nvram', { name: 'gone', size: '4MiB', policy: 'local' });
    const doomed = await rmem.journalOpen('gone', 1);
    const appends = Array.from({ length: 32 }, (_, i) => rmem.journalAppend(doomed, [{ payload: Buffer.alloc(4096, i) }]).catch(() => undefined));
    await new Promise((resolve) => setImmediate(resolve));
    const removed = await fetch(`${n.url}/v1/nvram/gone`, { method: 'DELETE' });
    assert.ok(removed.status === 200 || removed.status === 204, await removed.text());
    await Promise.all(appends);
  }
  assert.doesNotMatch(await (await fetch(`${n.url}/metrics`)).text(), /device="gone"/);
});
