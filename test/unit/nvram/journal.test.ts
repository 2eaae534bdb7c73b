import { test } from 'node:test';
import assert from 'node:assert/strict';
import { lstat, readFile, readdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { JournalFile, encodeFileHeader, parseJournal, type JournalSink } from '../../../src/nvram/journal-file.js';
import { FaultPlan, faultyJournal } from '../../support/faults.js';
import { RECORD_FLAG, decodeOne, decodeRecord, encodeRecord } from '../../../src/protocol/journal/record.js';

const FIXTURES = new URL('../../../../test/fixtures/journal/', import.meta.url);

test('records round-trip, and any flipped byte is caught by the checksum or the framing', () => {
  fc.assert(
    fc.property(
      fc.nat(),
      fc.nat(),
      fc.option(fc.record({ volume: fc.stringMatching(/^[a-z0-9]{1,16}$/), offset: fc.nat() }), { nil: undefined }),
      fc.uint8Array({ maxLength: 300 }),
      fc.nat(),
      (seq, epoch, target, payload, flip) => {
        const record = { seq, timestamp: 1795000000000000 + seq, epoch, flags: 0, target, payload: Buffer.from(payload) };
        const buf = encodeRecord(record);
        const back = decodeOne(buf);
        assert.deepEqual({ ...back, payload: [...back.payload] }, { ...record, target: target === undefined ? undefined : { ...target }, payload: [...payload] });
        const broken = Buffer.from(buf);
        const at = flip % broken.length;
        broken[at] = (broken[at] ?? 0) ^ 0x01;
        const result = decodeRecord(broken);
        // Flips in the reserved bytes (38-39, 52-55) are outside the checksum by design.
        if (!((at >= 38 && at < 40) || (at >= 52 && at < 56))) assert.ok(!('record' in result) || 'corrupt' in result, `flip at ${at} went unnoticed`);
      },
    ),
    { numRuns: 300 },
  );
  assert.throws(() => decodeOne(Buffer.alloc(10)), { code: 'MS_NVRAM_INVALID' });
});

test('frozen fixture: v1-local.journal reads back exactly', async () => {
  const parsed = parseJournal(await readFile(new URL('v1-local.journal', FIXTURES)));
  assert.equal(parsed.stoppedBecause, undefined);
  assert.equal(parsed.validLength, 4475);
  const summary = parsed.records.map((r) => [r.seq, r.timestamp, r.epoch, r.flags, r.target?.volume ?? null, r.target?.offset ?? null, r.payload.length]);
  assert.deepEqual(summary, [
    [1, 1795000000000001, 0, RECORD_FLAG.EPOCH, null, null, 8],
    [1, 1795000000000002, 3, 0, null, null, 12],
    [2, 1795000000000003, 3, 0, 'default', 4096, 4096],
    [3, 1795000000000004, 3, RECORD_FLAG.TRIM, null, null, 8],
    [3, 1795000000000005, 3, 0, null, null, 0],
  ]);
  assert.equal(parsed.records[1]!.payload.toString(), 'first record');
  assert.ok(parsed.records[2]!.payload.every((b) => b === 0xab));
});

test('frozen fixture: a torn tail is cut at the last whole record', async () => {
  const parsed = parseJournal(await readFile(new URL('v1-torn.journal', FIXTURES)));
  assert.equal(parsed.stoppedBecause, 'torn record at the end');
  assert.deepEqual(parsed.records.map((r) => r.seq), [1, 1, 2]);
});

test('frozen fixture: v2-ring.journal (format version 2, a ring in its third lap, its pointer moved three times) reads back exactly', async () => {
  const parsed = parseJournal(await readFile(new URL('v2-ring.journal', FIXTURES)));
  assert.equal(parsed.version, 2);
  assert.equal(parsed.validAfter, undefined);
  assert.deepEqual(parsed.base, { epoch: 4, trimmedTo: 32 });
  assert.deepEqual(parsed.ring?.pointer, { gen: 4, at: 15498, seq: 33, epoch: 4, trimmedTo: 32 });
  assert.equal(parsed.ring?.head, 19187);
  assert.equal(parsed.ring?.capacity, 8192);
  const summary = parsed.records.map((r) => [r.seq, r.timestamp, r.epoch, r.flags, r.target?.volume ?? null, r.target?.offset ?? null, r.payload.length]);
  const T = 1795000000000000;
  assert.deepEqual(summary, [
    [33, T + 33, 4, 0, 'default', 33 * 4096, 321],
    [34, T + 34, 4, 0, null, null, 358],
    [35, T + 35, 4, 0, null, null, 395],
    [36, T + 36, 4, RECORD_FLAG.TRIM, null, null, 8],
    [36, T + 36, 4, 0, 'default', 36 * 4096, 432],
    [37, T + 37, 4, 0, null, null, 469],
    [38, T + 38, 4, 0, null, null, 306],
    [39, T + 39, 4, 0, 'default', 39 * 4096, 343],
    [40, T + 40, 4, 0, null, null, 380],
    [41, T + 41, 4, RECORD_FLAG.TRIM, null, null, 8],
  ]);
  assert.equal(parsed.records[3]?.payload.readBigUInt64BE(0), 32n);
  assert.ok(parsed.records[4]?.payload.every((b) => b === 36));
});

test('frozen fixture: v2-torn.journal, the same ring with its last record torn, reads back to the record before it, with no damage', async () => {
  const parsed = parseJournal(await readFile(new URL('v2-torn.journal', FIXTURES)));
  assert.equal(parsed.validAfter, undefined);
  assert.deepEqual(parsed.records.filter((r) => r.flags === 0).map((r) => r.seq), [33, 34, 35, 36, 37, 38, 39]);
  assert.equal(parsed.ring?.head, 18687);
});

test('a record that breaks the sequence ends recovery there', () => {
  const image = Buffer.concat([
    encodeFileHeader(1 << 20, 0),
    encodeRecord({ seq: 5, timestamp: 1, epoch: 0, flags: 0, target: undefined, payload: Buffer.from('a') }),
    encodeRecord({ seq: 7, timestamp: 2, epoch: 0, flags: 0, target: undefined, payload: Buffer.from('b') }),
  ]);
  const parsed = parseJournal(image);
  assert.deepEqual(parsed.records.map((r) => r.seq), [5]);
  assert.match(parsed.stoppedBecause ?? '', /sequence jumps from 5 to 7/);
});

/**
 * A sink wrapper that notes which records each write carried and which of them each
 * sync covered (those written before the sync began), after a delay of `delay()` ms per
 * write and 2 more per sync.
 */
function watching(delay: () => number): { written: Set<number>; synced: Set<number>; watch: (sink: JournalSink) => JournalSink } {
  const written = new Set<number>();
  const synced = new Set<number>();
  const pause = (ms: number) => (ms > 0 ? new Promise((resolve) => setTimeout(resolve, ms)) : Promise.resolve());
  const watch = (sink: JournalSink): JournalSink => ({
    write: async (buf, position) => {
      await pause(delay());
      await sink.write(buf, position);
      for (let at = 0; at < buf.length; ) {
        const r = decodeRecord(buf, at);
        if (!('record' in r)) break;
        written.add(r.record.seq);
        at += r.size;
      }
    },
    datasync: async () => {
      const covers = [...written];
      const ms = delay();
      await pause(ms > 0 ? 2 + ms : 0);
      await sink.datasync();
      for (const seq of covers) synced.add(seq);
    },
    close: () => sink.close(),
  });
  return { written, synced, watch };
}

test('group commit: no appender is released by a sync that did not cover its record', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-journal-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  // Random delays, so writes and syncs of different batches interleave.
  const { synced, watch } = watching(() => Math.random() * 3);
  const journal = await JournalFile.create(join(dir, 'j.journal'), 1 << 20, { wrap: watch });
  const syncsBefore = journal.syncs;
  let nextSeq = 1;
  const appends = Array.from({ length: 60 }, (_, i) =>
    (async () => {
      if (i % 3 === 0) await new Promise((resolve) => setTimeout(resolve, i % 7));
      // Sequence numbers are taken when the append is queued, as the device does.
      const seq = nextSeq++;
      const record = encodeRecord({ seq, timestamp: i, epoch: 0, flags: 0, target: undefined, payload: Buffer.alloc(i * 7) });
      await journal.append(record);
      assert.ok(synced.has(seq), `append ${seq} released before a sync covered it`);
    })(),
  );
  await Promise.all(appends);
  assert.ok(journal.syncs - syncsBefore < 60, `group commit batched: ${journal.syncs - syncsBefore} syncs for 60 appends`);
  await journal.close();
  const parsed = parseJournal(await readFile(join(dir, 'j.journal')));
  assert.equal(parsed.stoppedBecause, undefined);
  assert.deepEqual(parsed.records.map((r) => r.seq), Array.from({ length: 60 }, (_, i) => i + 1));
});

test('a failed sync fences the journal: the batch and every later append are refused until replace() rewrites the file; a failed rewrite keeps the fence', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-journal-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const plan = new FaultPlan();
  const journal = await JournalFile.create(join(dir, 'j.journal'), 1 << 20, { wrap: faultyJournal(plan) });
  const rec = (seq: number) => encodeRecord({ seq, timestamp: seq, epoch: 0, flags: 0, target: undefined, payload: Buffer.from(`r${seq}`) });
  await journal.append(rec(1));
  plan.fail({ op: 'journal.datasync', fault: 'EIO' });
  const failed = journal.append(rec(2));
  const queued = journal.append(rec(3));
  await assert.rejects(failed, { code: 'MS_MEDIUM_IO', message: /write or sync failed/ });
  await assert.rejects(queued, { code: 'MS_MEDIUM_IO' }); // in the same batch, or refused by the fence
  await assert.rejects(journal.append(rec(2)), { code: 'MS_MEDIUM_IO', message: /fenced/ }, 'no append goes through a fenced file, though the disk is well again');
  assert.ok(journal.fenced !== undefined);
  // A rewrite that fails too leaves the fence up.
  plan.fail({ op: 'journal.datasync', fault: 'EIO' });
  await assert.rejects(journal.replace(rec(1)), { code: 'MS_MEDIUM_IO' });
  await assert.rejects(journal.append(rec(2)), { message: /fenced/ });
  // A rewrite from what the device holds lifts it.
  await journal.replace(rec(1));
  assert.equal(journal.fenced, undefined);
  await journal.append(rec(2));
  await journal.close();
  const parsed = parseJournal(await readFile(join(dir, 'j.journal')));
  assert.equal(parsed.stoppedBecause, undefined);
  assert.deepEqual(parsed.records.map((r) => r.payload.toString()), ['r1', 'r2']);
  assert.deepEqual(await readdir(dir), ['j.journal'], 'no temporary file is left behind');
});

test('appends without sync are released once written; flush and the next synced append cover them', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-journal-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const { written, synced, watch } = watching(() => 0);
  const journal = await JournalFile.create(join(dir, 'j.journal'), 1 << 20, { wrap: watch });
  const record = (seq: number) => encodeRecord({ seq, timestamp: seq, epoch: 0, flags: 0, target: undefined, payload: Buffer.alloc(100, seq) });
  const syncs = journal.syncs;
  await Promise.all([1, 2, 3].map((seq) => journal.append(record(seq), false)));
  assert.deepEqual([...written].sort(), [1, 2, 3]);
  assert.equal(journal.syncs, syncs, 'no sync for appends that do not ask for one');
  await journal.flush();
  assert.deepEqual([...synced].sort(), [1, 2, 3]);
  await journal.flush();
  assert.equal(journal.syncs, syncs + 1, 'a flush with nothing unsynced costs no sync');
  await journal.append(record(4), false);
  await journal.append(record(5));
  assert.ok(synced.has(4) && synced.has(5), 'a synced append covers the lazy one before it');
  await journal.append(record(6), false);
  await journal.close();
  assert.deepEqual(parseJournal(await readFile(join(dir, 'j.journal'))).records.map((r) => r.seq), [1, 2, 3, 4, 5, 6]);
});

test('a journal\'s temporary files are always new: a symlink planted at their names is removed, never written through', async (t) => {
  // Review finding: open(tmp, 'w') at create and at compaction followed a symlink out of the data directory.
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-journal-'));
  const elsewhere = await mkdtemp(join(tmpdir(), 'memstrata-outside-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  t.after(() => rm(elsewhere, { recursive: true, force: true }));
  const outside = join(elsewhere, 'precious.txt');
  await writeFile(outside, 'not memstrata\'s\n');
  const path = join(dir, 'j.journal');
  await symlink(outside, `${path}.tmp`);
  const journal = await JournalFile.create(path, 1 << 20);
  await journal.append(encodeRecord({ seq: 1, timestamp: 1, epoch: 0, flags: 0, target: undefined, payload: Buffer.from('one') }));
  await symlink(outside, `${path}.compact`);
  await journal.compact(0);
  await journal.close();
  assert.equal(await readFile(outside, 'utf8'), 'not memstrata\'s\n', 'the file outside is untouched');
  assert.ok((await lstat(path)).isFile());
  assert.deepEqual(await readdir(dir), ['j.journal']);
  assert.deepEqual(parseJournal(await readFile(path)).records.map((r) => r.seq), [1]);
});

test('once close began, the journal takes nothing more: a record deferred then is refused, never left pending; and a trim racing the close of its device leaves no descriptor open', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-journal-close-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const rec = (seq: number) => encodeRecord({ seq, timestamp: seq, epoch: 1, flags: 0, target: undefined, payload: Buffer.alloc(100, seq & 0xff) });
  const path = join(dir, 'x.journal');
  const j = await JournalFile.create(path, 1 << 20);
  await j.append(rec(1));
  const kept = j.defer(rec(2)); // before close: goes out with close's last batch
  const closing = j.close();
  await assert.rejects(j.defer(rec(3)), { code: 'MS_SHUTTING_DOWN' });
  await assert.rejects(j.append(rec(3)), { code: 'MS_SHUTTING_DOWN' });
  await closing;
  await kept;
  assert.deepEqual(parseJournal(await readFile(path)).records.map((r) => r.seq), [1, 2]);

  // A device whose small ring wraps (its pointer moving on), closed while a trim runs.
  const pino = (await import('pino')).default;
  const { DramMedium } = await import('../../../src/memory/dram-medium.js');
  const { PartitionTable } = await import('../../../src/memory/partition-table.js');
  const { DeviceManager } = await import('../../../src/nvram/device-manager.js');
  const { readlink } = await import('node:fs/promises');
  const MiB = 1024 * 1024;
  const medium = new DramMedium({ capacity: 16 * MiB, extentSize: MiB });
  await medium.open();
  const partition = new PartitionTable([
    { name: 'dram', capacity: 16 * MiB, extentSize: MiB, initial: { cache: 0, server: 0, nvram: 8 * MiB }, bounds: { cache: { min: 0, max: 16 * MiB }, server: { min: 0, max: 0 }, nvram: { min: 0, max: 16 * MiB } } },
  ]);
  const devicesDir = join(dir, 'node');
  const nvram = new DeviceManager({ dataDir: devicesDir, partition, media: [medium], log: pino({ level: 'silent' }), journalRing: 64 * 1024 });
  await nvram.open();
  await nvram.create('d', MiB, 'local');
  const device = nvram.get('d');
  await device.open(1);
  for (let round = 0; round < 2; round++) {
    for (let i = 0; i < 9; i++) await device.append(1, [{ payload: Buffer.alloc(100 * 1024, i) }]);
    await device.trim(1, device.lastSeq);
  }
  for (let i = 0; i < 3; i++) await device.append(1, [{ payload: Buffer.alloc(100 * 1024, i) }]);
  const trimming = device.trim(1, device.lastSeq).catch(() => undefined);
  await new Promise((resolve) => setImmediate(resolve));
  await nvram.close();
  await trimming;
  const open: string[] = [];
  for (const fd of await readdir('/proc/self/fd')) {
    const target = await readlink(`/proc/self/fd/${fd}`).catch(() => '');
    if (target.startsWith(devicesDir)) open.push(target);
  }
  assert.deepEqual(open, [], 'no descriptor of the closed device stays open');
});

test('the O_DSYNC write of an unwrapped journal: a batch that must be durable goes through it; when it fails, the batch is refused and the file fenced until replace(), as with a failed fdatasync', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-journal-dsync-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'j.journal');
  const journal = await JournalFile.create(path, 1 << 20);
  const rec = (seq: number) => encodeRecord({ seq, timestamp: seq, epoch: 0, flags: 0, target: undefined, payload: Buffer.from(`r${seq}`) });
  // The durable write is a private seam: watch it, then break it once.
  const seam = journal as unknown as { durable: ((buf: Buffer, at: number) => Promise<void>) | undefined };
  const real = seam.durable;
  assert.ok(real !== undefined, 'an unwrapped journal writes durable batches through an O_DSYNC descriptor');
  let durableWrites = 0;
  let fail = false;
  seam.durable = (buf, at) => {
    durableWrites++;
    return fail ? Promise.reject(Object.assign(new Error('EIO: injected'), { code: 'EIO' })) : real(buf, at);
  };
  await journal.append(rec(1));
  assert.equal(durableWrites, 1);
  const syncsBefore = journal.syncs;
  fail = true;
  await assert.rejects(journal.append(rec(2)), { code: 'MS_MEDIUM_IO', message: /write or sync failed/ });
  assert.equal(journal.syncs, syncsBefore, 'a failed durable write counts as no sync');
  fail = false;
  await assert.rejects(journal.append(rec(2)), { message: /fenced/ }, 'fenced until rewritten');
  await journal.replace(rec(1));
  await journal.append(rec(2));
  await journal.close();
  assert.deepEqual(parseJournal(await readFile(path)).records.map((r) => r.payload.toString()), ['r1', 'r2']);
});
