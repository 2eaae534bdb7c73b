// A real application on a volume (issue 13, "commits at memory speed"): SQLite in WAL
// mode with synchronous=FULL, one 512-byte insert per transaction, on ext4 on an NBD
// export reached through nbdfuse and a loop device, against the same stack on nbdkit's
// memory plugin (not durable: the ceiling of this path) and file plugin (a file on the
// same disk as the node's data directory: the same promise as memstrata, durable after
// FLUSH), in one run. memstrata serves a plain volume, a volume whose write log is a
// `local` NVRAM device, and one whose write log is a `mirrored` device, its partner a
// second node on this machine (a FLUSH then waits for no disk).
//
// Each commit is a few writes and a FLUSH from ext4 (the loop device turns SQLite's
// fdatasync into a FLUSH through nbdfuse), so the write log's promise shows here: a
// commit costs one journal sync, not one per write.
//
// Then, to show where a commit's time goes, each kind of request alone against each
// server (libnbd from the same Python; that table is skipped without its module).
//
// Needs root (losetup, mount), nbdfuse, mkfs.ext4, nbdkit, and Debian's /usr/bin/python3
// (its sqlite3 module); skips with the reason otherwise.
//
// Each server first runs the program once on a file system of its own, not counted
// (BENCH_WARMUP_COMMITS): a Node.js process compiles its hot paths during its first
// thousands of requests (V8's optimising compiler ran on two threads through a whole
// first run), where a node serves for days.
//
//   npm run bench -- app        BENCH_COMMITS=3000, BENCH_WARMUP_COMMITS=1000, BENCH_REQUESTS=1500 (defaults)

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, openSync, writeFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AdminClient } from '../src/client/admin-client.js';
import { startNode } from '../test/support/node-process.js';
import { freePort, have, waitForPort } from './support/ports.js';
import { nodeSettings } from './support/harness.js';

const COMMITS = Number(process.env.BENCH_COMMITS ?? 3000);
const WARMUP_COMMITS = Number(process.env.BENCH_WARMUP_COMMITS ?? 1000);
const PYTHON = '/usr/bin/python3';
const TOKEN = 'bench-app-token-0123456789';

// The application: one row per transaction, timed over the commits only.
const SQLITE = `
import os, sqlite3, sys, time
path, n = sys.argv[1], int(sys.argv[2])
db = sqlite3.connect(path, isolation_level=None)
db.execute('PRAGMA journal_mode=WAL')
db.execute('PRAGMA synchronous=FULL')
db.execute('CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)')
payload = os.urandom(512)
t0 = time.perf_counter()
for _ in range(n):
    db.execute('BEGIN')
    db.execute('INSERT INTO t (v) VALUES (?)', (payload,))
    db.execute('COMMIT')
print(n / (time.perf_counter() - t0))
`;

// Where a commit's time goes: each kind of request alone, QD1, one connection, 4 KiB,
// through libnbd (p50 and p90 in microseconds).
const REQUESTS = `
import nbd, os, sys, time
uri, n = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
buf = os.urandom(4096)
def timed(f):
    ts = []
    for i in range(n):
        t = time.perf_counter()
        f(i)
        ts.append(time.perf_counter() - t)
    ts.sort()
    return '%d/%d' % (ts[len(ts) // 2] * 1e6, ts[int(len(ts) * 0.9)] * 1e6)
def write_flush(i, writes):
    for k in range(writes):
        h.pwrite(buf, ((i + 7 * k) % 256) * 4096)
    h.flush()
print('\t'.join([
    timed(lambda i: h.pwrite(buf, (i % 256) * 4096)),
    timed(lambda i: h.pwrite(buf, (i % 256) * 4096, nbd.CMD_FLAG_FUA)),
    timed(lambda i: h.flush()),
    timed(lambda i: write_flush(i, 1)),
    timed(lambda i: write_flush(i, 2)),
]))
`;
const REQUEST_KINDS = ['WRITE', 'WRITE+FUA', 'FLUSH alone', 'WRITE, FLUSH', '2 WRITEs, FLUSH'];
const REQUEST_COUNT = Number(process.env.BENCH_REQUESTS ?? 1500);

function missing(): string | undefined {
  if (process.getuid?.() !== 0) return 'it needs root (losetup, mount)';
  for (const tool of ['nbdfuse', 'losetup', 'mkfs.ext4', 'nbdkit']) if (!have(tool)) return `${tool} is not installed`;
  if (!existsSync('/dev/fuse')) return '/dev/fuse is missing';
  if (spawnSync(PYTHON, ['-c', 'import sqlite3']).status !== 0) return `${PYTHON} has no sqlite3 module`;
  return undefined;
}

function run(cmd: string, args: string[]): string {
  const out = spawnSync(cmd, args, { encoding: 'utf8' });
  if (out.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${out.stderr || out.stdout}`);
  return out.stdout.trim();
}

/** Each kind of request's p50/p90 at QD1 against `uri`, or undefined without libnbd's Python module. */
function requestTimes(uri: string, script: string): string[] | undefined {
  const out = spawnSync(PYTHON, [script, uri, String(REQUEST_COUNT)], { encoding: 'utf8' });
  if (out.status !== 0) return undefined;
  return out.stdout.trim().split('\t');
}

/** ext4 on `uri` through nbdfuse and a loop device; runs the SQLite program there; undoes it all. */
async function commitsPerSecond(uri: string, work: string, script: string, commits = COMMITS): Promise<number> {
  const fuseDir = await mkdtemp(join(work, 'fuse-'));
  const mnt = await mkdtemp(join(work, 'mnt-'));
  const disk = join(fuseDir, 'disk');
  const fuse: ChildProcess = spawn('nbdfuse', [disk, uri], { stdio: 'ignore' });
  let loop: string | undefined;
  let mounted = false;
  try {
    for (let i = 0; i < 100 && !existsSync(disk); i++) await new Promise((resolve) => setTimeout(resolve, 50));
    loop = run('losetup', ['-f', '--show', disk]);
    run('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', loop]);
    run('mount', [loop, mnt]);
    mounted = true;
    return Number(run(PYTHON, [script, join(mnt, 'bench.sqlite'), String(commits)]));
  } finally {
    if (mounted) spawnSync('umount', [mnt]);
    if (loop !== undefined) spawnSync('losetup', ['-d', loop]);
    spawnSync('umount', [fuseDir]);
    if (fuse.exitCode === null) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          fuse.kill('SIGKILL');
          resolve();
        }, 5000);
        fuse.once('exit', () => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }
}

async function withNbdkit<T>(plugin: string[], fn: (uri: string) => Promise<T>): Promise<T> {
  const port = await freePort();
  const proc = spawn('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), ...plugin], { stdio: 'ignore' });
  try {
    await waitForPort(port);
    return await fn(`nbd://127.0.0.1:${port}/`);
  } finally {
    proc.kill('SIGTERM');
  }
}

const why = missing();
if (why !== undefined) {
  console.log(`bench/app skipped: ${why}`);
  process.exit(0);
}

const work = await mkdtemp(join(tmpdir(), 'memstrata-bench-app-'));
console.log(nodeSettings());
try {
  const script = join(work, 'commits.py');
  writeFileSync(script, SQLITE);
  const requestScript = join(work, 'requests.py');
  writeFileSync(requestScript, REQUESTS);
  const rows: [string, number][] = [];
  const perRequest: [string, string[] | undefined][] = [];
  const both = async (name: string, uri: string): Promise<void> => {
    if (WARMUP_COMMITS > 0) await commitsPerSecond(uri, work, script, WARMUP_COMMITS);
    rows.push([name, await commitsPerSecond(uri, work, script)]);
    perRequest.push([name, requestTimes(uri, requestScript)]);
  };
  await withNbdkit(['memory', '1G'], (uri) => both('nbdkit memory (not durable: the ceiling)', uri));
  const file = join(work, 'nbdkit-file.img');
  const fd = openSync(file, 'w');
  ftruncateSync(fd, 1024 * 1024 * 1024);
  closeSync(fd);
  await withNbdkit(['file', file], (uri) => both('nbdkit file', uri));
  const nodeDir = join(work, 'node');
  const partnerDir = join(work, 'partner');
  await mkdir(nodeDir);
  await mkdir(partnerDir);
  // The partner of the `mirrored` write log: a second node on this machine (sharing its
  // two cores), as the mirror's other half would be on another machine.
  const [nodeMirror, partnerMirror] = [await freePort(), await freePort()];
  const mirrorArgs = (own: number, other: number) => ['--mirror-listen', `127.0.0.1:${own}`, '--mirror-partner', `127.0.0.1:${other}`];
  const node = await startNode({ cwd: nodeDir, small: false, env: { MEMSTRATA_ADMIN_TOKEN: TOKEN }, args: ['--dram-size', '1GiB', '--flash-size', '1GiB', ...mirrorArgs(nodeMirror, partnerMirror)] });
  const partner = await startNode({ cwd: partnerDir, env: { MEMSTRATA_ADMIN_TOKEN: TOKEN }, args: ['--dram-size', '256MiB', ...mirrorArgs(partnerMirror, nodeMirror)] });
  try {
    const admin = new AdminClient(node.url, { token: TOKEN });
    await admin.post('/v1/volumes', { name: 'plain', size: '1GiB' });
    await admin.post('/v1/nvram', { name: 'wl', size: '32MiB', policy: 'local' });
    await admin.post('/v1/volumes', { name: 'logged', size: '1GiB', writeLog: 'wl' });
    await admin.post('/v1/nvram', { name: 'mwl', size: '32MiB', policy: 'mirrored' });
    for (let i = 0; ; i++) {
      const { devices } = await admin.get<{ devices: { name: string; mirror: string | null }[] }>('/v1/nvram');
      if (devices.find((d) => d.name === 'mwl')?.mirror === 'in-sync') break;
      if (i > 200) throw new Error('the mirrored device did not get in sync with its partner');
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    await admin.post('/v1/volumes', { name: 'mirrored', size: '1GiB', writeLog: 'mwl' });
    const base = `nbd://${node.nbd.host}:${node.nbd.port}`;
    await both('memstrata, plain volume', `${base}/plain`);
    await both('memstrata, `local` write log', `${base}/logged`);
    await both('memstrata, `mirrored` write log (partner on this machine)', `${base}/mirrored`);
  } finally {
    await node.stop('SIGTERM');
    await partner.stop('SIGTERM');
  }
  rows.push(['the machine\'s own ext4, no NBD', Number(run(PYTHON, [script, join(work, 'local.sqlite'), String(COMMITS)]))]);
  const memory = rows[0]?.[1] ?? 0;
  const fileRate = rows[1]?.[1] ?? 0;
  const width = Math.max(...rows.map(([name]) => name.length));
  console.log(`\nSQLite (WAL, synchronous=FULL, one 512-byte insert per transaction), ${COMMITS} commits after ${WARMUP_COMMITS} not counted, ext4 over nbdfuse and a loop device`);
  console.log(`${'under ext4'.padEnd(width)}  commits/s  vs nbdkit file  vs nbdkit memory`);
  for (const [name, rate] of rows) {
    console.log(`${name.padEnd(width)}  ${rate.toFixed(0).padStart(9)}  ${`${(rate / fileRate).toFixed(2)}x`.padStart(13)}  ${`${(rate / memory).toFixed(2)}x`.padStart(15)}`);
  }
  if (perRequest.every(([, times]) => times === undefined)) {
    console.log(`\nper request: skipped (${PYTHON} has no libnbd module: nbd)`);
  } else {
    console.log(`\nper request, QD1, one connection, 4 KiB, ${REQUEST_COUNT} each: p50/p90 in us`);
    console.log(`${'server'.padEnd(width)}  ${REQUEST_KINDS.map((k) => k.padStart(16)).join('')}`);
    for (const [name, times] of perRequest) console.log(`${name.padEnd(width)}  ${(times ?? REQUEST_KINDS.map(() => 'failed')).map((v) => v.padStart(16)).join('')}`);
  }
} finally {
  await rm(work, { recursive: true, force: true });
}
