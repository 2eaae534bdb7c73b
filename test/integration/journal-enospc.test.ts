// A real node whose data directory is a small tmpfs that fills up and empties again
// while writers append to a `local` NVRAM journal, killed with -9 at random moments
// (issue 11: crash loops with failed writes injected). A full disk fails journal writes
// (ENOSPC) for real: the journal is fenced, appends get errors, the rewrite waits for
// room. What must hold over every cycle: each acknowledged record comes back after the
// restart with its payload, no sequence number is acknowledged twice, and nothing never
// written is readable.
//
// Needs root to mount a tmpfs; skips with a reason otherwise (CI runs as root).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RmemClient } from '../../src/client/rmem-client.js';
import { RECORD_FLAG } from '../../src/protocol/journal/record.js';
import { startNode, type NodeProcess } from '../support/node-process.js';
import { rng } from '../support/rng.js';

const SOAK = process.env.MEMSTRATA_SOAK === '1';

test('kill -9 while a full disk fails journal writes: every acknowledged record comes back, no number is acknowledged twice', async () => {
  const mountPoint = await mkdtemp(join(tmpdir(), 'memstrata-enospc-'));
  const mounted = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=40m', 'tmpfs', mountPoint]);
  if (mounted.status !== 0) {
    await rm(mountPoint, { recursive: true, force: true });
    console.log(`# skipped: cannot mount a tmpfs (${mounted.stderr.toString().trim() || 'not root'})`);
    return;
  }
  const nodes: NodeProcess[] = [];
  try {
    await run(mountPoint, nodes);
  } finally {
    // Nodes first, then the mount, then its directory.
    for (const n of nodes) await n.stop('SIGKILL');
    spawnSync('umount', ['-l', mountPoint]);
    await rm(mountPoint, { recursive: true, force: true });
  }
});

async function run(mountPoint: string, nodes: NodeProcess[]): Promise<void> {
  const dir = join(mountPoint, 'node');
  await mkdir(dir);
  const ballast = join(mountPoint, 'ballast');
  const args = ['--dram-size', '32MiB', '--flash-size', '8MiB', '--set', 'volumes.defaultSize=4MiB'];
  const acked = new Map<number, string>(); // seq -> payload, over every cycle
  const written = new Set<string>();
  let epoch = 1;
  let failures = 0;
  const cycles = SOAK ? 20 : 3;
  for (let cycle = 0; cycle < cycles; cycle++) {
    const seed = (Date.now() ^ (cycle * 2654435761)) >>> 0;
    const random = rng(seed);
    console.log(`# enospc cycle ${cycle}: seed ${seed}`);
    await rm(ballast, { force: true });
    const n = await startNode({ cwd: dir, small: false, args, timeoutMs: 30_000 });
    nodes.push(n);
    if (cycle === 0) {
      const created = await fetch(`${n.url}/v1/nvram`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'j', size: '4MiB', policy: 'local' }) });
      assert.equal(created.status, 201, await created.text());
    }
    const c = await RmemClient.connect({ ...n.rmem, serverId: `w${cycle}`, reconnect: false, timeoutMs: 5000 });
    const journal = await c.journalOpen('j', ++epoch);
    // What the last kill left: every acknowledged record, and nothing never written.
    const back: Awaited<ReturnType<RmemClient['journalRead']>> = [];
    for (let from = 0; ; ) {
      const page = await c.journalRead(journal, from, 4096, 16 * 2 ** 20);
      if (page.length === 0) break;
      back.push(...page);
      from = (page.at(-1)?.seq ?? from) + 1;
    }
    const bySeq = new Map(back.map((r) => [r.seq, r]));
    for (const [seq, payload] of acked) {
      if (seq <= (back[0]?.seq ?? 1) - 1) continue; // trimmed at the start of a cycle
      assert.equal(bySeq.get(seq)?.payload.toString(), payload, `cycle ${cycle} (seed ${seed}): acknowledged record ${seq} lost or changed`);
    }
    for (const r of back) if ((r.flags & RECORD_FLAG.VOID) === 0) assert.ok(written.has(r.payload.toString()), `record ${r.seq} was never written`);
    if (back.length > 0) await c.journalTrim(journal, back.at(-1)?.seq ?? 0);
    for (const seq of acked.keys()) if (seq <= (back.at(-1)?.seq ?? 0)) acked.delete(seq);

    let stop = false;
    let k = 0;
    const writers = Array.from({ length: 8 }, async () => {
      while (!stop) {
        const payload = `${seed}:${k++}:${'x'.repeat(400)}`;
        written.add(payload);
        try {
          const [ack] = await c.journalAppend(journal, [{ payload: Buffer.from(payload) }]);
          if (ack === undefined) continue;
          assert.ok(!acked.has(ack.seq) || acked.get(ack.seq) === payload, `sequence number ${ack.seq} acknowledged twice`);
          acked.set(ack.seq, payload);
        } catch (error) {
          if (stop) return;
          failures++;
          if ((error as { code?: string }).code === 'MS_RMEM_CLOSED' || (error as { code?: string }).code === 'MS_RMEM_UNREACHABLE') return;
          await new Promise((r) => setTimeout(r, 10));
        }
      }
    });
    // Fill the disk, let writes fail for a while, make room again; kill at a random moment.
    const filler = (async () => {
      while (!stop) {
        await new Promise((r) => setTimeout(r, 50 + random() * 150));
        await writeFile(ballast, Buffer.alloc(64 * 2 ** 20)).catch(() => undefined); // as much as fits
        await new Promise((r) => setTimeout(r, 50 + random() * 150));
        await rm(ballast, { force: true });
      }
    })();
    await new Promise((r) => setTimeout(r, 600 + random() * 1200));
    assert.equal(await n.stop('SIGKILL'), 'SIGKILL');
    stop = true;
    await Promise.all([...writers, filler]);
    await c.close();
  }
  console.log(`# ${failures} appends failed on a full disk over the cycles`);
}
