// A mirrored pair of real nodes under partitions made with SIGSTOP and SIGCONT (issue 11):
// a stopped node answers nothing, its sockets stay open, its timers fire late, as a
// partitioned or frozen machine does.
//
//   partner frozen  the replica's node is stopped while a writer appends: the primary
//                   degrades, keeps acknowledging, and brings the replica up to date
//                   once it thaws.
//   primary frozen  the primary's node is stopped mid-stream; a second writer takes the
//                   replica over with a newer epoch and appends there; the old primary
//                   thaws. Every record acknowledged to either writer is served by the
//                   new primary or kept aside (diverged) on the old one, nothing never
//                   written is served, and the old writer is fenced. (An append in flight
//                   when the primary froze may be served though never acknowledged: the
//                   replica held it; its writer saw no answer, so its outcome was open.)

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RmemClient } from '../../src/client/rmem-client.js';
import type { NvramDumpJson } from '../../src/protocol/admin/api.js';
import { RECORD_FLAG } from '../../src/protocol/journal/record.js';
import { freePort, startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { nvramDevice, until } from '../support/nvram-probe.js';

type Ctx = { after(fn: () => Promise<unknown>): void };
type Journal = Awaited<ReturnType<RmemClient['journalOpen']>>;



async function twoNodes(t: Ctx): Promise<{ a: NodeProcess; b: NodeProcess }> {
  const [dirA, dirB, portA, portB] = [await tempDir(t), await tempDir(t), await freePort(), await freePort()];
  const args = (own: number, partner: number, id: string, partnerId: string) => [
    '--mirror-listen', `127.0.0.1:${own}`, '--mirror-partner', `127.0.0.1:${partner}`, '--node-id', id,
    '--set', `mirror.partnerId=${partnerId}`, '--set', 'mirror.timeout=500ms',
  ];
  const a = await startNode({ cwd: dirA, args: args(portA, portB, 'node-a', 'node-b') });
  t.after(() => { a.proc.kill('SIGCONT'); return a.stop('SIGKILL'); });
  const b = await startNode({ cwd: dirB, args: args(portB, portA, 'node-b', 'node-a') });
  t.after(() => { b.proc.kill('SIGCONT'); return b.stop('SIGKILL'); });
  const created = await fetch(`${a.url}/v1/nvram`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'm', size: '8MiB', policy: 'mirrored' }) });
  assert.equal(created.status, 201, await created.text());
  await until('in sync', () => nvramDevice(a, 'm'), (d) => d?.mirror === 'in-sync');
  return { a, b };
}

async function readAll(c: RmemClient, journal: Journal): Promise<Awaited<ReturnType<RmemClient['journalRead']>>> {
  const out: Awaited<ReturnType<RmemClient['journalRead']>> = [];
  for (;;) {
    const page = await c.journalRead(journal, (out.at(-1)?.seq ?? 0) + 1);
    if (page.length === 0) return out;
    out.push(...page);
  }
}

/** Appends one record at a time until told to stop; what was acknowledged, what was tried. */
function writer(c: RmemClient, journal: Journal, prefix: string) {
  const acked = new Set<string>();
  const tried = new Set<string>();
  let stop = false;
  const done = (async () => {
    for (let i = 0; !stop; i++) {
      const payload = `${prefix}${i}`;
      tried.add(payload);
      try {
        await c.journalAppend(journal, [{ payload: Buffer.from(payload) }]);
        acked.add(payload);
      } catch {
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  })();
  return { acked, tried, stop: async () => { stop = true; await done; } };
}

test('partner frozen (SIGSTOP): the primary degrades and keeps acknowledging; thawed, the replica is brought up to date', async (t) => {
  const { a, b } = await twoNodes(t);
  const c = await RmemClient.connect({ ...a.rmem, serverId: 'w', reconnect: false, timeoutMs: 10_000 });
  t.after(() => c.close());
  const journal = await c.journalOpen('m', 1);
  const w = writer(c, journal, 'r');
  await new Promise((r) => setTimeout(r, 300));
  b.proc.kill('SIGSTOP');
  await until('degraded', () => nvramDevice(a, 'm'), (d) => d?.mirror === 'degraded');
  const during = w.acked.size;
  await new Promise((r) => setTimeout(r, 500));
  assert.ok(w.acked.size > during, 'the primary acknowledges while its partner is frozen');
  b.proc.kill('SIGCONT');
  await until('in sync again', () => nvramDevice(a, 'm'), (d) => d?.mirror === 'in-sync');
  await w.stop();
  const primary = await nvramDevice(a, 'm');
  const replica = await until('replica caught up', () => nvramDevice(b, 'm'), (d) => d?.lastSeq === primary?.lastSeq);
  assert.equal(replica?.role, 'replica');
  const served = (await readAll(c, journal)).map((r) => r.payload.toString());
  for (const p of w.acked) assert.ok(served.includes(p), `acknowledged ${p} is served`);
});

test('primary frozen (SIGSTOP) mid-stream, the replica taken over: every acknowledged record is served by the new primary or kept aside on the old one; nothing never written is served; the old writer is fenced', async (t) => {
  const { a, b } = await twoNodes(t);
  const c1 = await RmemClient.connect({ ...a.rmem, serverId: 'w1', reconnect: false, timeoutMs: 4000 });
  t.after(() => c1.close());
  const j1 = await c1.journalOpen('m', 1);
  const w1 = writer(c1, j1, 'one-');
  await new Promise((r) => setTimeout(r, 300 + Math.floor(Math.random() * 300)));
  a.proc.kill('SIGSTOP');
  // Failover: a second writer takes the replica over on B and goes on there.
  const c2 = await RmemClient.connect({ ...b.rmem, serverId: 'w2', reconnect: false, timeoutMs: 4000 });
  t.after(() => c2.close());
  const j2 = await until('takeover', () => c2.journalOpen('m', 2).catch(() => undefined), (j) => j !== undefined);
  assert.ok(j2 !== undefined);
  const w2 = writer(c2, j2, 'two-');
  await new Promise((r) => setTimeout(r, 300));
  a.proc.kill('SIGCONT');
  // The old primary finds its partner newer, keeps its journal aside and becomes a replica.
  await until('old primary demoted, its journal kept aside', () => nvramDevice(a, 'm'), (d) => d?.role === 'replica' && (d.diverged ?? 0) > 0, 30_000);
  await w1.stop();
  await w2.stop();
  await assert.rejects(c1.journalAppend(j1, [{ payload: Buffer.from('late') }]), 'the old writer is fenced');
  const served = (await readAll(c2, j2)).filter((r) => (r.flags & RECORD_FLAG.VOID) === 0).map((r) => r.payload.toString());
  const dump = await fetch(`${a.url}/v1/nvram/m/records?diverged=1&max=1000000`);
  const kept = dump.status === 200 ? ((await dump.json()) as NvramDumpJson).records.map((r) => Buffer.from(r.payload, 'base64').toString()) : [];
  for (const p of [...w1.acked, ...w2.acked]) assert.ok(served.includes(p) || kept.includes(p), `acknowledged ${p} is neither served nor kept aside`);
  for (const p of served) assert.ok(w1.tried.has(p) || w2.tried.has(p), `${p} was never written`);
  assert.equal(new Set(served).size, served.length, 'no record served twice');
  console.log(`# acknowledged ${w1.acked.size} on A, ${w2.acked.size} on B; served ${served.length}, kept aside ${kept.length}`);
});
