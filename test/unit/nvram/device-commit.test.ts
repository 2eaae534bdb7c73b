// Appends without a sync (a write log's plain WRITEs) and commit (its FLUSH): a power cut
// keeps every record acknowledged before a commit that returned, and every record of a
// synced append; and a commit costs one fdatasync however many appends came before it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import pino from 'pino';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import { NvramDevice } from '../../../src/nvram/device.js';
import { JournalFile, parseJournal, type JournalSink } from '../../../src/nvram/journal-file.js';
import { RECORD_FLAG } from '../../../src/protocol/journal/record.js';
import type { DeviceManager } from '../../../src/nvram/device-manager.js';
import { Volume } from '../../../src/storage/volume-manager.js';
import { WriteLogIo } from '../../../src/storage/write-log.js';
import { FaultPlan } from '../../support/faults.js';
import { MemoryStore } from '../../support/memory-store.js';
import { tempDir } from '../../support/node-process.js';
import { smallCache } from '../../support/small-cache.js';

const E = 64 * 1024;
const SIZE = 16 * E;

/**
 * What a power cut leaves of a journal file: a write becomes durable only through an
 * fdatasync called after it completed. Starts from the file as it is (its synced header).
 */
class JournalPowerCut {
  durable: Buffer;
  private pending: { position: number; bytes: Buffer }[];
  syncs: number;

  constructor(path: string) {
    this.durable = readFileSync(path);
    this.pending = [];
    this.syncs = 0;
  }

  readonly wrap = (sink: JournalSink): JournalSink => ({
    write: async (buf, position) => {
      await sink.write(buf, position);
      this.pending.push({ position, bytes: Buffer.from(buf) });
    },
    datasync: async () => {
      const covered = this.pending;
      this.pending = [];
      await sink.datasync();
      this.syncs++;
      for (const w of covered) {
        if (this.durable.length < w.position + w.bytes.length) this.durable = Buffer.concat([this.durable, Buffer.alloc(w.position + w.bytes.length - this.durable.length)]);
        w.bytes.copy(this.durable, w.position);
      }
    },
    close: () => sink.close(),
  });
}

async function localDevice(path: string, policy: 'local' | 'mirrored+local' = 'local'): Promise<{ device: NvramDevice; power: JournalPowerCut }> {
  const created = await JournalFile.create(path, SIZE);
  await created.close();
  const power = new JournalPowerCut(path);
  const journal = await JournalFile.open(path, parseJournal(power.durable), SIZE, { wrap: power.wrap });
  const medium = new DramMedium({ capacity: SIZE, extentSize: E });
  await medium.open();
  const device = new NvramDevice({ name: 'wl', size: SIZE, policy, medium, extents: Array.from({ length: 16 }, (_, i) => i * E), extentSize: E, journal });
  return { device, power };
}

const userRecords = (image: Buffer): Map<number, string> =>
  new Map(parseJournal(image).records.filter((r) => (r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) === 0).map((r) => [r.seq, r.payload.toString()]));

test('appends without a sync survive a power cut once a later commit returned; synced appends at once; commits and appends interleaved at random', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  let run = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.array(fc.constantFrom('lazy', 'lazy', 'lazy', 'synced', 'commit'), { minLength: 1, maxLength: 6 }), { minLength: 1, maxLength: 8 }),
      fc.scheduler(),
      async (rounds, s) => {
        const { device, power } = await localDevice(join(dir, `j${run++}.journal`));
        const acked = new Map<number, string>();
        const mustSurvive = new Map<number, string>();
        let n = 0;
        try {
          for (const round of rounds) {
            // The round's operations start together; the scheduler picks the order in
            // which each one's journal I/O completes and it resumes.
            const ops = round.map(async (op) => {
              if (op === 'commit') {
                const before = new Map(acked);
                await s.schedule(device.commit());
                for (const [seq, payload] of before) mustSurvive.set(seq, payload);
                return;
              }
              const payload = `r${n++}`;
              const [a] = await s.schedule(device.append(0, [{ payload: Buffer.from(payload) }], { sync: op === 'synced' }));
              assert.ok(a !== undefined);
              acked.set(a.seq, payload);
              if (op === 'synced') mustSurvive.set(a.seq, payload);
            });
            await s.waitFor(Promise.all(ops));
            // A power cut now keeps every record a returned commit or a synced append covered.
            const held = userRecords(power.durable);
            for (const [seq, payload] of mustSurvive) assert.equal(held.get(seq), payload, `record ${seq} was made durable, yet a power cut loses it`);
            // And what it keeps is a prefix of what was acknowledged, never damage.
            assert.equal(parseJournal(power.durable).validAfter, undefined);
            for (const [seq, payload] of held) assert.equal(acked.get(seq), payload, `record ${seq} in the file was not acknowledged as such`);
          }
        } finally {
          await device.close();
        }
      },
    ),
    { numRuns: 60 },
  );
});

test('through a write log, plain WRITEs are not synced one by one: a FLUSH after many costs one fdatasync, and FUA writes share syncs', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  const { device, power } = await localDevice(join(dir, 'wl.journal'));
  const nvram = { get: () => device } as unknown as DeviceManager;
  // Behind a write-back cache (the only inner layer a plain WRITE may be deferred over).
  const io = new WriteLogIo(await smallCache(), nvram, pino({ level: 'silent' }));
  const volume = new Volume('v', false, new Date().toISOString(), new MemoryStore(1 << 20, new FaultPlan()), 'wl');
  // The journal writes zeros ahead of its tail (and syncs them) at its first append: let that pass.
  await io.write(volume, 1 << 19, Buffer.alloc(4096, 0xff), false);
  await io.flush(volume);
  const before = power.syncs;
  await Promise.all(Array.from({ length: 32 }, (_, i) => io.write(volume, i * 4096, Buffer.alloc(4096, i + 1), false)));
  assert.equal(power.syncs, before, 'a plain WRITE through the log waits for no fdatasync');
  await io.flush(volume);
  assert.equal(power.syncs, before + 1, 'one FLUSH, one fdatasync');
  const held = userRecords(power.durable);
  assert.equal(held.size, 33, 'the FLUSH made all 32 records durable');
  // 32 FUA writes at once: durable when acknowledged, in far fewer syncs than writes.
  const syncsBefore = power.syncs;
  await Promise.all(Array.from({ length: 32 }, (_, i) => io.write(volume, (32 + i) * 4096, Buffer.alloc(4096, i + 1), true)));
  assert.equal(userRecords(power.durable).size, 65, 'every FUA write durable once acknowledged');
  assert.ok(power.syncs - syncsBefore < 32, `32 FUA writes took ${power.syncs - syncsBefore} syncs`);
  await device.close();
});

test('only a local device defers: a mirrored+local device syncs an append asked without sync (it comes back from a crash ready from its file)', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  const { device, power } = await localDevice(join(dir, 'ml.journal'), 'mirrored+local');
  const [a] = await device.append(0, [{ payload: Buffer.from('kept') }], { sync: false });
  assert.equal(userRecords(power.durable).get(a?.seq ?? 0), 'kept');
  assert.equal(device.uncommittedBytes, 0);
  await device.close();
});
