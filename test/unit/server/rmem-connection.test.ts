// The rmem service in this process, over a medium whose reads the test holds or fails,
// driven by RmemClient over loopback: what the connection does with buffers and budget
// when pieces of one request finish at different times.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { RmemClient } from '../../../src/client/rmem-client.js';
import { StorageError } from '../../../src/errors.js';
import type { MediumName } from '../../../src/kinds.js';
import { AllocationTable } from '../../../src/memory/allocation-table.js';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import { PartitionTable } from '../../../src/memory/partition-table.js';
import { ServerMemory } from '../../../src/memory/server-memory.js';
import { DeviceManager } from '../../../src/nvram/device-manager.js';
import { RmemService } from '../../../src/server/rmem-service.js';

const E = 1024 * 1024;
const log = pino({ level: 'silent' });

/** DRAM whose reads at chosen addresses fail at once, or wait until the test lets them go. */
class ScriptedMedium extends DramMedium {
  override readonly name: MediumName = 'dram';
  readonly failAt = new Set<number>();
  readonly holdAt = new Map<number, { target: Uint8Array; go: (fill: number) => void }>();
  readonly holding = new Set<number>();

  override async read(offset: number, target: Uint8Array): Promise<void> {
    if (this.failAt.has(offset)) throw new StorageError('MS_MEDIUM_IO', `scripted failure at ${offset}`);
    if (this.holding.has(offset)) {
      // Held: when let go, the read lands in `target` (filled with `fill`), as a slow device would.
      await new Promise<void>((resolve) => {
        this.holdAt.set(offset, {
          target,
          go: (fill) => {
            target.fill(fill);
            resolve();
          },
        });
      });
      return;
    }
    return super.read(offset, target);
  }
}

async function service(t: { after(fn: () => Promise<void>): void }) {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-rmemconn-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const medium = new ScriptedMedium({ capacity: 32 * E, extentSize: E });
  await medium.open();
  const partition = new PartitionTable([
    { name: 'dram', capacity: 32 * E, extentSize: E, initial: { cache: 0, server: 16 * E, nvram: 0 }, bounds: { cache: { min: 0, max: 32 * E }, server: { min: 0, max: 32 * E }, nvram: { min: 0, max: 0 } } },
  ]);
  const memory = new ServerMemory({ partition, allocation: new AllocationTable(), media: [medium] });
  const nvram = new DeviceManager({ dataDir: dir, partition, media: [medium], log });
  const rmem = new RmemService({
    memory,
    nvram,
    log,
    nodeId: 'unit',
    leaseMs: 30_000,
    token: undefined,
    maxInFlight: 64,
    maxInFlightBytes: 32 * E,
    maxInFlightBytesTotal: 64 * E,
    maxConnections: 16,
    handshakeTimeoutMs: 5000,
  });
  const address = await rmem.listen({ host: '127.0.0.1', port: 0 });
  t.after(() => rmem.close());
  return { rmem, medium, address };
}

test('a READV with a failed entry keeps its reply buffer until every entry has stopped writing into it', async (t) => {
  const { medium, address } = await service(t);
  const client = await RmemClient.connect({ ...address, serverId: 'srv', keepalive: false });
  t.after(() => client.close());
  const failing = await client.bind(4096, { medium: 'dram' });
  const slow = await client.bind(64 * 1024, { medium: 'dram' });
  const other = await client.bind(100 * 1024, { medium: 'dram' });
  await client.write(other, 0, Buffer.alloc(other.size, 0x11));
  medium.failAt.add(failing.ranges[0]!.start);
  medium.holding.add(slow.ranges[0]!.start);
  medium.holding.add(other.ranges[0]!.start);

  // The slow entry is still reading into the reply buffer when its sibling fails.
  const readv = client.readv([
    { region: failing, offset: 0, length: 4096 },
    { region: slow, offset: 0, length: 64 * 1024 },
  ]);
  const failed = readv.then(
    () => assert.fail('the READV should fail'),
    (error: unknown) => (error as { code?: string }).code,
  );
  await until(() => medium.holdAt.has(slow.ranges[0]!.start));
  // A READ of the same size class, served while the READV's slow entry still writes.
  const read = client.read(other, 0, other.size);
  await until(() => medium.holdAt.has(other.ranges[0]!.start));
  // Both land in the same tick: a buffer shared between them would carry the slow entry's bytes.
  medium.holdAt.get(other.ranges[0]!.start)?.go(0x11);
  medium.holdAt.get(slow.ranges[0]!.start)?.go(0xee);
  const data = await read;
  assert.equal(await failed, 'MS_MEDIUM_IO');
  assert.ok(data.every((b) => b === 0x11), 'the READ carries only its own data');
});

async function until(probe: () => boolean): Promise<void> {
  while (!probe()) await new Promise((resolve) => setImmediate(resolve));
}
