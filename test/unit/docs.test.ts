// The README is the user's reference: keep it true to the code.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { SETTINGS, envName } from '../../src/node/config.js';
import { buildProgram } from '../../src/cli/program.js';
import type { Command } from 'commander';

const README = new URL('../../../README.md', import.meta.url);

test('README starts with the two commands a newcomer runs', async () => {
  const text = await readFile(README, 'utf8');
  const head = text.split('\n').slice(0, 30).join('\n');
  assert.match(head, /npm install && npm start/);
  assert.match(head, /npm test/);
});

test('README documents every setting with its environment variable', async () => {
  const text = await readFile(README, 'utf8');
  for (const setting of SETTINGS) {
    // Partition settings are documented as a pattern; the rest one by one.
    if (setting.path.startsWith('partition.')) continue;
    assert.ok(text.includes(envName(setting.path)), `README lacks ${envName(setting.path)}`);
    assert.ok(text.includes(`\`${setting.path}\``), `README lacks ${setting.path}`);
  }
  assert.ok(text.includes('MEMSTRATA_PARTITION_<MEDIUM>_<KIND>_'), 'README documents the partition variables');
});

test('README documents every CLI command', async () => {
  const text = await readFile(README, 'utf8');
  const names = (command: Command, prefix: string): string[] =>
    command.commands.flatMap((c) => {
      const name = `${prefix} ${c.name()}`.trim();
      return c.commands.length > 0 ? names(c, name) : [name];
    });
  for (const name of names(buildProgram(), 'memstrata')) assert.ok(text.includes(name), `README lacks ${name}`);
});

test('docs/guarantees.md: every test it names exists and has that phrase in its name', async () => {
  const text = await readFile(new URL('../../../docs/guarantees.md', import.meta.url), 'utf8');
  // References look like: `test/unit/x.test.ts` › "a phrase of the test's name"
  const refs = [...text.replace(/\s*\n\s*/g, ' ').matchAll(/`(test\/[^`]+\.test\.ts)` › "([^"]+)"/g)];
  assert.ok(refs.length >= 10, `only ${refs.length} test references found`);
  const missingRefs: string[] = [];
  for (const [, file, phrase] of refs) {
    let source: string;
    try {
      source = await readFile(new URL(`../../../${file ?? ''}`, import.meta.url), 'utf8');
    } catch {
      missingRefs.push(`${file ?? ''} does not exist`);
      continue;
    }
    const names = [...source.matchAll(/\btest\(\s*(?:'((?:[^'\\]|\\.)*)'|`((?:[^`\\]|\\.)*)`|"((?:[^"\\]|\\.)*)")/g)].map((m) => (m[1] ?? m[2] ?? m[3] ?? '').replace(/\\'/g, "'"));
    if (!names.some((name) => name.includes(phrase ?? '') || name.replace(/\$\{[^}]*\}/g, '').includes(phrase ?? ''))) missingRefs.push(`${file ?? ''} has no test named with "${phrase ?? ''}"`);
  }
  assert.deepEqual(missingRefs, []);
});
