// Node loss in the host library against real nodes (issue 10, item 7): a node stalled by
// SIGSTOP for less than the retry budget loses nothing; a node killed with SIGKILL is
// lost, flush() reports the dirty bytes that went with it and its pages are never served
// again; a node that comes back (after a stall past the budget, or a connection cut past
// the grace period) has the host's old regions freed, as its allocation table shows.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { MemstrataError } from '../../src/errors.js';
import { HierarchyMemory, type HierarchyOptions } from '../../src/host/hierarchy-memory.js';
import type { NodeTransition } from '../../src/host/remote-node.js';
import { startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { startProxy } from '../support/tcp-proxy.js';

type Ctx = { after(fn: () => Promise<unknown>): void };
const KiB = 1024;
const PAGE = 4096;

/** Cleanups run last-in, first-out: the hierarchy closes while its nodes still run (and are not stopped). */
function stack(t: Ctx): (fn: () => Promise<unknown>) => void {
  const fns: (() => Promise<unknown>)[] = [];
  t.after(async () => {
    for (const fn of fns.reverse()) await fn().catch(() => undefined);
  });
  return (fn) => fns.push(fn);
}

async function node(t: Ctx, later: (fn: () => Promise<unknown>) => void): Promise<NodeProcess> {
  const n = await startNode({ cwd: await tempDir(t) });
  later(async () => {
    n.proc.kill('SIGCONT');
    return n.stop('SIGKILL');
  });
  return n;
}

async function open(later: (fn: () => Promise<unknown>) => void, options: HierarchyOptions): Promise<{ memory: HierarchyMemory; transitions: string[] }> {
  const memory = await HierarchyMemory.open(options);
  later(() => memory.close());
  const transitions: string[] = [];
  memory.on('node', (tr: NodeTransition) => transitions.push(`${tr.node}:${tr.to}`));
  return { memory, transitions };
}

/** The host's rows in a node's allocation table (its regions there). */
async function regionsOf(n: NodeProcess, serverId: string): Promise<unknown[]> {
  const table = (await (await fetch(`${n.url}/v1/tables/allocation`)).json()) as { rows: { serverId: string }[] };
  return table.rows.filter((r) => r.serverId === serverId);
}

/** Waits (bounded) for state that settles on timers: a loss, a return. */
async function until(cond: () => boolean | Promise<boolean>, what: string, ms = 8000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) assert.fail(`timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

const lostOn =
  (name: string) =>
  (error: unknown): boolean => {
    const e = error as MemstrataError;
    assert.equal(e.code, 'MS_HOST_NODE_LOST', String(error));
    assert.equal(e.details?.node, name);
    return true;
  };

const page = (fill: number) => Buffer.alloc(PAGE, fill);

test('a node stopped (SIGSTOP) for less than the retry budget is not lost, and no write is lost', async (t) => {
  const later = stack(t);
  const n = await node(t, later);
  // Budget: 7 attempts of 250 ms plus backoffs of 50..1600 ms, about 5 s; the stall is 600 ms.
  const { memory, transitions } = await open(later, {
    serverId: 'host-stall',
    localDram: 64 * KiB,
    pageCache: 32 * KiB,
    timeoutMs: 250,
    nodeLoss: { retries: 6, backoffMs: 50 },
    nodes: [{ name: 'n1', host: n.rmem.host, port: n.rmem.port }],
  });
  const seg = await memory.alloc(64 * KiB, { device: 'n1' });
  const model = Buffer.alloc(64 * KiB);
  for (let i = 0; i < 4; i++) {
    for (let k = 0; k < 2; k++) await seg.write(i * PAGE, page(0x10 + i)); // hot: dirty in the cache
    model.fill(0x10 + i, i * PAGE, (i + 1) * PAGE);
  }

  n.proc.kill('SIGSTOP');
  let settled: PromiseSettledResult<unknown>[];
  try {
    const work = Promise.allSettled([
      ...[4, 5, 6, 7].map((i) => seg.write(i * PAGE, page(0x20 + i)).then(() => void model.fill(0x20 + i, i * PAGE, (i + 1) * PAGE))),
      seg.read(10 * PAGE, 3 * PAGE).then((got) => {
        assert.ok(got.equals(Buffer.alloc(3 * PAGE)));
      }),
      memory.flush(), // write-backs to the stopped node, retried
    ]);
    await new Promise((resolve) => setTimeout(resolve, 600));
    n.proc.kill('SIGCONT');
    settled = await work;
  } finally {
    n.proc.kill('SIGCONT');
  }
  assert.deepEqual(settled.filter((r) => r.status === 'rejected'), [], 'every request in the stall succeeded');

  assert.ok(transitions.includes('n1:suspect'), `requests timed out and were retried: ${transitions.join(', ')}`);
  assert.ok(!transitions.includes('n1:lost'), `never lost: ${transitions.join(', ')}`);
  assert.equal(seg.lost, false);
  await memory.flush();
  assert.ok((await seg.read(0, 64 * KiB)).equals(model), 'every write is there');
  const direct = Buffer.alloc(64 * KiB);
  await seg.readPieces(0, direct);
  assert.ok(direct.equals(model), 'and on the node, past the cache');
  assert.equal(memory.discovery().find((r) => r.device === 'n1')?.state, 'ok');
});

test('a node killed with SIGKILL is lost: flush() names it and the dirty bytes lost, its pages fail cached or not, the other node goes on', async (t) => {
  const later = stack(t);
  const [a, b] = [await node(t, later), await node(t, later)];
  const { memory, transitions } = await open(later, {
    serverId: 'host-kill',
    localDram: 64 * KiB,
    pageCache: 64 * KiB,
    timeoutMs: 500,
    nodeLoss: { graceMs: 300 },
    nodes: [
      { name: 'a', host: a.rmem.host, port: a.rmem.port },
      { name: 'b', host: b.rmem.host, port: b.rmem.port },
    ],
  });
  const onA = await memory.alloc(64 * KiB, { device: 'a' });
  const onB = await memory.alloc(64 * KiB, { device: 'b' });
  for (const i of [0, 1]) for (let k = 0; k < 2; k++) await onA.write(i * PAGE, page(0xa0 + i)); // two dirty pages
  for (let k = 0; k < 2; k++) await onA.read(2 * PAGE, PAGE); // one clean cached page
  await onB.write(0, Buffer.from('on b')); // cached too (a slot is free): a dirty page on b
  assert.equal(memory.stats().cache.dirtyPages, 3);

  await a.stop('SIGKILL');
  await until(() => transitions.includes('a:lost'), 'node a is declared lost');
  assert.deepEqual(
    memory.discovery().filter((r) => r.device === 'a').map((r) => r.state),
    ['lost', 'lost'],
  );
  await assert.rejects(onA.read(2 * PAGE, 4), lostOn('a'), 'a clean cached page is not served');
  await assert.rejects(onA.read(0, 4), lostOn('a'), 'a dirty cached page is not served');
  await assert.rejects(onA.read(9 * PAGE, 4), lostOn('a'));
  await assert.rejects(onA.write(0, Buffer.from('x')), lostOn('a'));
  await assert.rejects(memory.flush(), (error: unknown) => {
    lostOn('a')(error);
    const e = error as MemstrataError;
    assert.equal(e.details?.lostBytes, 2 * PAGE);
    assert.match(e.message, /node a lost 1 segment .* 8192 bytes of dirty data/);
    return true;
  });
  await assert.rejects(memory.flush(), (error: unknown) => (error as MemstrataError).details?.lostBytes === 2 * PAGE, 'a later flush does not pretend those bytes are safe');
  assert.equal((await onB.read(0, 4)).toString(), 'on b');
  const next = await memory.alloc(16 * KiB);
  assert.equal(next.mapping()[0]?.device, 'b', 'new allocations go to the node that answers');
  await onA.free(); // the application acknowledges the loss
  await memory.flush();
});

test('a node stopped past the retry budget is lost; when it returns, the host frees its old regions there and uses it again', async (t) => {
  const later = stack(t);
  const n = await node(t, later);
  const serverId = 'host-return';
  const { memory, transitions } = await open(later, {
    serverId,
    localDram: 0,
    timeoutMs: 500,
    nodeLoss: { retries: 1, backoffMs: 50, probeMs: 100 },
    nodes: [{ name: 'n1', host: n.rmem.host, port: n.rmem.port }],
  });
  const dram = await memory.alloc(64 * KiB, { device: 'n1', medium: 'dram' });
  const flash = await memory.alloc(32 * KiB, { device: 'n1', medium: 'flash' });
  await dram.write(0, Buffer.from('gone soon'));
  assert.equal((await regionsOf(n, serverId)).length, 2);

  transitions.length = 0; // from here on (a loaded machine may have made an earlier request slow)
  n.proc.kill('SIGSTOP');
  try {
    await assert.rejects(dram.read(0, 9), lostOn('n1'));
    assert.deepEqual(transitions, ['n1:suspect', 'n1:lost']);
  } finally {
    n.proc.kill('SIGCONT');
  }
  await until(() => transitions.at(-1) === 'n1:ok', 'the node is back in use');
  assert.deepEqual(transitions, ['n1:suspect', 'n1:lost', 'n1:reclaiming', 'n1:ok']);
  assert.deepEqual(await regionsOf(n, serverId), [], "the node's allocation table holds nothing of the host's old regions");

  await assert.rejects(dram.read(0, 9), lostOn('n1'), 'the old segment stays lost');
  await assert.rejects(flash.write(0, Buffer.from('x')), lostOn('n1'));
  const fresh = await memory.alloc(16 * KiB, { device: 'n1' });
  await fresh.write(0, Buffer.from('new'));
  assert.equal((await fresh.read(0, 3)).toString(), 'new');
  assert.equal((await regionsOf(n, serverId)).length, 1);
  await dram.free();
  await flash.free();
  assert.equal((await regionsOf(n, serverId)).length, 1, 'freeing the lost segments touches nothing on the node');
  assert.equal(memory.discovery().find((r) => r.device === 'n1')?.state, 'ok');
});

test('a connection cut for longer than the grace period loses the node; once the proxy lets it through, the resumed session frees the old regions', async (t) => {
  const later = stack(t);
  const n = await node(t, later);
  const proxy = await startProxy(n.rmem);
  later(() => proxy.close());
  const serverId = 'host-cut';
  const { memory, transitions } = await open(later, {
    serverId,
    localDram: 0,
    timeoutMs: 500,
    nodeLoss: { graceMs: 300, probeMs: 100 },
    nodes: [{ name: 'n1', host: proxy.host, port: proxy.port }],
  });
  const seg = await memory.alloc(64 * KiB, { device: 'n1' });
  await seg.write(0, Buffer.from('before the cut'));

  transitions.length = 0;
  proxy.cut();
  await until(() => transitions.includes('n1:lost'), 'the grace period is over');
  await assert.rejects(seg.read(0, 4), lostOn('n1'));
  assert.equal((await regionsOf(n, serverId)).length, 1, 'the node keeps the region for its lease');

  proxy.heal();
  await until(() => transitions.at(-1) === 'n1:ok', 'the session is resumed and the old regions freed');
  assert.deepEqual(transitions, ['n1:suspect', 'n1:lost', 'n1:reclaiming', 'n1:ok']);
  assert.deepEqual(await regionsOf(n, serverId), []);
  const fresh = await memory.alloc(8 * KiB, { device: 'n1' });
  await fresh.write(0, Buffer.from('after'));
  assert.equal((await fresh.read(0, 5)).toString(), 'after');
});
