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

test('flash: readSync reads what was written, and declines while closed', async (t) => {
  const path = join(await tempDir(t), 'flash.img');
  const medium = new FlashMedium({ path, capacity: 4 * EXTENT, extentSize: EXTENT });
  assert.throws(() => medium.readSync(0, Buffer.alloc(1)), { code: 'MS_READ_DECLINED' }, 'not open yet');
  await medium.open();
  const pattern = Buffer.from('read on the event loop '.repeat(300));
  await medium.write(EXTENT - 50, pattern);
  const back = Buffer.alloc(pattern.length);
  medium.readSync(EXTENT - 50, back);
  assert.ok(back.equals(pattern));
  assert.throws(() => medium.readSync(4 * EXTENT - 1, Buffer.alloc(2)), { code: 'MS_MEDIUM_RANGE' });
  assert.equal(medium.syncReads.made, 1);
  await medium.close();
  assert.throws(() => medium.readSync(0, Buffer.alloc(1)), { code: 'MS_READ_DECLINED' }, 'closed');
});

test('flash: synchronous reads are declined once they are slow, tried again now and then, and made again once fast', async (t) => {
  // A clock the test moves: each read takes `cost` ms of it, as if it reached a device.
  let now = 0;
  let cost = 0;
  let reading = false;
  const clock = (): number => {
    if (reading) now += cost; // the clock read after the pread sees the read's time
    reading = !reading;
    return now;
  };
  const path = join(await tempDir(t), 'flash.img');
  const medium = new FlashMedium({ path, capacity: 4 * EXTENT, extentSize: EXTENT, clock });
  await medium.open();
  t.after(() => medium.close());
  await medium.write(0, Buffer.alloc(4096, 7));
  const page = Buffer.alloc(4096);
  const attempt = (): boolean => {
    try {
      medium.readSync(0, page);
      assert.equal(page[0], 7);
      return true;
    } catch (error) {
      assert.equal((error as { code?: string }).code, 'MS_READ_DECLINED');
      // A declined read reads the clock once, not twice.
      reading = false;
      return false;
    }
  };
  // Fast (2 us): always made.
  cost = 0.002;
  for (let i = 0; i < 50; i++) assert.equal(attempt(), true, `fast read ${i}`);
  assert.equal(medium.syncReads.slow, false);
  // One preemption (5 ms) among fast reads does not turn them off.
  cost = 5;
  assert.equal(attempt(), true);
  cost = 0.002;
  for (let i = 0; i < 20; i++) assert.equal(attempt(), true, `fast read after a spike ${i}`);
  assert.equal(medium.syncReads.slow, false);
  // Reads that reach a device (150 us against a 31 us budget): a few, then declined.
  cost = 0.15;
  let made = 0;
  while (attempt()) made++;
  assert.ok(made >= 2 && made <= 4, `${made} slow reads before declining`);
  assert.equal(medium.syncReads.slow, true);
  // Declined until the probe interval has passed, then one probe.
  for (let i = 0; i < 10; i++) assert.equal(attempt(), false);
  now += 10;
  assert.equal(attempt(), true, 'a probe once the interval passed');
  assert.equal(attempt(), false, 'a slow probe keeps them declined');
  // Once the reads are fast again, probes bring them back.
  cost = 0.002;
  let probes = 0;
  while (medium.syncReads.slow && probes < 50) {
    now += 10;
    assert.equal(attempt(), true);
    probes++;
  }
  assert.equal(medium.syncReads.slow, false, 'fast probes turned synchronous reads back on');
  assert.ok(probes >= 2, `${probes} probes`);
  for (let i = 0; i < 10; i++) assert.equal(attempt(), true);
  assert.ok(medium.syncReads.declined >= 11);
});
