// Node loss in the host library (issue 10, item 7), against in-memory nodes whose
// sessions time out, drop their connection, lose the session or answer again on cue:
// retries before a loss, the grace period, freeing a returning node's old regions,
// flush() reporting lost dirty data, and lost pages never served from the page cache.
// The last test lets fast-check's scheduler interleave the loss with reads, writes,
// write-backs and flushes.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { NetworkError, type MemstrataError } from '../../../src/errors.js';
import { HierarchyMemory, type Segment } from '../../../src/host/hierarchy-memory.js';
import type { NodeLossPolicy } from '../../../src/host/remote-node.js';
import { BufferStore, RangeTier } from '../../../src/host/tiers.js';
import { FakeNode, type FakeSession } from '../../support/host-fakes.js';

const PAGE = 4096;
const MiB = 1024 * 1024;

function hierarchy(nodes: Record<string, FakeNode>, options: { pageCache?: number; nodeLoss?: Partial<NodeLossPolicy> } = {}) {
  const sessions = new Map<string, FakeSession[]>();
  const memory = HierarchyMemory.assemble({
    serverId: 'host-under-test',
    dram: new RangeTier('local', 'dram', 0, new BufferStore(0)),
    nodes: Object.entries(nodes).map(([name, node]) => {
      const first = node.session();
      sessions.set(name, [first]);
      return {
        name,
        address: `fake-${name}`,
        session: first,
        connect: () => {
          if (node.mode === 'silent') return Promise.reject(new NetworkError('MS_RMEM_UNREACHABLE', `fake-${name} does not answer`));
          const next = node.session();
          sessions.get(name)!.push(next);
          return Promise.resolve(next);
        },
      };
    }),
    pageCacheBytes: options.pageCache ?? 0,
    nodeLoss: { retries: 2, backoffMs: 1, graceMs: 40, probeMs: 5, ...options.nodeLoss },
  });
  const transitions: string[] = [];
  memory.on('node', (t) => transitions.push(`${t.node}:${t.to}`));
  const session = (name: string): FakeSession => sessions.get(name)!.at(-1)!;
  return { memory, session, transitions };
}

/** Polls until `cond` holds (bounded), for state that settles on the node's own timers. */
async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 1000 && !cond(); i++) await new Promise((resolve) => setTimeout(resolve, 2));
  assert.ok(cond(), `timed out waiting until ${what}`);
}

const isLost =
  (node: string) =>
  (error: unknown): boolean => {
    const e = error as MemstrataError;
    assert.equal(e.code, 'MS_HOST_NODE_LOST', String(error));
    assert.equal(e.details?.node, node);
    return true;
  };

test('a timeout is retried with backoff: a node that answers within the retries is not lost, and nothing is lost', async (t) => {
  const a = new FakeNode(MiB);
  const { memory, transitions } = hierarchy({ a });
  t.after(() => memory.close());
  await memory.refresh();
  const seg = await memory.alloc(2 * PAGE, { device: 'a' });
  a.timeouts = 2; // as many as the retries
  await seg.write(0, Buffer.from('kept'));
  a.timeouts = 2;
  assert.equal((await seg.read(0, 4)).toString(), 'kept');
  assert.deepEqual(transitions, ['a:suspect', 'a:ok', 'a:suspect', 'a:ok']);
  assert.equal(seg.lost, false);
  assert.equal(memory.discovery().find((r) => r.device === 'a')?.state, 'ok');

  // One more timeout than the retries: now the node is lost, and says so.
  a.timeouts = 3;
  await assert.rejects(seg.read(0, 4), isLost('a'));
  assert.equal(transitions.at(-1), 'a:lost');
  assert.equal(seg.lost, true);
});

test('a dropped connection waits for the session within the grace period; past it the node is lost, and when it resumes its old regions are freed', async (t) => {
  const a = new FakeNode(MiB);
  const { memory, session, transitions } = hierarchy({ a }, { nodeLoss: { graceMs: 40, probeMs: 1000 } });
  t.after(() => memory.close());
  await memory.refresh();
  const seg = await memory.alloc(2 * PAGE, { device: 'a' });
  await seg.write(0, Buffer.from('before'));

  session('a').drop();
  const read = seg.read(0, 6); // waits for the connection instead of spending its retries
  await new Promise((resolve) => setTimeout(resolve, 5));
  session('a').resume();
  assert.equal((await read).toString(), 'before');
  assert.deepEqual(transitions, ['a:suspect', 'a:ok']);

  session('a').drop();
  await until(() => transitions.at(-1) === 'a:lost', 'the grace period is over');
  await assert.rejects(seg.read(0, 6), isLost('a'));
  assert.equal(a.regions.size, 1, 'the node still holds the old region');

  session('a').resume(); // the session comes back within the node's lease: the host frees its old regions through it
  await until(() => transitions.at(-1) === 'a:ok', 'the node is back');
  assert.deepEqual(transitions, ['a:suspect', 'a:ok', 'a:suspect', 'a:lost', 'a:reclaiming', 'a:ok']);
  assert.equal(a.regions.size, 0, 'nothing of the host stays bound on the node');
  await assert.rejects(seg.read(0, 6), isLost('a'), 'a lost segment stays lost when its node returns');
  const again = await memory.alloc(PAGE, { device: 'a' });
  await again.write(0, Buffer.from('new'));
  assert.equal((await again.read(0, 3)).toString(), 'new');
  await seg.free();
  assert.equal(a.regions.size, 1);
});

test('a node that stops answering is lost after its retries; flush names it and the dirty bytes lost until the segment is freed; once it answers, its regions are freed', async (t) => {
  const [a, b] = [new FakeNode(MiB), new FakeNode(MiB)];
  const { memory, transitions } = hierarchy({ a, b }, { pageCache: 8 * PAGE, nodeLoss: { probeMs: 5 } });
  t.after(() => memory.close());
  await memory.refresh();
  const onA = await memory.alloc(4 * PAGE, { device: 'a' });
  const onB = await memory.alloc(4 * PAGE, { device: 'b' });
  // Two pages of onA dirty in the cache (cached on their first touch while slots are free), one clean.
  for (const page of [0, 1]) for (let i = 0; i < 2; i++) await onA.write(page * PAGE, Buffer.alloc(PAGE, 0xa0 + i));
  for (let i = 0; i < 2; i++) await onA.read(2 * PAGE, 10);
  await onB.write(0, Buffer.from('on b')); // cached too: a dirty page on b, which flush writes back
  assert.equal(memory.stats().cache.dirtyPages, 3);

  a.mode = 'silent';
  await assert.rejects(onA.read(3 * PAGE, 4), isLost('a')); // not cached: goes to the node, retries, gives up
  assert.deepEqual(transitions, ['a:suspect', 'a:lost']);
  await assert.rejects(memory.flush(), (error: unknown) => {
    isLost('a')(error);
    const e = error as MemstrataError;
    assert.equal(e.details?.lostBytes, 2 * PAGE);
    assert.deepEqual(e.details?.nodes, ['a']);
    assert.match(e.message, /node a .*8192 bytes of dirty data/);
    return true;
  });
  await assert.rejects(memory.flush(), (error: unknown) => (error as MemstrataError).details?.lostBytes === 2 * PAGE, 'a later flush does not pretend');
  assert.equal((await onB.read(0, 4)).toString(), 'on b', 'the other node goes on');
  assert.equal(memory.discovery().find((r) => r.device === 'a')?.state, 'lost');
  assert.equal(a.regions.size, 1);

  a.mode = 'up';
  await until(() => transitions.at(-1) === 'a:ok', 'the node answers again');
  assert.deepEqual(transitions, ['a:suspect', 'a:lost', 'a:reclaiming', 'a:ok']);
  assert.equal(a.regions.size, 0, 'the old region was freed on the node');
  await assert.rejects(memory.flush(), isLost('a'), 'the node is back, the data is not');
  await onA.free();
  await memory.flush();
});

test('a session that gave up is replaced once the node answers; regions the node already dropped count as gone', async (t) => {
  const a = new FakeNode(MiB);
  const { memory, session, transitions } = hierarchy({ a }, { nodeLoss: { probeMs: 5 } });
  t.after(() => memory.close());
  await memory.refresh();
  const [x, y] = [await memory.alloc(PAGE, { device: 'a' }), await memory.alloc(PAGE, { device: 'a' })];
  const first = session('a');
  a.mode = 'silent'; // the probe cannot connect yet
  first.gaveUp();
  assert.deepEqual(transitions, ['a:lost']);
  await assert.rejects(x.read(0, 1), isLost('a'));
  // The node's lease for x ran out and freed it; y is still bound there; another tenant binds meanwhile.
  a.regions.delete(x.mapping()[0]!.physicalStart / 0x100000);
  const other = a.bind(PAGE);
  a.mode = 'up';
  await until(() => transitions.at(-1) === 'a:ok', 'a new session is open');
  assert.notEqual(session('a'), first);
  assert.deepEqual([...a.regions.keys()], [other.regionId], "y was freed, x counted as gone, and another tenant's region left alone");
  await assert.rejects(y.write(0, Buffer.from('z')), isLost('a'));
});

test('pages of a lost segment are not served from the page cache, clean or dirty, and no request started after the loss succeeds on it', async (t) => {
  const a = new FakeNode(MiB);
  const { memory } = hierarchy({ a }, { pageCache: 8 * PAGE, nodeLoss: { probeMs: 60_000 } });
  t.after(() => memory.close());
  await memory.refresh();
  const seg = await memory.alloc(4 * PAGE, { device: 'a' });
  for (let i = 0; i < 2; i++) await seg.write(0, Buffer.alloc(PAGE, 7)); // dirty in the cache
  for (let i = 0; i < 2; i++) await seg.read(PAGE, PAGE); // clean in the cache
  const hits = memory.stats().cache.hits;
  assert.equal((await seg.read(PAGE, 4)).length, 4);
  assert.equal(memory.stats().cache.hits, hits + 1, 'page 1 is served from the cache while the node is there');

  a.mode = 'silent';
  await assert.rejects(seg.read(3 * PAGE, 1), isLost('a'));
  await assert.rejects(seg.read(PAGE, 4), isLost('a'), 'clean cached page');
  await assert.rejects(seg.read(0, 4), isLost('a'), 'dirty cached page');
  await assert.rejects(seg.write(0, Buffer.from('x')), isLost('a'));
  await assert.rejects(memory.read(seg.address, 4 * PAGE), isLost('a'));
  await assert.rejects(memory.flush(), isLost('a'));
  const stats = memory.stats().cache;
  assert.equal(stats.lostPages, 1);
  assert.equal(stats.cachedPages, 0, 'the cache dropped every page of the lost segment');
  assert.equal(seg.lostDirtyBytes, PAGE);
});

test('a bind that times out is not repeated: the allocation goes to another node, and a keepalive settles the first one', async (t) => {
  const [a, b] = [new FakeNode(MiB), new FakeNode(MiB / 2)];
  const { memory, transitions } = hierarchy({ a, b });
  t.after(() => memory.close());
  await memory.refresh();
  a.timeouts = 1;
  const seg = await memory.alloc(PAGE, { medium: 'dram' }); // a offers more: it is asked first
  assert.equal(seg.mapping()[0]?.device, 'b');
  assert.equal(a.served.get('BIND') ?? 0, 0);
  await until(() => transitions.at(-1) === 'a:ok', 'the keepalive answered');
  assert.deepEqual(transitions, ['a:suspect', 'a:ok']);
});

test('close spends no retries and frees segments side by side: one FREE per region, all in flight at once; what a stalled node misses, its lease frees', async () => {
  const [a, b, c] = [new FakeNode(MiB), new FakeNode(MiB), new FakeNode(MiB)];
  const { memory, transitions } = hierarchy({ a, b, c }, { nodeLoss: { retries: 3 } });
  await memory.refresh();
  for (const name of ['a', 'b', 'a', 'b', 'c']) await memory.alloc(PAGE, { device: name });
  // a and b stop (SIGSTOP): their requests hang, then time out.
  for (const n of [a, b]) {
    n.mode = 'silent';
    n.stall();
  }
  let closed = false;
  const closing = memory.close().then(() => (closed = true));
  await until(() => a.holding + b.holding === 4, 'every FREE to the stalled nodes is in flight');
  assert.deepEqual([a.holding, b.holding], [2, 2], 'not one node, nor one segment, after another');
  await until(() => c.regions.size === 0, 'the node that answers has its region freed meanwhile');
  assert.equal(closed, false);
  a.resume();
  b.resume(); // each FREE times out
  await closing;
  assert.deepEqual([a.attempts.get('FREE'), b.attempts.get('FREE')], [2, 2], 'one attempt per region: no retries');
  assert.deepEqual([a.regions.size, b.regions.size], [2, 2], 'left for the node to free when the lease ends');
  assert.deepEqual(transitions, [], 'closing declares no node suspect or lost');
});

test('close does not wait for a connection that is down, nor spend its grace period', async () => {
  const a = new FakeNode(MiB);
  const { memory, session } = hierarchy({ a }, { nodeLoss: { graceMs: 60_000 } });
  await memory.refresh();
  await memory.alloc(PAGE, { device: 'a' });
  session('a').drop();
  let closed = false;
  const closing = memory.close().then(() => (closed = true));
  await until(() => closed, 'close is done');
  await closing;
  assert.equal(a.attempts.get('FREE') ?? 0, 0, 'no FREE could be sent');
  assert.equal(a.regions.size, 1, 'the node frees it when the lease ends');
});

type Op = { kind: 'write'; seg: 'a' | 'b'; page: number } | { kind: 'read'; seg: 'a' | 'b'; page: number } | { kind: 'flush' } | { kind: 'lose'; how: 'silent' | 'session' };

test('under any interleaving of a node loss with reads, writes, write-backs and flushes: nothing is served after the loss, and flush counts every dirty byte lost (fc.scheduler)', async () => {
  const op: fc.Arbitrary<Op> = fc.oneof(
    fc.record({ kind: fc.constant('write' as const), seg: fc.constantFrom('a' as const, 'b' as const), page: fc.nat(3) }),
    fc.record({ kind: fc.constant('read' as const), seg: fc.constantFrom('a' as const, 'b' as const), page: fc.nat(3) }),
    fc.record({ kind: fc.constant('flush' as const) }),
  );
  await fc.assert(
    fc.asyncProperty(fc.scheduler(), fc.array(op, { minLength: 3, maxLength: 20 }), fc.nat(20), fc.constantFrom('silent' as const, 'session' as const), async (s, ops, at, how) => {
      const program: Op[] = [...ops.slice(0, at), { kind: 'lose', how }, ...ops.slice(at)];
      const a = new FakeNode(MiB, s);
      const b = new FakeNode(MiB, s);
      const { memory, session } = hierarchy({ a, b }, { pageCache: 3 * PAGE, nodeLoss: { retries: 1, backoffMs: 0, probeMs: 60_000 } });
      let lost = false;
      memory.on('node', (t) => {
        if (t.node === 'a' && t.to === 'lost') lost = true;
      });
      await s.waitFor(memory.refresh());
      const segs = { a: await s.waitFor(memory.alloc(4 * PAGE, { device: 'a' })), b: await s.waitFor(memory.alloc(4 * PAGE, { device: 'b' })) };
      // Each page is written at most once, with a value of its own, so what a page may hold is known.
      const value = (seg: 'a' | 'b', page: number) => (seg === 'a' ? 0x100 : 0x200) + page + 1;
      const acked = new Set<string>();
      const rejected = new Set<string>();
      const writtenOnce = new Set<string>();
      const problems: string[] = [];
      const tasks: Promise<void>[] = [];
      for (const o of program) {
        const start = s.schedule(Promise.resolve(), JSON.stringify(o));
        tasks.push(
          start.then(async () => {
            const after = lost; // the loss was declared before this request started
            if (o.kind === 'lose') {
              if (o.how === 'silent') a.mode = 'silent';
              else session('a').gaveUp();
              return;
            }
            if (o.kind === 'flush') {
              await memory.flush().then(
                () => {
                  if (after) problems.push('a flush after the loss resolved');
                },
                (error: unknown) => {
                  if ((error as MemstrataError).code !== 'MS_HOST_NODE_LOST') problems.push(`flush: ${String(error)}`);
                },
              );
              return;
            }
            const seg: Segment = segs[o.seg];
            const key = `${o.seg}:${o.page}`;
            const expectLost = o.seg === 'a' && after;
            const outcome = (ok: () => void) => [
              () => {
                if (expectLost) problems.push(`${o.kind} ${key} started after the loss and succeeded`);
                ok();
              },
              (error: unknown) => {
                if (o.seg === 'b') problems.push(`${o.kind} ${key} on the healthy node failed: ${String(error)}`);
                else if ((error as MemstrataError).code !== 'MS_HOST_NODE_LOST') problems.push(`${o.kind} ${key}: ${String(error)}`);
                if (o.kind === 'write') rejected.add(key);
              },
            ] as const;
            if (o.kind === 'write') {
              if (writtenOnce.has(key)) return;
              writtenOnce.add(key);
              const [ok, fail] = outcome(() => acked.add(key));
              await seg.write(o.page * PAGE, Buffer.alloc(PAGE, 0).fill(Buffer.from([value(o.seg, o.page) >> 8, value(o.seg, o.page) & 0xff]))).then(ok, fail);
            } else {
              const [ok, fail] = outcome(() => undefined);
              await seg.read(o.page * PAGE, PAGE).then((got) => {
                ok();
                const v = got.readUInt16BE(0);
                if (!(got.equals(Buffer.alloc(PAGE)) || (v === value(o.seg, o.page) && got.equals(Buffer.alloc(PAGE).fill(got.subarray(0, 2)))))) problems.push(`read ${key} saw a page that was never written there`);
              }, fail);
            }
          }),
        );
      }
      await s.waitFor(Promise.all(tasks));
      const final = await s.waitFor(memory.flush().then(() => undefined, (error: unknown) => error as MemstrataError));
      if (segs.a.lost) {
        // Pages acknowledged to the application whose bytes never reached the node: the least flush must report.
        let missing = 0;
        let maybe = 0;
        const region = [...a.regions.values()][0]!;
        for (let page = 0; page < 4; page++) {
          const key = `a:${page}`;
          const onNode = region.data.readUInt16BE(page * PAGE) === value('a', page);
          if (acked.has(key) && !onNode) missing++;
          if (rejected.has(key)) maybe++;
        }
        if (final?.code !== 'MS_HOST_NODE_LOST') problems.push(`final flush with a lost segment: ${String(final)}`);
        const lostBytes = final?.details?.lostBytes as number;
        if (lostBytes < missing * PAGE || lostBytes > (missing + maybe) * PAGE) problems.push(`flush reports ${lostBytes} lost bytes; ${missing} pages were lost for sure, ${maybe} maybe`);
        if (segs.a.lostDirtyBytes !== lostBytes) problems.push('the segment and the flush disagree');
      } else if (final !== undefined) {
        problems.push(`final flush without a loss failed: ${String(final)}`);
      } else {
        const region = [...a.regions.values()][0]!;
        for (const key of acked) {
          const [seg, page] = key.split(':') as ['a' | 'b', string];
          if (seg === 'a' && region.data.readUInt16BE(Number(page) * PAGE) !== value('a', Number(page))) problems.push(`page ${key} was acknowledged and flushed but is not on the node`);
        }
      }
      // The healthy node's segment holds every acknowledged write.
      for (const key of acked) {
        const [seg, page] = key.split(':') as ['a' | 'b', string];
        if (seg !== 'b') continue;
        const got = await s.waitFor(segs.b.read(Number(page) * PAGE, 2));
        if (got.readUInt16BE(0) !== value('b', Number(page))) problems.push(`page ${key} lost on the healthy node`);
      }
      await s.waitFor(memory.close());
      assert.deepEqual(problems, []);
    }),
    { numRuns: 300 },
  );
});
