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

    test('I/O after close fails with MS_MEDIUM_CLOSED', async () => {
      const { medium, cleanup } = await impl.make();
      await medium.open();
      await medium.close();
      await assert.rejects(medium.read(0, Buffer.alloc(1)), { code: 'MS_MEDIUM_CLOSED' });
      await assert.rejects(medium.write(0, Buffer.alloc(1)), { code: 'MS_MEDIUM_CLOSED' });
      await cleanup();
    });
  });
}
