import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { GiB, KiB, MiB, formatAddress, formatSize, hexRange, humanSize, parseAddress, parseSize } from '../../src/units.js';

test('parseSize accepts bytes and binary units', () => {
  assert.equal(parseSize('4096'), 4096);
  assert.equal(parseSize(4096), 4096);
  assert.equal(parseSize('64K'), 64 * KiB);
  assert.equal(parseSize('512MiB'), 512 * MiB);
  assert.equal(parseSize('1GiB'), GiB);
  assert.equal(parseSize(' 2 gib '), 2 * GiB);
  assert.equal(parseSize('0'), 0);
});

test('parseSize refuses decimal units, fractions, negatives and junk with MS_SIZE_INVALID', () => {
  for (const bad of ['1GB', '1.5GiB', '-1', 'lots', '', '12XB', '1e9', 'MiB']) {
    assert.throws(() => parseSize(bad), { code: 'MS_SIZE_INVALID' }, bad);
  }
  assert.throws(() => parseSize(-4), { code: 'MS_SIZE_INVALID' });
  assert.throws(() => parseSize(1.5), { code: 'MS_SIZE_INVALID' });
  assert.throws(() => parseSize('99999999TiB'), { code: 'MS_SIZE_INVALID' });
});

test('formatSize round-trips through parseSize', () => {
  fc.assert(fc.property(fc.nat({ max: 2 ** 40 }), (n) => parseSize(formatSize(n)) === n));
  assert.equal(formatSize(GiB), '1GiB');
  assert.equal(formatSize(1536 * KiB), '1536KiB');
  assert.equal(formatSize(4097), '4097');
  assert.equal(humanSize(1.5 * MiB + 1), '1.5MiB');
  assert.equal(humanSize(512 * MiB), '512MiB');
});

test('hexRange prints inclusive ranges like the patent figures', () => {
  assert.equal(hexRange(0x6000, 0x2000), '0x00006000 to 0x00007fff');
  assert.equal(hexRange(0, 4 * GiB, 9), '0x000000000 to 0x0ffffffff');
});

test('parseAddress handles IPv4, names and bracketed IPv6, and refuses bad ports', () => {
  assert.deepEqual(parseAddress('127.0.0.1:10880'), { host: '127.0.0.1', port: 10880 });
  assert.deepEqual(parseAddress('localhost:0'), { host: 'localhost', port: 0 });
  assert.deepEqual(parseAddress('[::1]:10809'), { host: '::1', port: 10809 });
  assert.equal(formatAddress({ host: '::1', port: 1 }), '[::1]:1');
  for (const bad of ['127.0.0.1', ':80', '127.0.0.1:65536', 'host:port', '::1:80', '']) {
    assert.throws(() => parseAddress(bad), { code: 'MS_CONFIG_INVALID' }, bad);
  }
});
