// Cost of the medium layer: 4 KiB reads and writes through DramMedium and FlashMedium,
// each against the same work done directly (a Buffer copy; a FileHandle pread/pwrite on
// a file of the same size), one at a time, in the same run.
//
//   npm run bench -- media        BENCH_MS=5000 for longer runs

import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DramMedium } from '../src/memory/dram-medium.js';
import { FlashMedium } from '../src/memory/flash-medium.js';
import { measure, report } from './support/harness.js';

const BLOCK = 4096;
const EXTENT = 1024 * 1024;
const CAPACITY = 256 * EXTENT;
const SLOTS = CAPACITY / BLOCK;

/** A fixed pseudo-random walk over the blocks, the same for every case. */
function slot(i: number): number {
  return ((i * 2654435761) >>> 0) % SLOTS;
}

const payload = Buffer.alloc(BLOCK, 0xa5);
const target = Buffer.alloc(BLOCK);

// ---- DRAM ----
const raw = Buffer.alloc(CAPACITY);
const dram = new DramMedium({ capacity: CAPACITY, extentSize: EXTENT });
await dram.open();
for (let off = 0; off < CAPACITY; off += EXTENT) await dram.write(off, Buffer.alloc(EXTENT, 1));

report('dram: 4 KiB write, QD1', [
  await measure({ name: 'Buffer copy (baseline)', bytesPerOp: BLOCK, run: (i) => {
    raw.set(payload, slot(i) * BLOCK);
  } }),
  await measure({ name: 'DramMedium.write', bytesPerOp: BLOCK, run: (i) => dram.write(slot(i) * BLOCK, payload) }),
]);
report('dram: 4 KiB read, QD1', [
  await measure({ name: 'Buffer copy (baseline)', bytesPerOp: BLOCK, run: (i) => {
    target.set(raw.subarray(slot(i) * BLOCK, slot(i) * BLOCK + BLOCK));
  } }),
  await measure({ name: 'DramMedium.read', bytesPerOp: BLOCK, run: (i) => dram.read(slot(i) * BLOCK, target) }),
]);
await dram.close();

// ---- flash ----
const dir = await mkdtemp(join(tmpdir(), 'memstrata-bench-'));
try {
  const plainPath = join(dir, 'plain.img');
  const plain = await open(plainPath, 'w+');
  await plain.truncate(CAPACITY);
  const flash = new FlashMedium({ path: join(dir, 'flash.img'), capacity: CAPACITY, extentSize: EXTENT });
  await flash.open();
  report('flash: 4 KiB write (page cache), QD1', [
    await measure({ name: 'FileHandle.write (baseline)', bytesPerOp: BLOCK, run: async (i) => {
      await plain.write(payload, 0, BLOCK, slot(i) * BLOCK);
    } }),
    await measure({ name: 'FlashMedium.write', bytesPerOp: BLOCK, run: (i) => flash.write(slot(i) * BLOCK, payload) }),
  ]);
  report('flash: 4 KiB read (page cache), QD1', [
    await measure({ name: 'FileHandle.read (baseline)', bytesPerOp: BLOCK, run: async (i) => {
      await plain.read(target, 0, BLOCK, slot(i) * BLOCK);
    } }),
    await measure({ name: 'FlashMedium.read', bytesPerOp: BLOCK, run: (i) => flash.read(slot(i) * BLOCK, target) }),
  ]);
  await flash.close();
  await plain.close();
} finally {
  await rm(dir, { recursive: true, force: true });
}
