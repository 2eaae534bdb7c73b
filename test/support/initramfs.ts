// A tiny initramfs for booting Linux as a guest in tests: a cpio archive in the "newc"
// format the kernel unpacks (Documentation/driver-api/early-userspace/buffer-format.rst),
// holding busybox, an /init script and the kernel modules the test names.
//
//   each entry: "070701" + 13 fields of 8 hex digits + name + NUL, padded to 4 bytes,
//               then the data, padded to 4 bytes; the archive ends with "TRAILER!!!".

import { readFile } from 'node:fs/promises';

export interface InitramfsEntry {
  path: string;
  /** File contents; undefined for a directory. */
  data?: Buffer;
  /** Permission bits; 0o755 by default. */
  mode?: number;
}

const DIR = 0o040000;
const FILE = 0o100000;

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

function header(ino: number, mode: number, size: number, name: string): Buffer {
  const fields = [ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, Buffer.byteLength(name) + 1, 0];
  const text = `070701${fields.map((f) => f.toString(16).padStart(8, '0')).join('')}${name}\0`;
  return Buffer.concat([Buffer.from(text, 'latin1'), Buffer.alloc(pad4(text.length))]);
}

/** The archive of `entries` (directories before what they hold), uncompressed. */
export function newcArchive(entries: readonly InitramfsEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  for (const entry of entries) {
    const data = entry.data ?? Buffer.alloc(0);
    const mode = (entry.data === undefined ? DIR : FILE) | (entry.mode ?? 0o755);
    parts.push(header(ino++, mode, data.length, entry.path), data, Buffer.alloc(pad4(data.length)));
  }
  parts.push(header(ino, 0, 0, 'TRAILER!!!'));
  return Buffer.concat(parts);
}

/**
 * An initramfs with busybox (statically linked) as every tool, the modules given (loaded
 * by /init in that order), and `/init` running `script` after it mounted /proc, /sys and
 * /dev and loaded the modules.
 */
export async function busyboxInitramfs(busybox: string, modules: readonly string[], script: string): Promise<Buffer> {
  const init = [
    '#!/bin/busybox sh',
    '/bin/busybox --install -s /bin',
    'mount -t proc proc /proc',
    'mount -t sysfs sys /sys',
    'mount -t devtmpfs dev /dev',
    ...modules.map((m) => `insmod /modules/${m.split('/').pop() ?? m}`),
    script,
  ].join('\n');
  return newcArchive([
    { path: 'bin' },
    { path: 'proc' },
    { path: 'sys' },
    { path: 'dev' },
    { path: 'tmp' },
    { path: 'modules' },
    { path: 'bin/busybox', data: await readFile(busybox) },
    ...(await Promise.all(modules.map(async (m) => ({ path: `modules/${m.split('/').pop() ?? m}`, data: await readFile(m), mode: 0o644 })))),
    { path: 'init', data: Buffer.from(`${init}\n`) },
  ]);
}
