// The guest supervisor's lifecycle (issue 12, first part): real child processes in their
// own process groups, stopped and reset as whole trees, restarted by policy with a
// backoff, definitions kept across a node restart, output in a bounded log.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { lstat, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { alive } from '../../support/node-process.js';
import { GuestSupervisor, type GuestInfo } from '../../../src/guest/supervisor.js';

const log = pino({ level: 'silent' });

/** Removes a test directory; retried, and never failing the test, since a guest may still be writing its log as it goes. */
async function removeDir(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true, maxRetries: 10, retryDelay: 50 }).catch(() => undefined);
}
type Ctx = { after(fn: () => Promise<void> | void): void };

async function supervisor(t: Ctx, dataDir?: string, options: { logBytes?: number; graceMs?: number } = {}): Promise<{ guests: GuestSupervisor; dataDir: string }> {
  const dir = dataDir ?? (await mkdtemp(join(tmpdir(), 'memstrata-guest-')));

  const guests = new GuestSupervisor({ dataDir: dir, log, graceMs: options.graceMs ?? 2000, ...(options.logBytes === undefined ? {} : { logBytes: options.logBytes }) });
  await guests.open();
  // One hook, in this order: the guests stop before their directory goes.
  t.after(async () => {
    await guests.close();
    if (dataDir === undefined) await removeDir(dir);
  });
  return { guests, dataDir: dir };
}

async function until(what: string, probe: () => boolean | Promise<boolean>, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error(`${what}: not reached in ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const sleeper = ['sh', '-c', 'echo started; sleep 60 & echo $! > child.pid; wait'];

test('a guest runs in its own process group; stop takes its whole tree down, children included', async (t) => {
  const { guests } = await supervisor(t);
  const info = await guests.create({ name: 'g', command: sleeper });
  assert.ok(info.state === 'booting' || info.state === 'running');
  await until('running', () => guests.info('g').state === 'running');
  const pid = guests.info('g').pid;
  const dir = join(guests.dir, 'g');
  await until('the child started', async () => (await readFile(join(dir, 'child.pid'), 'utf8').catch(() => '')).trim() !== '');
  const childPid = Number((await readFile(join(dir, 'child.pid'), 'utf8')).trim());
  assert.ok(alive(pid) && alive(childPid));
  await guests.stop('g');
  assert.equal(guests.info('g').state, 'stopped');
  await until('the tree is gone', () => !alive(pid) && !alive(childPid));
  await until('the log has its output', async () => (await readFile(join(dir, 'log'), 'utf8').catch(() => '')).includes('started'));
});

test('reset kills the tree and boots it again: a new pid, and another guest untouched', async (t) => {
  const { guests } = await supervisor(t);
  await guests.create({ name: 'a', command: ['sleep', '60'] });
  await guests.create({ name: 'b', command: ['sleep', '60'] });
  await until('both running', () => guests.list().every((g) => g.state === 'running'));
  const [a, b] = [guests.info('a').pid, guests.info('b').pid];
  const after = await guests.reset('a');
  await until('a running again', () => guests.info('a').state === 'running');
  assert.notEqual(guests.info('a').pid, a);
  assert.equal(after.resets, 1);
  assert.ok(!alive(a), 'the old process is gone');
  assert.equal(guests.info('b').pid, b, 'the other guest keeps its process');
  assert.equal(guests.info('b').restarts, 0);
});

test('restart policies: on-failure restarts a crashing guest with a growing backoff, never leaves it failed, a clean exit is not restarted', async (t) => {
  const { guests } = await supervisor(t);
  await guests.create({ name: 'crash', command: ['sh', '-c', 'exit 3'], restart: 'on-failure' });
  await guests.create({ name: 'once', command: ['sh', '-c', 'exit 3'], restart: 'never' });
  await guests.create({ name: 'clean', command: ['true'], restart: 'on-failure' });
  await until('once failed', () => guests.info('once').state === 'failed');
  assert.deepEqual(guests.info('once').lastExit, { code: 3, signal: null });
  await until('clean stopped', () => guests.info('clean').state === 'stopped');
  await until('restarted', () => guests.info('crash').restarts >= 1);
  await new Promise((r) => setTimeout(r, 1000));
  const restarts = guests.info('crash').restarts;
  // Backoff 100, 200, 400, 800 ms...: a few restarts in a second or so, never a busy loop of dozens.
  assert.ok(restarts <= 6, `${restarts} restarts in about a second`);
  await guests.stop('crash');
  assert.equal(guests.info('crash').state, 'stopped');
  const stopped = guests.info('crash').restarts;
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(guests.info('crash').restarts, stopped, 'a stopped guest is not restarted');
});

test('a command that cannot be run fails the guest with the reason; the supervisor goes on', async (t) => {
  const { guests } = await supervisor(t);
  await guests.create({ name: 'nope', command: ['/nonexistent/program'], restart: 'always' });
  await until('failed', () => guests.info('nope').state === 'failed');
  assert.match(guests.info('nope').error ?? '', /cannot run \/nonexistent\/program: .*ENOENT/);
  await guests.create({ name: 'ok', command: ['sleep', '60'] });
  await until('the other runs', () => guests.info('ok').state === 'running');
});

test('bad input gets coded errors and changes nothing', async (t) => {
  const { guests } = await supervisor(t);
  await assert.rejects(guests.create({ name: '../x', command: ['true'] }), { code: 'MS_GUEST_INVALID' });
  await assert.rejects(guests.create({ name: 'x', command: [] }), { code: 'MS_GUEST_INVALID' });
  await assert.rejects(guests.create({ name: 'x', command: ['true'], restart: 'sometimes' as never }), { code: 'MS_GUEST_INVALID' });
  await assert.rejects(guests.create({ name: 'x', command: ['true'], env: { 'BAD NAME': '1' } }), { code: 'MS_GUEST_INVALID' });
  await guests.create({ name: 'x', command: ['sleep', '60'] });
  await assert.rejects(guests.create({ name: 'x', command: ['true'] }), { code: 'MS_GUEST_EXISTS' });
  await assert.rejects(guests.start('y'), { code: 'MS_GUEST_NOT_FOUND' });
  await until('running', () => guests.info('x').state === 'running');
  await assert.rejects(guests.remove('x'), { code: 'MS_GUEST_BUSY' });
  await guests.stop('x');
  await guests.remove('x');
  assert.deepEqual(guests.list(), []);
});

test('definitions survive a node restart: guests that were running boot again, stopped ones stay stopped, a damaged definition is listed and the rest load', async (t) => {
  const first = await supervisor(t);
  await first.guests.create({ name: 'up', command: ['sleep', '60'] });
  await first.guests.create({ name: 'down', command: ['sleep', '60'] }, false);
  await until('up running', () => first.guests.info('up').state === 'running');
  const before = first.guests.info('up').pid;
  await first.guests.close();
  assert.ok(!alive(before), 'the node stops its guests when it stops');
  await writeFile(join(first.guests.dir, 'broken.json'), '{"name":"broken","command":[]}');
  const second = await supervisor(t, first.dataDir);
  await until('up running again', () => second.guests.info('up').state === 'running');
  assert.notEqual(second.guests.info('up').pid, before);
  assert.equal(second.guests.info('down').state, 'stopped');
  assert.deepEqual(second.guests.damaged().map((d) => [d.name, d.error.code]), [['broken', 'MS_META_INVALID']]);
  assert.deepEqual(second.guests.list().map((g: GuestInfo) => g.name), ['down', 'up']);
});

test('a guest\'s output goes to a bounded log: past the limit, log becomes log.1', async (t) => {
  const { guests } = await supervisor(t, undefined, { logBytes: 64 * 1024 });
  await guests.create({ name: 'chatty', command: ['sh', '-c', 'i=0; while [ $i -lt 4000 ]; do echo "line $i of a guest that talks too much"; i=$((i+1)); done'], restart: 'never' });
  await until('done', () => guests.info('chatty').state === 'stopped');
  const dir = join(guests.dir, 'chatty');
  // The guest's exit may come before its last output has gone through the pipe to the log.
  await until('the last line logged', async () => (await readFile(join(dir, 'log'), 'utf8').catch(() => '')).includes('line 3999 of a guest'));
  const [current, older] = [await stat(join(dir, 'log')), await stat(join(dir, 'log.1'))];
  assert.ok(current.size <= 64 * 1024 && older.size <= 64 * 1024, `log ${current.size} bytes, log.1 ${older.size} bytes`);
  assert.match(await readFile(join(dir, 'log'), 'utf8'), /line 3999 of a guest/);
});

test('followLogs streams the guest\'s output as it is written, through rotations, without a gap', async (t) => {
  const { guests } = await supervisor(t, undefined, { logBytes: 300 });
  await guests.create({ name: 'talker', command: ['sh', '-c', 'i=0; while :; do echo "line $i"; i=$((i + 1)); sleep 0.01; done'] });
  const stream = guests.followLogs('talker', 0);
  let text = '';
  stream.on('data', (chunk: Buffer) => { text += chunk.toString(); });
  await until('several rotations of output', () => text.split('\n').length > 120, 20_000);
  stream.destroy();
  const numbers = text.split('\n').filter((l) => /^line \d+$/.test(l)).map((l) => Number(l.slice(5)));
  assert.ok(numbers.length > 100);
  for (let i = 1; i < numbers.length; i++) assert.equal(numbers[i], (numbers[i - 1] ?? 0) + 1, `a gap or a repeat after line ${numbers[i - 1]}`);
  // A removed guest ends the stream.
  const ended = guests.followLogs('talker');
  const done = new Promise((resolve) => ended.once('end', resolve));
  ended.resume();
  await guests.stop('talker');
  await guests.remove('talker');
  await done;
});

test('--user: the guest runs as that user in a home of its own, cannot touch the node\'s files for it, and an unknown user is refused', async (t) => {
  if (process.getuid?.() !== 0) {
    t.skip('running a guest as another user needs root');
    return;
  }
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-guest-'));
  t.after(() => removeDir(dir));
  // The user must be able to reach its directory: the data directory is traversable.
  await (await import('node:fs/promises')).chmod(dir, 0o711);
  const { guests } = await supervisor(t, dir);
  await assert.rejects(guests.create({ name: 'ghost', command: ['true'], user: 'no-such-user-here' }), { code: 'MS_GUEST_INVALID' });
  // It tries to replace the node's files next to its home (its log, its socket) with links.
  await guests.create({ name: 'low', command: ['sh', '-c', 'id -u > whoami; ln -sf /etc/passwd ../log 2> link.err; rm -f ../rmem.sock 2>> link.err; exec sleep 60'], user: 'nobody' });
  await until('running', () => guests.info('low').state === 'running');
  const pid = guests.info('low').pid ?? 0;
  const home = join(guests.dir, 'low', 'home');
  await until('it wrote who it is', async () => (await readFile(join(home, 'whoami'), 'utf8').catch(() => '')).trim() !== '');
  assert.equal((await readFile(join(home, 'whoami'), 'utf8')).trim(), '65534');
  assert.match(await readFile(`/proc/${pid}/status`, 'utf8'), /^Uid:\s+65534\s/m);
  assert.equal((await stat(home)).uid, 65534, 'its home is its own');
  assert.equal((await stat(join(guests.dir, 'low'))).uid, 0, 'the directory holding the node\'s files is not');
  await until('its attempts failed', async () => (await readFile(join(home, 'link.err'), 'utf8').catch(() => '')).split('\n').filter(Boolean).length >= 1);
  assert.ok(!(await lstat(join(guests.dir, 'low', 'log')).then((st) => st.isSymbolicLink(), () => false)), 'no link where the node writes');
  assert.equal(guests.info('low').user, 'nobody');
});
