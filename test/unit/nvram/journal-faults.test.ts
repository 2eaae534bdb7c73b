// An NVRAM device over a journal file whose writes and syncs fail (EIO, ENOSPC, short
// writes) while appends are in flight (issue 11, item 1). What must hold whatever fails:
// an acknowledged record is never lost (in memory, in the file as a crash would find it,
// after a restart from that file); no sequence number is handed out twice; a failed
// append gets an error and its number becomes a void record, never another record's;
// the device repairs itself (file rewritten from memory) and serves again.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import { NvramDevice, type MirrorPort } from '../../../src/nvram/device.js';
import { JournalFile, parseJournal } from '../../../src/nvram/journal-file.js';
import { RECORD_FLAG, decodeOne, type JournalRecord } from '../../../src/protocol/journal/record.js';
import type { MirrorMode } from '../../../src/protocol/admin/api.js';
import { FaultPlan, faultyJournal, type FaultKind } from '../../support/faults.js';

const E = 64 * 1024;
const SIZE = 4 * E;
const SOAK = process.env.MEMSTRATA_SOAK === '1';

async function medium(): Promise<DramMedium> {
  const m = new DramMedium({ capacity: SIZE, extentSize: E });
  await m.open();
  return m;
}

async function device(path: string, plan: FaultPlan, policy: 'local' | 'mirrored+local' = 'local'): Promise<NvramDevice> {
  const journal = await JournalFile.create(path, SIZE, { wrap: faultyJournal(plan) });
  return new NvramDevice({ name: 'j', size: SIZE, policy, medium: await medium(), extents: [0, E, 2 * E, 3 * E], extentSize: E, journal });
}

const userRecords = (records: readonly JournalRecord[]): JournalRecord[] => records.filter((r) => (r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) === 0);

const isVoid = (r: JournalRecord): boolean => (r.flags & RECORD_FLAG.VOID) !== 0;

/** Takes note of a round's appends: each number acknowledged once, each refusal an MS_MEDIUM_IO. */
function noteAcked(results: readonly PromiseSettledResult<{ seq: number; payload: string }>[], acked: Map<number, string>): void {
  for (const r of results) {
    if (r.status === 'fulfilled') {
      assert.ok(!acked.has(r.value.seq), `sequence number ${r.value.seq} acknowledged twice`);
      acked.set(r.value.seq, r.value.payload);
    } else {
      assert.equal((r.reason as { code?: string }).code, 'MS_MEDIUM_IO', String(r.reason));
    }
  }
}

test('journal faults under concurrent appends: no acknowledged record lost, no number used twice, failed numbers void, the device repairs itself', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-jfaults-'));
  try {
    let run = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.record({
            batch: fc.integer({ min: 1, max: 6 }),
            fault: fc.option(
              fc.record({
                op: fc.constantFrom('journal.write', 'journal.datasync'),
                fault: fc.constantFrom<FaultKind>('EIO', 'ENOSPC', 'short'),
                from: fc.integer({ min: 1, max: 3 }),
                count: fc.integer({ min: 1, max: 2 }),
              }),
              { nil: undefined },
            ),
          }),
          { minLength: 1, maxLength: 8 },
        ),
        fc.integer({ min: 1, max: 40 }),
        async (rounds, crashAt) => {
          const path = join(dir, `j${run++}.journal`);
          const plan = new FaultPlan();
          const dev = await device(path, plan);
          const acked = new Map<number, string>();
          let n = 0;
          // A kill -9 at a random moment: at the crashAt-th write or sync of the journal,
          // with appends in flight, what the file holds (the page cache survives a kill)
          // and what had been acknowledged by then.
          let calls = 0;
          let crash: { image: Buffer; acked: Map<number, string> } | undefined;
          plan.gate = (op) => {
            if (crash === undefined && op.startsWith('journal.') && ++calls === crashAt) crash = { image: readFileSync(path), acked: new Map(acked) };
            return undefined;
          };
          for (const round of rounds) {
            if (round.fault !== undefined) plan.fail(round.fault);
            const results = await Promise.allSettled(
              Array.from({ length: round.batch }, async () => {
                const payload = `p${n++}`;
                const [appended] = await dev.append(0, [{ payload: Buffer.from(payload) }]);
                return { seq: appended?.seq ?? 0, payload };
              }),
            );
            noteAcked(results, acked);
            // The file as a crash would find it now holds every acknowledged record.
            const onDisk = new Map(userRecords(parseJournal(await readFile(path)).records).map((r) => [r.seq, r]));
            for (const [seq, payload] of acked) assert.equal(onDisk.get(seq)?.payload.toString(), payload, `acknowledged record ${seq} missing from the file`);
          }
          plan.heal();
          const [final] = await dev.append(0, [{ payload: Buffer.from('final') }]);
          const last = final?.seq ?? 0;
          assert.ok(!acked.has(last) && last > Math.max(0, ...acked.keys()));
          acked.set(last, 'final');
          // Every number up to the last is either an acknowledged record or void.
          const check = (records: readonly JournalRecord[], where: string): void => {
            assert.deepEqual(records.map((r) => r.seq), Array.from({ length: last }, (_, i) => i + 1), `${where}: numbers 1 to ${last}, each once`);
            for (const r of records) {
              const payload = acked.get(r.seq);
              if (payload !== undefined) assert.equal(r.payload.toString(), payload, `${where}: record ${r.seq}`);
              else assert.ok(isVoid(r) && r.payload.length === 0 && r.target === undefined, `${where}: record ${r.seq} was never acknowledged, so it must be void`);
            }
          };
          check((await dev.read(0, 100_000)).map((b) => decodeOne(b)), 'memory');
          await dev.close();
          if (crash !== undefined) {
            // The restart after that kill: every record acknowledged by then, intact; nothing
            // damaged in the middle (a kill tears at most the tail); numbers go on after them.
            const atCrash = parseJournal(crash.image);
            assert.equal(atCrash.validAfter, undefined, `a kill at call ${crashAt} looks like damage: ${atCrash.stoppedBecause ?? ''}`);
            const held = new Map(userRecords(atCrash.records).map((r) => [r.seq, r.payload.toString()]));
            for (const [seq, payload] of crash.acked) assert.equal(held.get(seq), payload, `record ${seq}, acknowledged before the kill at call ${crashAt}, lost`);
            const next = Math.max(0, ...userRecords(atCrash.records).map((r) => r.seq)) + 1;
            assert.ok(next > Math.max(0, ...crash.acked.keys()), 'no acknowledged number handed out again after the kill');
          }
          // A restart from the file alone gives the same, and goes on with a new number.
          const recovered = parseJournal(await readFile(path));
          assert.equal(recovered.stoppedBecause, undefined);
          check(userRecords(recovered.records), 'file');
          // Only the numbering is checked here: a device without a file (volatile) will do.
          const again = new NvramDevice({ name: 'j', size: SIZE, policy: 'volatile', medium: await medium(), extents: [0, E, 2 * E, 3 * E], extentSize: E, journal: undefined });
          await again.restore(recovered.records);
          const [next] = await again.append(0, [{ payload: Buffer.from('next') }]);
          assert.equal(next?.seq, last + 1);
          await again.close();
          await rm(path, { force: true });
        },
      ),
      { numRuns: SOAK ? 2000 : 60 },
    );
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('mirrored, in sync: journal writes in the appender\'s turn (writeSync) or the writer\'s that fail (EIO, ENOSPC, short) lose no acknowledged record; the device rewrites the file from memory, which then holds every acknowledged record; a kill at any journal call finds no damage', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-jfaults-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  let run = 0;
  let injectedNow = 0;
  const always: MirrorPort = { mode: () => 'in-sync', settled: () => Promise.resolve(), append: () => Promise.resolve(true), epoch: () => Promise.resolve(), trim: () => undefined, rolledBack: () => undefined, exclusive: (fn) => fn() };
  await fc.assert(
    fc.asyncProperty(
      fc.array(
        fc.record({
          // Each append synced (a FUA write: it waits for the partner) or not (a plain WRITE).
          batch: fc.array(fc.boolean(), { minLength: 1, maxLength: 6 }),
          fault: fc.option(
            fc.record({
              op: fc.constantFrom('journal.writeSync', 'journal.writeSync', 'journal.write', 'journal.datasync'),
              fault: fc.constantFrom<FaultKind>('EIO', 'ENOSPC', 'short'),
              from: fc.integer({ min: 1, max: 3 }),
              count: fc.integer({ min: 1, max: 2 }),
            }),
            { nil: undefined },
          ),
          commit: fc.boolean(),
        }),
        { minLength: 1, maxLength: 8 },
      ),
      fc.integer({ min: 1, max: 40 }),
      async (rounds, crashAt) => {
        const path = join(dir, `m${run++}.journal`);
        const plan = new FaultPlan();
        // A clock that never moves: writes in the appender's turn are never declined as slow.
        const journal = await JournalFile.create(path, SIZE, { wrap: faultyJournal(plan, 'journal', { writeSync: true }), clock: () => 0 });
        const dev = new NvramDevice({ name: 'j', size: SIZE, policy: 'mirrored', medium: await medium(), extents: [0, E, 2 * E, 3 * E], extentSize: E, journal });
        dev.port = always;
        const sent = new Set<string>(['warm']);
        const acked = new Map<number, string>();
        // The first lap's zeros ahead of the head written (the writer's work, which takes it
        // a while): from here on an append finds the writer idle unless a fault, a repair or
        // a batch of the round keeps it busy.
        const [warm] = await dev.append(0, [{ payload: Buffer.from('warm') }], { sync: false });
        acked.set(warm?.seq ?? 0, 'warm');
        await dev.syncJournal();
        let n = 0;
        // A kill -9 at the crashAt-th call on the journal (a write in the appender's turn included): what the file holds then.
        let calls = 0;
        let crash: Buffer | undefined;
        plan.gate = () => {
          if (crash === undefined && ++calls === crashAt) crash = readFileSync(path);
          return undefined;
        };
        for (const round of rounds) {
          if (round.fault !== undefined) plan.fail(round.fault);
          const results = await Promise.allSettled(
            round.batch.map(async (sync) => {
              const payload = `p${n++}`;
              sent.add(payload);
              const [appended] = await dev.append(0, [{ payload: Buffer.from(payload) }], { sync });
              return { seq: appended?.seq ?? 0, payload };
            }),
          );
          noteAcked(results, acked);
          if (round.commit) await dev.commit().catch(() => undefined);
        }
        injectedNow += plan.injectedInto('journal.writeSync');
        plan.heal();
        await dev.commit(); // waits for a repair under way, or runs one
        const memory = (await dev.read(0, 100_000)).map((b) => decodeOne(b));
        for (const [seq, payload] of acked) assert.equal(memory.find((r) => r.seq === seq)?.payload.toString(), payload, `acknowledged record ${seq} gone from memory`);
        // A clean stop syncs the journal, written behind the partner's copy (a write that
        // failed unnoticed until now is repaired from memory): the file holds every
        // acknowledged record, as a restart finds it.
        await dev.close();
        const file = parseJournal(await readFile(path));
        assert.equal(file.validAfter, undefined, `damage: ${file.stoppedBecause ?? ''}`);
        const held = new Map(userRecords(file.records).map((r) => [r.seq, r]));
        for (const [seq, payload] of acked) assert.equal(held.get(seq)?.payload.toString(), payload, `acknowledged record ${seq} missing from the file`);
        if (crash !== undefined) {
          // A kill at that moment: no damage, and every record there is one that was sent under its number, or void.
          const atCrash = parseJournal(crash);
          assert.equal(atCrash.validAfter, undefined, `a kill at call ${crashAt} looks like damage: ${atCrash.stoppedBecause ?? ''}`);
          for (const r of userRecords(atCrash.records)) {
            if (isVoid(r)) continue;
            assert.ok(sent.has(r.payload.toString()), `record ${r.seq} at the kill was never sent`);
            const ack = acked.get(r.seq);
            if (ack !== undefined) assert.equal(r.payload.toString(), ack, `record ${r.seq} at the kill is another one than was acknowledged under its number`);
          }
        }
        await rm(path, { force: true });
      },
    ),
    { numRuns: SOAK ? 2000 : 60 },
  );
  assert.ok(injectedNow > 0, 'faults were injected into writes made in the appender\'s turn');
});

test('a failed journal sync: the appends after it fail too, the device is failed until repaired, and reads never show a failed record', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-jfaults-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const plan = new FaultPlan();
  const dev = await device(join(dir, 'j.journal'), plan);
  await dev.append(0, [{ payload: Buffer.from('one') }]);
  // Hold the next sync, so a second append queues behind the one that will fail.
  let release = (): void => undefined;
  const held = new Promise<void>((resolve) => (release = resolve));
  plan.gate = (op) => (op === 'journal.datasync' ? held : undefined);
  plan.fail({ op: 'journal.datasync', fault: 'EIO' });
  const second = dev.append(0, [{ payload: Buffer.from('two') }]);
  await new Promise((r) => setImmediate(r));
  const third = dev.append(0, [{ payload: Buffer.from('three') }]);
  assert.deepEqual((await dev.read(0)).map((b) => decodeOne(b).payload.toString()), ['one'], 'nothing unacknowledged is readable');
  plan.gate = undefined;
  release();
  await assert.rejects(second, { code: 'MS_MEDIUM_IO' });
  await assert.rejects(third, { code: 'MS_MEDIUM_IO' });
  // The next request waits for the repair and goes on after the void numbers.
  const [fourth] = await dev.append(0, [{ payload: Buffer.from('four') }]);
  assert.equal(fourth?.seq, 4);
  const records = (await dev.read(0)).map((b) => decodeOne(b));
  assert.deepEqual(records.map((r) => [r.seq, isVoid(r) ? 'void' : r.payload.toString()]), [[1, 'one'], [2, 'void'], [3, 'void'], [4, 'four']]);
  assert.equal(dev.info().state, 'ready');
  await dev.close();
});

test('a failed repair keeps the device failed: requests fail with MS_MEDIUM_IO until a repair succeeds', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-jfaults-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const plan = new FaultPlan();
  const dev = await device(join(dir, 'j.journal'), plan);
  await dev.append(0, [{ payload: Buffer.from('one') }]);
  plan.fail({ op: 'journal.datasync', fault: 'EIO', count: Infinity });
  await assert.rejects(dev.append(0, [{ payload: Buffer.from('two') }]), { code: 'MS_MEDIUM_IO' });
  await assert.rejects(dev.append(0, [{ payload: Buffer.from('three') }]), { code: 'MS_MEDIUM_IO' });
  await assert.rejects(dev.trim(0, 1), { code: 'MS_MEDIUM_IO' });
  assert.equal(dev.info().state, 'failed');
  assert.deepEqual((await dev.read(0)).map((b) => decodeOne(b).payload.toString()), ['one'], 'acknowledged records stay readable');
  plan.heal();
  const [next] = await dev.append(0, [{ payload: Buffer.from('four') }]);
  assert.equal(next?.seq, 3, 'number 2 is void; number 3 was never handed out (that append waited for the repair)');
  assert.equal(dev.info().state, 'ready');
  await dev.close();
});

/** A partner that holds records only when told to. */
function partner(): { port: MirrorPort; answer: (outcome: boolean | Error) => Promise<void>; rolledBack: string[] } {
  const waiting: ((outcome: boolean | Error) => void)[] = [];
  const rolledBack: string[] = [];
  const mode: MirrorMode = 'in-sync';
  const port: MirrorPort = {
    mode: () => mode,
    settled: () => Promise.resolve(),
    append: () =>
      new Promise<boolean>((resolve, reject) => {
        waiting.push((outcome) => (outcome instanceof Error ? reject(outcome) : resolve(outcome)));
      }),
    epoch: () => Promise.resolve(),
    trim: () => undefined,
    rolledBack: (name) => { rolledBack.push(name); },
    exclusive: (fn) => fn(),
  };
  // Answers the oldest send, waiting for one to arrive (after a refusal the device
  // rewrites its journal before the next send: a fixed wait could answer no one).
  const answer = async (outcome: boolean | Error): Promise<void> => {
    const deadline = Date.now() + 20_000;
    for (;;) {
      const next = waiting.shift();
      if (next !== undefined) return next(outcome);
      assert.ok(Date.now() < deadline, 'no send reached the partner');
      await new Promise((r) => setTimeout(r, 5));
    }
  };
  return { port, answer, rolledBack };
}

test('mirrored: a record is readable only once the partner holds it; one the partner refused is void, and the replica is reset', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-jfaults-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const dev = await device(join(dir, 'j.journal'), new FaultPlan(), 'mirrored+local');
  const { port, answer, rolledBack } = partner();
  dev.port = port;
  const first = dev.append(0, [{ payload: Buffer.from('one') }]);
  await new Promise((r) => setTimeout(r, 20)); // the journal file has synced by now
  assert.deepEqual(await dev.read(0), [], 'not readable before the partner holds it');
  assert.equal(dev.info().lastSeq, null);
  await answer(true);
  await first;
  assert.equal(dev.info().lastSeq, 1);
  const refused = dev.append(0, [{ payload: Buffer.from('two') }]);
  await new Promise((r) => setTimeout(r, 20));
  await answer(Object.assign(new Error('the partner does not hold the record'), { code: 'MS_NVRAM_PARTNER_DOWN' }));
  await assert.rejects(refused, { code: 'MS_NVRAM_PARTNER_DOWN' });
  const third = dev.append(0, [{ payload: Buffer.from('three') }]);
  await new Promise((r) => setTimeout(r, 20));
  await answer(true);
  const [appended] = await third;
  assert.equal(appended?.seq, 3);
  assert.deepEqual(rolledBack, ['j'], 'the replica, which may hold record 2, is reset');
  const records = (await dev.read(0)).map((b) => decodeOne(b));
  assert.deepEqual(records.map((r) => [r.seq, isVoid(r) ? 'void' : r.payload.toString()]), [[1, 'one'], [2, 'void'], [3, 'three']]);
  await dev.close();
});

test('a newer open returns only once the appends of the older epoch taken before it are acknowledged or failed', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-jfaults-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const dev = await device(join(dir, 'j.journal'), new FaultPlan(), 'mirrored+local');
  const { port, answer } = partner();
  dev.port = port;
  await dev.open(1);
  let settled = false;
  const old = dev.append(1, [{ payload: Buffer.from('old epoch') }]).finally(() => { settled = true; });
  await new Promise((r) => setTimeout(r, 20)); // in the journal file; the partner has not answered
  let opened = false;
  const opening = dev.open(2).finally(() => { opened = true; });
  await new Promise((r) => setTimeout(r, 20));
  assert.ok(!opened, 'open(2) returned while an append of epoch 1 was still in flight');
  await answer(true);
  const info = await opening;
  assert.ok(settled);
  const [appended] = await old;
  assert.equal(info.lastSeq, appended?.seq, 'the lastSeq open(2) reports covers what epoch 1 had acknowledged');
  await assert.rejects(dev.append(1, [{ payload: Buffer.from('late') }]), { code: 'MS_NVRAM_FENCED' });
  await dev.close();
});

test('a tenant that opened the epoch a write-log claim would pick cannot get a record past the claim: the claim picks a newer epoch itself and waits for appends in flight', async (t) => {
  // Review finding: claim chose epoch + 1 before open() waited; a tenant's open of that epoch came first and its append was acknowledged after the trim.
  const { WriteLogIo } = await import('../../../src/storage/write-log.js');
  const pino = (await import('pino')).default;
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-jfaults-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const plan = new FaultPlan();
  const dev = await device(join(dir, 'j.journal'), plan);
  await dev.open(1);
  let release = (): void => undefined;
  const held = new Promise<void>((resolve) => (release = resolve));
  plan.gate = (op) => (op === 'journal.datasync' ? held : undefined);
  const planted = dev.append(1, [{ payload: Buffer.from('EVIL'), target: { volume: 'vol', offset: 0 } }]);
  await new Promise((r) => setImmediate(r));
  const tenantOpen = dev.open(2);
  const writeLog = new WriteLogIo({} as never, { get: () => dev } as never, pino({ level: 'silent' }));
  const claim = writeLog.claim('vol', 'j');
  await new Promise((r) => setTimeout(r, 20));
  plan.gate = undefined;
  release();
  await Promise.allSettled([planted, tenantOpen]);
  await claim;
  assert.ok(dev.epoch > 2, `the claim opened with epoch ${dev.epoch}, newer than the tenant's`);
  await assert.rejects(dev.append(2, [{ payload: Buffer.from('late'), target: { volume: 'vol', offset: 0 } }]), { code: 'MS_NVRAM_FENCED' });
  const writes: string[] = [];
  const volume = { name: 'vol', size: 1 << 20, writeLog: 'j', store: { write: async (_o: number, b: Buffer) => { writes.push(b.toString()); }, zeroRange: async () => undefined, sync: async () => undefined } };
  assert.equal(await writeLog.replay(volume as never), 0);
  assert.deepEqual(writes, [], 'nothing the tenant appended is replayed into the volume');
  await dev.close();
});

test('a primary being demoted takes no more appends from the moment the demotion begins; those taken before are journaled and kept', async (t) => {
  // Found by the SIGSTOP test: an append that came while the journal was being closed was acknowledged with neither a journal file nor a partner.
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-jfaults-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'j.journal');
  const dev = await device(path, new FaultPlan(), 'mirrored+local');
  await dev.append(0, [{ payload: Buffer.from('before') }]);
  const taken = dev.append(0, [{ payload: Buffer.from('in flight') }]);
  await Promise.resolve(); // it has its number and waits for its journal sync
  await Promise.resolve();
  const demoting = dev.demote();
  const late = await Promise.allSettled(Array.from({ length: 5 }, () => dev.append(0, [{ payload: Buffer.from('during the demotion') }])));
  await demoting;
  await taken;
  assert.ok(late.every((r) => r.status === 'rejected'), 'nothing is acknowledged once the demotion began');
  const inFile = userRecords(parseJournal(await readFile(path)).records).map((r) => r.payload.toString());
  assert.deepEqual(inFile, ['before', 'in flight'], 'the appends taken before are in the journal file');
});
