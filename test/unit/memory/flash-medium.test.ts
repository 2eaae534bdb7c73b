import { test } from 'node:test';
import assert from 'node:assert/strict';
import { stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { FlashMedium } from '../../../src/memory/flash-medium.js';
import { tempDir } from '../../support/node-process.js';

const EXTENT = 1024 * 1024;

test('flash: data written survives a restart of the medium', async (t) => {
  const path = join(await tempDir(t), 'flash.img');
  const first = new FlashMedium({ path, capacity: 8 * EXTENT, extentSize: EXTENT });
  await first.open();
  const pattern = Buffer.from('hierarchy memory management '.repeat(200));
  await first.write(3 * EXTENT - 100, pattern);
  await first.sync();
  await first.close();

  const second = new FlashMedium({ path, capacity: 8 * EXTENT, extentSize: EXTENT });
  await second.open();
  const back = Buffer.alloc(pattern.length);
  await second.read(3 * EXTENT - 100, back);
  assert.ok(back.equals(pattern));
  await second.close();
});

test('flash: the file is sparse, sized to capacity, and grows when the capacity does', async (t) => {
  const path = join(await tempDir(t), 'flash.img');
  const medium = new FlashMedium({ path, capacity: 64 * EXTENT, extentSize: EXTENT });
  await medium.open();
  const info = await stat(path);
  assert.equal(info.size, 64 * EXTENT);
  assert.ok(info.blocks * 512 < 64 * EXTENT, 'no blocks taken for unwritten space');
  await medium.close();
  const bigger = new FlashMedium({ path, capacity: 128 * EXTENT, extentSize: EXTENT });
  await bigger.open();
  assert.equal((await stat(path)).size, 128 * EXTENT);
  await bigger.close();
});

test('flash: a file larger than the configured capacity is refused, not truncated', async (t) => {
  const path = join(await tempDir(t), 'flash.img');
  await writeFile(path, Buffer.alloc(2 * EXTENT, 1));
  const medium = new FlashMedium({ path, capacity: EXTENT, extentSize: EXTENT });
  await assert.rejects(medium.open(), { code: 'MS_FLASH_SIZE' });
  assert.equal((await stat(path)).size, 2 * EXTENT);
});

test('flash: close waits for I/O in flight', async (t) => {
  const path = join(await tempDir(t), 'flash.img');
  const medium = new FlashMedium({ path, capacity: 32 * EXTENT, extentSize: EXTENT });
  await medium.open();
  const writes = Array.from({ length: 16 }, (_, i) => medium.write(i * EXTENT, Buffer.alloc(EXTENT, i + 1)));
  await medium.close();
  await Promise.all(writes);
  const reopened = new FlashMedium({ path, capacity: 32 * EXTENT, extentSize: EXTENT });
  await reopened.open();
  const buf = Buffer.alloc(1);
  await reopened.read(15 * EXTENT, buf);
  assert.equal(buf[0], 16);
  await reopened.close();
});

test('flash: an unusable path is a coded storage error', async (t) => {
  const dir = await tempDir(t);
  await writeFile(join(dir, 'file'), 'x');
  const medium = new FlashMedium({ path: join(dir, 'file', 'flash.img'), capacity: EXTENT, extentSize: EXTENT });
  await assert.rejects(medium.open(), { code: 'MS_DATA_DIR' });
});
