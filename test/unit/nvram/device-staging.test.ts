// Appends stage their encoded records in buffers from a pool the device manager shares
// between devices, given back once the device's memory and the journal file have the
// bytes. A buffer given back too early would be reused by a later append while the
// journal still had to write it: its record would reach the file with another append's
// bytes. Here journal writes are delayed at random (fast-check decides), appends of
// several records, synced and not, overlap, and every record must read back as appended,
// from the device and from the file after a restart.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import pino from 'pino';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import { PartitionTable } from '../../../src/memory/partition-table.js';
import { DeviceManager } from '../../../src/nvram/device-manager.js';
import type { JournalSink } from '../../../src/nvram/journal-file.js';
import { decodeOne } from '../../../src/protocol/journal/record.js';

const E = 64 * 1024;
const log = pino({ level: 'silent' });

async function manager(dir: string, journalWrap?: (sink: JournalSink) => JournalSink): Promise<DeviceManager> {
  const medium = new DramMedium({ capacity: 64 * E, extentSize: E });
  await medium.open();
  const partition = new PartitionTable([
    { name: 'dram', capacity: 64 * E, extentSize: E, initial: { cache: 0, server: 0, nvram: 32 * E }, bounds: { cache: { min: 0, max: 64 * E }, server: { min: 0, max: 64 * E }, nvram: { min: 0, max: 32 * E } } },
  ]);
  const devices = new DeviceManager({ dataDir: dir, partition, media: [medium], log, ...(journalWrap === undefined ? {} : { journalWrap }) });
  await devices.open();
  return devices;
}

/** A payload only this record has: its append and entry numbers, then a fill of its own. */
function payload(append: number, entry: number, size: number): Buffer {
  const buf = Buffer.alloc(size, (append * 7 + entry * 13) % 251);
  buf.writeUInt32BE(append, 0);
  buf.writeUInt32BE(entry, 4);
  return buf;
}

test('records staged in pooled buffers reach memory and the journal file as appended, whatever order the journal writes finish in', async () => {
  const appendShape = fc.record({ sizes: fc.array(fc.integer({ min: 8, max: 9000 }), { minLength: 1, maxLength: 3 }), sync: fc.boolean(), wait: fc.nat({ max: 6 }) });
  await fc.assert(
    fc.asyncProperty(fc.array(appendShape, { minLength: 4, maxLength: 24 }), fc.array(fc.nat({ max: 4 }), { minLength: 1, maxLength: 16 }), async (appends, delays) => {
      const dir = await mkdtemp(join(tmpdir(), 'memstrata-staging-'));
      try {
        let writes = 0;
        // Journal writes finish after a delay fast-check picks: later batches may be
        // assembled while earlier ones are still being written.
        const slow = (sink: JournalSink): JournalSink => ({
          ...sink,
          write: async (buf, position) => {
            const ms = delays[writes++ % delays.length] ?? 0;
            if (ms > 0) await new Promise((resolve) => setTimeout(resolve, ms));
            return sink.write(buf, position);
          },
        });
        const devices = await manager(dir, slow);
        await devices.create('s', 16 * E, 'local');
        const device = devices.get('s');
        await device.open(1);
        const expected = new Map<number, Buffer>();
        const runs = appends.map(async (a, i) => {
          // Appends start at different moments (a few milliseconds apart, while earlier
          // batches are still being written), so their buffers come and go interleaved.
          if (a.wait > 0) await new Promise((resolve) => setTimeout(resolve, a.wait));
          const entries = a.sizes.map((size, j) => ({ payload: payload(i, j, size) }));
          const acks = await device.append(1, entries, { sync: a.sync });
          acks.forEach((ack, j) => expected.set(ack.seq, entries[j]?.payload ?? Buffer.alloc(0)));
        });
        await Promise.all(runs);
        await device.commit();
        const fromMemory = await device.read(1, 4096);
        assert.equal(fromMemory.length, expected.size);
        for (const bytes of fromMemory) {
          const record = decodeOne(bytes);
          assert.ok(record.payload.equals(expected.get(record.seq) ?? Buffer.alloc(0)), `record ${record.seq} in memory`);
        }
        await devices.close();
        // After a restart the device holds what its journal file holds.
        const again = await manager(dir);
        const fromFile = await again.get('s').read(1, 4096);
        assert.equal(fromFile.length, expected.size);
        for (const bytes of fromFile) {
          const record = decodeOne(bytes);
          assert.ok(record.payload.equals(expected.get(record.seq) ?? Buffer.alloc(0)), `record ${record.seq} in the journal file`);
        }
        await again.close();
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    }),
    { numRuns: 30 },
  );
});

for (const policy of ['volatile', 'local'] as const) {
  test(`${policy}: an append with a record that cannot be encoded is refused whole: it takes no numbers and leaves nothing readable`, async () => {
    const dir = await mkdtemp(join(tmpdir(), 'memstrata-staging-'));
    try {
      let devices = await manager(dir);
      await devices.create('j', E, policy);
      const device = devices.get('j');
      await device.open(1);
      await device.append(1, [{ payload: Buffer.alloc(5000, 1) }]);
      // An offset past 2^64 cannot be written as a u64 (no wire decoder makes one; an
      // internal caller could).
      await assert.rejects(device.append(1, [{ payload: Buffer.alloc(5000, 2) }, { payload: Buffer.from('bad'), target: { volume: 'v', offset: 2 ** 64 } }]), { code: 'MS_NVRAM_INVALID' });
      const [after] = await device.append(1, [{ payload: Buffer.alloc(5000, 3) }]);
      assert.equal(after?.seq, 2);
      const show = (records: Buffer[]) => records.map((b) => { const r = decodeOne(b); return `${r.seq}:${r.payload[0] ?? -1}`; });
      assert.deepEqual(show(await device.read(0)), ['1:1', '2:3']);
      if (policy === 'local') {
        await devices.close();
        devices = await manager(dir);
        assert.deepEqual(show(await devices.get('j').read(0)), ['1:1', '2:3']);
      }
      await devices.close();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
}

test('an append settles only once its own entries are read: a writer\'s retry that shares a failed earlier answer waits for its new entry', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-staging-'));
  try {
    const devices = await manager(dir);
    await devices.create('j', E, 'volatile');
    const device = devices.get('j');
    await device.open(1);
    const writer = '0123456789abcdef';
    const later = () => {
      let resolve = (): void => undefined;
      let reject: (error: Error) => void = () => undefined;
      const p = new Promise<void>((a, b) => { resolve = a; reject = b; });
      return { p, resolve, reject };
    };
    // A stand-in mirror port: in sync, then resyncing (appends wait), as a partner would be.
    let mode = 'in-sync';
    const sentA = later();
    const resync = later();
    const port = { mode: () => mode, settled: () => resync.p, append: () => sentA.p, epoch: async () => undefined, trim: () => undefined, rolledBack: () => undefined, exclusive: (fn: () => unknown) => fn() };
    (device as unknown as { port: unknown }).port = port;
    const first = Buffer.from('first');
    const a = device.append(1, [{ payload: first, writer: { id: writer, seq: 1 } }]);
    a.catch(() => undefined);
    await new Promise((resolve) => setImmediate(resolve));
    mode = 'syncing';
    // The writer's retry: number 1 (answered by A) and number 2 (new, waiting for the resync).
    const second = Buffer.from('second');
    let settled = false;
    const b = device.append(1, [{ payload: first, writer: { id: writer, seq: 1 } }, { payload: second, writer: { id: writer, seq: 2 } }]);
    b.then(() => { settled = true; }, () => { settled = true; });
    sentA.reject(new Error('the partner refused'));
    for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
    assert.equal(settled, false, 'the retry waits for its own new entry');
    (device as unknown as { port: unknown }).port = undefined;
    resync.resolve();
    await assert.rejects(b);
    // Its answer in hand, the caller may reuse the memory (a pooled request body).
    second.fill(0x45);
    const records = (await device.read(0)).map((buf) => decodeOne(buf)).filter((r) => r.writer?.seq === 2);
    assert.deepEqual(records.map((r) => r.payload.toString()), ['second']);
    await devices.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
