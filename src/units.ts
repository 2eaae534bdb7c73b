// Sizes and addresses as people write and read them.
//
// Sizes are binary, like qemu-img and nbdkit: `4096`, `64K`, `512MiB`, `1GiB`, `2T`.
// Decimal units (KB, MB, GB) are refused rather than guessed at. Physical addresses
// print in hex the way the patent's tables show them: `0x00006000 to 0x00007fff`.

import { MisuseError } from './errors.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

const UNITS: Readonly<Record<string, number>> = {
  '': 1, b: 1,
  k: KiB, kib: KiB,
  m: MiB, mib: MiB,
  g: GiB, gib: GiB,
  t: TiB, tib: TiB,
};

export const SIZE_FORM = 'a size in bytes such as 4096, 64KiB, 512MiB or 1GiB (binary units B, KiB, MiB, GiB, TiB)';

const SIZE_PATTERN = /^\s*(\d+)\s*([a-zA-Z]*)\s*$/;

/** Parses `4096`, `512MiB`, `1GiB` (or a non-negative safe integer) into bytes. */
export function parseSize(input: string | number): number {
  if (typeof input === 'number') {
    if (Number.isSafeInteger(input) && input >= 0) return input;
    throw new MisuseError('MS_SIZE_INVALID', `invalid size ${String(input)}: expected ${SIZE_FORM}`);
  }
  const match = SIZE_PATTERN.exec(input);
  const unit = match === null ? undefined : UNITS[(match[2] ?? '').toLowerCase()];
  if (match === null || unit === undefined) {
    throw new MisuseError('MS_SIZE_INVALID', `invalid size "${input}": expected ${SIZE_FORM}`);
  }
  const bytes = Number(match[1]) * unit;
  if (!Number.isSafeInteger(bytes)) {
    throw new MisuseError('MS_SIZE_INVALID', `invalid size "${input}": too large`);
  }
  return bytes;
}

/** Formats bytes with the largest binary unit that divides them exactly: `1GiB`, `1536KiB`, `4097`. */
export function formatSize(bytes: number): string {
  for (const [suffix, unit] of [['TiB', TiB], ['GiB', GiB], ['MiB', MiB], ['KiB', KiB]] as const) {
    if (bytes >= unit && bytes % unit === 0) return `${bytes / unit}${suffix}`;
  }
  return String(bytes);
}

/** `0x` and at least `width` hex digits. */
export function hex(value: number, width = 8): string {
  return `0x${value.toString(16).padStart(width, '0')}`;
}

/** An inclusive hex range as the patent's tables print it: `0x00006000 to 0x00007fff`. */
export function hexRange(start: number, length: number, width = 8): string {
  return `${hex(start, width)} to ${hex(start + length - 1, width)}`;
}

/** Hex digits needed to print every address below `capacity`. */
export function hexWidth(capacity: number): number {
  return Math.max(8, Math.max(0, capacity - 1).toString(16).length);
}

export interface ListenAddress {
  host: string;
  port: number;
}

export const ADDRESS_FORM = 'HOST:PORT such as 127.0.0.1:10880 or [::1]:10880, port 0 to 65535';

const ADDRESS_PATTERN = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s[\]]+)):(\d{1,5})$/;

/** Parses `host:port` or `[v6]:port`. Port 0 asks the kernel for an ephemeral port. */
export function parseAddress(input: string): ListenAddress {
  const match = ADDRESS_PATTERN.exec(input.trim());
  const host = match?.[1] ?? match?.[2];
  const port = Number(match?.[3]);
  if (host === undefined || !Number.isInteger(port) || port > 65535) {
    throw new MisuseError('MS_CONFIG_INVALID', `invalid address "${input}": expected ${ADDRESS_FORM}`);
  }
  return { host, port };
}

export function formatAddress(address: ListenAddress): string {
  return address.host.includes(':') ? `[${address.host}]:${address.port}` : `${address.host}:${address.port}`;
}

/** Bytes for a person: exact units when they divide (`512MiB`), else one decimal (`1.3MiB`). */
export function humanSize(bytes: number): string {
  const exact = formatSize(bytes);
  if (exact !== String(bytes) || bytes < KiB) return exact;
  for (const [suffix, unit] of [['TiB', TiB], ['GiB', GiB], ['MiB', MiB], ['KiB', KiB]] as const) {
    if (bytes >= unit) return `${(bytes / unit).toFixed(1)}${suffix}`;
  }
  return exact;
}

export const DURATION_FORM = 'a duration such as 500ms, 30s, 5m or 1h (a bare number is milliseconds)';

const DURATION_UNITS: Readonly<Record<string, number>> = { '': 1, ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** Parses `500ms`, `30s`, `5m`, `1h`, or a number of milliseconds. */
export function parseDuration(input: string | number): number {
  if (typeof input === 'number') {
    if (Number.isSafeInteger(input) && input >= 0) return input;
    throw new MisuseError('MS_CONFIG_INVALID', `invalid duration ${String(input)}: expected ${DURATION_FORM}`);
  }
  const match = /^\s*(\d+)\s*(ms|s|m|h)?\s*$/.exec(input);
  const unit = match === null ? undefined : DURATION_UNITS[match[2] ?? ''];
  if (match === null || unit === undefined) throw new MisuseError('MS_CONFIG_INVALID', `invalid duration "${input}": expected ${DURATION_FORM}`);
  return Number(match[1]) * unit;
}
