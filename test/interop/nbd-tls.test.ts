// NBD over TLS with real clients (issue 14, item 6): nbdinfo and nbdsh (libnbd, GnuTLS)
// over nbds:// with a tls-certificates directory, and qemu-io with a tls-creds-x509
// object; plaintext refused under nbd.tls=require; a client certificate from another CA
// refused.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeCerts, missingOpenssl } from '../support/certs.js';
import { startNode, tempDir } from '../support/node-process.js';
import { missing, nbdsh, run } from '../support/tools.js';

test('nbdinfo, qemu-io and nbdsh over nbds:// with certificates; plaintext and foreign certificates refused under nbd.tls=require', async (t) => {
  if (missing('nbdinfo', 'qemu-io', 'nbdsh') !== undefined || missingOpenssl() !== undefined) return;
  const certs = await makeCerts(t);
  const node = await startNode({ cwd: await tempDir(t), args: ['--nbd-tls', 'require', '--tls-cert', certs.cert, '--tls-key', certs.key, '--tls-ca', certs.ca] });
  t.after(() => node.stop('SIGKILL'));
  const where = `${node.nbd.host}:${node.nbd.port}`;
  const nbds = (dir: string): string => `nbds://${where}/default?tls-certificates=${dir}`;

  const info = await run('nbdinfo', ['--json', nbds(certs.dir)]);
  assert.equal(info.code, 0, info.stderr);
  const parsed = JSON.parse(info.stdout) as { protocol: string; TLS: boolean; exports: { 'export-size': number }[] };
  assert.equal(parsed.TLS, true);
  assert.equal(parsed.exports[0]?.['export-size'], 64 * 2 ** 20);

  const qemu = await run('qemu-io', [
    '--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${certs.dir}`,
    '--image-opts', `driver=nbd,host=${node.nbd.host},port=${node.nbd.port},export=default,tls-creds=tls0`,
    '-c', 'write -P 0xc3 1M 256k', '-c', 'flush', '-c', 'read -P 0xc3 1M 256k',
  ]);
  assert.equal(qemu.code, 0, qemu.stderr + qemu.stdout);
  assert.doesNotMatch(qemu.stdout, /Pattern verification failed/);

  // What qemu wrote over TLS, read back by libnbd over TLS.
  const script = [
    'h = nbd.NBD()',
    'h.set_uri_allow_local_file(True)',
    `h.connect_uri(${JSON.stringify(nbds(certs.dir))})`,
    'assert h.get_tls_negotiated()',
    'data = h.pread(256 * 1024, 1024 * 1024)',
    'print(len(data), set(data) == {0xc3})',
    'h.shutdown()',
  ].join('\n');
  const back = await nbdsh(['-c', script]);
  assert.equal(back.code, 0, back.stderr);
  assert.equal(back.stdout.trim(), '262144 True');

  const plain = await run('nbdinfo', [`nbd://${where}/default`]);
  assert.notEqual(plain.code, 0, 'plaintext is refused');
  for (const dir of [certs.rogueDir, certs.anonymousDir]) {
    const refused = await run('nbdinfo', [nbds(dir)]);
    assert.notEqual(refused.code, 0, `a client certificate from ${dir} is refused`);
    assert.match(refused.stderr, /TLS|tls/);
  }
  const again = await run('nbdinfo', ['--size', nbds(certs.dir)]);
  assert.equal(again.stdout.trim(), String(64 * 2 ** 20), 'the node still serves');
});

test('nbd.tls=on: nbdinfo in plaintext and over TLS', async (t) => {
  if (missing('nbdinfo') !== undefined || missingOpenssl() !== undefined) return;
  const certs = await makeCerts(t);
  const node = await startNode({ cwd: await tempDir(t), args: ['--nbd-tls', 'on', '--tls-cert', certs.cert, '--tls-key', certs.key] });
  t.after(() => node.stop('SIGKILL'));
  const where = `${node.nbd.host}:${node.nbd.port}`;
  const plain = await run('nbdinfo', ['--json', `nbd://${where}/default`]);
  assert.equal(plain.code, 0, plain.stderr);
  assert.equal((JSON.parse(plain.stdout) as { TLS: boolean }).TLS, false);
  // No tls.ca: the node asks for no client certificate; the client checks the node's.
  const secure = await run('nbdinfo', ['--json', `nbds://${where}/default?tls-certificates=${certs.anonymousDir}`]);
  assert.equal(secure.code, 0, secure.stderr);
  assert.equal((JSON.parse(secure.stdout) as { TLS: boolean }).TLS, true);
});
