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
import { DEFER_LIMIT, NvramDevice, type MirrorPort } from '../../../src/nvram/device.js';
import { stagingPool } from '../../../src/memory/buffer-pool.js';
import { FILE_MAGIC, JournalFile, parseJournal, type JournalSink } from '../../../src/nvram/journal-file.js';
import { RECORD_FLAG, decodeRecord } from '../../../src/protocol/journal/record.js';
import type { MirrorMode } from '../../../src/protocol/admin/api.js';
import { RuntimeError } from '../../../src/errors.js';
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
  /** Whether the sink offers writes in the caller's turn (JournalSink.writeSync), and how many it took. */
  private readonly now: boolean;
  writesNow: number;
  /** The next write in the caller's turn fails with EIO. */
  failNextWriteNow: boolean;
  /** While set, each fdatasync waits (its writes done) until released: `heldSyncs` lists the waiting ones. */
  holdSyncs: boolean;
  readonly heldSyncs: (() => void)[];

  constructor(path: string, now = true) {
    this.durable = readFileSync(path);
    this.pending = [];
    this.syncs = 0;
    this.now = now;
    this.writesNow = 0;
    this.failNextWriteNow = false;
    this.holdSyncs = false;
    this.heldSyncs = [];
  }

  readonly wrap = (sink: JournalSink): JournalSink => {
    const wrapped: JournalSink = {
      write: async (buf, position) => {
        await sink.write(buf, position);
        this.pending.push({ position, bytes: Buffer.from(buf) });
      },
      datasync: async () => {
        const covered = this.pending;
        this.pending = [];
        if (this.holdSyncs) await new Promise<void>((resolve) => { this.heldSyncs.push(resolve); });
        await sink.datasync();
        this.syncs++;
        for (const w of covered) {
          if (this.durable.length < w.position + w.bytes.length) this.durable = Buffer.concat([this.durable, Buffer.alloc(w.position + w.bytes.length - this.durable.length)]);
          w.bytes.copy(this.durable, w.position);
        }
      },
      close: () => sink.close(),
    };
    const now = sink.writeSync;
    if (this.now && now !== undefined) {
      wrapped.writeSync = (buf, position) => {
        if (this.failNextWriteNow) {
          this.failNextWriteNow = false;
          throw Object.assign(new Error('EIO: injected'), { code: 'EIO' });
        }
        now.call(sink, buf, position);
        this.pending.push({ position, bytes: Buffer.from(buf) });
        this.writesNow++;
      };
    }
    return wrapped;
  };
}

async function localDevice(path: string, policy: 'local' | 'mirrored' | 'mirrored+local' = 'local', size = SIZE, writeNow = true): Promise<{ device: NvramDevice; power: JournalPowerCut }> {
  const created = await JournalFile.create(path, size);
  await created.close();
  const power = new JournalPowerCut(path, writeNow);
  // A clock that never moves: writes in the appender's turn are never timed as slow (a loaded machine would make them so now and then).
  const journal = await JournalFile.open(path, parseJournal(power.durable), size, { wrap: power.wrap, clock: () => 0 });
  const medium = new DramMedium({ capacity: size, extentSize: E });
  await medium.open();
  const device = new NvramDevice({ name: 'wl', size, policy, medium, extents: Array.from({ length: size / E }, (_, i) => i * E), extentSize: E, journal });
  return { device, power };
}

/** The records of a buffer of records back to back, as [seq, payload]. */
function decodeAll(buf: Buffer): [number, string][] {
  const out: [number, string][] = [];
  for (let at = 0; at < buf.length; ) {
    const decoded = decodeRecord(buf, at);
    if (!('record' in decoded)) throw new Error('a record that does not decode');
    out.push([decoded.record.seq, decoded.record.payload.toString()]);
    at += decoded.size;
  }
  return out;
}

const userRecords = (image: Buffer): Map<number, string> =>
  new Map(parseJournal(image).records.filter((r) => (r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) === 0).map((r) => [r.seq, r.payload.toString()]));

test('appends without a sync (taken in the caller\'s turn by appendNow or not) survive a power cut once a later commit returned; synced appends at once; so does what the write-ahead barrier let through; commits, barriers and appends interleaved at random', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  let run = 0;
  let now = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.array(fc.constantFrom('lazy', 'lazy', 'now', 'now', 'synced', 'commit', 'commit', 'barrier'), { minLength: 1, maxLength: 6 }), { minLength: 1, maxLength: 8 }),
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
              if (op === 'barrier') {
                // WriteLogIo's write-ahead barrier before a destage: a commit only while
                // something is not covered by a sync. Looked at when the scheduler says,
                // in the middle of the round, and checked the moment it returns (a commit
                // later in the round must not hide it).
                await s.schedule(Promise.resolve(), 'barrier');
                const before = new Map(acked);
                if (device.uncommittedBytes > 0) await s.schedule(device.commit());
                const held = userRecords(power.durable);
                for (const [seq, payload] of before) {
                  assert.equal(held.get(seq), payload, `record ${seq} acknowledged before a write-ahead barrier that returned is not synced (uncommitted ${device.uncommittedBytes})`);
                  mustSurvive.set(seq, payload);
                }
                return;
              }
              const payload = `r${n++}`;
              if (op === 'now') {
                // Taken where every append before is acknowledged (else declined, nothing
                // taken, and appended the usual way): acknowledged in this turn.
                await s.schedule(Promise.resolve(), 'appendNow');
                const known = device.lastSeq;
                const [b] = device.appendNow(0, [{ payload: Buffer.from(payload) }]) ?? [];
                if (b !== undefined) {
                  now++;
                  assert.equal(b.seq, known + 1, 'the next number after every acknowledged one');
                  assert.equal(device.lastSeq, b.seq, 'readable at once');
                  acked.set(b.seq, payload);
                  return;
                }
              }
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
  assert.ok(now > 0, 'appendNow never took an append');
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

test('appendNow takes an append in the caller\'s turn only where append would acknowledge it without waiting: never behind an append in flight, on a failed, fenced, closed, full, recovering, file-less, replica or mirrored+local device, with a writer, or while the partner resyncs or is refused', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  const { device, power } = await localDevice(join(dir, 'now.journal'), 'local', 4 * E);
  const one = (payload: string) => [{ payload: Buffer.from(payload) }];
  // Taken: numbered after every acknowledged record, readable at once, not synced, and a commit makes it durable.
  await device.append(0, one('first'), { sync: false });
  const syncs = power.syncs;
  const [a] = device.appendNow(0, one('now')) ?? [];
  assert.equal(a?.seq, 2);
  assert.deepEqual(decodeAll(Buffer.concat(await device.read(2, 10))), [[2, 'now']]);
  assert.equal(power.syncs, syncs, 'no fdatasync');
  assert.ok(device.uncommittedBytes > 0, 'counted for the write-ahead barrier');
  await device.commit();
  assert.equal(userRecords(power.durable).get(2), 'now');
  // Behind an append not yet acknowledged (its number taken): declined, nothing taken.
  const pending = device.append(0, one('pending'), { sync: true });
  await new Promise((resolve) => setImmediate(resolve)); // it has taken its number
  assert.equal(device.canAppendNow(0, one('x')), false);
  assert.equal(device.appendNow(0, one('x')), undefined);
  await pending;
  assert.equal(device.lastSeq, 3, 'the declined append took no number');
  // An older or newer epoch, a writer, a record larger than the room left: declined.
  assert.equal(device.appendNow(1, one('x')), undefined, 'another epoch');
  assert.equal(device.appendNow(0, [{ payload: Buffer.from('x'), writer: { id: '0123456789abcdef', seq: 1 } }]), undefined, 'a writer');
  assert.equal(device.appendNow(0, [{ payload: Buffer.alloc(4 * E) }]), undefined, 'full');
  assert.equal(device.appendNow(0, []), undefined, 'nothing to append');
  // Fenced by a newer open: the old epoch is declined, the new one taken.
  await device.open(5);
  assert.equal(device.appendNow(0, one('x')), undefined, 'fenced');
  assert.ok(device.appendNow(5, one('new epoch')) !== undefined);
  // In a cluster, where the node does not own the device now: declined (append says why).
  device.owner = () => { throw new RuntimeError('MS_NVRAM_FENCED', 'not the owner'); };
  assert.equal(device.appendNow(5, one('x')), undefined, 'not owned');
  device.owner = undefined;
  await device.close();
  assert.equal(device.appendNow(5, one('x')), undefined, 'closed');
  // A mirrored+local device syncs every record; a mirrored one waits while resyncing or refused.
  const { device: both } = await localDevice(join(dir, 'both.journal'), 'mirrored+local');
  assert.equal(both.appendNow(0, one('x')), undefined, 'mirrored+local');
  await both.close();
  const { device: replica } = await localDevice(join(dir, 'replica.journal'), 'mirrored');
  replica.resetReplica(0, 0, 1);
  assert.equal(replica.appendNow(0, one('x')), undefined, 'a replica');
  await replica.close();
  // Recovering after a crash (waiting for its partner), or without its journal file.
  const { device: recovering } = await localDevice(join(dir, 'recovering.journal'), 'mirrored');
  recovering.recovering = true;
  assert.equal(recovering.appendNow(0, one('x')), undefined, 'recovering');
  recovering.recovering = false;
  await recovering.close();
  const medium = new DramMedium({ capacity: 4 * E, extentSize: E });
  await medium.open();
  const fileless = new NvramDevice({ name: 'nofile', size: 4 * E, policy: 'local', medium, extents: [0, E, 2 * E, 3 * E], extentSize: E, journal: undefined });
  assert.equal(fileless.appendNow(0, one('x')), undefined, 'no journal file');
  await fileless.close();
  const { device: mirrored } = await localDevice(join(dir, 'mirrored.journal'), 'mirrored');
  const partner = new FakePartner();
  mirrored.port = partner;
  for (const mode of ['syncing', 'refusing'] as const) {
    partner.state = mode;
    assert.equal(mirrored.appendNow(0, one('x')), undefined, mode);
  }
  partner.state = 'in-sync';
  const [m] = mirrored.appendNow(0, one('sent')) ?? [];
  assert.equal(m?.seq, 1, 'in sync: acknowledged while its send waits');
  assert.equal(partner.waiting.length, 1, 'sent at once');
  let committed = false;
  const commit = mirrored.commit().then(() => { committed = true; });
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(committed, false, 'a FLUSH waits for the partner to hold it');
  partner.answer('held');
  await commit;
  assert.equal(partner.held.get(1), 'sent');
  // A failed device (the partner could not hold a plain WRITE's record, acknowledged
  // already, nor etcd be told): every append acknowledged, yet declined until repaired,
  // then taken again (degraded: its record deferred to the journal here).
  const [plain] = await mirrored.append(0, one('plain'), { sync: false });
  partner.answer('failed');
  for (let i = 0; i < 3; i++) await Promise.resolve();
  assert.equal(mirrored.lastSeq, plain?.seq, 'every append acknowledged');
  assert.equal(mirrored.info().state, 'failed');
  assert.equal(mirrored.appendNow(0, one('x')), undefined, 'failed');
  await mirrored.commit(); // waits for the repair
  assert.ok(mirrored.appendNow(0, one('again')) !== undefined, 'taken again once repaired');
  await mirrored.close();
});

test('appendNow stages its record in a pooled buffer that goes back to the pool only once the deferred journal write has read it: the file holds the bytes each append carried', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  const path = join(dir, 'staged.journal');
  const created = await JournalFile.create(path, SIZE);
  const medium = new DramMedium({ capacity: SIZE, extentSize: E });
  await medium.open();
  const device = new NvramDevice({ name: 'wl', size: SIZE, policy: 'local', medium, extents: Array.from({ length: SIZE / E }, (_, i) => i * E), extentSize: E, journal: created, staging: stagingPool(1 << 20) });
  // Records of 5 KiB and more: a staging pool keeps buffers from 4 KiB up.
  for (let i = 1; i <= 20; i++) assert.ok(device.appendNow(0, [{ payload: Buffer.alloc(5000 + i, i) }]) !== undefined);
  // Appends through the ordinary path in between would reuse a buffer given back too soon.
  await Promise.all(Array.from({ length: 10 }, (_, i) => device.append(0, [{ payload: Buffer.alloc(5000, 100 + i) }], { sync: false })));
  await device.commit();
  await device.close();
  const held = parseJournal(readFileSync(path)).records.filter((r) => (r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) === 0);
  for (let i = 1; i <= 20; i++) {
    const r = held.find((x) => x.seq === i);
    assert.ok(r !== undefined && r.payload.length === 5000 + i && r.payload.every((b) => b === i), `record ${i} in the file is not what its append carried`);
  }
  assert.equal(held.length, 30);
});

test('a mirrored+local device does not defer: it syncs an append asked without sync (it comes back from a crash ready from its file)', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  const { device, power } = await localDevice(join(dir, 'ml.journal'), 'mirrored+local');
  const [a] = await device.append(0, [{ payload: Buffer.from('kept') }], { sync: false });
  assert.equal(userRecords(power.durable).get(a?.seq ?? 0), 'kept');
  assert.equal(device.uncommittedBytes, 0);
  await device.close();
});

/**
 * The partner of a `mirrored` device, as the device sees it through its MirrorPort: each
 * send is answered when `answer` says so, with what `outcome` picks: held (the partner's
 * copy gets the records), lost (the link went down: the device is to degrade and sync
 * here) or failed (say, etcd could not record the replica as out of date).
 */
class FakePartner implements MirrorPort {
  state: MirrorMode = 'in-sync';
  readonly held = new Map<number, string>();
  readonly waiting: { records: Buffer; resolve(holds: boolean): void; reject(error: Error): void }[] = [];

  mode(): MirrorMode {
    return this.state;
  }

  settled(): Promise<void> {
    return Promise.resolve();
  }

  append(_device: string, _epoch: number, records: Buffer): Promise<boolean> {
    return new Promise((resolve, reject) => { this.waiting.push({ records, resolve, reject }); });
  }

  /** Answers the oldest send still waiting. */
  answer(outcome: 'held' | 'lost' | 'failed'): void {
    const send = this.waiting.shift();
    if (send === undefined) return;
    if (outcome === 'held' && this.holding()) {
      for (const [seq, payload] of decodeAll(send.records)) this.held.set(seq, payload);
      send.resolve(true);
    } else if (outcome === 'failed') {
      this.state = 'degraded';
      send.reject(new RuntimeError('MS_NVRAM_PARTNER_DOWN', 'the partner does not hold the record and etcd could not be told'));
    } else {
      this.state = 'degraded';
      send.resolve(false);
    }
  }

  /** Whether an APPEND answered now lands in the partner's copy. */
  protected holding(): boolean {
    return this.state === 'in-sync';
  }

  epoch(): Promise<void> {
    return Promise.resolve();
  }

  trim(): void {}

  rolledBack(): void {
    // A resync would reset the replica; this partner stays out of reach instead.
    this.state = 'degraded';
  }

  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return fn();
  }
}

test('commits that overlap never count a record deferred after their syncs were asked for as synced: the write-ahead barrier still waits for it', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  const turns = async (n: number): Promise<void> => {
    for (let i = 0; i < n; i++) await new Promise((resolve) => setImmediate(resolve));
  };
  // Bounded by time, not by turns: the batch's write goes through the thread pool first,
  // which on a loaded machine takes more than a thousand turns (2-4 ms) now and then.
  const syncHeld = async (power: JournalPowerCut, n: number): Promise<void> => {
    const deadline = Date.now() + 20_000;
    while (power.heldSyncs.length < n) {
      if (Date.now() > deadline) throw new Error(`the journal never synced (${power.heldSyncs.length} of ${n} held, ${power.syncs} done)`);
      await turns(1);
    }
  };
  // A local device (a mirrored one whose partner is not in sync defers, and counts, the same way).
  const { device, power } = await localDevice(join(dir, 'local.journal'));
  // The write-ahead barrier as WriteLogIo installs it.
  const barrier = (): Promise<void> => (device.uncommittedBytes > 0 ? device.commit() : Promise.resolve());
  const append = async (payload: string): Promise<number> => {
    const [a] = await device.append(0, [{ payload: Buffer.from(payload) }], { sync: false });
    assert.ok(a !== undefined);
    return a.seq;
  };
  // The file's first batch preallocates (a sync of its own): out of the way first.
  await append('warm-up');
  await device.commit();
  power.holdSyncs = true;
  await append('a');
  const first = device.commit(); // its sync covers a
  await syncHeld(power, 1);
  await append('b'); // queued behind the first sync
  const second = device.commit(); // its sync covers a and b
  await turns(5);
  power.heldSyncs.shift()?.();
  await first;
  await syncHeld(power, 1); // the second sync's batch (b) is written and its sync asked for
  const c = await append('c'); // after it: no sync yet covers c
  power.heldSyncs.shift()?.();
  await second;
  power.holdSyncs = false;
  assert.ok(device.uncommittedBytes > 0, `record ${c} is in no synced batch, yet nothing counts as uncommitted`);
  await barrier();
  assert.equal(userRecords(power.durable).get(c), 'c', `the barrier returned with record ${c} not synced`);
  await device.close();
});

/**
 * A power cut as JournalPowerCut models it, over every file the journal opens (a repair
 * or compaction writes a new file and renames it over the old one), with faults: the
 * next write or fdatasync fails with EIO, and a failed fdatasync forgets the writes it
 * was to cover (the kernel may drop pages it could not write). A new file's image counts
 * once its own fdatasync returns (the journal renames it and syncs the directory before
 * anything waiting on it returns).
 */
class FaultyPowerCut {
  durable: Buffer;
  failNextWrite: boolean;
  failNextSync: boolean;

  constructor(path: string) {
    this.durable = readFileSync(path);
    this.failNextWrite = false;
    this.failNextSync = false;
  }

  readonly wrap = (sink: JournalSink): JournalSink => {
    let pending: { position: number; bytes: Buffer }[] = [];
    let image: Buffer | undefined;
    const eio = (what: string): Error => Object.assign(new Error(`EIO: injected ${what}`), { code: 'EIO' });
    return {
      write: async (buf, position) => {
        if (this.failNextWrite) {
          this.failNextWrite = false;
          throw eio('write');
        }
        await sink.write(buf, position);
        if (position === 0 && buf.subarray(0, FILE_MAGIC.length).equals(FILE_MAGIC)) image = Buffer.from(buf);
        else pending.push({ position, bytes: Buffer.from(buf) });
      },
      datasync: async () => {
        const covered = pending;
        pending = [];
        if (this.failNextSync) {
          this.failNextSync = false;
          throw eio('fdatasync');
        }
        await sink.datasync();
        if (image !== undefined) this.durable = image;
        image = undefined;
        for (const w of covered) {
          if (this.durable.length < w.position + w.bytes.length) this.durable = Buffer.concat([this.durable, Buffer.alloc(w.position + w.bytes.length - this.durable.length)]);
          w.bytes.copy(this.durable, w.position);
        }
      },
      close: () => sink.close(),
    };
  };
}

test('a local write log under journal faults (EIO on a write or an fdatasync that then forgets its writes) among commits, write-ahead barriers and appends at moments the scheduler picks: what a commit or barrier that returned covers is durable the moment it returns, a synced append the moment it is acknowledged, and no acknowledged record leaves the device', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  let run = 0;
  let faults = 0;
  let repaired = 0;
  // Settles, as the scheduler picks, with what `p` settled with.
  const settled = async <T>(s: fc.Scheduler, p: Promise<T>, label: string): Promise<T> => {
    const r = await s.schedule(p.then((value) => ({ value }), (error: unknown) => ({ error })), label);
    if ('error' in r) throw r.error;
    return r.value;
  };
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.array(fc.tuple(fc.constantFrom('lazy', 'lazy', 'now', 'now', 'synced', 'commit', 'commit', 'barrier', 'barrier', 'fail-sync', 'fail-write'), fc.boolean()), { minLength: 1, maxLength: 8 }), { minLength: 1, maxLength: 6 }),
      fc.scheduler(),
      async (rounds, s) => {
        const path = join(dir, `f${run++}.journal`);
        const created = await JournalFile.create(path, SIZE);
        await created.close();
        const power = new FaultyPowerCut(path);
        const journal = await JournalFile.open(path, parseJournal(power.durable), SIZE, { wrap: power.wrap, clock: () => 0 });
        const medium = new DramMedium({ capacity: SIZE, extentSize: E });
        await medium.open();
        const device = new NvramDevice({ name: 'wl', size: SIZE, policy: 'local', medium, extents: Array.from({ length: SIZE / E }, (_, i) => i * E), extentSize: E, journal });
        const acked = new Map<number, string>();
        let n = 0;
        try {
          for (const round of rounds) {
            const ops = round.map(async ([op, late]) => {
              // Some start with the round, others when the scheduler says.
              if (late) await s.schedule(Promise.resolve(), op);
              if (op === 'fail-sync' || op === 'fail-write') {
                if (op === 'fail-sync') power.failNextSync = true;
                else power.failNextWrite = true;
                faults++;
                return;
              }
              if (op === 'commit' || op === 'barrier') {
                const before = new Map(acked);
                try {
                  if (op === 'commit' || device.uncommittedBytes > 0) await settled(s, device.commit(), `${op} returns`);
                } catch {
                  return; // a FLUSH that failed promises nothing
                }
                const held = userRecords(power.durable);
                for (const [seq, payload] of before) assert.equal(held.get(seq), payload, `record ${seq} acknowledged before a ${op} that returned is not durable (uncommitted ${device.uncommittedBytes})`);
                return;
              }
              const payload = `r${n++}`;
              if (op === 'now') {
                const [b] = device.appendNow(0, [{ payload: Buffer.from(payload) }]) ?? [];
                if (b !== undefined) {
                  acked.set(b.seq, payload);
                  return;
                }
              }
              let a;
              try {
                [a] = await settled(s, device.append(0, [{ payload: Buffer.from(payload) }], { sync: op === 'synced' }), `${op} acknowledged`);
              } catch {
                return; // refused or failed: not acknowledged
              }
              assert.ok(a !== undefined);
              acked.set(a.seq, payload);
              if (op === 'synced') assert.equal(userRecords(power.durable).get(a.seq), payload, `synced record ${a.seq} acknowledged, not durable`);
            });
            await s.waitFor(Promise.all(ops));
          }
          power.failNextSync = false;
          power.failNextWrite = false;
          await device.quiesce();
          repaired += device.info().journal?.rewrites ?? 0;
          const kept = new Map((await device.read(1, 10_000)).flatMap((b) => decodeAll(b)));
          for (const [seq, payload] of acked) assert.equal(kept.get(seq), payload, `acknowledged record ${seq} is gone from the device`);
        } finally {
          power.failNextSync = false;
          power.failNextWrite = false;
          await device.close().catch(() => undefined);
        }
      },
    ),
    { numRuns: 150 },
  );
  assert.ok(faults > 0 && repaired > 0, `faults injected ${faults}, journals rewritten by a repair ${repaired}`);
});

test('a mirrored write log: a plain WRITE is acknowledged before the partner answers, a FLUSH waits for the partner to hold it', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  const { device, power } = await localDevice(join(dir, 'm.journal'), 'mirrored');
  const partner = new FakePartner();
  device.port = partner;
  const [a] = await device.append(0, [{ payload: Buffer.from('one') }], { sync: false });
  assert.equal(a?.seq, 1, 'acknowledged while its send to the partner waits');
  assert.equal(partner.waiting.length, 1, 'sent at once');
  assert.ok(device.uncommittedBytes > 0);
  let committed = false;
  const commit = device.commit().then(() => { committed = true; });
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(committed, false, 'the FLUSH waits for the partner');
  partner.answer('held');
  await commit;
  assert.equal(partner.held.get(1), 'one');
  assert.equal(device.uncommittedBytes, 0);
  assert.equal(power.syncs, 0, 'in sync, a FLUSH costs no fdatasync');
  // A FUA write waits for the partner itself.
  let fua = false;
  const synced = device.append(0, [{ payload: Buffer.from('two') }], { sync: true }).then(() => { fua = true; });
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(fua, false, 'a FUA write waits for the partner');
  partner.answer('held');
  await synced;
  await device.close();
});

test('a mirrored write log writes each record to its journal file in the appender\'s turn while the journal\'s writer is idle: the record is in the file (the OS\'s cache, which a kill -9 keeps) when its WRITE is acknowledged, with no trip through the thread pool', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  const path = join(dir, 'm.journal');
  const { device, power } = await localDevice(path, 'mirrored');
  const partner = new FakePartner();
  device.port = partner;
  // The first append has the writer put zeros ahead of the head (its first lap): let it finish.
  await device.append(0, [{ payload: Buffer.from('first') }], { sync: false });
  partner.answer('held');
  await device.syncJournal();
  const syncs = power.syncs;
  for (let i = 0; i < 20; i++) {
    const before = power.writesNow;
    const [a] = await device.append(0, [{ payload: Buffer.from(`w${i}`) }], { sync: false });
    assert.equal(power.writesNow, before + 1, 'written in the appender\'s turn');
    assert.equal(userRecords(readFileSync(path)).get(a?.seq ?? 0), `w${i}`, `record ${a?.seq ?? 0} is in the file when acknowledged`);
    partner.answer('held');
  }
  await device.commit();
  assert.equal(power.syncs, syncs, 'in sync, neither the appends nor the FLUSH cost an fdatasync');
  await device.close();
});

test('closing a mirrored device syncs its journal and waits for nothing else: not for a resync under way, which may wait for the device manager the close runs under, whether the device is well or failed', async (t) => {
  // Review finding: close ran a commit, which waits while the partner is being resynced;
  // DeviceManager.remove closes under its lock, which such a resync may need (a demotion).
  const dir = await tempDir(t, 'memstrata-commit-');
  for (const failed of [false, true]) {
    const path = join(dir, `m-${failed}.journal`);
    const { device, power } = await localDevice(path, 'mirrored');
    const partner = new FakePartner();
    device.port = partner;
    const [a] = await device.append(0, [{ payload: Buffer.from('kept') }], { sync: false });
    partner.answer('held');
    await device.commit();
    await device.syncJournal(); // the first lap's zeros written: the journal's writer is idle
    let b: { seq: number } | undefined;
    if (failed) {
      // Its journal write fails: the device has failed, and a repair is due.
      power.failNextWriteNow = true;
      [b] = await device.append(0, [{ payload: Buffer.from('also kept') }], { sync: false });
      assert.equal(power.failNextWriteNow, false, 'the write in the appender\'s turn failed');
      partner.answer('held');
    }
    // A resync is under way while the device closes. Waiting for it would hang (it may wait
    // for the device manager this close runs under); here the resync ends as soon as
    // someone waits for it, and the test notes that someone did.
    let syncing = true;
    let waitedForResync = false;
    partner.mode = () => (syncing ? 'syncing' : 'in-sync');
    partner.settled = () => {
      waitedForResync = true;
      syncing = false;
      return Promise.resolve();
    };
    await device.close();
    assert.equal(waitedForResync, false, `close of ${failed ? 'a failed device' : 'a device in sync'} waited for the resync`);
    const held = userRecords(readFileSync(path));
    assert.equal(held.get(a?.seq ?? 0), 'kept', 'the journal holds the acknowledged record');
    if (b !== undefined) assert.equal(held.get(b.seq), 'also kept', 'the repair rewrote the journal with the record whose write failed');
  }
});

/**
 * A partner closer to Mirroring: a lost link degrades (sends answer false), `resync`
 * brings it back (quiesce, sync the journal, RESET, push every acknowledged record), a
 * repair's rolledBack puts it out of sync until the next resync, and the partner may die
 * for good (its memory gone).
 */
class ModelPartner extends FakePartner {
  /** Dead from the moment die() begins: a resync under way then does not bring it back. */
  private dying = false;
  dead = false;
  private syncing: Promise<void> | undefined;
  private readonly device: NvramDevice;

  constructor(device: NvramDevice) {
    super();
    this.device = device;
  }

  override mode(): MirrorMode {
    return this.syncing !== undefined ? 'syncing' : this.state;
  }

  override settled(): Promise<void> {
    return this.syncing ?? Promise.resolve();
  }

  override append(device: string, epoch: number, records: Buffer): Promise<boolean> {
    if (this.state !== 'in-sync' || this.syncing !== undefined) return Promise.resolve(false);
    return super.append(device, epoch, records);
  }

  protected override holding(): boolean {
    return super.holding() && !this.dead;
  }

  /**
   * The partner dies and the node notices (as Mirroring.lostPartner does: its link is
   * down, the journal synced here); then the partner's memory is gone. A death the node
   * has not noticed yet, together with a crash here, loses what only the partner held:
   * not promised (docs/guarantees.md).
   */
  async die(): Promise<void> {
    this.dying = true;
    this.state = 'degraded';
    while (this.waiting.length > 0) this.answer('lost');
    await this.device.syncJournal();
    this.dead = true;
  }

  resync(): Promise<void> {
    if (this.dying || this.syncing !== undefined || this.state === 'in-sync') return Promise.resolve();
    const run = (async () => {
      await this.device.quiesce();
      await this.device.syncJournal();
      this.held.clear();
      for (const b of await this.device.collect(0, 1e9, 1e12)) for (const [seq, payload] of decodeAll(b)) this.held.set(seq, payload);
      // A partner that died while it resynced stays lost.
      if (!this.dying) this.state = 'in-sync';
    })().finally(() => { this.syncing = undefined; });
    this.syncing = run;
    return run.catch(() => undefined);
  }

  override rolledBack(): void {
    if (this.syncing === undefined) this.state = 'degraded';
  }
}

test('a mirrored write log under a partner that holds, drops or fails each send, resyncs and dies, at moments the scheduler picks: every record acknowledged before a FLUSH that returned (by appendNow in the caller\'s turn or not) is on the partner or synced here (here, if the partner died first), the write-ahead barrier lets nothing through that is on neither, and no acknowledged record is voided', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  let run = 0;
  let now = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.array(fc.constantFrom('lazy', 'lazy', 'now', 'now', 'synced', 'commit', 'barrier', 'held', 'held', 'held', 'lost', 'failed', 'resync', 'resync', 'die'), { minLength: 1, maxLength: 8 }), { minLength: 1, maxLength: 6 }),
      fc.scheduler(),
      // Whether the journal may write in the appender's turn (JournalFile's writeNow) or only through its writer.
      fc.boolean(),
      async (rounds, s, writeNow) => {
        const { device, power } = await localDevice(join(dir, `m${run++}.journal`), 'mirrored', SIZE, writeNow);
        const partner = new ModelPartner(device);
        device.port = partner;
        const acked = new Map<number, string>();
        let n = 0;
        const onPartner = (seq: number, payload: string): boolean => !partner.dead && partner.held.get(seq) === payload;
        const synced = (seq: number, payload: string): boolean => userRecords(power.durable).get(seq) === payload;
        try {
          for (const round of rounds) {
            const ops = round.map(async (op) => {
              // The scheduler picks when each operation starts and each answer comes; an
              // append or a FLUSH then waits for those answers.
              await s.schedule(Promise.resolve());
              if (op === 'held' || op === 'lost' || op === 'failed') {
                partner.answer(op);
                return;
              }
              if (op === 'die') {
                await partner.die();
                return;
              }
              if (op === 'resync') {
                await partner.resync();
                return;
              }
              if (op === 'barrier' || op === 'commit') {
                // 'barrier' is WriteLogIo's write-ahead barrier before a destage.
                const before = new Map(acked);
                const deadBefore = partner.dead;
                try {
                  if (op === 'commit' || device.uncommittedBytes > 0) await device.commit();
                } catch {
                  return; // a FLUSH that failed promises nothing
                }
                for (const [seq, payload] of before) {
                  assert.ok(onPartner(seq, payload) || synced(seq, payload), `record ${seq} (${payload}) acknowledged before a ${op} that returned is on neither node`);
                  if (op === 'commit' && deadBefore) assert.ok(synced(seq, payload), `record ${seq}: the FLUSH returned after the partner died, yet it is not synced here`);
                }
                return;
              }
              const payload = `r${n++}`;
              if (op === 'now') {
                const [b] = device.appendNow(0, [{ payload: Buffer.from(payload) }]) ?? [];
                if (b !== undefined) {
                  now++;
                  acked.set(b.seq, payload);
                  return;
                }
              }
              let a;
              try {
                [a] = await device.append(0, [{ payload: Buffer.from(payload) }], { sync: op === 'synced' });
              } catch {
                return; // refused (an earlier append failed): not acknowledged
              }
              assert.ok(a !== undefined);
              acked.set(a.seq, payload);
              if (op === 'synced') assert.ok(onPartner(a.seq, payload) || synced(a.seq, payload), `FUA record ${a.seq} acknowledged on neither node`);
            });
            // Sends nobody answers in this round are held in turn, at moments the scheduler
            // picks, so that a FLUSH waiting for them returns.
            let over = false;
            const all = Promise.all(ops).finally(() => { over = true; });
            const drain = (async () => {
              for (let i = 0; !over; i++) {
                if (i > 10_000) throw new Error('the round never ends');
                await s.schedule(new Promise((resolve) => setImmediate(resolve)));
                partner.answer('held');
              }
            })();
            await s.waitFor(all);
            await s.waitFor(drain);
          }
          while (partner.waiting.length > 0) partner.answer('held');
          await device.quiesce();
          // Every acknowledged record is still the device's, never voided by a repair, and
          // the numbers run without a gap.
          const kept = new Map((await device.read(1, 10_000)).flatMap((b) => decodeAll(b)));
          for (const [seq, payload] of acked) assert.equal(kept.get(seq), payload, `acknowledged record ${seq} is gone from the device`);
          const seqs = [...kept.keys()].sort((x, y) => x - y);
          for (let i = 1; i < seqs.length; i++) assert.equal(seqs[i], (seqs[i - 1] ?? 0) + 1, 'sequence numbers without a gap');
        } finally {
          while (partner.waiting.length > 0) partner.answer('held');
          await device.close().catch(() => undefined);
        }
      },
    ),
    { numRuns: 150 },
  );
  assert.ok(now > 0, 'appendNow never took an append');
});

test('a mirrored write log: while a failed send is being repaired, its record still counts as uncommitted, so the write-ahead barrier waits for it to be synced here', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  const { device, power } = await localDevice(join(dir, 'm.journal'), 'mirrored');
  const partner = new FakePartner();
  device.port = partner;
  // The barrier as WriteLogIo installs it.
  const barrier = (): Promise<void> => (device.uncommittedBytes > 0 ? device.commit() : Promise.resolve());
  const [plain] = await device.append(0, [{ payload: Buffer.from('plain') }], { sync: false });
  // A FUA write after it, its send still on its way: the repair waits for it.
  const fua = device.append(0, [{ payload: Buffer.from('fua') }], { sync: true });
  fua.catch(() => undefined);
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(partner.waiting.length, 2);
  partner.answer('failed'); // the plain WRITE's send fails (refuse, or etcd cannot be told)
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
  let passed = false;
  const gate = barrier().then(() => { passed = true; });
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
  assert.equal(passed, false, `the barrier let the destage through (uncommittedBytes ${device.uncommittedBytes}) while record ${plain?.seq} is on neither node`);
  partner.answer('held');
  await fua.catch(() => undefined);
  await gate;
  assert.equal(userRecords(power.durable).get(plain?.seq ?? -1), 'plain', 'the barrier returned once the record was synced here');
  await device.close();
});

test('a mirrored write log bounds what waits for the partner: past DEFER_LIMIT bytes, a plain WRITE waits for the partner like a FUA write', async (t) => {
  const dir = await tempDir(t, 'memstrata-commit-');
  const { device } = await localDevice(join(dir, 'm.journal'), 'mirrored', 2 * DEFER_LIMIT);
  const partner = new FakePartner();
  device.port = partner;
  const piece = Buffer.alloc(256 * 1024, 7);
  let n = 0;
  while (device.uncommittedBytes <= DEFER_LIMIT) {
    await device.append(0, [{ payload: piece }], { sync: false });
    n++;
  }
  assert.equal(partner.waiting.length, n, 'every record sent, none answered');
  assert.equal(device.appendNow(0, [{ payload: piece }]), undefined, 'over the bound, none is taken in the caller\'s turn');
  let acknowledged = false;
  const next = device.append(0, [{ payload: piece }], { sync: false }).then(() => { acknowledged = true; });
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
  assert.equal(acknowledged, false, 'over the bound, the WRITE waits for the partner');
  while (partner.waiting.length > 0) {
    partner.answer('held');
    await new Promise((resolve) => setImmediate(resolve));
  }
  await next;
  assert.equal(device.uncommittedBytes, 0);
  await device.close();
});
