// `redundancy: 2` host segments against real nodes (issue 14, item 5): the two copies go
// to nodes in two zones; kill -9 of one of them in the middle of a read/write workload
// checked against a model loses no acknowledged byte; the host copies the segment to a
// third node in the background, and the mapping table shows it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { HierarchyMemory } from '../../src/host/hierarchy-memory.js';
import { startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { rng } from '../support/rng.js';

type Ctx = { after(fn: () => Promise<unknown>): void };
const PAGE = 4096;
const SEGMENT = 1024 * 1024;

async function node(t: Ctx): Promise<NodeProcess> {
  const n = await startNode({ cwd: await tempDir(t) });
  t.after(() => n.stop('SIGKILL'));
  return n;
}

async function until(cond: () => boolean, what: string, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) assert.fail(`not within ${ms} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

test('redundancy: 2: kill -9 of a copy holder mid-workload loses nothing, reads go on from the other copy, and the segment is copied to a third node', async (t) => {
  const nodes = [await node(t), await node(t), await node(t)];
  const zones = ['a', 'a', 'b'];
  const memory = await HierarchyMemory.open({
    serverId: 'redundant-host',
    localDram: 64 * 1024,
    pageCache: 16 * PAGE,
    timeoutMs: 1000,
    nodeLoss: { retries: 1, backoffMs: 50, graceMs: 800, probeMs: 200 },
    nodes: nodes.map((n, i) => ({ name: `n${i}`, host: n.rmem.host, port: n.rmem.port, zone: zones[i] })),
  });
  t.after(() => memory.close());
  const rebuilds: string[] = [];
  memory.on('rebuild', (e) => rebuilds.push(`${e.ok}: ${e.reason}`));
  const segments = [await memory.alloc(SEGMENT, { redundancy: 2, medium: 'dram' }), await memory.alloc(SEGMENT, { redundancy: 2, medium: 'dram' })];
  for (const segment of segments) {
    const devices = [...new Set(segment.mapping().map((r) => r.device))].sort();
    assert.equal(devices.length, 2, 'two copies');
    assert.ok(devices.includes('n2'), 'one copy in zone b, the other in zone a');
    assert.deepEqual(segment.mapping().map((r) => r.copy), [1, 2]);
  }
  // A victim that holds a copy of the first segment; its other copy survives.
  const victim = segments[0]!.mapping()[0]!.device;
  const victimIndex = Number(victim.slice(1));

  const model = segments.map(() => Buffer.alloc(SEGMENT));
  const next = rng(7);
  const random = (n: number): number => Math.floor(next() * n);
  let ops = 0;
  let stop = false;
  const failures: string[] = [];
  // Four lanes, each on pages of its own (so the model knows every page's latest acknowledged value).
  // Every operation waits a turn of the event loop first: a run of page-cache hits resolves
  // without one, and would starve the timers (the deadlines here, the host's rebuild).
  const lane = async (id: number): Promise<void> => {
    while (!stop) {
      await new Promise((resolve) => setImmediate(resolve));
      const s = random(segments.length);
      const page = random(SEGMENT / PAGE / 4) * 4 + id;
      const at = page * PAGE;
      try {
        if (random(10) < 4) {
          const data = Buffer.alloc(PAGE, (ops % 250) + 1);
          await segments[s]!.write(at, data);
          data.copy(model[s]!, at);
        } else {
          const got = await segments[s]!.read(at, PAGE);
          if (!got.equals(model[s]!.subarray(at, at + PAGE))) failures.push(`segment ${s} page ${page} differs from the model`);
        }
      } catch (error) {
        failures.push(`op failed: ${error instanceof Error ? error.message : String(error)}`);
      }
      ops++;
    }
  };
  const lanes = [0, 1, 2, 3].map((id) => lane(id));
  await until(() => ops >= 400, 'the workload runs', 20_000);
  await nodes[victimIndex]!.stop('SIGKILL');
  const killedAt = ops;
  await until(() => rebuilds.length >= 1 && ops >= killedAt + 400, 'a rebuild ends and the workload goes on', 30_000);
  for (const segment of segments) await segment.rebuilt();
  await until(() => segments.every((s) => s.mapping().every((r) => r.state === 'ok' && r.device !== victim)), 'every copy ok, none on the killed node', 20_000);
  stop = true;
  await Promise.all(lanes);
  assert.deepEqual(failures, []);
  // The workload reached the nodes: with 512 pages over a 16-page cache, most operations miss it.
  const cache = memory.stats().cache;
  assert.ok(cache.misses > cache.hits, `misses ${cache.misses}, hits ${cache.hits}`);
  assert.ok(rebuilds.some((r) => r.startsWith('true: new copy on')), rebuilds.join('; '));
  // Every byte, from each copy: flush the cache, then read all of it back.
  await memory.flush();
  for (const [i, segment] of segments.entries()) {
    assert.ok((await segment.read(0, SEGMENT)).equals(model[i]!), `segment ${i} matches the model`);
    assert.equal(segment.lost, false);
    assert.equal(new Set(segment.mapping().map((r) => r.device)).size, 2);
  }
  assert.match(memory.formatMapping(), /COPY\s+DEVICE\s+MEDIUM\s+PHYSICAL ADDRESS\s+STATE/);
  // The other survivor and the new copy are two distinct nodes, neither the killed one.
  const holders = new Set(segments.flatMap((s) => s.mapping().map((r) => r.device)));
  assert.ok(!holders.has(victim));
});

test('redundancy: 2 needs two nodes; it takes no device and is refused when only one node can hold it', async (t) => {
  const one = await node(t);
  const memory = await HierarchyMemory.open({ serverId: 'lonely', localDram: 64 * 1024, nodes: [{ name: 'only', host: one.rmem.host, port: one.rmem.port }] });
  t.after(() => memory.close());
  await assert.rejects(memory.alloc(SEGMENT, { redundancy: 2 }), (e: { code: string; message: string }) => e.code === 'MS_HOST_NO_CAPACITY' && /on two nodes/.test(e.message));
  await assert.rejects(memory.alloc(SEGMENT, { redundancy: 2, device: 'only' }), (e: { code: string }) => e.code === 'MS_HOST_INVALID');
  await assert.rejects(memory.alloc(SEGMENT, { redundancy: 3 as 2 }), (e: { code: string }) => e.code === 'MS_HOST_INVALID');
});
