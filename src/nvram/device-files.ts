// The one way from a device name to a file of the device: every path under nvram/ is made
// here, and a name that is not a device name (a path, "..", a slash) is refused before
// it reaches the file system, whoever sent it (the admin API, rmem, the mirror partner).

import { join } from 'node:path';
import { MisuseError } from '../errors.js';
import { isDeviceName } from '../protocol/journal/policy.js';

export type DeviceFileSuffix = '.json' | '.journal' | '.journal.new' | '.vault' | `.diverged-${number}`;

/** Quarantined journals of `name` in `files` (a listing of nvram/), oldest first. */
export function divergedFiles(files: readonly string[], name: string): string[] {
  const prefix = `${name}.diverged-`;
  return files.filter((f) => f.startsWith(prefix) && /^\d+$/.test(f.slice(prefix.length))).sort();
}

export function deviceFile(dir: string, name: string, suffix: DeviceFileSuffix): string {
  if (!isDeviceName(name)) {
    throw new MisuseError('MS_NVRAM_INVALID', `invalid device name ${JSON.stringify(name.slice(0, 80))}: expected 1 to 64 letters, digits, ".", "_" or "-"`);
  }
  return join(dir, `${name}${suffix}`);
}
