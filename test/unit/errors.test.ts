import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { ERRORS, MisuseError, NetworkError, RuntimeError, StorageError, toMemstrataError, type ErrorCode } from '../../src/errors.js';

const DOC = new URL('../../../docs/errors.md', import.meta.url);

async function documented(): Promise<Map<string, { category: string; status: number }>> {
  const text = await readFile(DOC, 'utf8');
  const rows = new Map<string, { category: string; status: number }>();
  for (const match of text.matchAll(/^\|\s*`(MS_[A-Z_]+)`\s*\|\s*(\w+)\s*\|\s*(\d+)\s*\|/gm)) {
    rows.set(match[1]!, { category: match[2]!, status: Number(match[3]) });
  }
  return rows;
}

test('every registered code is documented in docs/errors.md with its category and status', async () => {
  const docs = await documented();
  for (const [code, entry] of Object.entries(ERRORS)) {
    assert.deepEqual(docs.get(code), { category: entry.category, status: entry.status }, `docs/errors.md row for ${code}`);
  }
});

test('every code in docs/errors.md exists in the registry', async () => {
  const docs = await documented();
  assert.ok(docs.size > 0);
  for (const code of docs.keys()) assert.ok(code in ERRORS, `${code} is documented but not registered`);
});

test('each subclass carries its category, status and a JSON form', () => {
  const cases: [Error & { code: ErrorCode; category: string; status: number }, string][] = [
    [new MisuseError('MS_BAD_REQUEST', 'x'), 'misuse'],
    [new RuntimeError('MS_NODE_LOCKED', 'x'), 'runtime'],
    [new NetworkError('MS_ADMIN_UNREACHABLE', 'x'), 'network'],
    [new StorageError('MS_MEDIUM_IO', 'x', { cause: new Error('EIO') }), 'storage'],
  ];
  for (const [error, category] of cases) {
    assert.equal(error.category, category);
    assert.equal(error.status, ERRORS[error.code].status);
  }
  const withDetails = new MisuseError('MS_MEDIUM_RANGE', 'out', { details: { offset: 1 } });
  assert.deepEqual(JSON.parse(JSON.stringify(withDetails)), { code: 'MS_MEDIUM_RANGE', message: 'out', details: { offset: 1 } });
  assert.equal(withDetails.name, 'MisuseError');
});

test('toMemstrataError keeps coded errors and wraps the rest as MS_INTERNAL with the cause', () => {
  const coded = new RuntimeError('MS_SHUTTING_DOWN', 'stopping');
  assert.equal(toMemstrataError(coded), coded);
  const plain = new TypeError('boom');
  const wrapped = toMemstrataError(plain);
  assert.equal(wrapped.code, 'MS_INTERNAL');
  assert.equal(wrapped.cause, plain);
});
