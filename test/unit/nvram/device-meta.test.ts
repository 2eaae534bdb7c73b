// The NVRAM device metadata file (nvram/<name>.json) and what the device manager does with
// one that is damaged: the device is not restored, its journal and metadata are never
// touched, its name stays taken, and the other devices are restored.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import pino from 'pino';
import { DramMedium } from '../../../src/memory/dram-medium.js';
import { PartitionTable } from '../../../src/memory/partition-table.js';
import type { MetaFs } from '../../../src/fs/meta-file.js';
import { DeviceManager } from '../../../src/nvram/device-manager.js';
import { readDeviceMeta } from '../../../src/nvram/device-meta.js';
import { recordingFs } from '../../support/recording-fs.js';
import { tempDir } from '../../support/node-process.js';

const E = 64 * 1024;
const FIXTURES = new URL('../../../../test/fixtures/meta/', import.meta.url);

async function manager(dataDir: string, options: { log?: pino.Logger; fs?: MetaFs } = {}): Promise<DeviceManager> {
  const medium = new DramMedium({ capacity: 32 * E, extentSize: E });
  await medium.open();
  const partition = new PartitionTable([
    { name: 'dram', capacity: 32 * E, extentSize: E, initial: { cache: 0, server: 0, nvram: 8 * E }, bounds: { cache: { min: 0, max: 32 * E }, server: { min: 0, max: 32 * E }, nvram: { min: 0, max: 16 * E } } },
  ]);
  const devices = new DeviceManager({ dataDir, partition, media: [medium], log: options.log ?? pino({ level: 'silent' }), ...(options.fs === undefined ? {} : { fs: options.fs }) });
  await devices.open();
  return devices;
}

test('version 1 files written by earlier nodes still load (frozen fixtures)', async (t) => {
  const dir = await tempDir(t);
  await copyFile(new URL('nvram-v1.json', FIXTURES), join(dir, 'j1.json'));
  await copyFile(new URL('nvram-v1-no-role.json', FIXTURES), join(dir, 'old.json'));
  assert.deepEqual(await readDeviceMeta(dir, 'j1'), { name: 'j1', size: 64 * 1024 * 1024, policy: 'mirrored+local', medium: 'flash', role: 'replica', createdAt: '2025-01-02T03:04:05.678Z' });
  assert.deepEqual(await readDeviceMeta(dir, 'old'), { name: 'old', size: 4 * 1024 * 1024, policy: 'local', medium: 'dram', createdAt: '2024-06-01T00:00:00.000Z' });
});

const GOOD = { name: 'j1', size: E, policy: 'local', medium: 'dram', role: 'primary', createdAt: '2025-01-02T03:04:05.678Z', version: 1 };
const damaged: [string, string, RegExp][] = [
  ['truncated JSON', JSON.stringify(GOOD).slice(0, 25), /NVRAM device metadata .*j1\.json is not valid JSON/],
  ['size of the wrong type', JSON.stringify({ ...GOOD, size: 'big' }), /j1\.json field size: /],
  ['negative size', JSON.stringify({ ...GOOD, size: -E }), /field size: /],
  ['an unknown policy', JSON.stringify({ ...GOOD, policy: 'battery' }), /field policy: /],
  ['an unknown medium', JSON.stringify({ ...GOOD, medium: 'tape' }), /field medium: /],
  ['a name that is not the file', JSON.stringify({ ...GOOD, name: 'j2' }), /field name: "j2" is not the file's name "j1"/],
  ['an unknown version', JSON.stringify({ ...GOOD, version: 2 }), /field version: expected version 1/],
  ['an unknown field', JSON.stringify({ ...GOOD, battery: true }), /has unknown field battery/],
];

for (const [what, text, message] of damaged) {
  test(`${what}: the device is not restored (MS_META_INVALID naming file and field); its files stay, the others are restored`, async (t) => {
    const dataDir = await tempDir(t);
    const first = await manager(dataDir);
    await first.create('j1', E, 'local');
    await first.create('j3', E, 'local');
    for (const name of ['j1', 'j3']) {
      const device = first.get(name);
      await device.open(1);
      await device.append(1, [{ payload: Buffer.from(`record of ${name}`) }]);
    }
    await first.close();

    const nvram = join(dataDir, 'nvram');
    await writeFile(join(nvram, 'j1.json'), text);
    // j1's own files; j3's journal is rewritten by its restore, as it should be.
    const files = (await readdir(nvram)).filter((f) => f.startsWith('j1.'));
    assert.deepEqual(files.sort(), ['j1.journal', 'j1.json']);
    const before = new Map(await Promise.all(files.map(async (f) => [f, await readFile(join(nvram, f))] as const)));

    const logged: Record<string, unknown>[] = [];
    const devices = await manager(dataDir, { log: pino({ level: 'error' }, { write: (line: string) => logged.push(JSON.parse(line) as Record<string, unknown>) }) });
    t.after(() => devices.close());
    assert.deepEqual(devices.list().map((d) => [d.name, d.records]), [['j3', 1]], 'the other device is restored with its record');
    const entries = devices.damaged();
    assert.deepEqual(entries.map((d) => [d.name, d.file, d.error.code]), [['j1', join(nvram, 'j1.json'), 'MS_META_INVALID']]);
    assert.match(entries[0]?.error.message ?? '', message);
    assert.equal(logged.length, 1);
    assert.equal(logged[0]?.code, 'MS_META_INVALID');

    await assert.rejects(devices.create('j1', E, 'volatile'), { code: 'MS_META_DAMAGED' });
    await assert.rejects(devices.remove('j1'), { code: 'MS_META_DAMAGED' });
    await assert.rejects(devices.resetReplica({ name: 'j1', policy: 'mirrored', medium: 'dram', size: E, epoch: 9, trimmedTo: 0, firstSeq: 1 }), { code: 'MS_META_DAMAGED' });
    await devices.close();
    for (const [file, bytes] of before) assert.ok((await readFile(join(nvram, file))).equals(bytes), `${file} untouched`);
  });
}

test('device metadata is replaced durably: fsync of the file before the rename, fsync of the directory after', async (t) => {
  const dataDir = await tempDir(t);
  await mkdir(join(dataDir, 'nvram'));
  const fs = recordingFs(join(dataDir, 'nvram'));
  const devices = await manager(dataDir, { fs });
  t.after(() => devices.close());
  await devices.create('j1', E, 'volatile');
  assert.deepEqual(fs.calls, ['rm j1.json.tmp', 'open j1.json.tmp WRONLY|CREAT|EXCL|NOFOLLOW', 'write j1.json.tmp', 'sync j1.json.tmp', 'close j1.json.tmp', 'rename j1.json.tmp j1.json', 'open . r', 'sync .', 'close .']);
  assert.equal((await readDeviceMeta(join(dataDir, 'nvram'), 'j1')).policy, 'volatile');
});
