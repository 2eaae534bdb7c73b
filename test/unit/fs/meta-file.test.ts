import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { readMetaFile, replaceFile } from '../../../src/fs/meta-file.js';
import { recordingFs } from '../../support/recording-fs.js';
import { tempDir } from '../../support/node-process.js';

test('replaceFile writes and fsyncs a temporary file, renames it, then fsyncs the directory', async (t) => {
  const dir = await tempDir(t);
  const fs = recordingFs(dir);
  await replaceFile(join(dir, 'm.json'), '{"a":1}\n', fs);
  assert.deepEqual(fs.calls, ['open m.json.tmp w', 'write m.json.tmp', 'sync m.json.tmp', 'close m.json.tmp', 'rename m.json.tmp m.json', 'open . r', 'sync .', 'close .']);
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
