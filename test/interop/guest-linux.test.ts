// A guest operating system, literally (issue 12): Linux boots under qemu-system-x86_64
// (TCG) as a guest of the node at --cpu 1, its virtio disk the guest's volume over its
// cut-through socket (nbd+unix). Its init, from an initramfs this test builds (busybox and
// the kernel's virtio modules), writes a pattern to the disk with fsync and powers off;
// the pattern is then read over the node's TCP NBD port. A `guest reset` in the middle of
// a second boot leaves the node and another guest undisturbed, and the guest boots again.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { GuestInfoJson, NodeInfo } from '../../src/protocol/admin/api.js';
import { NbdClient } from '../../src/client/index.js';
import { REQUIRE_INTEROP, missing } from '../support/tools.js';
import { busyboxInitramfs } from '../support/initramfs.js';
import { runCli, startNode, tempDir } from '../support/node-process.js';

const TOKEN = 'linux-guest-token-0123456789';
const MARKER = 'MEMSTRATA-LINUX-GUEST-WROTE';
// In dependency order (modules.dep): virtio needs virtio_ring's symbols.
const VIRTIO = ['virtio/virtio_ring.ko', 'virtio/virtio.ko', 'virtio/virtio_pci_legacy_dev.ko', 'virtio/virtio_pci_modern_dev.ko', 'virtio/virtio_pci.ko', 'block/virtio_blk.ko'];

/** Debian's kernel and its virtio modules, if installed (linux-image-amd64). */
function debianKernel(): { kernel: string; modules: string[] } | undefined {
  const kernels = existsSync('/boot') ? readdirSync('/boot').filter((f) => f.startsWith('vmlinuz-')).sort() : [];
  const kernel = kernels.at(-1);
  if (kernel === undefined) return undefined;
  const version = kernel.slice('vmlinuz-'.length);
  const modules = VIRTIO.map((m) => join('/lib/modules', version, 'kernel/drivers', m));
  return modules.every((m) => existsSync(m)) ? { kernel: join('/boot', kernel), modules } : undefined;
}

const INIT = `
i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vda ] || { echo 'no virtio disk'; poweroff -f; }
printf 'memstrata linux guest, kernel %s\\n' "$(uname -r)" > /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=4096 count=1 conv=sync,fsync 2>/dev/null && echo ${MARKER}
poweroff -f
`;

test('Linux boots as a guest at --cpu 1 with its disk on the guest\'s volume over nbd+unix, writes, powers off; a reset mid-boot disturbs no one', async (t) => {
  const skip = missing('qemu-system-x86_64', 'busybox');
  if (skip !== undefined) {
    t.skip(skip);
    return;
  }
  const found = debianKernel();
  if (found === undefined) {
    const reason = 'needs a kernel in /boot with virtio modules (Debian: linux-image-amd64)';
    if (REQUIRE_INTEROP) throw new Error(`MEMSTRATA_REQUIRE_INTEROP=1 but ${reason}`);
    t.skip(reason);
    return;
  }
  const work = await tempDir(t);
  const busybox = ['/bin/busybox', '/usr/bin/busybox'].find((p) => existsSync(p)) ?? 'busybox';
  await writeFile(join(work, 'initramfs.cpio'), await busyboxInitramfs(busybox, found.modules, INIT));

  const env = { MEMSTRATA_ADMIN_TOKEN: TOKEN };
  const node = await startNode({ cwd: await tempDir(t), env });
  t.after(() => node.stop('SIGTERM'));
  const cli = async (...args: string[]): Promise<string> => {
    const result = await runCli([...args.slice(0, 3), '--admin', node.url, ...args.slice(3)], { env });
    assert.equal(result.code, 0, `${args.join(' ')}: ${result.stderr}`);
    return result.stdout;
  };
  const guest = async (name: string): Promise<GuestInfoJson | undefined> => (JSON.parse(await cli('guest', 'list', '--json')) as GuestInfoJson[]).find((g) => g.name === name);
  const until = async (what: string, probe: () => Promise<boolean>, ms: number): Promise<void> => {
    const deadline = Date.now() + ms;
    while (!(await probe())) {
      assert.ok(Date.now() < deadline, `${what}: not in ${ms} ms; guest log:\n${(await cli('guest', 'logs', 'linux')).slice(-3000)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  };
  const marks = async (): Promise<number> => (await cli('guest', 'logs', 'linux')).split(MARKER).length - 1;

  await cli('volume', 'create', 'linuxdisk', '--size', '64MiB');
  const qemu = [
    'qemu-system-x86_64', '-accel', 'tcg', '-m', '256', '-smp', '1', '-nographic', '-no-reboot', '-net', 'none',
    '-kernel', found.kernel, '-initrd', join(work, 'initramfs.cpio'), '-append', 'console=ttyS0 panic=-1 quiet',
    // The disk: the guest's own volume through its cut-through socket.
    '-blockdev', 'driver=nbd,node-name=disk,server.type=unix,server.path=$MEMSTRATA_CTD_SOCKET,export=linuxdisk',
    '-device', 'virtio-blk-pci,drive=disk',
  ];
  await cli('guest', 'create', 'linux', '--cpu', '1', '--volume', 'linuxdisk', '--restart', 'never', '--', 'sh', '-c', `exec ${qemu.map((a) => (a.includes('$') ? `"${a}"` : `'${a}'`)).join(' ')}`);
  await until('Linux wrote its pattern and powered off', async () => (await guest('linux'))?.state === 'stopped', 120_000);
  assert.equal(await marks(), 1, 'its init wrote the pattern');
  assert.equal((await guest('linux'))?.lastExit?.code, 0, 'qemu exited cleanly at poweroff');

  // Read over TCP NBD, as any other client of the node.
  const info = JSON.parse(await cli('status', '--json')) as { node: NodeInfo };
  const [host = '127.0.0.1', port = '10809'] = info.node.listen.nbd.split(/:(?=\d+$)/);
  const nbd = await NbdClient.connect({ host, port: Number(port), export: 'linuxdisk' });
  const first = (await nbd.read(0, 4096)).toString('latin1');
  await nbd.close();
  // (Its first line only in a failure message: the rest is 4 KiB of padding.)
  assert.ok(/^memstrata linux guest, kernel \S+\n\0+$/.test(first), `the disk holds ${JSON.stringify(first.replace(/\0+$/, '').slice(0, 200))}`);

  // A reset in the middle of a boot: a new pid; the node and another guest untouched.
  await cli('guest', 'create', 'bystander', '--', 'sleep', '600');
  await until('bystander running', async () => (await guest('bystander'))?.state === 'running', 10_000);
  const bystander = (await guest('bystander'))?.pid;
  // A boot takes 3 s or so here under TCG (the kernel powers off 2.0-2.6 s after it
  // starts), so start and reset go straight to the admin API (a CLI call is a Node.js
  // process to load, and two of them took longer than a boot) and the reset comes half a
  // second into the boot, once qemu holds its disk. Where the boot ended first anyway,
  // the reset was not mid-boot: the marks show it, and the pair is tried again.
  const action = async (name: 'start' | 'reset'): Promise<GuestInfoJson> => {
    const response = await fetch(`${node.url}/v1/guests/linux/${name}`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}` } });
    assert.equal(response.status, 200, `guest ${name}: ${await response.clone().text()}`);
    return (await response.json()) as GuestInfoJson;
  };
  let resets = 0;
  for (let midBoot = false; !midBoot; ) {
    assert.ok(resets < 3, 'three resets in a row came after the boot had written its pattern');
    const started = await marks();
    const booting = (await action('start')).pid;
    assert.notEqual(booting, null);
    await new Promise((r) => setTimeout(r, 500));
    const again = (await action('reset')).pid;
    resets++;
    assert.ok(again !== null && again !== booting, `pid ${again} after the reset, ${booting} before`);
    await until('booted again to the end', async () => (await guest('linux'))?.state === 'stopped', 120_000);
    // One pattern from the boot after the reset, and one more if the boot it killed had
    // written its own.
    const wrote = (await marks()) - started;
    assert.ok(wrote === 1 || wrote === 2, `${wrote} patterns written by the boot the reset killed and the one after it`);
    midBoot = wrote === 1;
  }
  t.diagnostic(`the reset came mid-boot at try ${resets}`);
  assert.equal((await guest('bystander'))?.pid, bystander);
  assert.equal((await guest('bystander'))?.state, 'running');
  assert.equal(node.proc.exitCode, null, 'the node runs on');
  assert.equal((await guest('linux'))?.resets, resets);
});
