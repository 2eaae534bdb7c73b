// DESIGN section 6: imports flow one way. protocol <- memory/storage/nvram <-
// server/guest/cluster <- node <- cli/admin; the host library and the clients stay out of
// the daemon; a wire codec never imports the subsystem that uses it. This test reads
// every import in src and refuses the ones that go against the flow.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, readdir } from 'node:fs/promises';
import { dirname, join, normalize, relative } from 'node:path';

const SRC = new URL('../../../src/', import.meta.url).pathname;

/** Top-level folders of src each layer must never import. */
const FORBIDDEN: Readonly<Record<string, readonly string[]>> = {
  protocol: ['memory', 'storage', 'nvram', 'server', 'guest', 'cluster', 'host', 'node', 'cli', 'admin', 'client'],
  memory: ['storage', 'nvram', 'server', 'guest', 'cluster', 'host', 'node', 'cli', 'admin', 'client'],
  storage: ['server', 'guest', 'cluster', 'host', 'node', 'cli', 'admin', 'client'],
  nvram: ['server', 'guest', 'cluster', 'host', 'node', 'cli', 'admin', 'client'],
  server: ['guest', 'cluster', 'host', 'node', 'cli', 'admin', 'client'],
  client: ['memory', 'storage', 'nvram', 'server', 'guest', 'cluster', 'host', 'node', 'cli', 'admin'],
  host: ['storage', 'nvram', 'server', 'guest', 'cluster', 'node', 'cli', 'admin'],
  net: ['memory', 'storage', 'nvram', 'server', 'guest', 'cluster', 'host', 'node', 'cli', 'admin', 'client'],
  fs: ['memory', 'storage', 'nvram', 'server', 'guest', 'cluster', 'host', 'node', 'cli', 'admin', 'client'],
};

async function sources(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { withFileTypes: true });
  const nested = await Promise.all(entries.map((e) => (e.isDirectory() ? sources(join(dir, e.name)) : Promise.resolve(e.name.endsWith('.ts') ? [join(dir, e.name)] : []))));
  return nested.flat();
}

function layerOf(path: string): string {
  const rel = relative(SRC, path);
  return rel.includes('/') ? (rel.split('/')[0] ?? '') : '(root)';
}

test('imports in src flow one way between layers', async () => {
  const violations: string[] = [];
  for (const file of await sources(SRC)) {
    const from = layerOf(file);
    const forbidden = FORBIDDEN[from] ?? [];
    const text = await readFile(file, 'utf8');
    for (const match of text.matchAll(/\bfrom\s+'(\.[^']+)'/g)) {
      const spec = match[1] ?? '';
      const target = normalize(join(dirname(file), spec));
      const to = layerOf(target);
      if (forbidden.includes(to) || (from === '(root)' && to !== '(root)' && file.endsWith('.ts') && !file.endsWith('index.ts'))) {
        violations.push(`${relative(SRC, file)} imports ${spec} (${from} -> ${to})`);
      }
    }
  }
  assert.deepEqual(violations, []);
});
