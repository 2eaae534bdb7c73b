// The cluster's costs (issue 14), each against its baseline in the same run:
//
//   1. mirrored 4 KiB appends, QD1 and 32 in flight, with etcd-fenced ownership     (the fence
//      against the same pair of nodes without etcd (baseline)                          is local)
//   2. a host's 4 KiB reads and writes, 16 in flight, on `redundancy: 2` segments
//      against single-copy segments (baseline), no page cache
//   3. failover time over repeated kill -9 of the primary: from the kill to the first
//      acknowledgement on the new primary; median and max
//
// Needs Debian's etcd-server.   npm run bench -- cluster    (BENCH_MS, BENCH_KILLS=5)

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MultipathJournal, RmemClient } from '../src/client/index.js';
import { HierarchyMemory } from '../src/host/hierarchy-memory.js';
import { startEtcd, type EtcdProcess } from '../test/support/etcd.js';
import { freePort, startNode, type NodeProcess } from '../test/support/node-process.js';
import { measure, report, type CaseResult } from './support/harness.js';
import { have } from './support/ports.js';

const KB4 = 4096;
const LEASE_S = 2;
const KILLS = Number(process.env.BENCH_KILLS ?? 5);

const cleanups: (() => Promise<void>)[] = [];
const ctx = { after: (fn: () => Promise<void>) => { cleanups.push(fn); } };

async function dir(): Promise<string> {
  const path = await mkdtemp(join(tmpdir(), 'memstrata-bench-cluster-'));
  cleanups.push(() => rm(path, { recursive: true, force: true }));
  return path;
}

async function node(args: string[], cwd?: string): Promise<NodeProcess> {
  const n = await startNode({ cwd: cwd ?? (await dir()), args: ['--dram-size', '256MiB', '--flash-size', '128MiB', ...args] });
  cleanups.push(async () => {
    n.proc.kill('SIGCONT');
    await n.stop('SIGKILL');
  });
  return n;
}

async function until<T>(probe: () => Promise<T>, ok: (v: T) => boolean, ms = 30_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await probe().catch(() => undefined as T);
    if (v !== undefined && ok(v)) return v;
    if (Date.now() > end) throw new Error('timed out');
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

async function device(n: NodeProcess, name: string): Promise<{ role: string; mirror: string | null } | undefined> {
  const list = (await (await fetch(`${n.url}/v1/nvram`)).json()) as { devices: { name: string; role: string; mirror: string | null }[] };
  return list.devices.find((d) => d.name === name);
}

/** Two partnered nodes with a mirrored device `m` on the first, in sync; with `etcd`, in a cluster that chooses the partner (the other node), else partners set by hand. */
async function pair(etcd: EtcdProcess | undefined): Promise<{ a: NodeProcess; b: NodeProcess }> {
  const [portA, portB] = [await freePort(), await freePort()];
  const cluster = etcd === undefined ? [] : ['--etcd', etcd.url, '--set', `cluster.lease=${LEASE_S}s`, '--set', `cluster.name=bench-${portA}`];
  const args = (own: 'a' | 'b'): string[] => [
    '--node-id', `node-${own}`, ...cluster, '--mirror-listen', `127.0.0.1:${own === 'a' ? portA : portB}`,
    ...(etcd === undefined ? ['--mirror-partner', `127.0.0.1:${own === 'a' ? portB : portA}`, '--set', `mirror.partnerId=node-${own === 'a' ? 'b' : 'a'}`] : []), '--set', 'mirror.timeout=500ms',
  ];
  const a = await node(args('a'));
  const b = await node(args('b'));
  // The cluster chooses among the members a sees: wait for b to be one (else the device waits for a partner a tick longer).
  if (etcd !== undefined) await until(async () => ((await (await fetch(`${a.url}/v1/cluster`)).json()) as { members: { id: string }[] }).members.map((m) => m.id), (ids) => ids.includes('node-b'));
  const created = await fetch(`${a.url}/v1/nvram`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'm', size: '64MiB', policy: 'mirrored' }) });
  if (created.status !== 201) throw new Error(await created.text());
  await until(() => device(a, 'm'), (d) => d?.mirror === 'in-sync');
  // In a cluster, wait for the claim too (appends are refused until then). The cluster name
  // is per pair: the device is named `m` on every pair.
  const probe = await RmemClient.connect({ ...a.rmem, serverId: 'probe', reconnect: false });
  const j = await probe.journalOpen('m', 1);
  await until(() => probe.journalAppend(j, [{ payload: Buffer.from('probe') }]).then(() => true), (ok) => ok);
  await probe.close();
  return { a, b };
}

/** Appends of 4 KiB with `depth` in flight, trimming behind itself. */
async function appends(n: NodeProcess, name: string, depth: number): Promise<CaseResult> {
  const client = await RmemClient.connect({ ...n.rmem, serverId: `bench-${name}`, reconnect: false });
  try {
    const journal = await client.journalOpen('m', 1);
    const payload = Buffer.alloc(KB4, 7);
    let last = 0;
    return await measure(
      {
        name,
        bytesPerOp: KB4,
        run: async () => {
          const [ack] = await client.journalAppend(journal, [{ payload }]);
          const seq = ack?.seq ?? 0;
          if (seq - last > 4096) {
            last = seq;
            await client.journalTrim(journal, seq - 1024);
          }
        },
      },
      { depth },
    );
  } finally {
    await client.close();
  }
}

try {
  if (!have('etcd')) {
    console.log('bench/cluster needs etcd (Debian: etcd-server); skipped');
  } else {
    const etcd = await startEtcd(ctx);

    // ---- 1. the fence's cost per append ----
    const plain = await pair(undefined);
    const fenced = await pair(etcd);
    for (const depth of [1, 32]) {
      const rows = [await appends(plain.a, `mirrored, no etcd (baseline), ${depth} in flight`, depth), await appends(fenced.a, `mirrored, etcd-fenced ownership, ${depth} in flight`, depth)];
      report(`Mirrored 4 KiB appends, ${depth} in flight: with and without fenced ownership (target >= 0.95x)`, rows);
    }

    // ---- 2. redundancy: 2 against one copy ----
    const nodes = [await node([]), await node([]), await node([])];
    const memory = await HierarchyMemory.open({
      serverId: 'bench-redundancy',
      localDram: 64 * 1024,
      pageCache: 0,
      nodes: nodes.map((n, i) => ({ name: `n${i}`, host: n.rmem.host, port: n.rmem.port, zone: `z${i}` })),
    });
    try {
      const SIZE = 16 * 1024 * 1024;
      const single = await memory.alloc(SIZE, { medium: 'dram' });
      const double = await memory.alloc(SIZE, { medium: 'dram', redundancy: 2 });
      const data = Buffer.alloc(KB4, 3);
      const workload = (segment: typeof single, name: string): Promise<CaseResult> =>
        measure({ name, bytesPerOp: KB4, run: async (i) => {
          const at = ((i * 2654435761) % (SIZE / KB4)) * KB4;
          if (i % 10 < 7) await segment.read(at, KB4);
          else await segment.write(at, data);
        } }, { depth: 16 });
      report('Host 4 KiB reads and writes (70/30), 16 in flight, no page cache: one copy and redundancy: 2', [await workload(single, 'one copy (baseline)'), await workload(double, 'redundancy: 2')]);
    } finally {
      await memory.close();
    }

    // ---- 3. failover time: a fresh pair each round, its primary killed under a writer ----
    const times: number[] = [];
    for (let round = 0; round < KILLS; round++) {
      const { a, b } = await pair(etcd);
      const journal = await MultipathJournal.open({ device: 'm', serverId: `failover-${round}`, epoch: 1, paths: [{ ...a.rmem }, { ...b.rmem }], timeoutMs: 1000, failoverTimeoutMs: 30_000 });
      let acks = 0;
      let stop = false;
      const writer = (async () => {
        while (!stop) {
          await journal.append([{ payload: Buffer.from(`round ${round}`) }]);
          acks++;
        }
      })();
      await until(() => Promise.resolve(acks), (n) => n >= 50);
      await a.stop('SIGKILL');
      const killedAt = performance.now();
      const before = acks;
      await until(() => Promise.resolve(acks), (n) => n > before, 60_000);
      times.push(performance.now() - killedAt);
      stop = true;
      await writer;
      await journal.close();
      await b.stop('SIGKILL');
    }
    const sorted = [...times].sort((x, y) => x - y);
    console.log(`\nFailover time, kill -9 of the primary to the first acknowledgement on the new one (lease ${LEASE_S} s), ${times.length} kill(s): median ${Math.round(sorted[Math.floor(sorted.length / 2)] ?? 0)} ms, max ${Math.round(sorted.at(-1) ?? 0)} ms`);
  }
} finally {
  for (const fn of cleanups.reverse()) await fn().catch(() => undefined);
}
