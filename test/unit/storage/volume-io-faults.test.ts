// One contract suite for every VolumeIo backend (the direct data-store path, the cache
// with DRAM only, the cache with DRAM and flash), run over a data store and media that
// fail on purpose (test/support/faults.ts, after nbdkit's error and delay filters).
//
// What every backend must show (docs/guarantees.md, "NBD volumes"):
//   - a FLUSH or FUA write succeeds only when every write acknowledged before it is in
//     the data store and synced; a failed write-back or sync is reported, never hidden;
//   - a failed sync fences the volume: every later FLUSH, FUA and write fails, reads work;
//   - a write-back that failed (EIO, ENOSPC, a short write) leaves the data dirty, so the
//     FLUSH after the fault clears makes it durable: no acknowledged write is lost.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import fc from 'fast-check';
import pino from 'pino';
import type { MediumName } from '../../../src/kinds.js';
import { PartitionTable, type MediumLayout } from '../../../src/memory/partition-table.js';
import { LINE_SIZE } from '../../../src/storage/cache/line.js';
import { StorageCache } from '../../../src/storage/cache/storage-cache.js';
import { DataStore } from '../../../src/storage/data-store.js';
import { DirectVolumeIo, type VolumeIo } from '../../../src/storage/volume-io.js';
import { Volume } from '../../../src/storage/volume-manager.js';
import { FaultPlan, FaultyMedium, faultyFiles } from '../../support/faults.js';
import { tempDir } from '../../support/node-process.js';
import { NamedDram } from '../../support/named-dram.js';

const log = pino({ level: 'silent' });
const E = 256 * 1024;
const SIZE = 2 * 1024 * 1024;

interface Rig {
  io: VolumeIo;
  volume: Volume;
  plan: FaultPlan;
  /** Runs the background destager once, where there is one. */
  destage(): Promise<void>;
  /** What a fresh open of the volume's files reads (no faults). */
  stored(): Promise<Buffer>;
}

interface Backend {
  name: string;
  cached: boolean;
  make(t: { after(fn: () => Promise<void>): void }): Promise<Rig>;
}

function layout(name: MediumName, lines: number): MediumLayout {
  const cache = Math.ceil((lines * LINE_SIZE) / E) * E;
  const capacity = cache * 2;
  return {
    name,
    capacity,
    extentSize: E,
    initial: { cache, server: 0, nvram: 0 },
    bounds: { cache: { min: 0, max: capacity }, server: { min: 0, max: capacity }, nvram: { min: 0, max: capacity } },
  };
}

async function volumeOn(t: { after(fn: () => Promise<void>): void }, plan: FaultPlan): Promise<{ volume: Volume; stored: () => Promise<Buffer> }> {
  const dir = await tempDir(t);
  const path = join(dir, 'v.img');
  const store = new DataStore(path, SIZE, faultyFiles(plan));
  await store.open(true);
  const volume = new Volume('v', false, new Date().toISOString(), store);
  t.after(() => store.close().catch(() => undefined));
  return {
    volume,
    stored: async () => {
      const fresh = new DataStore(path, SIZE);
      await fresh.open(false);
      const buf = Buffer.alloc(SIZE);
      await fresh.read(0, buf);
      await fresh.close().catch(() => undefined);
      return buf;
    },
  };
}

function cacheBackend(name: string, dramLines: number, flashLines: number): Backend {
  return {
    name,
    cached: true,
    async make(t) {
      const plan = new FaultPlan();
      const layouts = [layout('dram', dramLines)];
      if (flashLines > 0) layouts.push(layout('flash', flashLines));
      const media = layouts.map((l) => new FaultyMedium(new NamedDram(l.name, l.capacity, E), plan));
      for (const m of media) await m.open();
      const partition = new PartitionTable(layouts);
      const { volume, stored } = await volumeOn(t, plan);
      const cache = new StorageCache({ partition, media, log, maxDirtyAgeMs: 0, destageIntervalMs: 0 });
      cache.start();
      t.after(async () => {
        plan.heal();
        await cache.stop();
      });
      return { io: cache, volume, plan, stored, destage: () => cache.destage() };
    },
  };
}

const BACKENDS: readonly Backend[] = [
  {
    name: 'direct',
    cached: false,
    async make(t) {
      const plan = new FaultPlan();
      const { volume, stored } = await volumeOn(t, plan);
      return { io: new DirectVolumeIo(), volume, plan, stored, destage: () => Promise.resolve() };
    },
  },
  cacheBackend('cache (DRAM)', 8, 0),
  cacheBackend('cache (DRAM and flash)', 4, 8),
];

function pattern(seed: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  for (let i = 0; i < length; i += 4) buf.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
  return buf;
}

async function rejectsWithCode(promise: Promise<unknown>, codes: readonly string[], what: string): Promise<string> {
  try {
    await promise;
  } catch (error) {
    const code = (error as { code?: string }).code ?? '';
    assert.ok(codes.includes(code), `${what}: expected one of ${codes.join(', ')}, got ${code} (${(error as Error).message})`);
    return code;
  }
  assert.fail(`${what} succeeded; it must fail`);
}

for (const backend of BACKENDS) {
  test(`${backend.name}: a failed sync fails the FLUSH and fences the volume; later FLUSH, FUA and writes fail, reads work`, async (t) => {
    const { io, volume, plan } = await backend.make(t);
    const data = pattern(1, 3 * LINE_SIZE);
    await io.write(volume, LINE_SIZE, data, false);
    plan.fail({ op: 'store.datasync', fault: 'EIO' });
    await rejectsWithCode(io.flush(volume), ['EIO', 'MS_VOLUME_FENCED'], 'the FLUSH whose sync failed');
    assert.ok(volume.failure !== undefined, 'the volume is fenced');
    assert.equal(volume.info().state, 'fenced');
    // The kernel may have dropped those pages and report the next fsync as clean: a retried
    // FLUSH must not claim they are durable.
    await rejectsWithCode(io.flush(volume), ['MS_VOLUME_FENCED'], 'a FLUSH after the failed sync');
    await rejectsWithCode(io.write(volume, 0, pattern(2, 4096), true), ['MS_VOLUME_FENCED'], 'a FUA write after the failed sync');
    await rejectsWithCode(io.write(volume, 0, pattern(3, 4096), false), ['MS_VOLUME_FENCED'], 'a write after the failed sync');
    await rejectsWithCode(io.zero(volume, 0, 4096, { fua: false, allocate: false }), ['MS_VOLUME_FENCED'], 'a zero after the failed sync');
    const back = Buffer.alloc(data.length);
    await io.read(volume, LINE_SIZE, back);
    assert.ok(back.equals(data), 'reads still return what was written');
  });

  for (const fault of ['EIO', 'ENOSPC', 'short'] as const) {
    test(`${backend.name}: a write-back that fails with ${fault} is reported, and the FLUSH after the fault clears makes every acknowledged write durable`, async (t) => {
      const { io, volume, plan, stored } = await backend.make(t);
      const model = Buffer.alloc(SIZE);
      const failed: [number, number][] = [];
      // Eight lines, so that the store fails in the middle of writing them back.
      plan.fail({ op: 'store.write', from: 3, count: Infinity, fault });
      for (let i = 0; i < 8; i++) {
        const data = pattern(10 + i, LINE_SIZE - 4096);
        const offset = i * LINE_SIZE + 2048;
        try {
          await io.write(volume, offset, data, false);
          data.copy(model, offset);
        } catch {
          failed.push([offset, data.length]); // not acknowledged: its range is undefined
        }
      }
      const masked = (buf: Buffer): Buffer => {
        for (const [offset, length] of failed) buf.fill(0, offset, offset + length);
        return buf;
      };
      if (backend.cached) {
        // A write fails only when every line it could evict is dirty data the store refuses.
        await rejectsWithCode(io.flush(volume), fault === 'ENOSPC' ? ['ENOSPC'] : ['EIO'], `the FLUSH that met ${fault}`);
        const back = Buffer.alloc(SIZE);
        await io.read(volume, 0, back);
        assert.ok(masked(back).equals(masked(Buffer.from(model))), 'the cache still holds every acknowledged write');
      } else {
        assert.ok(failed.length > 0, 'the direct path reports the failed write to its writer');
      }
      assert.equal(volume.failure, undefined, 'a failed write does not fence the volume: nothing synced was lost');
      plan.heal();
      await io.flush(volume);
      assert.ok(masked(await stored()).equals(masked(model)), 'after the FLUSH every acknowledged write is in the store');
    });
  }

  test(`${backend.name}: a FUA write whose write-back fails is not acknowledged`, async (t) => {
    const { io, volume, plan, stored } = await backend.make(t);
    plan.fail({ op: 'store.write', count: Infinity, fault: 'EIO' });
    await assert.rejects(io.write(volume, 0, pattern(5, 8192), true));
    plan.heal();
    await io.flush(volume);
    // The cache kept the data dirty, so the next FLUSH wrote it; the direct path never
    // acknowledged it, and its range holds whatever the failed write left.
    if (backend.cached) assert.ok((await stored()).subarray(0, 8192).equals(pattern(5, 8192)));
  });

  test(`${backend.name}: a write-back held up by a slow disk holds the FLUSH until it lands`, async (t) => {
    const { io, volume, plan, stored } = await backend.make(t);
    const data = pattern(7, 2 * LINE_SIZE);
    let release: () => void = () => undefined;
    const held = new Promise<void>((resolve) => (release = resolve));
    if (!backend.cached) await io.write(volume, 0, data, false);
    plan.gate = (op) => (op === 'store.write' || op === 'store.datasync' ? held : undefined);
    if (backend.cached) await io.write(volume, 0, data, false);
    let settled = false;
    const flush = io.flush(volume).finally(() => (settled = true));
    for (let i = 0; i < 50; i++) await new Promise((resolve) => setImmediate(resolve));
    assert.equal(settled, false, 'the FLUSH waits for the held write-back');
    plan.gate = undefined;
    release();
    await flush;
    assert.ok((await stored()).subarray(0, data.length).equals(data));
  });

  test(`${backend.name}: random writes, flushes and store faults never lose an acknowledged, flushed write`, async (t) => {
    const rig = await backend.make(t);
    const { io, volume, plan } = rig;
    const model = Buffer.alloc(SIZE);
    const undefinedRanges: [number, number][] = [];
    let fenced = false;
    const op = fc.oneof(
      fc.record({ kind: fc.constant('write' as const), block: fc.nat({ max: SIZE / 4096 - 8 }), blocks: fc.integer({ min: 1, max: 8 }), seed: fc.nat(), fua: fc.boolean() }),
      fc.record({ kind: fc.constant('flush' as const) }),
      fc.record({ kind: fc.constant('destage' as const) }),
      fc.record({ kind: fc.constant('fault' as const), fault: fc.constantFrom('EIO' as const, 'ENOSPC' as const, 'short' as const), count: fc.integer({ min: 1, max: 4 }) }),
      fc.record({ kind: fc.constant('heal' as const) }),
      fc.record({ kind: fc.constant('syncfault' as const) }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 25 }).filter((ops) => ops.filter((o) => o.kind === 'syncfault').length <= 1), async (ops) => {
        for (const o of ops) {
          if (o.kind === 'fault') plan.fail({ op: 'store.write', from: 1, count: o.count, fault: o.fault });
          else if (o.kind === 'syncfault') plan.fail({ op: 'store.datasync', from: 1, count: 1, fault: 'EIO' });
          else if (o.kind === 'heal') plan.heal();
          else if (o.kind === 'destage') await rig.destage();
          else if (o.kind === 'write') {
            const offset = o.block * 4096;
            const data = pattern(o.seed, o.blocks * 4096);
            try {
              await io.write(volume, offset, data, o.fua);
              data.copy(model, offset);
            } catch {
              // Not acknowledged (or, with FUA, acknowledged into the cache but not durable):
              // the range may hold the new bytes or the old.
              undefinedRanges.push([offset, data.length]);
              data.copy(model, offset);
            }
          } else {
            let ok = true;
            try {
              await io.flush(volume);
            } catch {
              ok = false;
            }
            if (volume.failure !== undefined) fenced = true;
            if (ok) {
              assert.equal(fenced, false, 'no FLUSH succeeds once a sync has failed');
              const onDisk = await rig.stored();
              const expect = Buffer.from(model);
              for (const [offset, length] of undefinedRanges) {
                onDisk.fill(0, offset, offset + length);
                expect.fill(0, offset, offset + length);
              }
              assert.ok(onDisk.equals(expect), 'a FLUSH that succeeded left every acknowledged write in the store');
            }
          }
        }
      }),
      { numRuns: 15 },
    );
  });
}
