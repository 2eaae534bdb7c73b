// The package version, read once from package.json (two levels above dist/src).

import { readFileSync } from 'node:fs';

function readVersion(): string {
  try {
    const pkg: unknown = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8'));
    if (typeof pkg === 'object' && pkg !== null && 'version' in pkg && typeof pkg.version === 'string') return pkg.version;
  } catch {
    // Fall through: a copy of dist without its package.json still runs.
  }
  return '0.0.0-unknown';
}

export const VERSION = readVersion();
