#!/usr/bin/env node
// Runs the benchmark scripts in dist/bench (or those whose name contains an argument),
// one after another, since each one compares against a baseline on this same machine.

import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';

const root = new URL('../dist/bench/', import.meta.url).pathname;
const filters = process.argv.slice(2);
let files = [];
try {
  files = readdirSync(root).filter((name) => name.endsWith('.js') && (filters.length === 0 || filters.some((f) => name.includes(f)))).sort();
} catch {
  // No benchmarks built.
}
if (files.length === 0) {
  console.log('no benchmarks to run');
  process.exit(0);
}
for (const name of files) {
  console.log(`\n== ${name}`);
  const result = spawnSync(process.execPath, [join(root, name)], { stdio: 'inherit' });
  if (result.status !== 0) process.exit(result.status ?? 1);
}
