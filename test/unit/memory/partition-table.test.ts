import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { PartitionTable, type MediumLayout } from '../../../src/memory/partition-table.js';
import { KINDS, USED_KINDS, type MediumName, type UsedKind } from '../../../src/kinds.js';

const E = 4096; // small extents keep the tables small

function layout(name: MediumName, extents: number, initial: Record<UsedKind, number>, bounds?: Partial<Record<UsedKind, { min: number; max: number }>>): MediumLayout {
  const all = { min: 0, max: extents * E };
  return {
    name,
    capacity: extents * E,
    extentSize: E,
    initial: { cache: initial.cache * E, server: initial.server * E, nvram: initial.nvram * E },
    bounds: { cache: bounds?.cache ?? all, server: bounds?.server ?? all, nvram: bounds?.nvram ?? all },
  };
}

function bytesOf(table: PartitionTable, medium: MediumName, kind: (typeof KINDS)[number]): number {
  return table.usage().find((u) => u.medium === medium)!.kinds[kind].bytes;
}

/** Layouts whose initial sizes respect their bounds, with bounds drawn at random. */
const layoutArb = fc
  .record({
    extents: fc.integer({ min: 4, max: 48 }),
    shares: fc.tuple(fc.nat({ max: 100 }), fc.nat({ max: 100 }), fc.nat({ max: 100 })),
    slack: fc.tuple(fc.nat({ max: 8 }), fc.nat({ max: 8 }), fc.nat({ max: 8 }), fc.nat({ max: 8 }), fc.nat({ max: 8 }), fc.nat({ max: 8 })),
  })
  .map(({ extents, shares, slack }) => {
    const total = shares[0] + shares[1] + shares[2] + 1;
    const initial = {
      cache: Math.floor((extents * shares[0]) / total),
      server: Math.floor((extents * shares[1]) / total),
      nvram: Math.floor((extents * shares[2]) / total),
    };
    const bound = (n: number, lo: number, hi: number) => ({ min: Math.max(0, n - lo) * E, max: Math.min(extents, n + hi) * E });
    return layout('dram', extents, initial, {
      cache: bound(initial.cache, slack[0], slack[1]),
      server: bound(initial.server, slack[2], slack[3]),
      nvram: bound(initial.nvram, slack[4], slack[5]),
    });
  });

const resizeArb = fc.record({ kind: fc.constantFrom(...USED_KINDS), extents: fc.nat({ max: 56 }) });

test('partition table: random resizes keep capacities adding up, respect bounds, and are all or nothing', async () => {
  await fc.assert(
    fc.asyncProperty(layoutArb, fc.array(resizeArb, { maxLength: 25 }), fc.nat({ max: 6 }), async (medium, resizes, held) => {
      const table = new PartitionTable([medium]);
      // An owner without a reclaimer pins some server extents: they must never move.
      const pinned = table.extents('dram').idleOf('server') >= held ? table.assign('dram', 'server', 'srv-a', held * E) : [];
      for (const { kind, extents } of resizes) {
        const before = KINDS.map((k) => bytesOf(table, 'dram', k));
        const bytes = extents * E;
        try {
          const result = await table.resize('dram', kind, bytes);
          assert.equal(bytesOf(table, 'dram', kind), bytes);
          assert.equal(result.toBytes, bytes);
          const movedTotal = Object.values(result.moved).reduce((s, v) => s + v, 0);
          assert.equal(movedTotal, bytes - result.fromBytes, 'moved bytes account for the change');
        } catch (error) {
          const code = (error as { code?: string }).code;
          assert.ok(['MS_PARTITION_BOUND', 'MS_PARTITION_NO_CAPACITY', 'MS_PARTITION_BUSY'].includes(code ?? ''), String(error));
          assert.deepEqual(KINDS.map((k) => bytesOf(table, 'dram', k)), before, 'a refused resize changes nothing');
          if (code === 'MS_PARTITION_BOUND') assert.ok(bytes < medium.bounds[kind].min || bytes > medium.bounds[kind].max);
        }
        const usage = table.usage()[0]!;
        assert.equal(KINDS.reduce((s, k) => s + usage.kinds[k].bytes, 0), medium.capacity, 'kinds add up to the capacity');
        for (const k of USED_KINDS) {
          assert.ok(usage.kinds[k].bytes >= medium.bounds[k].min && usage.kinds[k].bytes <= medium.bounds[k].max, `${k} within bounds`);
        }
        for (const i of pinned) {
          assert.equal(table.extents('dram').kindOf(i), 'server');
          assert.equal(table.extents('dram').ownerOf(i), 'srv-a');
        }
        // Rows cover the medium exactly once and are merged.
        const rows = table.rows();
        let next = 0;
        for (const [k, row] of rows.entries()) {
          assert.equal(row.start, next);
          next += row.length;
          const prev = rows[k - 1];
          if (prev !== undefined) assert.ok(prev.kind !== row.kind || prev.owner !== row.owner);
        }
        assert.equal(next, medium.capacity);
      }
    }),
    { numRuns: 200 },
  );
});

test('growing takes free extents first, then the cache down to its minimum', async () => {
  const table = new PartitionTable([layout('dram', 16, { cache: 8, server: 4, nvram: 2 }, { cache: { min: 6 * E, max: 16 * E } })]);
  const result = await table.resize('dram', 'server', 8 * E);
  assert.deepEqual(result.moved, { free: 2 * E, cache: 2 * E });
  assert.equal(bytesOf(table, 'dram', 'cache'), 6 * E);
  await assert.rejects(table.resize('dram', 'server', 9 * E), { code: 'MS_PARTITION_NO_CAPACITY' });
  assert.equal(bytesOf(table, 'dram', 'server'), 8 * E);
});

test('a resize beyond a bound is refused with the bound in the message', async () => {
  const table = new PartitionTable([layout('flash', 16, { cache: 4, server: 4, nvram: 0 }, { server: { min: 2 * E, max: 6 * E } })]);
  await assert.rejects(table.resize('flash', 'server', 7 * E), (error: Error & { code?: string }) => {
    assert.equal(error.code, 'MS_PARTITION_BOUND');
    assert.match(error.message, /between 8KiB and 24KiB/);
    return true;
  });
  await assert.rejects(table.resize('flash', 'server', E), { code: 'MS_PARTITION_BOUND' });
  await assert.rejects(table.resize('flash', 'server', E + 1), { code: 'MS_PARTITION_ALIGN' });
  await assert.rejects(table.resize('dram', 'server', E), { code: 'MS_BAD_REQUEST' });
});

test('shrinking asks owners through their reclaimer and moves only what they hand back', async () => {
  const table = new PartitionTable([layout('dram', 16, { cache: 8, server: 0, nvram: 0 })]);
  const lines = table.assign('dram', 'cache', 'cache', 8 * E);
  const asked: number[] = [];
  table.setReclaimer('cache', async (request) => {
    asked.push(request.extents);
    // The cache evicts from its coldest end and hands those extents back.
    return lines.splice(lines.length - request.extents, request.extents);
  });
  const result = await table.resize('dram', 'cache', 5 * E);
  assert.deepEqual(asked, [3]);
  assert.equal(result.reclaimedBytes, 3 * E);
  assert.equal(bytesOf(table, 'dram', 'cache'), 5 * E);
  for (const i of lines) assert.equal(table.extents('dram').ownerOf(i), 'cache', 'extents the cache kept are still its own');
});

test('growing another kind reclaims cache extents, and an owner that refuses makes the resize fail cleanly', async () => {
  const table = new PartitionTable([layout('dram', 8, { cache: 8, server: 0, nvram: 0 })]);
  const lines = table.assign('dram', 'cache', 'cache', 8 * E);
  let refuse = true;
  table.setReclaimer('cache', async (request) => {
    if (refuse) throw new Error('destage failed');
    return lines.splice(0, request.extents);
  });
  await assert.rejects(table.resize('dram', 'server', 2 * E), { code: 'MS_PARTITION_BUSY' });
  assert.equal(bytesOf(table, 'dram', 'server'), 0);
  refuse = false;
  const result = await table.resize('dram', 'server', 2 * E);
  assert.deepEqual(result.moved, { cache: 2 * E });
  assert.equal(result.reclaimedBytes, 2 * E);
});

test('an owner without a reclaimer pins its extents', async () => {
  const table = new PartitionTable([layout('dram', 8, { cache: 0, server: 4, nvram: 0 })]);
  table.assign('dram', 'server', 'srv-a', 3 * E);
  await table.resize('dram', 'server', 3 * E); // the idle one goes
  await assert.rejects(table.resize('dram', 'server', 2 * E), { code: 'MS_PARTITION_BUSY' });
  assert.equal(bytesOf(table, 'dram', 'server'), 3 * E);
});

test('resizes run one at a time, in the order asked', async () => {
  const table = new PartitionTable([layout('dram', 8, { cache: 4, server: 0, nvram: 0 })]);
  const lines = table.assign('dram', 'cache', 'cache', 4 * E);
  const order: string[] = [];
  table.setReclaimer('cache', async (request) => {
    order.push('reclaim start');
    await new Promise((resolve) => setTimeout(resolve, 10));
    order.push('reclaim end');
    return lines.splice(0, request.extents);
  });
  const first = table.resize('dram', 'cache', 2 * E).then(() => order.push('first done'));
  const second = table.resize('dram', 'server', 6 * E).then(() => order.push('second done'));
  await Promise.all([first, second]);
  assert.deepEqual(order, ['reclaim start', 'reclaim end', 'first done', 'second done']);
  assert.equal(bytesOf(table, 'dram', 'server'), 6 * E);
});
