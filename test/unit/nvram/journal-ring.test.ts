// The journal ring (format version 2) under laps, pointer moves, power cuts and torn
// tails. A model of the disk keeps what an fdatasync made durable; at any moment a power
// cut may keep that plus the unsynced writes in order, the last one torn anywhere. What
// recovery reads from such an image must hold every record made durable and not trimmed,
// exactly, and nothing that was never appended; the writer then goes on from that image,
// over whatever stale bytes lie ahead of it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import fc from 'fast-check';
import { FILE_MAGIC, JournalFile, RING_START, cutJournal, encodeFileHeader, parseJournal, type JournalSink } from '../../../src/nvram/journal-file.js';
import { RECORD_FLAG, encodeRecord, type JournalRecord } from '../../../src/protocol/journal/record.js';
import { tempDir } from '../../support/node-process.js';
import { rng } from '../../support/rng.js';

/** The disk under a journal: writes become durable through an fdatasync that began after them. */
class Disk {
  durable: Buffer;
  pending: { position: number; bytes: Buffer; file: boolean }[];
  /** Whether the sink offers writes in the caller's turn (JournalSink.writeSync), and how many it took. */
  private readonly now: boolean;
  writesNow: number;

  constructor(image: Buffer, now = false) {
    this.durable = Buffer.from(image);
    this.pending = [];
    this.now = now;
    this.writesNow = 0;
  }

  readonly wrap = (sink: JournalSink): JournalSink => {
    const wrapped: JournalSink = {
      write: async (buf, position) => {
        await sink.write(buf, position);
        // A whole new file (a rewrite, renamed over the journal once synced) replaces the image.
        this.pending.push({ position, bytes: Buffer.from(buf), file: position === 0 && buf.subarray(0, 8).equals(FILE_MAGIC) });
      },
      datasync: async () => {
        const covered = this.pending;
        this.pending = [];
        await sink.datasync();
        for (const w of covered) this.durable = w.file ? Buffer.from(w.bytes) : put(this.durable, w.position, w.bytes);
      },
      close: () => sink.close(),
    };
    const now = sink.writeSync;
    if (this.now && now !== undefined) {
      wrapped.writeSync = (buf, position) => {
        // Padded to its page's end (a wrap marker's piece too): the kernel never reads a page to complete it.
        assert.equal((position + buf.length) % 4096, 0, 'a write in the appender\'s turn ends on a page boundary');
        now.call(sink, buf, position);
        this.pending.push({ position, bytes: Buffer.from(buf), file: false });
        this.writesNow++;
      };
    }
    return wrapped;
  };

  /**
   * What a power cut leaves when the disk wrote back out of order: the durable image and
   * any of the unsynced writes, each whole, torn or lost (picked by `pick`, 0..1 each).
   */
  scramble(pick: () => number): Buffer {
    let image: Buffer = Buffer.from(this.durable);
    for (const w of this.pending) {
      const p = pick();
      if (p < 0.4) continue;
      if (w.file) continue; // a new file not synced is never renamed over the journal
      image = put(image, w.position, p < 0.7 ? w.bytes.subarray(0, Math.floor(pick() * w.bytes.length)) : w.bytes);
    }
    return image;
  }

  /** What a power cut now leaves: the durable image, then the unsynced writes in order, the last one cut at `keep` (0..1). */
  cut(keep: number): Buffer {
    let image: Buffer = Buffer.from(this.durable);
    const kept = Math.floor(keep * (this.pending.length + 1));
    this.pending.slice(0, kept).forEach((w, i) => {
      if (w.file) return; // a new file not synced is never renamed over the journal
      const torn = i === kept - 1 ? w.bytes.subarray(0, Math.floor(keep * 7919) % (w.bytes.length + 1)) : w.bytes;
      image = put(image, w.position, torn);
    });
    return image;
  }
}

function put(image: Buffer, position: number, bytes: Buffer): Buffer {
  const out = image.length < position + bytes.length ? Buffer.concat([image, Buffer.alloc(position + bytes.length - image.length)]) : image;
  bytes.copy(out, position);
  return out;
}

const marker = (flag: number, seq: number, value: number): Buffer => {
  const payload = Buffer.alloc(8);
  payload.writeBigUInt64BE(BigInt(value));
  return encodeRecord({ seq, timestamp: seq, epoch: 0, flags: flag, target: undefined, payload });
};

/** A user record numbered `seq`, stamped with its number. */
const record = (seq: number, payload: Buffer, epoch = 0): Buffer => encodeRecord({ seq, timestamp: seq, epoch, flags: 0, target: undefined, payload });

const users = (records: readonly JournalRecord[]): JournalRecord[] => records.filter((r) => (r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) === 0);

/**
 * Bytes a client puts in its payloads that look like the ring's own records: a trim or
 * epoch marker of a huge value, a user record numbered a little ahead, or a piece of a
 * real version 2 journal file. Once trimmed and left stale, reading may run into them.
 */
interface Forgery {
  kind: 'trim' | 'epoch' | 'user' | 'file';
  at: number;
  ahead: number;
}

const FIXTURE = new URL('../../../../test/fixtures/journal/v2-ring.journal', import.meta.url);

function forge(payload: Buffer, f: Forgery, next: number, file: Buffer): void {
  const image =
    f.kind === 'trim' ? marker(RECORD_FLAG.TRIM, next + f.ahead, 2 ** 40)
    : f.kind === 'epoch' ? marker(RECORD_FLAG.EPOCH, next + f.ahead, 2 ** 40)
    : f.kind === 'user' ? encodeRecord({ seq: next + f.ahead, timestamp: 0, epoch: 0, flags: 0, target: undefined, payload: Buffer.from('never appended') })
    : file.subarray(RING_START + (f.at % (file.length - RING_START - 64)), RING_START + (f.at % (file.length - RING_START - 64)) + 600);
  if (payload.length < 64) return;
  const at = f.at % Math.max(1, payload.length - Math.min(image.length, payload.length) + 1);
  image.copy(payload, at, 0, Math.min(image.length, payload.length - at));
}

type Op =
  | { t: 'append'; sizes: number[]; sync: boolean; forged: Forgery | undefined }
  | { t: 'trim'; at: number }
  | { t: 'epoch' }
  | { t: 'flush' }
  | { t: 'crash'; keep: number; scramble: number | undefined };

const op: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc.record({
      t: fc.constant('append' as const),
      sizes: fc.array(fc.nat({ max: 700 }), { minLength: 1, maxLength: 5 }),
      sync: fc.boolean(),
      forged: fc.option(fc.record({ kind: fc.constantFrom('trim' as const, 'epoch' as const, 'user' as const, 'file' as const), at: fc.nat(), ahead: fc.nat({ max: 40 }) }), { nil: undefined }),
    }),
  },
  { weight: 2, arbitrary: fc.record({ t: fc.constant('trim' as const), at: fc.double({ min: 0, max: 1, noNaN: true }) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('epoch' as const) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('flush' as const) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('crash' as const), keep: fc.double({ min: 0, max: 1, noNaN: true }), scramble: fc.option(fc.nat(), { nil: undefined }) }) },
);

test('the ring under laps, pointer moves, power cuts and torn tails: recovery holds every durable record not trimmed, exactly, and the writer goes on over stale bytes', async (t) => {
  const dir = await tempDir(t, 'memstrata-ring-');
  // A ring of 8 KiB to begin with. Live records are kept under nine tenths of the ring
  // (a device keeps them under its size, half the ring): markers and batches fill the rest,
  // so the ring now and then holds too much to take a batch and is rewritten into a bigger one.
  const DEVICE = 1024;
  const budget = (j: JournalFile) => j.capacity * 0.9;
  const fixture = await readFile(FIXTURE);
  let run = 0;
  let moves = 0;
  let rewrites = 0;
  let writesNow = 0;
  await fc.assert(
    fc.asyncProperty(fc.array(op, { minLength: 10, maxLength: 120 }), fc.boolean(), async (ops, writeNow) => {
      const path = join(dir, `r${run++}.journal`);
      let journal = await JournalFile.create(path, DEVICE, { ring: 8192 });
      await journal.close();
      // With writeNow, appends without a sync go to the file in the appender's turn while the writer is idle.
      let disk = new Disk(await readFile(path), writeNow);
      journal = await JournalFile.open(path, parseJournal(disk.durable), DEVICE, { wrap: disk.wrap, clock: () => 0 });
      // The model: every record appended by number, which of them are durable, trims and epochs.
      const appended = new Map<number, Buffer>();
      const durable = new Set<number>();
      let acked = 0; // every record up to here has been answered
      let next = 1;
      let trimmed = 0; // trim marker made durable
      let trimSent = 0;
      let epoch = 0;
      let epochSent = 0;
      const live = () => [...appended.entries()].filter(([seq]) => seq > trimSent).reduce((n, [, b]) => n + b.length, 0);
      const check = (image: Buffer, why: string, damageAllowed = false): ReturnType<typeof parseJournal> => {
        const parsed = parseJournal(image);
        if (!damageAllowed) assert.equal(parsed.validAfter, undefined, `${why}: no damage (${parsed.stoppedBecause ?? ''})`);
        const trimTo = Math.max(parsed.base.trimmedTo, ...parsed.records.filter((r) => (r.flags & RECORD_FLAG.TRIM) !== 0).map((r) => Number(r.payload.readBigUInt64BE(0))));
        const gotEpoch = Math.max(parsed.base.epoch, ...parsed.records.filter((r) => (r.flags & RECORD_FLAG.EPOCH) !== 0).map((r) => Number(r.payload.readBigUInt64BE(0))));
        assert.ok(trimTo >= trimmed && trimTo <= trimSent, `${why}: trim point ${trimTo} outside [${trimmed}, ${trimSent}]`);
        assert.ok(gotEpoch >= epoch && gotEpoch <= epochSent, `${why}: epoch ${gotEpoch} outside [${epoch}, ${epochSent}]`);
        const got = users(parsed.records).filter((r) => r.seq > trimTo);
        got.forEach((r, i) => {
          if (i > 0) assert.equal(r.seq, (got[i - 1]?.seq ?? 0) + 1, `${why}: numbers follow on`);
          assert.ok(appended.get(r.seq)?.equals(encodeRecord(r)), `${why}: record ${r.seq} is one that was appended ${JSON.stringify(r)} ${appended.get(r.seq)?.toString('hex')} ${encodeRecord(r).toString('hex')}`);
        });
        const have = new Set(got.map((r) => r.seq));
        for (const seq of durable) if (seq > trimTo) assert.ok(have.has(seq), `${why}: durable record ${seq} lost (trimmed to ${trimTo})`);
        return parsed;
      };
      for (const [step, o] of ops.entries()) {
        if (o.t === 'append') {
          if (live() + o.sizes.reduce((n, s) => n + s + 56, 0) > budget(journal) && acked > trimSent) {
            // Trim the oldest records until half the budget is left, so some stay live across laps.
            let to = trimSent;
            while (to < acked && live() > budget(journal) / 2) trimSent = ++to;
            await journal.append(marker(RECORD_FLAG.TRIM, next, to));
            trimmed = trimSent;
          }
          if (live() + o.sizes.reduce((n, s) => n + s + 56, 0) > budget(journal)) continue;
          await Promise.all(
            o.sizes.map(async (size) => {
              const seq = next++;
              const payload = Buffer.alloc(size, seq & 0xff);
              if (o.forged !== undefined) forge(payload, o.forged, seq + 1, fixture);
              const buf = record(seq, payload, epoch);
              appended.set(seq, buf);
              await journal.append(buf, o.sync);
              if (o.sync) for (const s of appended.keys()) if (s <= seq) durable.add(s);
            }),
          );
          acked = next - 1;
        } else if (o.t === 'trim') {
          const to = Math.floor(trimSent + (acked - trimSent) * o.at);
          if (to <= trimSent) continue;
          trimSent = to;
          await journal.append(marker(RECORD_FLAG.TRIM, next, to));
          trimmed = to;
          for (const s of appended.keys()) durable.add(s);
        } else if (o.t === 'epoch') {
          epochSent = epoch + 1;
          await journal.append(marker(RECORD_FLAG.EPOCH, next, epochSent));
          epoch = epochSent;
          for (const s of appended.keys()) durable.add(s);
        } else if (o.t === 'flush') {
          await journal.flush();
          for (const s of appended.keys()) durable.add(s);
        } else {
          // Power cut: recover from what the disk kept, and go on from there. Written back
          // in order, it is a torn tail; out of order, it may be damage, which a `mirrored`
          // device accepts (its partner has the rest): the writer goes on all the same.
          const image = o.scramble === undefined ? disk.cut(o.keep) : disk.scramble(rng(o.scramble));
          const parsed = check(image, `step ${step}, power cut${o.scramble === undefined ? '' : ' (out of order)'}`, o.scramble !== undefined);
          moves += journal.pointerMoves;
          rewrites += journal.rewrites;
          await journal.close();
          await writeFile(path, image);
          writesNow += disk.writesNow;
          disk = new Disk(image, writeNow);
          journal = await JournalFile.open(path, parsed, DEVICE, { wrap: disk.wrap, clock: () => 0 });
          // What was lost was never durable; its numbers are handed out again, as a device does.
          const last = Math.max(trimmed, ...users(parsed.records).map((r) => r.seq));
          for (const s of [...appended.keys()]) if (s > last) appended.delete(s);
          for (const s of appended.keys()) durable.add(s);
          next = last + 1;
          acked = last;
          trimSent = trimmed = Math.max(trimmed, parsed.base.trimmedTo, ...parsed.records.filter((r) => (r.flags & RECORD_FLAG.TRIM) !== 0).map((r) => Number(r.payload.readBigUInt64BE(0))));
          epoch = epochSent = Math.max(parsed.base.epoch, ...parsed.records.filter((r) => (r.flags & RECORD_FLAG.EPOCH) !== 0).map((r) => Number(r.payload.readBigUInt64BE(0))));
          continue;
        }
        check(disk.durable, `step ${step} (${o.t})`);
      }
      moves += journal.pointerMoves;
      rewrites += journal.rewrites;
      writesNow += disk.writesNow;
      await journal.close();
      assert.ok((await stat(path)).size <= RING_START + journal.capacity, 'the file never grows past its ring');
    }),
    // A failing schedule (fast-check prints it) replays with TEST_OPS='[...]' (and TEST_WRITE_NOW=1 for its second value true).
    process.env.TEST_OPS === undefined ? { numRuns: 150 } : { numRuns: 1, examples: [[JSON.parse(process.env.TEST_OPS) as Op[], process.env.TEST_WRITE_NOW === '1']] },
  );
  assert.ok(moves > 0 && rewrites > 0, `the runs wrapped the ring (${moves} pointer moves) and filled it (${rewrites} rewrites)`);
  assert.ok(writesNow > 0, 'appends without a sync were written in the appender\'s turn');
});

test('the ring wraps and reuses its space: a long run of appends and trims stays in one ring-sized file, the pointer moves, and a restart reads exactly the live records', async (t) => {
  const dir = await tempDir(t, 'memstrata-ring-');
  const path = join(dir, 'j.journal');
  const journal = await JournalFile.create(path, 16 * 1024, { ring: 64 * 1024 });
  let next = 1;
  for (let round = 0; round < 200; round++) {
    await Promise.all(Array.from({ length: 8 }, () => { const seq = next++; return journal.append(record(seq, Buffer.alloc(900, seq & 0xff), 1)); }));
    await journal.append(marker(RECORD_FLAG.TRIM, next, next - 5)); // keep the four newest
  }
  assert.ok(journal.pointerMoves > 20, `the pointer moved ${journal.pointerMoves} times`);
  assert.equal(journal.rewrites, 0);
  await journal.close();
  assert.equal((await stat(path)).size, RING_START + 64 * 1024, 'the file is its ring, no more');
  const parsed = parseJournal(await readFile(path));
  assert.equal(parsed.version, 2);
  assert.equal(parsed.validAfter, undefined);
  const trimTo = Math.max(parsed.base.trimmedTo, ...parsed.records.filter((r) => (r.flags & RECORD_FLAG.TRIM) !== 0).map((r) => Number(r.payload.readBigUInt64BE(0))));
  assert.equal(trimTo, next - 5);
  assert.deepEqual(users(parsed.records).filter((r) => r.seq > trimTo).map((r) => r.seq), [next - 4, next - 3, next - 2, next - 1]);
  assert.deepEqual(await readdir(dir), ['j.journal']);
});

test('records appended without a sync (as an in-sync mirrored device writes its journal) over many laps read back exactly: each piece of a batch that wraps reaches the file as it was', async (t) => {
  const dir = await tempDir(t, 'memstrata-ring-');
  const path = join(dir, 'j.journal');
  const journal = await JournalFile.create(path, 16 * 1024, { ring: 64 * 1024 });
  const random = rng(1234);
  const sent = new Map<number, Buffer>();
  let next = 1;
  let laps = 0;
  for (let round = 0; round < 300; round++) {
    const written: Promise<void>[] = [];
    for (let i = 0; i < 8; i++) {
      const seq = next++;
      const payload = Buffer.alloc(200 + Math.floor(random() * 2800));
      for (let b = 0; b < payload.length; b++) payload[b] = Math.floor(random() * 256);
      sent.set(seq, payload);
      written.push(journal.append(record(seq, payload, 1), false));
    }
    const moves = journal.pointerMoves;
    await Promise.all(written);
    if (journal.pointerMoves > moves) laps++;
    // What the file holds now (written, in the OS's cache): the batch just written, whole.
    const parsed = parseJournal(await readFile(path));
    assert.equal(parsed.validAfter, undefined);
    const live = users(parsed.records).filter((r) => r.seq > next - 9);
    assert.deepEqual(live.map((r) => r.seq), Array.from({ length: 8 }, (_, i) => next - 8 + i));
    for (const r of live) assert.ok(r.payload.equals(sent.get(r.seq) ?? Buffer.alloc(0)), `record ${r.seq} reads back as it was sent`);
    await journal.append(marker(RECORD_FLAG.TRIM, next, next - 9), false); // keep the eight newest
  }
  assert.ok(laps > 20, `the pointer moved on in ${laps} batches`);
  assert.equal(journal.syncs, 0, 'no batch synced');
  await journal.close();
});

test('an append without a sync written in the appender\'s turn never lands ahead of what the writer is writing or has queued: under interleavings fast-check\'s scheduler picks, the file holds every record not trimmed, in the order appended', async (t) => {
  const dir = await tempDir(t, 'memstrata-ring-');
  let run = 0;
  let now = 0; // appends without a sync written in the appender's turn
  let behind = 0; // appends without a sync that found the writer busy and were queued
  // 'deferred': written only with whatever comes next (a write log's plain WRITE while its device is not in sync).
  const op = fc.record({ kind: fc.constantFrom('lazy', 'lazy', 'lazy', 'synced', 'deferred', 'flush', 'trim'), size: fc.nat({ max: 3000 }) });
  await fc.assert(
    fc.asyncProperty(
      // Rounds of operations started together; after some rounds the writer is left to finish (idle).
      fc.array(fc.record({ ops: fc.array(op, { minLength: 1, maxLength: 6 }), settle: fc.boolean() }), { minLength: 1, maxLength: 10 }),
      fc.scheduler(),
      async (rounds, s) => {
        const path = join(dir, `o${run++}.journal`);
        const created = await JournalFile.create(path, 8 * 1024, { ring: 32 * 1024 });
        await created.close();
        let writesNow = 0;
        // The writer's writes and syncs each wait for the scheduler; writes in the appender's turn cannot wait.
        const wrap = (sink: JournalSink): JournalSink => {
          const inner = sink.writeSync;
          assert.ok(inner !== undefined);
          return {
            write: async (buf, position) => {
              await s.schedule(Promise.resolve());
              await sink.write(buf, position);
            },
            writeSync: (buf, position) => {
              // Padded to its page's end: the kernel never reads a page to complete it.
              assert.equal((position + buf.length) % 4096, 0, 'a write in the appender\'s turn ends on a page boundary');
              inner.call(sink, buf, position);
              writesNow++;
            },
            datasync: async () => {
              await s.schedule(Promise.resolve());
              await sink.datasync();
            },
            close: () => sink.close(),
          };
        };
        // A clock that never moves: writes in the appender's turn are never declined as slow.
        const journal = await JournalFile.open(path, parseJournal(await readFile(path)), 8 * 1024, { wrap, clock: () => 0 });
        const appended = new Map<number, Buffer>();
        let next = 1;
        let trimSent = 0;
        const deferred: Promise<void>[] = [];
        for (const round of rounds) {
          const all = round.ops.map(async (o) => {
            await s.schedule(Promise.resolve()); // the scheduler picks when each operation starts
            if (o.kind === 'flush') return journal.flush();
            if (o.kind === 'trim') {
              // Trim half of what was appended so far, as a device's checkpoint does (a synced marker).
              const to = Math.floor((next - 1) / 2);
              if (to <= trimSent) return undefined;
              trimSent = to;
              return journal.append(marker(RECORD_FLAG.TRIM, next, to));
            }
            const seq = next++;
            const buf = record(seq, Buffer.alloc(o.size, seq & 0xff));
            appended.set(seq, buf);
            if (o.kind === 'synced') return journal.append(buf);
            if (o.kind === 'deferred') {
              deferred.push(journal.defer(buf)); // settles with a later batch: awaited at the end
              return undefined;
            }
            const before = writesNow;
            const written = journal.append(buf, false);
            if (writesNow > before) now++;
            else behind++;
            return written;
          });
          await s.waitFor(Promise.all(all));
          // The writer pauses a turn after releasing several appenders: past it, it is idle.
          if (round.settle) await s.waitFor(new Promise((resolve) => setTimeout(resolve, 1)));
        }
        await s.waitFor(journal.flush());
        await Promise.all(deferred);
        await journal.close();
        const parsed = parseJournal(await readFile(path));
        assert.equal(parsed.validAfter, undefined, `no damage (${parsed.stoppedBecause ?? ''})`);
        const trimTo = Math.max(parsed.base.trimmedTo, ...parsed.records.filter((r) => (r.flags & RECORD_FLAG.TRIM) !== 0).map((r) => Number(r.payload.readBigUInt64BE(0))));
        const got = users(parsed.records).filter((r) => r.seq > trimTo);
        assert.deepEqual(got.map((r) => r.seq), Array.from({ length: next - 1 - trimTo }, (_, i) => trimTo + 1 + i), 'every record not trimmed, in the order appended');
        for (const r of got) assert.ok(appended.get(r.seq)?.equals(encodeRecord(r)), `record ${r.seq} reads back as appended`);
      },
    ),
    { numRuns: 100 },
  );
  assert.ok(now > 0 && behind > 0, `both ways were taken: ${now} appends written in the appender's turn, ${behind} queued behind the writer`);
});

test('an append made while the journal closes is refused (MS_SHUTTING_DOWN), never written in the appender\'s turn behind the last sync', async (t) => {
  const dir = await tempDir(t, 'memstrata-ring-');
  const path = join(dir, 'c.journal');
  const journal = await JournalFile.create(path, 8 * 1024, { ring: 32 * 1024 });
  await journal.append(record(1, Buffer.alloc(100, 1)), true); // the first lap's zeros written: the writer is idle now
  await journal.append(record(2, Buffer.alloc(100, 2)), false);
  const closing = journal.close();
  await assert.rejects(journal.append(record(3, Buffer.alloc(100, 3)), false), { code: 'MS_SHUTTING_DOWN' });
  await closing;
  assert.deepEqual(users(parseJournal(await readFile(path)).records).map((r) => r.seq), [1, 2]);
});

test('writes in the appender\'s turn that hold the event loop (a disk the kernel throttles or that hangs) are declined: appends then go to the writer, in order, and are written at once again when such writes are fast', async (t) => {
  const dir = await tempDir(t, 'memstrata-ring-');
  const path = join(dir, 's.journal');
  const created = await JournalFile.create(path, 8 * 1024, { ring: 256 * 1024 });
  await created.close();
  const clock = { now: 0 };
  let cost = 5; // ms each write in the appender's turn holds the loop, on the fake clock
  let now = 0;
  const wrap = (sink: JournalSink): JournalSink => {
    const inner = sink.writeSync;
    assert.ok(inner !== undefined);
    return {
      write: (buf, position) => sink.write(buf, position),
      writeSync: (buf, position) => {
        inner.call(sink, buf, position);
        now++;
        clock.now += cost;
      },
      datasync: () => sink.datasync(),
      close: () => sink.close(),
    };
  };
  const journal = await JournalFile.open(path, parseJournal(await readFile(path)), 8 * 1024, { wrap, clock: () => clock.now });
  let seq = 1;
  const append = async (sync: boolean): Promise<void> => {
    await journal.append(record(seq, Buffer.alloc(200, seq & 0xff)), sync);
    seq++;
    clock.now += 1; // the loop's other work between appends
  };
  await append(true); // the first lap's zeros, by the writer
  for (let i = 0; i < 100; i++) await append(false);
  assert.ok(journal.syncWrites.slow, 'slow writes in the appender\'s turn are declined');
  assert.ok(now <= 5, `${now} of 100 appends were written in the appender's turn while such writes took 5 ms (a probe now and then)`);
  // Fast again: probes find it so, and the gauge lets such writes be made again.
  cost = 0.005;
  for (let i = 0; i < 200 && journal.syncWrites.slow; i++) {
    clock.now += 20;
    await append(false);
  }
  assert.equal(journal.syncWrites.slow, false, 'fast writes in the appender\'s turn are made again');
  const before = now;
  await append(false);
  assert.equal(now, before + 1);
  await journal.flush();
  await journal.close();
  assert.deepEqual(users(parseJournal(await readFile(path)).records).map((r) => r.seq), Array.from({ length: seq - 1 }, (_, i) => i + 1), 'every record, in order, whichever way it was written');
});

test('records that follow a trim of everything stay where the pointer can reach them: the next move of the pointer keeps them', async (t) => {
  // Review finding (of the writer itself): when a move let go of every run, the next
  // records joined the last run let go of, and the move after skipped them.
  const dir = await tempDir(t, 'memstrata-ring-');
  const path = join(dir, 'j.journal');
  const journal = await JournalFile.create(path, 1024, { ring: 8192 });
  const rec = (seq: number) => record(seq, Buffer.alloc(500, seq & 0xff));
  for (let seq = 1; seq <= 14; seq++) await journal.append(rec(seq)); // 14 x 556 bytes: almost a lap
  await journal.append(marker(RECORD_FLAG.TRIM, 15, 14)); // everything trimmed
  await journal.append(rec(15)); // wraps; the pointer moves to the head, past every run
  for (let seq = 16; seq <= 30; seq++) await journal.append(rec(seq)); // nothing trimmed: the ring fills again
  await journal.close();
  const parsed = parseJournal(await readFile(path));
  assert.equal(parsed.validAfter, undefined);
  assert.deepEqual(users(parsed.records).filter((r) => r.seq > 14).map((r) => r.seq), Array.from({ length: 16 }, (_, i) => 15 + i));
});

test('a client\'s payload that holds a record image is never read as one of the ring\'s records, though reading runs into it where the head stops in a later lap', async (t) => {
  // Review finding: a trim marker (2^40) journaled inside a payload, trimmed, then met at
  // the head of the next lap was taken for a live marker, and every record was dropped.
  const dir = await tempDir(t, 'memstrata-ring-');
  for (const kind of ['trim', 'epoch', 'user'] as const) {
    const path = join(dir, `${kind}.journal`);
    const journal = await JournalFile.create(path, 1024, { ring: 8192 });
    const payload = Buffer.alloc(4000);
    // The image lies at ring offset 56 + 200 = 256: where record 6 ends in the next lap.
    (kind === 'trim' ? marker(RECORD_FLAG.TRIM, 7, 2 ** 40) : kind === 'epoch' ? marker(RECORD_FLAG.EPOCH, 7, 2 ** 40) : encodeRecord({ seq: 7, timestamp: 0, epoch: 0, flags: 0, target: undefined, payload: Buffer.from('never appended') })).copy(payload, 200);
    await journal.append(record(1, payload));
    await journal.append(marker(RECORD_FLAG.TRIM, 2, 1));
    for (let seq = 2; seq <= 5; seq++) await journal.append(record(seq, Buffer.alloc(900, seq)));
    await journal.append(marker(RECORD_FLAG.TRIM, 6, 5));
    await journal.append(record(6, Buffer.alloc(200, 6))); // wraps: [8192, 8448)
    assert.equal(journal.pointerMoves, 1);
    await journal.close();
    const parsed = parseJournal(await readFile(path));
    assert.equal(parsed.ring?.head, 8448, `${kind}: reading stops at the head`);
    assert.deepEqual(users(parsed.records).map((r) => r.seq), [6], `${kind}: record 6 and nothing else`);
    assert.deepEqual([parsed.ring?.trimmedTo, parsed.ring?.epoch, parsed.validAfter], [5, 0, undefined], kind);
  }
});

test('a ring holding more than it can of records not trimmed is rewritten into a bigger ring, every record kept; a rewrite that finds the file damaged refuses, which fences it until replace()', async (t) => {
  const dir = await tempDir(t, 'memstrata-ring-');
  const path = join(dir, 'j.journal');
  const journal = await JournalFile.create(path, 1024, { ring: 8192 });
  const rec = (seq: number) => record(seq, Buffer.alloc(500, seq & 0xff));
  for (let seq = 1; seq <= 40; seq++) await journal.append(rec(seq)); // 40 x 556 bytes: more than the 8 KiB ring
  assert.ok(journal.rewrites >= 1, 'rewritten into a bigger ring');
  assert.ok(journal.capacity > 8192);
  assert.deepEqual(users(parseJournal(await readFile(path)).records).map((r) => r.seq), Array.from({ length: 40 }, (_, i) => i + 1));
  // Damage a record the next rewrite must copy (as a failing disk might).
  const image = await readFile(path);
  const at = RING_START + 556 * 3 + 100;
  image[at] = (image[at] ?? 0) ^ 0xff;
  await writeFile(path, image);
  let seq = 41;
  let refused: unknown;
  while (refused === undefined && seq < 2000) await journal.append(rec(seq++)).catch((error: unknown) => { refused = error; });
  assert.match(String((refused as Error | undefined)?.message), /compaction found the file damaged/);
  await assert.rejects(journal.append(rec(seq)), { message: /fenced/ });
  await journal.replace(Buffer.concat([marker(RECORD_FLAG.TRIM, 50, 45), ...[46, 47, 48, 49].map(rec)]));
  await journal.append(rec(50));
  await journal.close();
  const parsed = parseJournal(await readFile(path));
  assert.equal(parsed.base.trimmedTo, 45);
  assert.deepEqual(users(parsed.records).map((r) => r.seq), [46, 47, 48, 49, 50]);
});

test('cut-journal drops what lies beyond the damage of a version 2 ring (a dry run changes nothing), and refuses when a pointer slot is damaged', async (t) => {
  const dir = await tempDir(t, 'memstrata-ring-');
  const path = join(dir, 'j.journal');
  const journal = await JournalFile.create(path, 1024, { ring: 8192 });
  for (let seq = 1; seq <= 8; seq++) await journal.append(record(seq, Buffer.alloc(300, seq)));
  await journal.close();
  // Record 5 lost (as a write the disk never made), 6 to 8 there: damage in the middle.
  const image = await readFile(path);
  image.fill(0, RING_START + 4 * 356, RING_START + 4 * 356 + 4);
  await writeFile(path, image);
  assert.equal(parseJournal(image).validAfter, RING_START + 5 * 356);
  assert.deepEqual(await cutJournal(path, true), { version: 2, kept: 4, lastSeq: 4, dropped: 3 });
  assert.ok((await readFile(path)).equals(image), 'a dry run changes nothing');
  // A damaged pointer slot: the records beyond may be the live ones.
  const slotted = Buffer.from(image);
  slotted.fill(0xaa, 8192, 8192 + 48);
  await writeFile(path, slotted);
  await assert.rejects(cutJournal(path), { code: 'MS_NVRAM_DAMAGED', message: /pointer slot is damaged/ });
  await writeFile(path, image);
  assert.deepEqual(await cutJournal(path), { version: 2, kept: 4, lastSeq: 4, dropped: 3 });
  const cut = parseJournal(await readFile(path));
  assert.equal(cut.validAfter, undefined);
  assert.deepEqual(users(cut.records).map((r) => r.seq), [1, 2, 3, 4]);
  // The writer goes on from there: numbers 5 on are handed out again.
  const again = await JournalFile.open(path, cut, 1024);
  await again.append(record(5, Buffer.from('new 5')));
  await again.close();
  assert.deepEqual(users(parseJournal(await readFile(path)).records).map((r) => [r.seq, r.payload.length]), [[1, 300], [2, 300], [3, 300], [4, 300], [5, 5]]);
});

test('a pointer slot gone bad is reported as damage, not read short: from a new file\'s first slot, which takes any number, records numbered lower beyond what was read are the live ones', async (t) => {
  // Review finding: slot B (the newest) gone bad sent reading to slot A {at 0, seq 0}; it
  // took the next lap's records there for the start, and the live records after them for
  // an earlier lap's: acknowledged records and the epoch lost without a word.
  const dir = await tempDir(t, 'memstrata-ring-');
  const path = join(dir, 'j.journal');
  const journal = await JournalFile.create(path, 1024, { ring: 8192 });
  await journal.append(marker(RECORD_FLAG.EPOCH, 1, 5));
  let seq = 1;
  while (journal.pointerMoves < 1 || journal.info().spanBytes < 6000) {
    await journal.append(record(seq, Buffer.alloc(700, seq & 0xff), 5));
    if (seq > 5) await journal.append(marker(RECORD_FLAG.TRIM, seq + 1, seq - 5));
    seq++;
  }
  await journal.close();
  const image = await readFile(path);
  const good = parseJournal(image);
  assert.equal(good.validAfter, undefined);
  assert.equal(good.ring?.pointer.gen, 2);
  image[8192 + 20] = (image[8192 + 20] ?? 0) ^ 0x01; // slot B: one bad bit
  await writeFile(path, image);
  const bad = parseJournal(image);
  assert.equal(bad.ring?.pointer.gen, 1, 'reading falls back to slot A');
  assert.ok(bad.validAfter !== undefined, `reported as damage (${bad.stoppedBecause ?? ''})`);
  await assert.rejects(cutJournal(path), { code: 'MS_NVRAM_DAMAGED', message: /pointer slot is damaged/ });
});

test('a torn record beyond what was read, its tag and header whole, is made unreadable before the writer goes on, so a later power cut cannot bring it back whole', async (t) => {
  // Review finding: only valid records beyond were zeroed; a torn one whose number came
  // back to the same place (so the same tag) could be reassembled by a second power cut.
  const dir = await tempDir(t, 'memstrata-ring-');
  const path = join(dir, 'j.journal');
  const journal = await JournalFile.create(path, 1024, { ring: 65536 });
  for (let seq = 1; seq <= 4; seq++) await journal.append(record(seq, Buffer.alloc(456, seq)));
  await journal.close();
  const image = await readFile(path);
  const at = RING_START + 3 * 512;
  image[at + 300] = (image[at + 300] ?? 0) ^ 0xff; // record 4's payload lost: torn
  await writeFile(path, image);
  const parsed = parseJournal(image);
  assert.deepEqual(users(parsed.records).map((r) => r.seq), [1, 2, 3]);
  assert.equal(parsed.validAfter, undefined, 'a torn tail, no damage');
  assert.deepEqual(parsed.ring?.ahead, [at]);
  const again = await JournalFile.open(path, parsed, 1024);
  await again.close();
  assert.equal((await readFile(path)).readUInt32BE(at), 0, 'its magic is zeroed');
});

test('version 1 journals still read, and a writer opening one rewrites it as version 2 with the same records, epoch and trim point; a damaged one is cut by cut-journal', async (t) => {
  const dir = await tempDir(t, 'memstrata-ring-');
  const path = join(dir, 'v1.journal');
  const fixture = await readFile(new URL('../../../../test/fixtures/journal/v1-local.journal', import.meta.url));
  await writeFile(path, fixture);
  const v1 = parseJournal(fixture);
  assert.equal(v1.version, 1);
  const journal = await JournalFile.open(path, v1, 1 << 20);
  await journal.append(record(4, Buffer.from('after'), 3));
  await journal.close();
  const image = await readFile(path);
  assert.ok(image.subarray(0, 8).equals(FILE_MAGIC));
  const v2 = parseJournal(image);
  assert.equal(v2.version, 2);
  const value = (flag: number) => Math.max(...v1.records.filter((r) => (r.flags & flag) !== 0).map((r) => Number(r.payload.readBigUInt64BE(0))));
  assert.deepEqual(v2.base, { epoch: value(RECORD_FLAG.EPOCH), trimmedTo: value(RECORD_FLAG.TRIM) }, 'the fixture\'s markers are in the pointer');
  const kept = users(v1.records).filter((r) => r.seq > value(RECORD_FLAG.TRIM)).map((r) => [r.seq, r.payload.toString()]);
  assert.ok(kept.length > 0);
  assert.deepEqual(users(v2.records).map((r) => [r.seq, r.payload.toString()]), [...kept, [4, 'after']], 'the records after the trim point, and the one appended');
  // A vault is still written as version 1.
  assert.equal(parseJournal(Buffer.concat([encodeFileHeader(1, 0), marker(RECORD_FLAG.EPOCH, 1, 7)])).version, 1);
  // A damaged version 1 file is cut where reading stops, as MS_NVRAM_DAMAGED says.
  const rec = (seq: number) => record(seq, Buffer.from(`r${seq}`));
  const bad = rec(3);
  bad[57] = (bad[57] ?? 0) ^ 0xff;
  const damaged = join(dir, 'damaged.journal');
  await writeFile(damaged, Buffer.concat([encodeFileHeader(1, 0), rec(1), rec(2), bad, rec(4)]));
  assert.ok(parseJournal(await readFile(damaged)).validAfter !== undefined);
  assert.deepEqual(await cutJournal(damaged), { version: 1, kept: 2, lastSeq: 2, dropped: 1 });
  const cut = parseJournal(await readFile(damaged));
  assert.equal(cut.validAfter, undefined);
  assert.deepEqual(users(cut.records).map((r) => r.seq), [1, 2]);
});
