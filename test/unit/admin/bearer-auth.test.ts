import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { BearerAuth } from '../../../src/admin/bearer-auth.js';

const TOKEN = 'f3a9c2e4b7d1a8c6e0f2b4d6a8c0e2f4';

test('only the exact token in a Bearer header passes', () => {
  const auth = new BearerAuth(TOKEN);
  assert.equal(auth.check(`Bearer ${TOKEN}`), 'ok');
  assert.equal(auth.check(`bearer ${TOKEN}`), 'ok', 'the scheme is case-insensitive (RFC 7235)');
  assert.equal(auth.check(`BEARER  ${TOKEN} `), 'ok');
  assert.equal(auth.check(undefined), 'missing');
  assert.equal(auth.check(''), 'missing');
  for (const header of [
    TOKEN, // no scheme
    `Basic ${TOKEN}`,
    `Bearer ${TOKEN.toUpperCase()}`, // the token is case-sensitive
    `Bearer ${TOKEN}x`,
    `Bearer ${TOKEN.slice(0, -1)}`, // a prefix
    `Bearer ${TOKEN} ${TOKEN}`,
    'Bearer ',
    `Bearer${TOKEN}`,
  ]) {
    assert.equal(auth.check(header), 'wrong', header);
  }
});

test('no header but the token passes (property)', () => {
  const auth = new BearerAuth(TOKEN);
  fc.assert(
    fc.property(fc.string({ maxLength: 80 }), (candidate) => {
      const verdict = auth.check(`Bearer ${candidate}`);
      assert.equal(verdict === 'ok', candidate.trim() === TOKEN);
    }),
    { numRuns: 2000 },
  );
});
