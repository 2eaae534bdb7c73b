// NVRAM appends against fdatasync-per-write on the same machine in the same run
// (DESIGN section 8): 4 KiB appends at one, 32 and 64 in flight, for each policy
// (volatile, local, mirrored, mirrored+local; mirrored to a second node on loopback),
// over rmem from one client. Baseline: fio writing 4 KiB sequentially with
// --fdatasync=1 in the node's data directory, at iodepth 1 (psync), which is what a
// commit costs without NVRAM. Then NBD commits without a write log and with a local and
// a mirrored one.
//
// Every case runs BENCH_ROUNDS times (default 3), the baseline first in each round, and
// the tables give medians (support/harness.ts).
//
//   npm run bench -- journal        BENCH_MS=5000 for longer runs; BENCH_POLICIES=mirrored for one policy

import { spawnSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RmemClient } from '../src/client/rmem-client.js';
import { freePort, startNode } from '../test/support/node-process.js';
import { benchRounds, measure, reportRounds, type CaseResult } from './support/harness.js';
import { have } from './support/ports.js';

const KB4 = 4096;

/** fio's own measurement of 4 KiB writes each followed by fdatasync, in `dir`. */
function fioFdatasync(dir: string, seconds: number): CaseResult | undefined {
  if (!have('fio')) return undefined;
  const out = spawnSync(
    'fio',
    ['--name=fdatasync', `--directory=${dir}`, '--rw=write', '--bs=4k', '--size=64M', '--ioengine=psync', '--fdatasync=1', '--time_based', `--runtime=${seconds}`, '--output-format=json'],
    { encoding: 'utf8' },
  );
  if (out.status !== 0) return undefined;
  const job = (JSON.parse(out.stdout.slice(out.stdout.indexOf('{'))) as { jobs: { write: { iops: number; clat_ns: { percentile?: Record<string, number> } }; sync: { lat_ns: { percentile?: Record<string, number> } } }[] }).jobs[0];
  if (job === undefined) return undefined;
  // One operation is a write plus its fdatasync: add the two medians.
  const p = (percentile: string) => ((job.write.clat_ns.percentile?.[percentile] ?? 0) + (job.sync.lat_ns.percentile?.[percentile] ?? 0)) / 1000;
  return { name: 'fio write+fdatasync, 4 KiB (baseline)', ops: job.write.iops * seconds, seconds, p50us: p('50.000000'), p99us: p('99.000000'), bytesPerOp: KB4 };
}

const POLICIES = (process.env.BENCH_POLICIES ?? 'volatile,local,mirrored,mirrored+local').split(',');
const deviceName = (policy: string) => policy.replace('+', '-');
const dir = await mkdtemp(join(tmpdir(), 'memstrata-bench-journal-'));
const partnerDir = await mkdtemp(join(tmpdir(), 'memstrata-bench-partner-'));
const [own, partnerPort] = [await freePort(), await freePort()];
const media = ['--dram-size', '512MiB', '--set', 'partition.dram.nvram.initial=320MiB', '--set', 'partition.dram.cache.initial=64MiB'];
const node = await startNode({ cwd: dir, args: [...media, '--mirror-listen', `127.0.0.1:${own}`, '--mirror-partner', `127.0.0.1:${partnerPort}`] });
const partner = await startNode({ cwd: partnerDir, args: [...media, '--mirror-listen', `127.0.0.1:${partnerPort}`, '--mirror-partner', `127.0.0.1:${own}`] });
try {
  for (const policy of POLICIES) {
    const response = await fetch(`${node.url}/v1/nvram`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: deviceName(policy), size: '48MiB', policy }) });
    if (response.status !== 201) throw new Error(await response.text());
  }
  // Mirrored devices are measured once their replicas are in sync.
  for (let i = 0; i < 200; i++) {
    const { devices } = (await (await fetch(`${node.url}/v1/nvram`)).json()) as { devices: { mirror: string | null }[] };
    if (devices.every((d) => d.mirror === null || d.mirror === 'in-sync')) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const client = await RmemClient.connect({ ...node.rmem, serverId: 'bench' });
  const payload = Buffer.alloc(KB4, 0x42);
  const seconds = Number(process.env.BENCH_MS ?? 2000) / 1000;
  const journals = new Map<string, Awaited<ReturnType<RmemClient['journalOpen']>>>();
  for (const policy of POLICIES) journals.set(policy, await client.journalOpen(deviceName(policy), 1));
  // Rounds: the fio baseline, then every policy's cases, in turn (harness.ts, Rounds).
  const rounds: CaseResult[][] = [];
  let fio = have('fio');
  if (!fio) console.log('fio not found: the fdatasync baseline is skipped (Debian: apt-get install fio)');
  for (let round = 0; round < benchRounds(); round++) {
    const results: CaseResult[] = [];
    const baseline = fio ? fioFdatasync(join(dir, 'memstrata-data'), Math.max(2, Math.round(seconds))) : undefined;
    if (baseline !== undefined) results.push(baseline);
    else if (fio) {
      console.log('fio failed: the fdatasync baseline is skipped');
      fio = false;
      for (const r of rounds) r.shift();
    }
    for (const policy of POLICIES) {
      const journal = journals.get(policy);
      if (journal === undefined) continue;
      let appended = 0;
      const append = async (): Promise<void> => {
        const [ack] = await client.journalAppend(journal, [{ payload }]);
        appended++;
        // Keep the 48 MiB device from filling: trim behind the writers now and then.
        if (ack !== undefined && appended % 4096 === 0) await client.journalTrim(journal, ack.seq - 64);
      };
      results.push(await measure({ name: `append ${policy}, QD1`, bytesPerOp: KB4, run: append }));
      for (const depth of [32, 64]) results.push(await measure({ name: `append ${policy}, ${depth} in flight`, bytesPerOp: KB4, run: append }, { depth }));
    }
    rounds.push(results);
  }
  reportRounds(fio ? 'NVRAM 4 KiB appends (ratios against fio write+fdatasync)' : 'NVRAM 4 KiB appends (no fio: ratios against the first row)', rounds);
  await client.close();

  // NBD commits: 4 KiB write + FLUSH at QD1, on a plain volume and on volumes whose write
  // log is a local and a mirrored NVRAM device (the partner is the second node).
  // (fio's nbd engine sends FLUSH for --fsync=1; it has no FUA.)
  if (have('fio')) {
    const post = async (path: string, body: unknown): Promise<void> => {
      const response = await fetch(`${node.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
      if (response.status !== 201) throw new Error(`${path}: ${await response.text()}`);
    };
    await post('/v1/nvram', { name: 'wl', size: '64MiB', policy: 'local' });
    await post('/v1/nvram', { name: 'mwl', size: '64MiB', policy: 'mirrored' });
    for (let i = 0; i < 200; i++) {
      const { devices } = (await (await fetch(`${node.url}/v1/nvram`)).json()) as { devices: { name: string; mirror: string | null }[] };
      if (devices.find((d) => d.name === 'mwl')?.mirror === 'in-sync') break;
      await new Promise((r) => setTimeout(r, 50));
    }
    await post('/v1/volumes', { name: 'plain', size: '256MiB' });
    await post('/v1/volumes', { name: 'logged', size: '256MiB', writeLog: 'wl' });
    await post('/v1/volumes', { name: 'mirrored', size: '256MiB', writeLog: 'mwl' });
    const commits = (volume: string): CaseResult | undefined => {
      const secs = Math.max(2, Math.round(seconds));
      const out = spawnSync(
        'fio',
        ['--name=commit', '--ioengine=nbd', `--uri=nbd://${node.nbd.host}:${node.nbd.port}/${volume}`, '--rw=randwrite', '--bs=4k', '--iodepth=1', '--fsync=1', '--size=64M', '--time_based', `--runtime=${secs}`, '--output-format=json'],
        { encoding: 'utf8' },
      );
      if (out.status !== 0) return undefined;
      const job = (JSON.parse(out.stdout.slice(out.stdout.indexOf('{'))) as { jobs: { write: { iops: number; clat_ns: { percentile?: Record<string, number> } }; sync: { lat_ns: { percentile?: Record<string, number> } } }[] }).jobs[0];
      if (job === undefined) return undefined;
      const p = (q: string) => ((job.write.clat_ns.percentile?.[q] ?? 0) + (job.sync.lat_ns.percentile?.[q] ?? 0)) / 1000;
      const what = { plain: 'no write log (baseline)', logged: 'NVRAM write log (local)', mirrored: 'NVRAM write log (mirrored)' }[volume] ?? volume;
      return { name: `NBD 4k write+FLUSH QD1, ${what}`, ops: job.write.iops * secs, seconds: secs, p50us: p('50.000000'), p99us: p('99.000000'), bytesPerOp: KB4 };
    };
    const commitRounds: CaseResult[][] = [];
    for (let round = 0; round < benchRounds(); round++) {
      const rows = [commits('plain'), commits('logged'), commits('mirrored')];
      if (rows.every((r): r is CaseResult => r !== undefined)) commitRounds.push(rows);
    }
    reportRounds('NBD commit latency, with and without the NVRAM write log', commitRounds);
  }
} finally {
  await node.stop('SIGTERM');
  await partner.stop('SIGTERM');
  await rm(dir, { recursive: true, force: true });
  await rm(partnerDir, { recursive: true, force: true });
}
