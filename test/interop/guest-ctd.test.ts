// Cut-through devices with real clients from inside guests (issue 12, item 3): each guest
// runs nbdinfo, qemu-io and fio over nbd+unix:// on its own nbd.sock, and the memstrata
// client over its rmem.sock, and is refused the other guest's volume and device with the
// protocols' ordinary answers. Then, from outside: what a guest wrote is on its volume
// over TCP NBD, attached volumes and devices cannot be removed, detach and attach work
// while the guests run, and a reset changes only that guest's pid and keeps its data.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { GuestInfoJson } from '../../src/protocol/admin/api.js';
import { RmemClient } from '../../src/client/index.js';
import { missing, run } from '../support/tools.js';
import { runCli, startNode, tempDir } from '../support/node-process.js';

const CLIENT = fileURLToPath(new URL('../../src/client/index.js', import.meta.url));
const TOKEN = 'ctd-test-token-0123456789';

// The guest program: every client against its own devices, then against the other guest's.
const GUEST_SCRIPT = `#!/bin/sh
env | grep '^MEMSTRATA_' | sort > env.txt
U="nbd+unix:///$VOLUME?socket=$MEMSTRATA_CTD_SOCKET"
nbdinfo --json "$U" > nbdinfo.json 2> nbdinfo.err; echo $? > nbdinfo.rc
nbdinfo --list --json "nbd+unix://?socket=$MEMSTRATA_CTD_SOCKET" > list.json 2> list.err
qemu-io -f raw -c 'write -P 0xab 0 64k' -c flush -c 'read -P 0xab 0 64k' "$U" > qemu-io.out 2>&1; echo $? > qemu-io.rc
fio --name=ctd --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --size=2m --offset=1m --iodepth=8 --verify=crc32c --do_verify=1 --output-format=json > fio.json 2> fio.err; echo $? > fio.rc
nbdinfo "nbd+unix:///$OTHER_VOLUME?socket=$MEMSTRATA_CTD_SOCKET" > other.out 2>&1; echo $? > other.rc
"$NODE_BIN" "$NVRAM_SCRIPT" > nvram.json 2> nvram.err; echo $? > nvram.rc
touch done
exec sleep 600
`;

const NVRAM_SCRIPT = `import { RmemClient } from ${JSON.stringify(CLIENT)};
const env = process.env;
const client = await RmemClient.connect({ path: env.MEMSTRATA_NVRAM_SOCKET, serverId: 'app', keepalive: false });
const device = env.MEMSTRATA_NVRAM_DEVICES.split(',')[0];
const journal = await client.journalOpen(device, 1);
const [ack] = await client.journalAppend(journal, [{ payload: Buffer.from('put from ' + env.MEMSTRATA_GUEST), target: { volume: env.VOLUME, offset: 0 } }]);
const refused = async (name) => { try { await client.journalOpen(name, 1); return 'opened'; } catch (e) { return e.code; } };
const region = await client.bind(4096, { medium: 'dram' });
await client.write(region, 0, Buffer.from('mine'));
console.log(JSON.stringify({ device, seq: ack.seq, other: await refused(env.OTHER_NVRAM), unknown: await refused('no-such-device') }));
await client.close();
`;

test('guests reach exactly their own volumes and NVRAM devices through their cut-through sockets, with nbdinfo, qemu-io, fio and the memstrata client', async (t) => {
  const skip = missing('nbdinfo', 'qemu-io', 'fio');
  if (skip !== undefined) {
    t.skip(skip);
    return;
  }
  const dir = await tempDir(t);
  const scripts = await tempDir(t);
  const env = { MEMSTRATA_ADMIN_TOKEN: TOKEN };
  const node = await startNode({ cwd: dir, env });
  // SIGTERM: a node stopped cleanly stops its guests; one killed would leave them running.
  t.after(() => node.stop('SIGTERM'));
  const cli = async (...args: string[]): Promise<string> => {
    const result = await runCli([...args.slice(0, 3), '--admin', node.url, ...args.slice(3)], { env });
    assert.equal(result.code, 0, `${args.join(' ')}: ${result.stderr}`);
    return result.stdout;
  };
  const refused = async (...args: string[]): Promise<string> => {
    const result = await runCli([...args, '--admin', node.url], { env });
    assert.notEqual(result.code, 0, `${args.join(' ')} should be refused: ${result.stdout}`);
    return result.stderr;
  };
  await writeFile(join(scripts, 'guest.sh'), GUEST_SCRIPT, { mode: 0o755 });
  await writeFile(join(scripts, 'nvram.mjs'), NVRAM_SCRIPT);
  for (const v of ['va', 'vb']) await cli('volume', 'create', v, '--size', '16MiB');
  for (const d of ['da', 'db']) await cli('nvram', 'create', d, '--size', '1MiB', '--policy', 'local');

  const guestDir = (name: string): string => join(dir, 'memstrata-data', 'guests', name);
  const boot = async (name: string, volume: string, device: string, otherVolume: string, otherDevice: string): Promise<void> => {
    await cli('guest', 'create', name, '--volume', volume, '--nvram', device,
      '--env', `VOLUME=${volume}`, '--env', `OTHER_VOLUME=${otherVolume}`, '--env', `OTHER_NVRAM=${otherDevice}`,
      '--env', `NODE_BIN=${process.execPath}`, '--env', `NVRAM_SCRIPT=${join(scripts, 'nvram.mjs')}`,
      '--', join(scripts, 'guest.sh'));
  };
  await boot('a', 'va', 'da', 'vb', 'db');
  await boot('b', 'vb', 'db', 'va', 'da');
  const file = (guest: string, name: string): Promise<string> => readFile(join(guestDir(guest), name), 'utf8');
  for (const g of ['a', 'b']) {
    const deadline = Date.now() + 90_000;
    while (!(await file(g, 'done').then(() => true, () => false))) {
      assert.ok(Date.now() < deadline, `guest ${g} did not finish its clients: ${await cli('guest', 'logs', g)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  for (const [g, volume, device, other] of [['a', 'va', 'da', 'vb'], ['b', 'vb', 'db', 'va']] as const) {
    const envText = await file(g, 'env.txt');
    assert.match(envText, new RegExp(`MEMSTRATA_CTD_SOCKET=${guestDir(g)}/nbd.sock`));
    assert.match(envText, new RegExp(`MEMSTRATA_NVRAM_SOCKET=${guestDir(g)}/rmem.sock`));
    assert.match(envText, new RegExp(`MEMSTRATA_NVRAM_DEVICES=${device}\\n`));
    assert.match(envText, /MEMSTRATA_NVRAM_PATHS=unix:.*rmem\.sock,tcp:127\.0\.0\.1:\d+/);
    assert.equal((await file(g, 'nbdinfo.rc')).trim(), '0', await file(g, 'nbdinfo.err'));
    const info = JSON.parse(await file(g, 'nbdinfo.json')) as { exports: { 'export-name': string; 'export-size': number }[] };
    assert.equal(info.exports[0]?.['export-name'], volume);
    assert.equal(info.exports[0]?.['export-size'], 16 * 1024 * 1024);
    const list = JSON.parse(await file(g, 'list.json')) as { exports: { 'export-name': string }[] };
    assert.deepEqual(list.exports.map((e) => e['export-name']), [volume], 'NBD_OPT_LIST shows the guest its own volumes only');
    assert.equal((await file(g, 'qemu-io.rc')).trim(), '0', await file(g, 'qemu-io.out'));
    assert.match(await file(g, 'qemu-io.out'), /wrote 65536\/65536 bytes/);
    assert.equal((await file(g, 'fio.rc')).trim(), '0', await file(g, 'fio.err'));
    // fio's nbd engine says "connected to NBD server" on stdout before its JSON.
    const fioOut = await file(g, 'fio.json');
    const fio = JSON.parse(fioOut.slice(fioOut.indexOf('{'))) as { jobs: { error: number; write: { io_bytes: number } }[] };
    assert.equal(fio.jobs[0]?.error, 0);
    assert.equal(fio.jobs[0]?.write.io_bytes, 2 * 1024 * 1024);
    assert.notEqual((await file(g, 'other.rc')).trim(), '0', `guest ${g} reached volume ${other}`);
    assert.match(await file(g, 'other.out'), /export.*not (found|present)|unknown export|NBD_REP_ERR_UNKNOWN|No such file|server has no export/i);
    assert.equal((await file(g, 'nvram.rc')).trim(), '0', await file(g, 'nvram.err'));
    const nvram = JSON.parse(await file(g, 'nvram.json')) as { device: string; seq: number; other: string; unknown: string };
    assert.equal(nvram.device, device);
    assert.equal(nvram.other, 'MS_NVRAM_NOT_FOUND', 'another guest\'s device answers as an unknown one');
    assert.equal(nvram.unknown, 'MS_NVRAM_NOT_FOUND');
  }

  // From outside, over TCP: what guest a wrote through its socket is on its volume.
  const tcpNbd = (await fetchJson<{ listen: { nbd: string; rmem: string } }>(node.url, '/v1/node')).listen;
  const check = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0xab 0 64k', `nbd://${tcpNbd.nbd}/va`]);
  assert.equal(check.code, 0, check.stdout + check.stderr);
  assert.doesNotMatch(check.stdout, /Pattern verification failed/);

  // Attached devices stay: not removed, not attached to another guest, not a write log.
  assert.match(await refused('volume', 'rm', 'va'), /^memstrata: MS_GUEST_ATTACHED.*guest a/);
  assert.match(await refused('nvram', 'rm', 'db'), /^memstrata: MS_GUEST_ATTACHED.*guest b/);
  assert.match(await refused('guest', 'attach', 'a', '--volume', 'vb'), /^memstrata: MS_GUEST_ATTACHED/);
  assert.match(await refused('volume', 'create', 'vc', '--size', '1MiB', '--write-log', 'da'), /^memstrata: MS_GUEST_ATTACHED/);
  assert.match(await refused('guest', 'attach', 'a', '--nvram', 'nope'), /^memstrata: MS_NVRAM_NOT_FOUND/);
  assert.match(await refused('guest', 'attach', 'a', '--volume', 'nope'), /^memstrata: MS_VOLUME_NOT_FOUND/);

  // Detach and attach while guest a runs: its socket follows at once.
  const socketA = join(guestDir('a'), 'nbd.sock');
  await cli('volume', 'create', 'vc', '--size', '1MiB');
  await cli('guest', 'attach', 'a', '--volume', 'vc');
  const listed = await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${socketA}`]);
  assert.deepEqual((JSON.parse(listed.stdout) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name']).sort(), ['va', 'vc']);
  await cli('guest', 'detach', 'a', '--volume', 'vc');
  assert.notEqual((await run('nbdinfo', [`nbd+unix:///vc?socket=${socketA}`])).code, 0, 'a detached volume is gone from the socket');
  await cli('volume', 'rm', 'vc');

  // Reset of guest a: its pid changes; the node's, guest b's, its records and its data stay.
  const guests = async (): Promise<GuestInfoJson[]> => JSON.parse(await cli('guest', 'list', '--json')) as GuestInfoJson[];
  const before = await guests();
  const pidA = before.find((g) => g.name === 'a')?.pid;
  const pidB = before.find((g) => g.name === 'b')?.pid;
  await cli('guest', 'reset', 'a');
  const after = await guests();
  assert.notEqual(after.find((g) => g.name === 'a')?.pid, pidA);
  assert.equal(after.find((g) => g.name === 'b')?.pid, pidB);
  assert.ok(node.proc.exitCode === null, 'the node runs on');
  const rmem = await RmemClient.connect({ host: '127.0.0.1', port: Number(tcpNbd.rmem.split(':').pop()), serverId: 'checker', keepalive: false });
  t.after(() => rmem.close());
  const journal = await rmem.journalOpen('da', 1);
  const records = await rmem.journalRead(journal, 0);
  assert.ok(records.some((r) => Buffer.from(r.payload).toString() === 'put from a'), 'guest a\'s record survives its reset');
  const again = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0xab 0 64k', `nbd://${tcpNbd.nbd}/va`]);
  assert.doesNotMatch(again.stdout, /Pattern verification failed/);
  // A TCP client may not take a guest's server-id namespace.
  await assert.rejects(RmemClient.connect({ host: '127.0.0.1', port: Number(tcpNbd.rmem.split(':').pop()), serverId: 'guest:a/app', keepalive: false, reconnect: false }), { code: 'MS_RMEM_INVALID' });
});

async function fetchJson<T>(url: string, path: string): Promise<T> {
  const response = await fetch(`${url}${path}`, { headers: { authorization: `Bearer ${TOKEN}` } });
  return (await response.json()) as T;
}
