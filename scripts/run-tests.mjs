#!/usr/bin/env node
// Runs every compiled test file (dist/test/**/*.test.js) with node's test runner.
// Node 20's runner takes no globs, so the files are listed here. Pass a substring to run
// only matching files: `npm test -- partition`.

import { readdirSync } from 'node:fs';
import { join, relative } from 'node:path';
import { spawnSync } from 'node:child_process';

const root = new URL('../dist/test/', import.meta.url).pathname;
const filters = process.argv.slice(2);

function walk(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return walk(path);
    return entry.name.endsWith('.test.js') ? [path] : [];
  });
}

const files = walk(root)
  .filter((file) => filters.length === 0 || filters.some((f) => relative(root, file).includes(f)))
  .sort();
if (files.length === 0) {
  console.error(`no test files under ${root}${filters.length > 0 ? ` matching ${filters.join(', ')}` : ''}`);
  process.exit(1);
}
// Every test process loads it first: a failing property prints its error (see the file).
const report = new URL('../dist/test/support/fast-check-report.js', import.meta.url).pathname;
// A test gets two minutes; a soak (`npm run soak`: many more runs each) an hour.
const timeout = process.env.MEMSTRATA_SOAK === '1' ? 3_600_000 : 120_000;
const result = spawnSync(process.execPath, ['--import', report, '--test', `--test-timeout=${timeout}`, '--enable-source-maps', ...files], { stdio: 'inherit' });
process.exit(result.status ?? 1);
