// JAPPEND bodies that span socket reads are assembled in buffers from the rmem service's
// pool and given back once the device has the records. Given back too early, a buffer
// would be reused by the next spanning request while the device still had to encode the
// first one: a record acknowledged with another request's bytes. Here raw connections
// send JAPPENDs cut into pieces (fast-check picks sizes, cuts and which requests fail:
// an unknown handle, a target name too long), many at once while the
// connection's request limit queues them, and every acknowledged record must read back
// with the bytes its request carried.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect, type Socket } from 'node:net';
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import pino from 'pino';
import { AllocationTable } from '../../../src/memory/allocation-table.js';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import { PartitionTable } from '../../../src/memory/partition-table.js';
import { ServerMemory } from '../../../src/memory/server-memory.js';
import { DeviceManager } from '../../../src/nvram/device-manager.js';
import { RmemService } from '../../../src/server/rmem-service.js';
import * as codec from '../../../src/protocol/rmem/codec.js';
import { FrameParser, type Frame } from '../../../src/protocol/rmem/parser.js';
import { HEADER_SIZE, STATUS, VERSION } from '../../../src/protocol/rmem/spec.js';
import { decodeOne } from '../../../src/protocol/journal/record.js';

const E = 1024 * 1024;
const log = pino({ level: 'silent' });

async function service(t: { after(fn: () => Promise<void>): void }): Promise<{ port: number; nvram: DeviceManager }> {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-jappend-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const medium = new DramMedium({ capacity: 32 * E, extentSize: E });
  await medium.open();
  const partition = new PartitionTable([
    { name: 'dram', capacity: 32 * E, extentSize: E, initial: { cache: 0, server: 0, nvram: 16 * E }, bounds: { cache: { min: 0, max: 32 * E }, server: { min: 0, max: 32 * E }, nvram: { min: 0, max: 16 * E } } },
  ]);
  const memory = new ServerMemory({ partition, allocation: new AllocationTable(), media: [medium] });
  const nvram = new DeviceManager({ dataDir: dir, partition, media: [medium], log });
  await nvram.open();
  await nvram.create('l', 8 * E, 'local');
  await nvram.create('v', 4 * E, 'volatile');
  // Four requests in flight per connection: the rest queue, their bodies held meanwhile.
  const rmem = new RmemService({ memory, nvram, log, nodeId: 'unit', leaseMs: 30_000, token: undefined, maxInFlight: 4, maxInFlightBytes: 2 * E, maxInFlightBytesTotal: 8 * E, maxConnections: 16, maxConnectionsPerClient: 16, handshakeTimeoutMs: 5000 });
  const address = await rmem.listen({ host: '127.0.0.1', port: 0 });
  t.after(async () => {
    await rmem.close();
    await nvram.close();
  });
  return { port: address.port, nvram };
}

/** A raw rmem connection: frames written as the test cuts them, replies by tag. */
async function raw(port: number, opened: Socket[]): Promise<{ socket: Socket; reply(tag: number): Promise<Frame> }> {
  const socket = connect(port, '127.0.0.1');
  socket.setNoDelay(true);
  const replies = new Map<number, Frame>();
  const waiting = new Map<number, (f: Frame) => void>();
  const parser = new FrameParser('response', {
    onFrame: (f) => {
      const copy = { ...f, body: Buffer.from(f.body) };
      const w = waiting.get(f.tagLo);
      if (w !== undefined) {
        waiting.delete(f.tagLo);
        w(copy);
      } else replies.set(f.tagLo, copy);
    },
    onFatal: () => socket.destroy(),
  });
  socket.on('data', (c: Buffer) => parser.feed(c));
  opened.push(socket);
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  const reply = (tag: number) => {
    const got = replies.get(tag);
    if (got !== undefined) {
      replies.delete(tag);
      return Promise.resolve(got);
    }
    return new Promise<Frame>((resolve) => waiting.set(tag, resolve));
  };
  socket.write(codec.encodeHelloRequest({ hi: 0, lo: 1 }, { version: VERSION, serverId: `raw-${port}-${Math.random()}`, token: '' }));
  assert.equal((await reply(1)).word, STATUS.OK);
  return { socket, reply };
}

const pause = () => new Promise((resolve) => setTimeout(resolve, 1));

test('JAPPEND bodies assembled in pooled buffers: every acknowledged record reads back with its own bytes, failures and queued requests among them', async (t) => {
  const { port, nvram } = await service(t);
  const shape = fc.record({
    device: fc.constantFrom('l', 'v'),
    sizes: fc.array(fc.integer({ min: 8, max: 20_000 }), { minLength: 1, maxLength: 4 }),
    cut: fc.double({ min: 0.05, max: 0.95, noNaN: true }),
    fault: fc.constantFrom('none', 'none', 'none', 'handle', 'name'),
  });
  let epoch = 1;
  await fc.assert(
    fc.asyncProperty(fc.array(fc.array(shape, { minLength: 1, maxLength: 12 }), { minLength: 1, maxLength: 3 }), async (connections) => {
      epoch += 2;
      const acked = new Map<string, Buffer>();
      let label = 0;
      const opened: Socket[] = [];
      try {
      await Promise.all(connections.map(async (requests) => {
        const { socket, reply } = await raw(port, opened);
        // Each connection opens both devices at this run's epoch.
        const handles: Record<string, number> = {};
        let tag = 10;
        for (const name of ['l', 'v']) {
          socket.write(codec.encodeJopenRequest({ hi: 0, lo: ++tag }, name, epoch));
          const r = await reply(tag);
          assert.equal(r.word, STATUS.OK, r.body.toString());
          handles[name] = codec.decodeJopenReply(r.body).handle;
        }
        const sent: { tag: number; device: string; payloads: Buffer[]; fault: string }[] = [];
        for (const rq of requests) {
          const payloads = rq.sizes.map((size) => {
            // Random bytes, labelled: a body read a few bytes off its place shows.
            const p = randomBytes(size);
            p.writeUInt32BE(label++, 0);
            return p;
          });
          const handle = rq.fault === 'handle' ? 9999 : (handles[rq.device] ?? 0);
          const entries = payloads.map((payload) => ({ payload, target: rq.fault === 'name' ? { volume: 'n'.repeat(65), offset: 0 } : undefined }));
          const frame = Buffer.concat(codec.encodeJappendRequest({ hi: 0, lo: ++tag }, handle, entries));
          // Cut in two, the second part a little later: the body spans socket reads.
          const at = Math.max(HEADER_SIZE + 1, Math.floor(frame.length * rq.cut));
          socket.write(frame.subarray(0, at));
          await pause();
          socket.write(frame.subarray(at));
          sent.push({ tag, device: rq.device, payloads, fault: rq.fault });
        }
        for (const s of sent) {
          const r = await reply(s.tag);
          if (s.fault === 'handle' || s.fault === 'name') {
            assert.notEqual(r.word, STATUS.OK, `request ${s.tag} (${s.fault}) was refused`);
            continue;
          }
          if (r.word !== STATUS.OK) {
            // Fenced by another connection's newer open is fine; anything else is not.
            assert.equal(r.word, STATUS.FENCED, r.body.toString());
            continue;
          }
          codec.decodeJappendReply(r.body).forEach((a, i) => acked.set(`${s.device}:${a.seq}`, s.payloads[i] ?? Buffer.alloc(0)));
        }
      }));
      } finally {
        // A connection per client address is limited: each run closes its own.
        for (const socket of opened) socket.destroy();
      }
      for (const name of ['l', 'v']) {
        const device = nvram.get(name);
        for (let from = device.info().firstSeq ?? 0; from > 0 && from <= device.lastSeq; ) {
          const records = await device.read(from, 256);
          if (records.length === 0) break;
          for (const bytes of records) {
            const record = decodeOne(bytes);
            const want = acked.get(`${name}:${record.seq}`);
            if (want !== undefined) assert.ok(record.payload.equals(want), `${name} record ${record.seq} holds the bytes of its own request`);
            from = record.seq + 1;
          }
        }
        // Keep the devices from filling up across runs.
        const last = device.lastSeq;
        if (last > 0) await device.trim(device.epoch, last);
      }
    }),
    { numRuns: 25 },
  );
});
