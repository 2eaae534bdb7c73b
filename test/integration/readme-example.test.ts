// The README's rmem and host library examples, run as written against a real node (only ports and paths change).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { startNode, tempDir } from '../support/node-process.js';

test('the README rmem example runs against a node', async (t) => {
  const readme = await readFile(new URL('../../../README.md', import.meta.url), 'utf8');
  const section = readme.slice(readme.indexOf('## Remote memory'));
  const code = /```ts\n([\s\S]*?)```/.exec(section)?.[1];
  assert.ok(code !== undefined, 'README has a ts example under Remote memory');
  const dir = await tempDir(t);
  const node = await startNode({ cwd: dir });
  t.after(() => node.stop('SIGKILL'));
  assert.match(code, /port: 10810/);
  const script = `${code.replace('port: 10810', `port: ${node.rmem.port}`)}\nconsole.log(JSON.stringify({ data: data.toString(), a: a.toString(), b: b.length }));`;
  const result = spawnSync(process.execPath, ['--input-type=module', '-e', script], { cwd: new URL('../../..', import.meta.url).pathname, encoding: 'utf8', timeout: 20000 });
  assert.equal(result.status, 0, result.stderr);
  const last = result.stdout.trim().split('\n').pop() ?? '';
  assert.deepEqual(JSON.parse(last), { data: 'hello', a: 'hello', b: 8 });
});

test('the README host library example runs against a node', async (t) => {
  const readme = await readFile(new URL('../../../README.md', import.meta.url), 'utf8');
  const section = readme.slice(readme.indexOf('## Host library'));
  const code = /```ts\n([\s\S]*?)```/.exec(section)?.[1];
  assert.ok(code !== undefined, 'README has a ts example under Host library');
  const dir = await tempDir(t);
  const node = await startNode({ cwd: dir });
  t.after(() => node.stop('SIGKILL'));
  assert.match(code, /port: 10810/);
  assert.match(code, /nbd:\/\/127\.0\.0\.1:10809\/default/);
  const script = `${code
    .replace('port: 10810', `port: ${node.rmem.port}`)
    .replace('nbd://127.0.0.1:10809/default', `nbd://127.0.0.1:${node.nbd.port}/default`)
    .replace('/tmp/app-1.flash', `${dir}/app-1.flash`)}\nconsole.log(JSON.stringify({ text }));`;
  const result = spawnSync(process.execPath, ['--input-type=module', '-e', script], { cwd: new URL('../../..', import.meta.url).pathname, encoding: 'utf8', timeout: 20000 });
  assert.equal(result.status, 0, result.stderr);
  assert.match(result.stdout, /DEVICE +MEDIUM +OFFERED +ASSIGNED +STATE/);
  assert.match(result.stdout, /node-a +dram/);
  assert.match(result.stdout, /VIRTUAL ADDRESS +DEVICE +MEDIUM +PHYSICAL ADDRESS/);
  const last = result.stdout.trim().split('\n').pop() ?? '';
  assert.deepEqual(JSON.parse(last), { text: 'far away' });
});
