// Writers (issue 12, multipath): an append carrying a writer id and number that the device
// already took is answered with the first answer and appends nothing, whether the retry
// comes after the first was acknowledged, while it is still in flight, in the same batch,
// or after a node restart (the index is rebuilt from the records); the writer fields
// survive the journal file and reads; a number too old to be remembered is refused.

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
import { decodeOne, decodeRecord, encodeRecord } from '../../../src/protocol/journal/record.js';
import { MAX_WRITERS, WRITER_WINDOW } from '../../../src/nvram/writers.js';

const E = 64 * 1024;
const log = pino({ level: 'silent' });
const W = '0123456789abcdef';
const V = 'fedcba9876543210';

async function manager(dir: string): Promise<DeviceManager> {
  const medium = new DramMedium({ capacity: 32 * E, extentSize: E });
  await medium.open();
  const partition = new PartitionTable([
    { name: 'dram', capacity: 32 * E, extentSize: E, initial: { cache: 0, server: 0, nvram: 8 * E }, bounds: { cache: { min: 0, max: 32 * E }, server: { min: 0, max: 32 * E }, nvram: { min: 0, max: 16 * E } } },
  ]);
  const devices = new DeviceManager({ dataDir: dir, partition, media: [medium], log });
  await devices.open();
  return devices;
}

async function withDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-writers-'));
  try {
    return await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

const entry = (text: string, id: string, seq: number) => ({ payload: Buffer.from(text), writer: { id, seq } });

test('a record with a writer encodes and decodes it; one without stays as it was', () => {
  const base = { seq: 7, timestamp: 1, epoch: 2, flags: 0, target: { volume: 'v', offset: 4096 }, payload: Buffer.from('data') };
  const withWriter = decodeOne(encodeRecord({ ...base, writer: { id: W, seq: 2 ** 40 } }));
  assert.deepEqual(withWriter.writer, { id: W, seq: 2 ** 40 });
  assert.equal(withWriter.payload.toString(), 'data');
  const without = decodeRecord(encodeRecord(base));
  assert.ok('record' in without && !('writer' in without.record));
});

test('a retried append is answered, not appended: after its acknowledgement, in flight, in one batch, and after a restart', () =>
  withDir(async (dir) => {
    const devices = await manager(dir);
    await devices.create('j', E, 'local');
    const device = devices.get('j');
    await device.open(1);
    const [first] = await device.append(1, [entry('a1', W, 1)]);
    const [again] = await device.append(1, [entry('a1', W, 1)]);
    assert.deepEqual(again, first, 'the retry gets the first answer');
    // The same number with another payload is a writer that lost its numbers: refused, not answered.
    await assert.rejects(device.append(1, [entry('something else', W, 1)]), (e: Error & { code?: string }) => e.code === 'MS_NVRAM_INVALID' && /another payload/.test(e.message));
    // In flight: both at once.
    const [x, y] = await Promise.all([device.append(1, [entry('a2', W, 2)]), device.append(1, [entry('a2', W, 2)])]);
    assert.deepEqual(x, y);
    // In one batch, mixed with new numbers and another writer.
    const batch = await device.append(1, [entry('a2', W, 2), entry('a3', W, 3), entry('b1', V, 1), entry('a3', W, 3)]);
    assert.deepEqual(batch[0], x?.[0]);
    assert.deepEqual(batch[3], batch[1]);
    const texts = async (d: DeviceManager): Promise<string[]> => (await d.get('j').read(0)).map((b) => decodeOne(b).payload.toString());
    assert.deepEqual(await texts(devices), ['a1', 'a2', 'a3', 'b1']);
    await devices.close();
    // After a restart the index comes back from the journal file.
    const restarted = await manager(dir);
    const d2 = restarted.get('j');
    await d2.open(1);
    const [retry] = await d2.append(1, [entry('a3', W, 3)]);
    assert.deepEqual(retry, batch[1]);
    await d2.append(1, [entry('a4', W, 4)]);
    assert.deepEqual(await texts(restarted), ['a1', 'a2', 'a3', 'b1', 'a4']);
    assert.deepEqual((await d2.read(0)).map((b) => decodeOne(b).writer?.seq), [1, 2, 3, 1, 4]);
    await restarted.close();
  }));

test('a number at or below the writer\'s highest that the device does not remember is refused, not appended', () =>
  withDir(async (dir) => {
    const devices = await manager(dir);
    await devices.create('j', E, 'local');
    const device = devices.get('j');
    await device.open(1);
    await device.append(1, [entry('a5', W, 5)]);
    await assert.rejects(device.append(1, [entry('a3', W, 3)]), { code: 'MS_NVRAM_INVALID' });
    await assert.rejects(device.append(1, [{ payload: Buffer.from('x'), writer: { id: 'not-hex', seq: 1 } }]), { code: 'MS_NVRAM_INVALID' });
    await assert.rejects(device.append(1, [entry('zero', W, 0)]), { code: 'MS_NVRAM_INVALID' });
    assert.equal((await device.read(0)).length, 1);
    await devices.close();
  }));

test('any interleaving of appends and retries from several writers leaves each number exactly once, in each writer\'s order', async () => {
  await fc.assert(
    fc.asyncProperty(fc.scheduler(), fc.array(fc.tuple(fc.constantFrom(W, V), fc.integer({ min: 1, max: 6 })), { minLength: 1, maxLength: 24 }), (s, sends) =>
      withDir(async (dir) => {
        const devices = await manager(dir);
        await devices.create('j', E, 'volatile');
        const device = devices.get('j');
        await device.open(1);
        // Each send is a writer's number (retries are sends of a number again); the
        // scheduler decides the order in which they reach the device.
        const sent = Promise.allSettled(sends.map(([id, seq]) => s.schedule(Promise.resolve(), `${id.slice(0, 2)}#${seq}`).then(() => device.append(1, [entry(`${id}:${seq}`, id, seq)]))));
        await s.waitIdle();
        const results = await sent;
        const records = (await device.read(0)).map((b) => decodeOne(b));
        const keys = records.map((r) => `${r.writer?.id ?? ''}:${r.writer?.seq ?? 0}`);
        assert.equal(new Set(keys).size, keys.length, `a number appended twice: ${keys.join(' ')}`);
        for (const [i, [id, seq]] of sends.entries()) {
          const result = results[i];
          if (result?.status === 'fulfilled') {
            assert.ok(keys.includes(`${id}:${seq}`), `acknowledged ${id}:${seq} is missing`);
            const record = records.find((r) => r.writer?.id === id && r.writer.seq === seq);
            assert.equal(result.value[0]?.seq, record?.seq, 'every send of a number gets the sequence number of its one record');
          } else {
            // Refused only as a first send of a number below one the writer already had taken.
            assert.equal((result?.reason as { code?: string }).code, 'MS_NVRAM_INVALID');
          }
        }
        // Each writer's numbers are in the journal in increasing order.
        for (const id of [W, V]) {
          const mine = records.filter((r) => r.writer?.id === id).map((r) => r.writer?.seq ?? 0);
          assert.deepEqual(mine, [...mine].sort((a, b) => a - b));
        }
        await devices.close();
      }),
    ),
    { numRuns: 60 },
  );
});

test('after a restart, many appends of one writer at once are taken in the order they arrive while the index is rebuilt', () =>
  withDir(async (dir) => {
    const devices = await manager(dir);
    await devices.create('j', E, 'local');
    await devices.get('j').open(1);
    await devices.get('j').append(1, [entry('w1', W, 1)]);
    await devices.close();
    const restarted = await manager(dir);
    const device = restarted.get('j');
    await device.open(1);
    // All at once, as a pipelining client sends them: none may overtake another.
    const answers = await Promise.all(Array.from({ length: 32 }, (_, i) => device.append(1, [entry(`w${i + 2}`, W, i + 2)])));
    assert.deepEqual(answers.map((a) => a[0]?.seq), Array.from({ length: 32 }, (_, i) => i + 2));
    await restarted.close();
  }));

test('the writers index has a fixed size: many writers and many numbers, failed ones included, stay bounded in writers and failed numbers', () =>
  withDir(async (dir) => {
    const devices = await manager(dir);
    await devices.create('j', 4 * E, 'volatile');
    const device = devices.get('j');
    await device.open(1);
    // 200 writers (more than the MAX_WRITERS remembered) x 300 numbers, trimming behind.
    let last = 0;
    for (let round = 0; round < 300; round++) {
      const batch = Array.from({ length: 200 }, (_, w) => entry('x', w.toString(16).padStart(16, '0'), round + 1));
      const acks = await device.append(1, batch);
      last = acks.at(-1)?.seq ?? last;
      await device.trim(1, last);
    }
    // A full device: every append fails, and failed numbers are not kept beyond the window.
    await devices.create('small', E, 'volatile');
    const small = devices.get('small');
    await small.open(1);
    const big = Buffer.alloc(E);
    for (let n = 1; n <= 3000; n++) await small.append(1, [{ payload: big, writer: { id: W, seq: n } }]).catch(() => undefined);
    assert.deepEqual(device.writerStats(), { writers: MAX_WRITERS, inflight: 0, failed: 0 });
    const { failed, inflight, writers } = small.writerStats();
    assert.equal(writers, 1);
    assert.equal(inflight, 0);
    assert.ok(failed <= WRITER_WINDOW, `${failed} failed numbers kept, more than the window of ${WRITER_WINDOW}`);
    await devices.close();
  }));

test('a record larger than a reader takes is refused at append, with or without a writer', () =>
  withDir(async (dir) => {
    const devices = await manager(dir);
    await devices.create('j', 4 * E, 'volatile');
    const device = devices.get('j');
    await device.open(1);
    const { MAX_PAYLOAD } = await import('../../../src/protocol/journal/record.js');
    await assert.rejects(device.append(1, [{ payload: Buffer.alloc(MAX_PAYLOAD + 1) }]), { code: 'MS_NVRAM_INVALID' });
    // Exactly the limit is fine without a writer, too large with its 16 writer bytes.
    await assert.rejects(device.append(1, [{ payload: Buffer.alloc(MAX_PAYLOAD), writer: { id: W, seq: 1 } }]), { code: 'MS_NVRAM_INVALID' });
    assert.equal((await device.read(0)).length, 0);
    await devices.close();
  }));
