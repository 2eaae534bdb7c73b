// Member records are read by every host and node of a cluster: one that does not read is
// skipped with a reason, never trusted and never thrown.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { MEMBER_FORMAT, MEMBER_MAX_BYTES, decodeMember, encodeMember, memberKey, membersPrefix, type MemberRecord } from '../../../../src/protocol/cluster/member.js';

const record: MemberRecord = {
  format: MEMBER_FORMAT,
  id: 'ms-1',
  zone: 'a',
  version: '0.1.0',
  startedAt: '2026-11-29T00:00:00.000Z',
  services: { nbd: '10.0.0.1:10809', rmem: '10.0.0.1:10810', mirror: '10.0.0.1:10811', admin: '10.0.0.1:10880' },
  capacity: [{ medium: 'dram', capacity: 1024, kinds: { free: { bytes: 0, idleBytes: 0 }, cache: { bytes: 512, idleBytes: 0 }, server: { bytes: 256, idleBytes: 256 }, nvram: { bytes: 256, idleBytes: 128 } } }],
  partner: null,
  mirrored: [{ name: 'log', policy: 'mirrored', size: 4096, role: 'primary', epoch: 3, state: 'ready' }],
};

test('a record reads back as written, under its own key', () => {
  assert.equal(memberKey('prod', 'ms-1'), '/memstrata/prod/nodes/ms-1');
  assert.ok(memberKey('prod', 'ms-1').startsWith(membersPrefix('prod')));
  assert.deepEqual(decodeMember(Buffer.from(encodeMember(record)), memberKey('prod', 'ms-1')), record);
});

test('records that do not read are reasons, not records', () => {
  const key = memberKey('prod', 'ms-1');
  const cases: [string, RegExp][] = [
    ['{', /not JSON/],
    ['null', /not a format-1 record/],
    [JSON.stringify({ ...record, format: 2 }), /format/],
    [JSON.stringify({ ...record, services: { ...record.services, rmem: '' } }), /services\.rmem/],
    [JSON.stringify({ ...record, capacity: [{ ...record.capacity[0], capacity: -1 }] }), /capacity/],
    [JSON.stringify({ ...record, id: 'ms-2' }), /names another node \(ms-2\)/],
    [' '.repeat(MEMBER_MAX_BYTES + 1), /more than/],
  ];
  for (const [text, reason] of cases) {
    const result = decodeMember(text, key);
    assert.equal(typeof result, 'string', text.slice(0, 40));
    assert.match(result as string, reason);
  }
  // Anything at all: a reason or a record, never an exception.
  fc.assert(
    fc.property(fc.oneof(fc.string(), fc.json(), fc.uint8Array().map((b) => Buffer.from(b).toString('latin1'))), (text) => {
      const result = decodeMember(text, key);
      assert.ok(typeof result === 'string' || result.id === 'ms-1');
    }),
  );
});
