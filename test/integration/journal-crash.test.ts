// Crash loops of NVRAM journals around the file rewrites (issue 11):
//
//   ring        a `local` device whose writers append and trim all the time, so its
//               journal's ring (16 MiB) wraps again and again, its pointer moving on over
//               trimmed records; kill -9 at random moments. Every acknowledged record not covered by a trim
//               (one sent but unanswered at the kill may have taken effect) comes back
//               intact, in order, and nothing never written.
//   vault       a `volatile` device stopped cleanly (SIGTERM writes its vault) and killed
//               at a random moment during that stop. After the restart it holds every
//               acknowledged record (the vault was complete) or none (it was not, and a
//               volatile device is empty after a crash, as its policy says): never a part.
//
// The seed of each cycle is printed; MEMSTRATA_SOAK=1 runs more cycles.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { RmemClient } from '../../src/client/rmem-client.js';
import { RECORD_FLAG } from '../../src/protocol/journal/record.js';
import { startNode, tempDir, type NodeProcess } from '../support/node-process.js';

const SOAK = process.env.MEMSTRATA_SOAK === '1';

async function createDevice(n: NodeProcess, name: string, size: string, policy: string): Promise<void> {
  const response = await fetch(`${n.url}/v1/nvram`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name, size, policy }) });
  assert.equal(response.status, 201, await response.text());
}

type Journal = Awaited<ReturnType<RmemClient['journalOpen']>>;

async function readAll(c: RmemClient, journal: Journal): Promise<Awaited<ReturnType<RmemClient['journalRead']>>> {
  const back: Awaited<ReturnType<RmemClient['journalRead']>> = [];
  for (let from = 0; ; ) {
    const page = await c.journalRead(journal, from, 4096, 16 * 2 ** 20);
    if (page.length === 0) return back;
    back.push(...page);
    from = (page.at(-1)?.seq ?? from) + 1;
  }
}

test('kill -9 while a local journal is appended and trimmed, its ring wrapping: every acknowledged, untrimmed record comes back', async (t) => {
  const dir = await tempDir(t);
  const acked = new Map<number, string>();
  const attempted = new Set<string>();
  let trimmedTo = 0; // highest trim acknowledged
  let trimSent = 0; // highest trim sent: one in flight at the kill may have taken effect
  let epoch = 1;
  const cycles = SOAK ? 20 : 3;
  for (let cycle = 0; cycle < cycles; cycle++) {
    const seed = (Date.now() ^ (cycle * 7919)) >>> 0;
    console.log(`# journal ring crash cycle ${cycle}: seed ${seed}`);
    const n = await startNode({ cwd: dir });
    t.after(() => n.stop('SIGKILL'));
    if (cycle === 0) await createDevice(n, 'c', '2MiB', 'local');
    const c = await RmemClient.connect({ ...n.rmem, serverId: `w${cycle}`, reconnect: false, timeoutMs: 5000 });
    const journal = await c.journalOpen('c', ++epoch);
    const back = await readAll(c, journal);
    back.forEach((r, i) => {
      assert.equal(r.seq, (back[0]?.seq ?? 0) + i, `cycle ${cycle} (seed ${seed}): in order without gaps`);
      if ((r.flags & RECORD_FLAG.VOID) === 0) assert.ok(attempted.has(r.payload.toString('hex')), `record ${r.seq} was never written`);
    });
    const bySeq = new Map(back.map((r) => [r.seq, r.payload.toString('hex')]));
    for (const [seq, hex] of acked) {
      if (seq > trimSent) assert.equal(bySeq.get(seq), hex, `cycle ${cycle} (seed ${seed}): acknowledged record ${seq} lost or changed (trimmed to ${trimmedTo}, trim sent to ${trimSent})`);
    }
    // Appenders and a trimmer, so the ring wraps and its pointer moves on, until killed.
    let stop = false;
    let k = 0;
    const writers = Array.from({ length: 16 }, async () => {
      while (!stop) {
        const payload = createHash('sha256').update(`${seed}:${k++}`).digest();
        const record = Buffer.concat([payload, Buffer.alloc(16 * 1024 - payload.length, payload[0])]);
        attempted.add(record.toString('hex'));
        try {
          const [ack] = await c.journalAppend(journal, [{ payload: record }]);
          if (ack !== undefined) acked.set(ack.seq, record.toString('hex'));
        } catch {
          return;
        }
      }
    });
    const trimmer = (async () => {
      while (!stop) {
        await new Promise((resolve) => setTimeout(resolve, 5));
        // Trim up to the middle of what is acknowledged: records after it must survive.
        const seqs = [...acked.keys()].filter((s) => s > trimmedTo).sort((a, b) => a - b);
        const upTo = seqs[Math.floor(seqs.length / 2)];
        if (upTo === undefined) continue;
        trimSent = Math.max(trimSent, upTo);
        try {
          await c.journalTrim(journal, upTo);
          trimmedTo = Math.max(trimmedTo, upTo);
          for (const s of acked.keys()) if (s <= trimmedTo) acked.delete(s);
        } catch {
          return;
        }
      }
    })();
    await new Promise((resolve) => setTimeout(resolve, 400 + (seed % 1200)));
    assert.equal(await n.stop('SIGKILL'), 'SIGKILL');
    stop = true;
    await Promise.all([...writers, trimmer]);
    await c.close();
  }
});

test('kill -9 during the clean stop that vaults a volatile device: after the restart it holds every acknowledged record or none, never a part', async (t) => {
  const dir = await tempDir(t);
  const cycles = SOAK ? 20 : 3;
  let epoch = 1;
  for (let cycle = 0; cycle < cycles; cycle++) {
    const seed = (Date.now() ^ (cycle * 104729)) >>> 0;
    console.log(`# vault crash cycle ${cycle}: seed ${seed}`);
    const n = await startNode({ cwd: dir });
    t.after(() => n.stop('SIGKILL'));
    if (cycle === 0) await createDevice(n, 'v', '8MiB', 'volatile');
    const c = await RmemClient.connect({ ...n.rmem, serverId: `v${cycle}`, reconnect: false, timeoutMs: 5000 });
    const journal = await c.journalOpen('v', ++epoch);
    const old = await readAll(c, journal);
    if (old.length > 0) await c.journalTrim(journal, old.at(-1)?.seq ?? 0);
    const acked = new Map<number, string>();
    for (let i = 0; i < 200; i++) {
      const payload = createHash('sha256').update(`${seed}:${i}`).digest();
      const record = Buffer.concat([payload, Buffer.alloc(32 * 1024 - payload.length, i)]);
      const [ack] = await c.journalAppend(journal, [{ payload: record }]);
      if (ack !== undefined) acked.set(ack.seq, record.toString('hex'));
    }
    await c.close();
    // A clean stop writes the vault (6 MiB); kill it at a random moment on the way.
    n.proc.kill('SIGTERM');
    await new Promise((resolve) => setTimeout(resolve, seed % 400));
    await n.stop('SIGKILL');
    const again = await startNode({ cwd: dir });
    t.after(() => again.stop('SIGKILL'));
    const reader = await RmemClient.connect({ ...again.rmem, serverId: `r${cycle}`, reconnect: false, timeoutMs: 5000 });
    const back = await readAll(reader, await reader.journalOpen('v', ++epoch));
    const live = back.filter((r) => (r.flags & RECORD_FLAG.VOID) === 0 && acked.has(r.seq));
    assert.ok(live.length === 0 || live.length === acked.size, `cycle ${cycle} (seed ${seed}): ${live.length} of ${acked.size} acknowledged records came back`);
    for (const r of live) assert.equal(r.payload.toString('hex'), acked.get(r.seq), `record ${r.seq} changed`);
    console.log(`# vault crash cycle ${cycle}: ${live.length === 0 ? 'killed before the vault was whole: empty' : 'vault whole: every record back'}`);
    await reader.close();
    await again.stop('SIGTERM');
  }
});

test('kill -9 while a node restores a mirrored device from its vault at start: every record comes back, from the vault or the journal it rewrote', async (t) => {
  const { spawn } = await import('node:child_process');
  const { CLI, SMALL_MEDIA } = await import('../support/node-process.js');
  const dir = await tempDir(t);
  const first = await startNode({ cwd: dir });
  t.after(() => first.stop('SIGKILL'));
  await createDevice(first, 'v', '8MiB', 'mirrored'); // no partner: appends are synced locally (degrade)
  const c = await RmemClient.connect({ ...first.rmem, serverId: 'w', reconnect: false, timeoutMs: 5000 });
  const journal = await c.journalOpen('v', 1);
  const acked = new Map<number, string>();
  for (let i = 0; i < 150; i++) {
    const payload = createHash('sha256').update(`restore:${i}`).digest('hex').repeat(100);
    const [ack] = await c.journalAppend(journal, [{ payload: Buffer.from(payload) }]);
    if (ack !== undefined) acked.set(ack.seq, payload);
  }
  await c.close();
  assert.equal(await first.stop('SIGTERM'), 0, 'a clean stop writes the vault');
  // Each start reads the vault, rewrites the journal from it and removes it; kill on the way.
  for (let round = 0; round < (SOAK ? 20 : 3); round++) {
    const proc = spawn(process.execPath, [CLI, 'node', 'start', '--admin-listen', '127.0.0.1:0', '--rmem-listen', '127.0.0.1:0', '--nbd-listen', '127.0.0.1:0', '--mirror-listen', '127.0.0.1:0', '--log-format', 'json', ...SMALL_MEDIA], { cwd: dir, stdio: ['ignore', 'pipe', 'ignore'] });
    const exited = new Promise((resolve) => proc.once('exit', resolve));
    t.after(() => { proc.kill('SIGKILL'); });
    let out = '';
    proc.stdout.on('data', (chunk: Buffer) => { out += chunk.toString(); });
    // No line comes before the restore: kill at a random moment of the start-up.
    await new Promise((r) => setTimeout(r, 150 + Math.floor(Math.random() * 500)));
    proc.kill('SIGKILL');
    await exited;
    console.log(`# restore round ${round}: killed ${out.includes('NVRAM device restored') ? 'after' : 'before or during'} the restore`);
  }
  const last = await startNode({ cwd: dir });
  t.after(() => last.stop('SIGKILL'));
  // A mirrored device after a crash waits for its partner (recovering); the dump reads it anyway.
  const dump = (await (await fetch(`${last.url}/v1/nvram/v/records?max=100000`)).json()) as { records: { seq: number; payload: string }[] };
  const back = new Map(dump.records.map((r) => [r.seq, Buffer.from(r.payload, 'base64').toString()]));
  for (const [seq, payload] of acked) assert.equal(back.get(seq), payload, `record ${seq} lost in a restore`);
});
