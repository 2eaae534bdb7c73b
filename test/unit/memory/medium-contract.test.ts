// One contract suite, run against every Medium implementation.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import { FlashMedium } from '../../../src/memory/flash-medium.js';
import type { Medium } from '../../../src/memory/medium.js';

const EXTENT = 64 * 1024;
const CAPACITY = 16 * EXTENT;

interface Implementation {
  name: string;
  make(): Promise<{ medium: Medium; cleanup(): Promise<void> }>;
}

const implementations: Implementation[] = [
  {
    name: 'dram',
    make: async () => ({ medium: new DramMedium({ capacity: CAPACITY, extentSize: EXTENT }), cleanup: async () => undefined }),
  },
  {
    // Extents of several chunks (a buffer per 64 KiB): I/O crosses chunks within an extent.
    name: 'dram, 256 KiB extents',
    make: async () => ({ medium: new DramMedium({ capacity: CAPACITY, extentSize: 4 * EXTENT }), cleanup: async () => undefined }),
  },
  {
    name: 'flash',
    make: async () => {
      const dir = await mkdtemp(join(tmpdir(), 'memstrata-flash-'));
      return {
        medium: new FlashMedium({ path: join(dir, 'flash.img'), capacity: CAPACITY, extentSize: EXTENT }),
        cleanup: () => rm(dir, { recursive: true, force: true }),
      };
    },
  },
];

for (const impl of implementations) {
  describe(`medium contract: ${impl.name}`, () => {
    async function withMedium(fn: (medium: Medium) => Promise<void>): Promise<void> {
      const { medium, cleanup } = await impl.make();
      await medium.open();
      try {
        await fn(medium);
      } finally {
        await medium.close();
        await cleanup();
      }
    }

    test('a fresh medium reads as zeros', () =>
      withMedium(async (medium) => {
        const buf = Buffer.alloc(3 * EXTENT, 0xff);
        await medium.read(EXTENT - 7, buf);
        assert.ok(buf.every((b) => b === 0));
      }));

    test('random writes and zeroes read back like a plain buffer, across extent boundaries', () =>
      withMedium(async (medium) => {
        const model = Buffer.alloc(CAPACITY);
        const opArb = fc.record({
          zero: fc.boolean(),
          offset: fc.nat({ max: CAPACITY - 1 }),
          length: fc.integer({ min: 1, max: 3 * EXTENT }),
          seed: fc.nat({ max: 255 }),
        });
        await fc.assert(
          fc.asyncProperty(fc.array(opArb, { maxLength: 12 }), async (ops) => {
            for (const op of ops) {
              const length = Math.min(op.length, CAPACITY - op.offset);
              if (op.zero) {
                await medium.zero(op.offset, length);
                model.fill(0, op.offset, op.offset + length);
              } else {
                const data = Buffer.alloc(length, op.seed);
                data[0] = op.seed ^ 0x5a;
                await medium.write(op.offset, data);
                data.copy(model, op.offset);
              }
            }
            const whole = Buffer.alloc(CAPACITY);
            await medium.read(0, whole);
            assert.ok(whole.equals(model));
          }),
          { numRuns: 25 },
        );
      }));

    test('I/O outside the capacity is refused with MS_MEDIUM_RANGE and touches nothing', () =>
      withMedium(async (medium) => {
        await medium.write(CAPACITY - 4, Buffer.from([1, 2, 3, 4]));
        await assert.rejects(medium.read(CAPACITY - 2, Buffer.alloc(4)), { code: 'MS_MEDIUM_RANGE' });
        await assert.rejects(medium.write(CAPACITY, Buffer.alloc(1)), { code: 'MS_MEDIUM_RANGE' });
        await assert.rejects(medium.write(-1, Buffer.alloc(1)), { code: 'MS_MEDIUM_RANGE' });
        await assert.rejects(medium.zero(CAPACITY - 1, 2), { code: 'MS_MEDIUM_RANGE' });
        await assert.rejects(medium.read(0.5, Buffer.alloc(1)), { code: 'MS_MEDIUM_RANGE' });
        const tail = Buffer.alloc(4);
        await medium.read(CAPACITY - 4, tail);
        assert.deepEqual([...tail], [1, 2, 3, 4]);
      }));

    test('errors are always asynchronous (no Zalgo)', () =>
      withMedium(async (medium) => {
        let returned = false;
        const pending = medium.read(CAPACITY, Buffer.alloc(1)).catch((error: unknown) => {
          assert.ok(returned, 'rejection must come after the call returns');
          return error;
        });
        returned = true;
        assert.equal(((await pending) as { code: string }).code, 'MS_MEDIUM_RANGE');
      }));

    test('zeroing whole extents hands their storage back', () =>
      withMedium(async (medium) => {
        await medium.write(0, Buffer.alloc(4 * EXTENT, 7));
        await medium.sync();
        const full = await medium.resident();
        assert.ok(full >= 4 * EXTENT, `resident ${full} after writing 4 extents`);
        await medium.zero(0, 4 * EXTENT);
        if (!medium.capabilities.persistent) assert.equal(await medium.resident(), 0);
        const back = Buffer.alloc(4 * EXTENT, 1);
        await medium.read(0, back);
        assert.ok(back.every((b) => b === 0));
      }));

    test('a synchronous write, where the medium has one, stores what write would, reads back at once, and refuses a range outside with MS_MEDIUM_RANGE before writing', () =>
      withMedium(async (medium) => {
        if (medium.writeSync === undefined) return;
        const model = Buffer.alloc(CAPACITY);
        for (const [offset, length, seed] of [[EXTENT - 7, 3 * EXTENT, 5], [100, 10, 6], [CAPACITY - EXTENT, EXTENT, 7]] as const) {
          const data = Buffer.alloc(length, seed);
          medium.writeSync(offset, data);
          data.copy(model, offset);
          const back = Buffer.alloc(length);
          medium.readSync?.(offset, back);
          if (medium.readSync !== undefined) assert.ok(back.equals(data), 'readSync right after writeSync');
        }
        assert.throws(() => medium.writeSync?.(CAPACITY - 2, Buffer.alloc(4, 9)), { code: 'MS_MEDIUM_RANGE' });
        const whole = Buffer.alloc(CAPACITY);
        await medium.read(0, whole);
        assert.ok(whole.equals(model));
      }));

    test('I/O after close fails with MS_MEDIUM_CLOSED', async () => {
      const { medium, cleanup } = await impl.make();
      await medium.open();
      await medium.close();
      await assert.rejects(medium.read(0, Buffer.alloc(1)), { code: 'MS_MEDIUM_CLOSED' });
      await assert.rejects(medium.write(0, Buffer.alloc(1)), { code: 'MS_MEDIUM_CLOSED' });
      if (medium.writeSync !== undefined) assert.throws(() => medium.writeSync?.(0, Buffer.alloc(1)), { code: 'MS_MEDIUM_CLOSED' });
      await cleanup();
    });
  });
}

test('dram: a view shows a written chunk\'s bytes and keeps only that chunk alive; zeroing the extent gives it new memory and leaves the view its bytes', async () => {
  const medium = new DramMedium({ capacity: 4 * 1024 * 1024, extentSize: 1024 * 1024 });
  await medium.open();
  const MiB = 1024 * 1024;
  assert.equal(medium.view(MiB, 4096), undefined, 'a chunk never written has no memory to show');
  await medium.write(MiB, Buffer.alloc(MiB, 3));
  const view = medium.view(MiB + EXTENT + 100, 4096);
  assert.ok(view !== undefined);
  assert.ok(view.every((b) => b === 3));
  assert.ok(view.buffer.byteLength <= EXTENT, `the view keeps ${view.buffer.byteLength} bytes alive`);
  assert.equal(medium.view(MiB + EXTENT - 10, 20), undefined, 'a range across two chunks has no one view');
  assert.equal(medium.view(MiB, 0), undefined);
  await medium.zero(MiB, MiB);
  await medium.write(MiB, Buffer.alloc(MiB, 9));
  assert.ok(view.every((b) => b === 3), 'the extent\'s next bytes reached memory a view still shows');
  const now = Buffer.alloc(4096);
  await medium.read(MiB + EXTENT + 100, now);
  assert.ok(now.every((b) => b === 9));
  // Zeroing part of a chunk writes it in place: the view shows the zeros (its own range).
  const again = medium.view(MiB, 4096);
  assert.ok(again !== undefined);
  await medium.zero(MiB, 100);
  assert.equal(again[0], 0);
  await medium.close();
});
