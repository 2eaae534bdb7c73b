import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { lstat, mkdir, readFile, readdir, symlink, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { META_MAX_BYTES, readMetaFile, replaceFile } from '../../../src/fs/meta-file.js';
import { recordingFs } from '../../support/recording-fs.js';
import { tempDir } from '../../support/node-process.js';

test('replaceFile writes and fsyncs a temporary file, renames it, then fsyncs the directory', async (t) => {
  const dir = await tempDir(t);
  const fs = recordingFs(dir);
  await replaceFile(join(dir, 'm.json'), '{"a":1}\n', fs);
  assert.deepEqual(fs.calls, ['rm m.json.tmp', 'open m.json.tmp WRONLY|CREAT|EXCL|NOFOLLOW', 'write m.json.tmp', 'sync m.json.tmp', 'close m.json.tmp', 'rename m.json.tmp m.json', 'open . r', 'sync .', 'close .']);
  assert.equal(await readFile(join(dir, 'm.json'), 'utf8'), '{"a":1}\n');
});

for (const step of ['open m.json.tmp', 'write', 'sync m.json.tmp', 'rename']) {
  test(`a failed ${step} leaves the old file whole and no temporary file`, async (t) => {
    const dir = await tempDir(t);
    await writeFile(join(dir, 'm.json'), 'old\n');
    const fs = recordingFs(dir);
    fs.failNext(step);
    await assert.rejects(replaceFile(join(dir, 'm.json'), 'new\n', fs), (error: { code?: string; message: string }) => {
      assert.equal(error.code, 'MS_DATA_DIR');
      assert.match(error.message, /cannot write .*m\.json: EIO/);
      return true;
    });
    assert.equal(await readFile(join(dir, 'm.json'), 'utf8'), 'old\n');
    assert.deepEqual(await readdir(dir), ['m.json']);
    assert.ok(!fs.calls.some((c) => c.startsWith('open . ')), 'no directory sync after a failed write');
  });
}

test('replaceFile never writes through a symlink at the temporary name: the link goes, the file outside stays', async (t) => {
  // Review finding: open(tmp, 'w') followed a planted m.json.tmp symlink, overwrote the
  // file it pointed at, and the rename then made m.json itself that symlink.
  const dir = await tempDir(t);
  const outside = join(await tempDir(t), 'precious.txt');
  await writeFile(outside, 'not memstrata\'s\n');
  await symlink(outside, join(dir, 'm.json.tmp'));
  await symlink(join(dir, 'nowhere'), join(dir, 'n.json.tmp')); // dangling: open would create its target
  await replaceFile(join(dir, 'm.json'), '{"a":1}\n');
  await replaceFile(join(dir, 'n.json'), '{"b":2}\n');
  assert.equal(await readFile(outside, 'utf8'), 'not memstrata\'s\n', 'the file the link pointed at is untouched');
  for (const name of ['m.json', 'n.json']) assert.ok((await lstat(join(dir, name))).isFile(), `${name} is a regular file`);
  assert.equal(await readFile(join(dir, 'm.json'), 'utf8'), '{"a":1}\n');
  assert.deepEqual((await readdir(dir)).sort(), ['m.json', 'n.json'], 'no link left, and nothing made where the dangling link pointed');
});

test('a failed directory fsync is reported: the caller must not take the new content as durable', async (t) => {
  const dir = await tempDir(t);
  const fs = recordingFs(dir);
  fs.failNext('sync .');
  await assert.rejects(replaceFile(join(dir, 'm.json'), 'new\n', fs), /cannot sync directory/);
});

const schema = z.strictObject({ version: z.literal(1), name: z.string(), size: z.number().int().positive() });

test('readMetaFile names the file and the field of every way a file can be wrong', async (t) => {
  const dir = await tempDir(t);
  const cases: [string, string, string | null, RegExp][] = [
    ['truncated', '{"version":1,"name":"a","si', null, /is not valid JSON/],
    ['empty', '', null, /is not valid JSON/],
    ['not an object', '[1,2]', null, /field \(top level\)/],
    ['wrong type', '{"version":1,"name":"a","size":"big"}', 'size', /field size: /],
    ['negative', '{"version":1,"name":"a","size":-4096}', 'size', /field size: /],
    ['missing', '{"version":1,"name":"a"}', 'size', /field size: /],
    ['unknown version', '{"version":2,"name":"a","size":1}', 'version', /field version: /],
    ['unknown field', '{"version":1,"name":"a","size":1,"extra":true}', 'extra', /has unknown field extra/],
  ];
  for (const [what, text, field, message] of cases) {
    const path = join(dir, `${what.replace(/ /g, '-')}.json`);
    await writeFile(path, text);
    await assert.rejects(readMetaFile(path, schema, 'test metadata'), (error: { code?: string; message: string; details?: { file?: string; field?: string | null } }) => {
      assert.equal(error.code, 'MS_META_INVALID', what);
      assert.match(error.message, message, what);
      assert.ok(error.message.startsWith(`test metadata ${path} `), `${what}: ${error.message}`);
      assert.deepEqual(error.details, { file: path, field }, what);
      return true;
    });
  }
  await assert.rejects(readMetaFile(join(dir, 'absent.json'), schema, 'test metadata'), /cannot be read/);
  await writeFile(join(dir, 'ok.json'), '{"version":1,"name":"a","size":7}');
  assert.deepEqual(await readMetaFile(join(dir, 'ok.json'), schema, 'test metadata'), { version: 1, name: 'a', size: 7 });
});

test('readMetaFile opens only a regular file: a FIFO, a directory, a symlink and a device are refused, never opened', async (t) => {
  // Review finding: readFile of a FIFO named *.json blocked start-up forever in open(2).
  const dir = await tempDir(t);
  execFileSync('mkfifo', [join(dir, 'fifo.json')]);
  await mkdir(join(dir, 'dir.json'));
  await writeFile(join(dir, 'target.json'), '{"version":1,"name":"a","size":7}');
  await symlink(join(dir, 'target.json'), join(dir, 'link.json'));
  const cases: [string, RegExp][] = [
    [join(dir, 'fifo.json'), /is a FIFO, not a regular file/],
    [join(dir, 'dir.json'), /is a directory, not a regular file/],
    [join(dir, 'link.json'), /is a symbolic link, not a regular file/],
    ['/dev/zero', /is not a regular file \(a device or a socket\)/],
  ];
  for (const [path, message] of cases) {
    const fs = recordingFs(dir);
    await assert.rejects(readMetaFile(path, schema, 'test metadata', fs), (error: { code?: string; message: string; details?: { file?: string } }) => {
      assert.equal(error.code, 'MS_META_INVALID', path);
      assert.match(error.message, message, path);
      assert.equal(error.details?.file, path);
      return true;
    });
    assert.ok(!fs.calls.some((c) => c.startsWith('open ')), `${path} was never opened: ${fs.calls.join(', ')}`);
  }
});

test('readMetaFile refuses a file over 64 KiB before reading a byte of it', async (t) => {
  // Review finding: a 256 MiB sparse big.json was read whole (RSS ~600 MiB) before JSON.parse refused it.
  const dir = await tempDir(t);
  const big = join(dir, 'big.json');
  await writeFile(big, '');
  await truncate(big, 256 * 1024 * 1024);
  const fs = recordingFs(dir);
  await assert.rejects(readMetaFile(big, schema, 'test metadata', fs), (error: { code?: string; message: string }) => {
    assert.equal(error.code, 'MS_META_INVALID');
    assert.match(error.message, /big\.json is 268435456 bytes, more than the 65536 such a file may hold/);
    return true;
  });
  assert.ok(!fs.calls.some((c) => c.startsWith('read ') || c.startsWith('open ')), fs.calls.join(', '));
  const limit = join(dir, 'limit.json');
  await writeFile(limit, `{"version":1,"name":"a","size":7}${' '.repeat(META_MAX_BYTES - 33)}`);
  assert.deepEqual(await readMetaFile(limit, schema, 'test metadata'), { version: 1, name: 'a', size: 7 }, 'exactly 64 KiB still loads');
});
