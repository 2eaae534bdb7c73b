// The NBD service driven by real clients: nbdinfo, nbdsh, qemu-io, qemu-img, nbdcopy, fio.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { missing, nbdsh, run } from '../support/tools.js';

type Ctx = { after(fn: () => Promise<unknown>): void };

async function node(t: Ctx, dir?: string): Promise<NodeProcess> {
  const cwd = dir ?? (await tempDir(t));
  const n = await startNode({ cwd });
  t.after(() => n.stop('SIGKILL'));
  return n;
}

const uri = (n: NodeProcess, name = ''): string => `nbd://${n.nbd.host}:${n.nbd.port}/${name}`;

async function createVolume(n: NodeProcess, name: string, size: string, readOnly = false): Promise<void> {
  const response = await fetch(`${n.url}/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name, size, readOnly }) });
  assert.equal(response.status, 201, await response.text());
}

test('nbdinfo: list, size, flags, contexts and the allocation map', async (t) => {
  if (missing('nbdinfo') !== undefined) return;
  const n = await node(t);
  await createVolume(n, 'ro', '4MiB', true);
  const list = await run('nbdinfo', ['--list', '--json', uri(n)]);
  assert.equal(list.code, 0, list.stderr);
  const exports = (JSON.parse(list.stdout) as { exports: { 'export-name': string; 'export-size': number; is_read_only: boolean; can_trim: boolean; can_multi_conn: boolean; can_flush: boolean; can_fua: boolean; can_zero: boolean; can_fast_zero: boolean; can_cache: boolean; contexts: string[] }[] }).exports;
  const byName = new Map(exports.map((e) => [e['export-name'], e]));
  const def = byName.get('default')!;
  assert.equal(def['export-size'], 64 * 2 ** 20);
  assert.deepEqual(
    [def.is_read_only, def.can_trim, def.can_multi_conn, def.can_flush, def.can_fua, def.can_zero, def.can_fast_zero, def.can_cache],
    [false, true, true, true, true, true, true, true],
  );
  assert.deepEqual(def.contexts, ['base:allocation']);
  const ro = byName.get('ro')!;
  assert.deepEqual([ro.is_read_only, ro.can_trim, ro.can_zero], [true, false, false]);

  const empty = await run('nbdinfo', ['--map', uri(n)]);
  assert.match(empty.stdout.trim(), /^0\s+67108864\s+3\s+hole,zero$/);
  const write = await run('qemu-io', ['-f', 'raw', uri(n), '-c', 'write -P 0x5a 1M 64k']);
  if (write.code === 0) {
    const map = await run('nbdinfo', ['--map', uri(n)]);
    assert.match(map.stdout, /1048576\s+65536\s+0\s+data/);
  }
  const unknown = await run('nbdinfo', [uri(n, 'nope')]);
  assert.notEqual(unknown.code, 0);
  assert.match(unknown.stderr, /nope/);
});

test('qemu-io: patterns written at many offsets and sizes read back', async (t) => {
  if (missing('qemu-io') !== undefined) return;
  const n = await node(t);
  const cases: [number, number, number][] = [
    [0, 4096, 0x11],
    [4096 * 3, 512, 0x22],
    [8192 + 1000, 3, 0x33], // unaligned, inside one sector
    [65536 - 100, 200, 0x44], // across a 64 KiB chunk boundary
    [5 * 2 ** 20 + 7, 123457, 0x55],
    [64 * 2 ** 20 - 4096, 4096, 0x66], // the last sector
    [2 * 2 ** 20, 2 ** 20, 0x77],
  ];
  const commands = cases.flatMap(([offset, length, pattern]) => ['-c', `write -P ${pattern} ${offset} ${length}`]);
  const checks = cases.flatMap(([offset, length, pattern]) => ['-c', `read -P ${pattern} ${offset} ${length}`]);
  const result = await run('qemu-io', ['-f', 'raw', uri(n), ...commands, '-c', 'flush', ...checks, '-c', `read -P 0 ${10 * 2 ** 20 + 10000} 50000`]);
  assert.equal(result.code, 0, result.stderr + result.stdout);
  assert.doesNotMatch(result.stdout, /Pattern verification failed|error/i);
});

test('qemu-img convert into a volume and back is bit-identical; so is nbdcopy', async (t) => {
  if (missing('qemu-img', 'nbdcopy') !== undefined) return;
  const n = await node(t);
  await createVolume(n, 'img', '8MiB');
  const dir = await tempDir(t);
  const source = join(dir, 'source.img');
  const image = randomBytes(8 * 2 ** 20);
  image.fill(0, 2 ** 20, 3 * 2 ** 20); // a zero run, which qemu-img may send as a zero request
  await writeFile(source, image);
  const into = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', source, uri(n, 'img')]);
  assert.equal(into.code, 0, into.stderr);
  const back = join(dir, 'back.img');
  const out = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri(n, 'img'), back]);
  assert.equal(out.code, 0, out.stderr);
  assert.ok((await readFile(back)).equals(image), 'qemu-img round trip differs');

  await createVolume(n, 'copy', '8MiB');
  assert.equal((await run('nbdcopy', [source, uri(n, 'copy')])).code, 0);
  const copied = join(dir, 'copied.img');
  assert.equal((await run('nbdcopy', [uri(n, 'copy'), copied])).code, 0);
  assert.ok((await readFile(copied)).equals(image), 'nbdcopy round trip differs');
});

test('fio with the nbd engine: mixed random I/O verified with crc32c, across two connections', async (t) => {
  if (missing('fio') !== undefined) return;
  const n = await node(t);
  const args = ['--ioengine=nbd', `--uri=${uri(n)}`, '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--output-format=json'];
  const scratch = await tempDir(t);
  const result = await run('fio', [
    '--name=mixed', '--rw=randrw', '--rwmixread=40', '--bsrange=512-64k', '--iodepth=16', '--size=24M', '--offset=0', ...args,
    '--name=second', '--rw=randwrite', '--bs=4k', '--iodepth=8', '--size=16M', '--offset=32M', ...args,
  ], { timeoutMs: 120_000, cwd: scratch }); // fio leaves verify state files in its working directory
  assert.equal(result.code, 0, result.stderr);
  const report = JSON.parse(result.stdout.slice(result.stdout.indexOf('{'))) as { jobs: { jobname: string; error: number }[] };
  assert.deepEqual(report.jobs.map((j) => [j.jobname, j.error]), [['mixed', 0], ['second', 0]]);
});

test('nbdsh: TRIM, WRITE_ZEROES, BLOCK_STATUS, FUA, CACHE and the errors', async (t) => {
  if (missing('nbdsh') !== undefined) return;
  const n = await node(t);
  await createVolume(n, 'ro', '1MiB', true);
  const script = `
import errno
# Strict mode off: requests go to the server, which must refuse them itself.
h.set_strict_mode(0)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(${JSON.stringify(uri(n))})
M = 1 << 20
h.pwrite(b"\\xaa" * M, 0, nbd.CMD_FLAG_FUA)
assert h.pread(M, 0) == b"\\xaa" * M
h.trim(M // 2, 0)
assert h.pread(M // 2, 0) == b"\\0" * (M // 2), "trim reads back zeros"
h.pwrite(b"\\xbb" * 8192, 2 * M)
h.zero(4096, 2 * M + 1024)
assert h.pread(8192, 2 * M) == b"\\xbb" * 1024 + b"\\0" * 4096 + b"\\xbb" * 3072, "write_zeroes inside a chunk"
h.zero(M, 4 * M, nbd.CMD_FLAG_FAST_ZERO)
h.pwrite(b"\\xcc" * M, 4 * M)
h.zero(M, 4 * M, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(M, 4 * M) == b"\\0" * M
h.cache(M, 0)
h.flush()
seen = []
def extents(meta, offset, entries, err):
    if meta == nbd.CONTEXT_BASE_ALLOCATION:
        seen.extend(entries)
    return 0
h.block_status(8 * M, 0, extents)
assert seen[0:2] == [M // 2, 3], seen[0:4]
assert seen[2:4] == [M // 2, 0], seen[0:4]
one = []
h.block_status(8 * M, 0, lambda m, o, e, err: one.extend(e) or 0, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 2, one
try:
    h.pread(4096, 64 * M - 1024)
    assert False, "read past the end succeeded"
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
h.shutdown()
ro = nbd.NBD()
ro.set_strict_mode(0)
ro.connect_uri(${JSON.stringify(uri(n, 'ro'))})
assert ro.is_read_only()
try:
    ro.pwrite(b"x", 0)
    assert False, "write to a read-only export succeeded"
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
ro.shutdown()
print("ok")
`;
  const result = await nbdsh(['-c', script], { timeoutMs: 60_000 });
  assert.equal(result.code, 0, result.stderr + result.stdout);
  assert.match(result.stdout, /ok/);
});

test('durability: flushed writes survive kill -9; neighbours of unflushed writes are intact', async (t) => {
  if (missing('qemu-io', 'fio') !== undefined) return;
  const dir = await tempDir(t);
  const first = await node(t, dir);
  const jobs = ['--ioengine=nbd', `--uri=${uri(first)}`, '--name=durable', '--rw=randwrite', '--bs=4k', '--iodepth=16', '--size=16M', '--verify=crc32c', '--randseed=42', '--end_fsync=1', '--do_verify=0'];
  const write = await run('fio', jobs, { timeoutMs: 120_000, cwd: dir });
  assert.equal(write.code, 0, write.stderr);
  // Unflushed writes after the flush, in a range the fio job does not use.
  await run('qemu-io', ['-f', 'raw', uri(first), '-c', 'write -P 0x99 32M 1M']);
  assert.equal(await first.stop('SIGKILL'), 'SIGKILL');

  const second = await node(t, dir);
  const verify = await run('fio', [...jobs.filter((a) => !a.startsWith('--uri') && a !== '--do_verify=0'), `--uri=${uri(second)}`, '--verify_only', '--verify_fatal=1'], { timeoutMs: 120_000, cwd: dir });
  assert.equal(verify.code, 0, verify.stderr + verify.stdout);
  assert.doesNotMatch(verify.stdout + verify.stderr, /verify: bad|bad magic/);
  const around = await run('qemu-io', ['-f', 'raw', uri(second), '-c', 'read -P 0 31M 1M', '-c', 'read -P 0 33M 1M']);
  assert.equal(around.code, 0, around.stderr);
  assert.doesNotMatch(around.stdout, /Pattern verification failed/);
});

test('multi-conn: connections see each other\'s completed writes, and a FLUSH on one covers all', async (t) => {
  if (missing('nbdsh') !== undefined) return;
  const dir = await tempDir(t);
  const first = await node(t, dir);
  const script = `
a = h
a.connect_uri(${JSON.stringify(uri(first))})
b = nbd.NBD()
b.connect_uri(${JSON.stringify(uri(first))})
c = nbd.NBD()
c.connect_uri(${JSON.stringify(uri(first))})
assert a.can_multi_conn()
a.pwrite(b"A" * 65536, 0)
b.pwrite(b"B" * 4096, 1 << 20)
assert c.pread(65536, 0) == b"A" * 65536, "c sees a's completed write"
assert a.pread(4096, 1 << 20) == b"B" * 4096, "a sees b's completed write"
c.flush()  # covers the writes completed on a and b
print("flushed")
`;
  const result = await nbdsh(['-c', script], { timeoutMs: 60_000 });
  assert.equal(result.code, 0, result.stderr + result.stdout);
  assert.equal(await first.stop('SIGKILL'), 'SIGKILL');
  const second = await node(t, dir);
  const check = await nbdsh(['-c', `
h.connect_uri(${JSON.stringify(uri(second))})
assert h.pread(65536, 0) == b"A" * 65536, "a's write survived the kill through c's flush"
assert h.pread(4096, 1 << 20) == b"B" * 4096, "b's write survived the kill through c's flush"
print("ok")
`], { timeoutMs: 60_000 });
  assert.equal(check.code, 0, check.stderr + check.stdout);
});

test('journaled volume: FUA writes and FLUSH acknowledged through the NVRAM write log survive kill -9', async (t) => {
  if (missing('nbdsh') !== undefined) return;
  const dir = await tempDir(t);
  const first = await node(t, dir);
  const created = await fetch(`${first.url}/v1/nvram`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'wl', size: '4MiB', policy: 'local' }) });
  assert.equal(created.status, 201, await created.text());
  const volume = await fetch(`${first.url}/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'jv', size: '16MiB', writeLog: 'wl' }) });
  assert.equal(volume.status, 201, await volume.text());
  const inUse = await fetch(`${first.url}/v1/nvram/wl`, { method: 'DELETE' });
  assert.equal(inUse.status, 400, 'a write log in use cannot be removed');
  // 600 FUA writes of 8 KiB (more than the 4 MiB journal holds, so checkpoints run),
  // then plain writes covered by one FLUSH; each block's content names the block.
  const script = `
h.connect_uri(${JSON.stringify(uri(first, 'jv'))})
import random
random.seed(7)
blocks = random.sample(range(1900), 600)  # the last 400 KiB take the plain writes
for b in blocks:
    h.pwrite(bytes([b % 251]) * 8192, b * 8192, nbd.CMD_FLAG_FUA)
for b in range(100):
    h.pwrite(bytes([(b * 7) % 251]) * 4096, 16 * 1024 * 1024 - (b + 1) * 4096)
h.flush()
print(",".join(str(b) for b in blocks))
`;
  const wrote = await nbdsh(['-c', script], { timeoutMs: 120_000 });
  assert.equal(wrote.code, 0, wrote.stderr + wrote.stdout);
  const blocks = wrote.stdout.trim().split(',').map(Number);
  assert.equal(blocks.length, 600);
  assert.equal(await first.stop('SIGKILL'), 'SIGKILL');

  const second = await node(t, dir);
  const replayed = second.logs.find((l) => l.msg === 'write log replayed into the volume');
  assert.ok(replayed !== undefined && typeof replayed.records === 'number' && replayed.records > 0, 'journaled writes were replayed before serving');
  const check = await nbdsh(['-c', `
h.connect_uri(${JSON.stringify(uri(second, 'jv'))})
for b in [${blocks.join(',')}]:
    got = h.pread(8192, b * 8192)
    assert got == bytes([b % 251]) * 8192, "FUA block %d lost" % b
for b in range(100):
    got = h.pread(4096, 16 * 1024 * 1024 - (b + 1) * 4096)
    assert got == bytes([(b * 7) % 251]) * 4096, "flushed block %d lost" % b
print("ok")
`], { timeoutMs: 120_000 });
  assert.equal(check.code, 0, check.stderr + check.stdout);
  const devices = (await (await fetch(`${second.url}/v1/nvram`)).json()) as { devices: { name: string; records: number }[] };
  assert.equal(devices.devices.find((d) => d.name === 'wl')?.records, 0, 'the replay trimmed the journal');
});

test('libnbd asynchronous API: commands pipelined, then disconnect while they are in flight: every one completes', async (t) => {
  if (missing('nbdsh') !== undefined) return;
  const n = await node(t);
  // libnbd sends NBD_CMD_DISC right behind the commands and shuts down its sending side;
  // the server must still answer all of them (proto.md, NBD_CMD_DISC), READs whole.
  const script = `
M = 1 << 20
h.connect_uri(${JSON.stringify(uri(n))})
for i in range(8):
    h.pwrite(bytes([i + 1]) * M, i * M)
for round in range(3):
    cookies = []
    bufs = {}
    for i in range(24):
        kind = i % 4
        if kind == 0 or kind == 1:
            buf = nbd.Buffer(M)
            c = h.aio_pread(buf, (i % 8) * M)
            bufs[c] = (buf, i % 8)
        elif kind == 2:
            c = h.aio_pwrite(bytes([100 + i]) * 65536, 32 * M + i * 65536, flags=nbd.CMD_FLAG_FUA)
        else:
            c = h.aio_flush()
        cookies.append(c)
    if round < 2:
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)
        continue
    h.aio_disconnect(0)
    while not h.aio_is_closed():
        if h.aio_is_dead():
            raise Exception("connection died with %d commands in flight" % h.aio_in_flight())
        h.poll(-1)
    failed = 0
    for c in cookies:
        try:
            assert h.aio_command_completed(c)
        except nbd.Error as e:
            failed += 1
    assert failed == 0, "%d of %d commands failed" % (failed, len(cookies))
    for c, (buf, block) in bufs.items():
        assert buf.to_bytearray() == bytes([block + 1]) * M, "READ of block %d came back whole" % block
print("ok")
`;
  const result = await nbdsh(['-c', script], { timeoutMs: 60_000 });
  assert.equal(result.code, 0, result.stderr + result.stdout);
  assert.match(result.stdout, /ok/);
});
