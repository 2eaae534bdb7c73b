// Guests (issue 12, DESIGN 4.6), one run on this machine:
//
//   1. 4 KiB NVRAM appends from inside a guest, over its cut-through socket (rmem.sock)
//      against the same over the node's TCP port, QD1 and 32 in flight, for a volatile
//      and a local device; baseline: fio write+fdatasync in the data directory.
//   2. fio's nbd engine running as a guest over nbd+unix at --cpu 1.0, 0.5, 0.25, 0.1:
//      IOPS should follow the share (ratios against 1.0).
//   3. Requested against measured CPU share (0.1, 0.25, 0.5, 1.0, 1.5) for a guest of two
//      busy processes, measured with the kernel's accounting (/proc/<pid>/stat of every
//      process in its group), for the node's enforcement and for the signal fallback.
//
//   0. The floor under part 1: a bare echo between two Node.js processes (a 4 KiB
//      request, a 32-byte answer, one in flight) over a Unix socket against loopback
//      TCP, with no memstrata code in between: what the cut-through socket can save.
//
//   npm run bench -- guest        BENCH_MS=5000 for longer runs; BENCH_GUEST_PART=floor
//                                 runs part 0 only

import { spawnSync } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { AdminClient } from '../src/client/admin-client.js';
import type { GuestInfoJson } from '../src/protocol/admin/api.js';
import { parseProcStat } from '../src/guest/proc-stat.js';
import { startNode, type NodeProcess } from '../test/support/node-process.js';
import { measure, report, type CaseResult } from './support/harness.js';
import { have } from './support/ports.js';

const KB4 = 4096;
const TOKEN = 'bench-guest-token-0123456789';
const seconds = Number(process.env.BENCH_MS ?? 2000) / 1000;
const HARNESS = fileURLToPath(new URL('./support/harness.js', import.meta.url));
const CLIENT = fileURLToPath(new URL('../src/client/index.js', import.meta.url));

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function guests(admin: AdminClient): Promise<GuestInfoJson[]> {
  return (await admin.get<{ guests: GuestInfoJson[] }>('/v1/guests')).guests;
}

async function waitFor(admin: AdminClient, name: string, done: (g: GuestInfoJson) => boolean, ms: number): Promise<GuestInfoJson> {
  const deadline = Date.now() + ms;
  for (;;) {
    const g = (await guests(admin)).find((x) => x.name === name);
    if (g !== undefined && done(g)) return g;
    if (Date.now() > deadline) throw new Error(`guest ${name}: not done in ${ms} ms (${JSON.stringify(g)})`);
    await sleep(100);
  }
}

/** fio's 4 KiB write + fdatasync in `dir`: what a commit costs without NVRAM. */
function fioFdatasync(dir: string): CaseResult | undefined {
  if (!have('fio')) return undefined;
  const secs = Math.max(2, Math.round(seconds));
  const out = spawnSync('fio', ['--name=fdatasync', `--directory=${dir}`, '--rw=write', '--bs=4k', '--size=64M', '--ioengine=psync', '--fdatasync=1', '--time_based', `--runtime=${secs}`, '--output-format=json'], { encoding: 'utf8' });
  if (out.status !== 0) return undefined;
  const job = (JSON.parse(out.stdout.slice(out.stdout.indexOf('{'))) as { jobs: { write: { iops: number; clat_ns: { percentile?: Record<string, number> } }; sync: { lat_ns: { percentile?: Record<string, number> } } }[] }).jobs[0];
  if (job === undefined) return undefined;
  const p = (q: string) => ((job.write.clat_ns.percentile?.[q] ?? 0) + (job.sync.lat_ns.percentile?.[q] ?? 0)) / 1000;
  return { name: 'fio write+fdatasync, 4 KiB (baseline)', ops: job.write.iops * secs, seconds: secs, p50us: p('50.000000'), p99us: p('99.000000'), bytesPerOp: KB4 };
}

/** The guest program of part 1: measures appends on both paths from inside the guest, prints JSON. */
const APPENDS = `import { measure } from ${JSON.stringify(HARNESS)};
import { RmemClient } from ${JSON.stringify(CLIENT)};
const env = process.env;
const payload = Buffer.alloc(${KB4}, 0x42);
const results = [];
const [tcpHost, tcpPort] = [env.MEMSTRATA_NVRAM_PATHS.split(',')[1].slice(4).replace(/:\\d+$/, ''), Number(env.MEMSTRATA_NVRAM_PATHS.split(':').pop())];
for (const device of env.MEMSTRATA_NVRAM_DEVICES.split(',')) {
  for (const [path, where] of [['cut-through socket', { path: env.MEMSTRATA_NVRAM_SOCKET }], ['TCP', { host: tcpHost, port: tcpPort }]]) {
    const client = await RmemClient.connect({ ...where, serverId: 'bench-' + path.replace(/ /g, '-') });
    const journal = await client.journalOpen(device, Date.now());
    let n = 0;
    const append = async () => {
      const [ack] = await client.journalAppend(journal, [{ payload }]);
      if (++n % 4096 === 0) await client.journalTrim(journal, ack.seq - 64);
    };
    results.push(await measure({ name: 'append ' + device + ' over ' + path + ', QD1', bytesPerOp: ${KB4}, run: append }));
    results.push(await measure({ name: 'append ' + device + ' over ' + path + ', 32 in flight', bytesPerOp: ${KB4}, run: append }, { depth: 32 }));
    await client.close();
  }
}
console.log('RESULTS ' + JSON.stringify(results));
`;

async function appendsFromGuest(node: NodeProcess, admin: AdminClient, work: string): Promise<void> {
  for (const [name, policy] of [['volatile', 'volatile'], ['local', 'local']]) await admin.post('/v1/nvram', { name, size: '48MiB', policy });
  const script = join(work, 'appends.mjs');
  await writeFile(script, APPENDS);
  await admin.post('/v1/guests', { name: 'appender', command: [process.execPath, script], nvram: ['volatile', 'local'], restart: 'never' });
  await waitFor(admin, 'appender', (g) => g.state === 'stopped' || g.state === 'failed', 120_000);
  const log = await admin.text('/v1/guests/appender/logs');
  const line = log.split('\n').find((l) => l.startsWith('RESULTS '));
  if (line === undefined) throw new Error(`the appending guest printed no results:\n${log}`);
  const results = JSON.parse(line.slice('RESULTS '.length)) as CaseResult[];
  const baseline = fioFdatasync(join(node.dir, 'memstrata-data'));
  report('NVRAM 4 KiB appends from inside a guest (ratios against fio write+fdatasync)', baseline === undefined ? results : [baseline, ...results]);
  for (const device of ['volatile', 'local']) {
    const of = (path: string, qd: string) => results.find((r) => r.name === `append ${device} over ${path}, ${qd}`);
    const ctd = of('cut-through socket', 'QD1');
    const tcp = of('TCP', 'QD1');
    if (ctd !== undefined && tcp !== undefined) console.log(`${device}: cut-through QD1 p50 is ${(ctd.p50us / tcp.p50us).toFixed(2)}x the TCP path's (target <= 0.80x)`);
  }
}

async function fioShares(admin: AdminClient): Promise<void> {
  if (!have('fio')) {
    console.log('fio not found: the fio-as-a-guest part is skipped');
    return;
  }
  await admin.post('/v1/volumes', { name: 'fiovol', size: '256MiB' });
  const secs = Math.max(3, Math.round(seconds * 1.5));
  const results: CaseResult[] = [];
  for (const cpu of [1, 0.5, 0.25, 0.1]) {
    const name = `fio-${String(cpu).replace('.', '')}`;
    const uri = 'nbd+unix:///fiovol?socket=$MEMSTRATA_CTD_SOCKET';
    await admin.post('/v1/guests', {
      name, cpu, volumes: ['fiovol'], restart: 'never',
      command: ['sh', '-c', `exec fio --name=g --ioengine=nbd --uri="${uri}" --rw=randwrite --bs=4k --iodepth=8 --size=64M --time_based --runtime=${secs} --output-format=json`],
    });
    await waitFor(admin, name, (g) => g.state === 'stopped' || g.state === 'failed', (secs + 30) * 1000);
    const log = await admin.text(`/v1/guests/${name}/logs`);
    const job = (JSON.parse(log.slice(log.indexOf('{'))) as { jobs: { write: { iops: number; clat_ns: { percentile?: Record<string, number> } } }[] }).jobs[0];
    const p = (q: string) => (job?.write.clat_ns.percentile?.[q] ?? 0) / 1000;
    results.push({ name: `fio nbd randwrite 4k QD8 as a guest, --cpu ${cpu}`, ops: (job?.write.iops ?? 0) * secs, seconds: secs, p50us: p('50.000000'), p99us: p('99.000000'), bytesPerOp: KB4 });
    await admin.delete(`/v1/guests/${name}`);
  }
  report('fio as a guest over its cut-through NBD socket (ratios against --cpu 1.0)', results);
}

/** CPU seconds of every process in process group `pgid`, by the kernel's count. */
async function groupCpu(pgid: number): Promise<number> {
  let ticks = 0;
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const sample = parseProcStat(await readFile(`/proc/${entry}/stat`, 'utf8').catch(() => ''));
    if (sample?.pgrp === pgid) ticks += sample.ticks;
  }
  return ticks / 100;
}

async function shares(admin: AdminClient, mode: string): Promise<void> {
  const rows: string[][] = [];
  for (const cpu of [0.1, 0.25, 0.5, 1.0, 1.5]) {
    const name = `busy-${String(cpu).replace('.', '')}`;
    // Two busy processes, so a share above one core can be used.
    await admin.post('/v1/guests', { name, cpu, command: ['sh', '-c', 'while :; do :; done & while :; do :; done'] });
    const g = await waitFor(admin, name, (x) => x.state === 'running' && x.pid !== null, 10_000);
    const pid = g.pid ?? 0;
    await sleep(500);
    const before = await groupCpu(pid);
    const t0 = performance.now();
    await sleep(Math.max(3000, seconds * 1500));
    const used = (await groupCpu(pid)) - before;
    const measured = used / ((performance.now() - t0) / 1000);
    rows.push([String(cpu), measured.toFixed(3), `${(((measured - cpu) / cpu) * 100).toFixed(1)}%`]);
    await admin.post(`/v1/guests/${name}/stop`, {});
    await admin.delete(`/v1/guests/${name}`);
  }
  console.log(`\nRequested against measured CPU share, enforcement ${mode} (two busy processes; target within 5%)`);
  console.log(['requested', 'measured', 'error'].map((h) => h.padStart(10)).join(''));
  for (const r of rows) console.log(r.map((c) => c.padStart(10)).join(''));
}

/** A bare echo server in a child process, on a Unix socket and a TCP port. */
const ECHO_SERVER = `import { createServer } from 'node:net';
const serve = (s) => { s.setNoDelay?.(true); s.on('data', (d) => { s.write(d.subarray(0, 32)); }); s.on('error', () => {}); };
const unix = createServer(serve); const tcp = createServer(serve);
await new Promise((r) => unix.listen(process.argv[2], r));
await new Promise((r) => tcp.listen(0, '127.0.0.1', r));
console.log(JSON.stringify({ port: tcp.address().port }));
`;

async function transportFloor(work: string): Promise<void> {
  const script = join(work, 'echo.mjs');
  await writeFile(script, ECHO_SERVER);
  const socketPath = join(work, 'echo.sock');
  const { spawn } = await import('node:child_process');
  const { connect } = await import('node:net');
  const server = spawn(process.execPath, [script, socketPath], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    const port = await new Promise<number>((resolve, reject) => {
      server.stdout.once('data', (d: Buffer) => resolve((JSON.parse(d.toString()) as { port: number }).port));
      server.once('exit', () => reject(new Error('the echo server exited')));
    });
    const request = Buffer.alloc(KB4 + 32, 0x42);
    const results: CaseResult[] = [];
    for (const [name, where] of [['echo over TCP loopback (baseline)', { port, host: '127.0.0.1' }], ['echo over a Unix socket', { path: socketPath }]] as const) {
      const socket = connect(where);
      socket.setNoDelay(true);
      await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
      let pending: (() => void) | undefined;
      let got = 0;
      socket.on('data', (d: Buffer) => {
        got += d.length;
        if (got >= 32) {
          got = 0;
          pending?.();
        }
      });
      results.push(await measure({ name, bytesPerOp: KB4, run: () => new Promise<void>((resolve) => { pending = resolve; socket.write(request); }) }));
      socket.destroy();
    }
    report('The transport alone: a 4 KiB request and a 32-byte answer between two Node.js processes, one in flight', results);
    const [tcp, unix] = results;
    if (tcp !== undefined && unix !== undefined) console.log(`Unix socket QD1 p50 is ${(unix.p50us / tcp.p50us).toFixed(2)}x TCP's: the most the cut-through socket can save on this machine`);
  } finally {
    server.kill('SIGTERM');
  }
}

const work = await mkdtemp(join(tmpdir(), 'memstrata-bench-guest-'));
if (process.env.BENCH_GUEST_PART === 'floor') {
  try {
    await transportFloor(work);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
  process.exit(0);
}
const env = { MEMSTRATA_ADMIN_TOKEN: TOKEN };
const media = ['--dram-size', '512MiB', '--set', 'partition.dram.nvram.initial=256MiB', '--set', 'partition.dram.cache.initial=64MiB'];
try {
  const node = await startNode({ cwd: join(work), env, args: media });
  const admin = new AdminClient(node.url, { token: TOKEN });
  try {
    const info = await admin.get<{ guests: { enforcement: string } }>('/v1/node');
    await transportFloor(work);
    await appendsFromGuest(node, admin, work);
    await fioShares(admin);
    await shares(admin, info.guests.enforcement);
  } finally {
    await node.stop('SIGTERM');
  }
  if (process.env.BENCH_SIGNAL !== '0') {
    const signalDir = await mkdtemp(join(tmpdir(), 'memstrata-bench-guest-signal-'));
    const signalNode = await startNode({ cwd: signalDir, env, args: [...media, '--set', 'guests.enforcement=signal'] });
    try {
      await shares(new AdminClient(signalNode.url, { token: TOKEN }), 'signal');
    } finally {
      await signalNode.stop('SIGTERM');
      await rm(signalDir, { recursive: true, force: true });
    }
  }
} finally {
  await rm(work, { recursive: true, force: true });
}
