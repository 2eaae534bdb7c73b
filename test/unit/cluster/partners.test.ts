// The cluster's choice of a mirror partner (issue 14, item 4): a member with room for the
// device on its medium, in another zone first, then the one with the most room. Checked on
// examples and as properties over random member lists.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { choosePartner, roomFor } from '../../../src/cluster/partners.js';
import { MEMBER_FORMAT, type MemberRecord } from '../../../src/protocol/cluster/member.js';

const MiB = 1024 * 1024;

function member(id: string, zone: string | null, room: Record<string, number>, old = false): MemberRecord {
  return {
    format: MEMBER_FORMAT,
    id,
    zone,
    version: '0.1.0',
    startedAt: '2026-11-29T00:00:00.000Z',
    services: { nbd: '127.0.0.1:1', rmem: '127.0.0.1:2', mirror: '127.0.0.1:3', admin: '127.0.0.1:4' },
    capacity: Object.entries(room).map(([medium, bytes]) => ({
      medium,
      capacity: 4 * bytes,
      // An older node says no nvramRoom: its free extents and idle nvram count.
      kinds: { free: { bytes: old ? bytes - MiB : 0, idleBytes: old ? bytes - MiB : 0 }, cache: { bytes: 0, idleBytes: 0 }, server: { bytes: 0, idleBytes: 0 }, nvram: { bytes: MiB, idleBytes: old ? MiB : 0 } },
      ...(old ? {} : { nvramRoom: bytes }),
    })),
    partner: null,
    mirrored: [],
  };
}

test('another zone before more room; then the most room; never itself, an avoided node or one without room', () => {
  const self = { id: 'a', zone: 'z1' };
  const need = { size: 8 * MiB, medium: 'dram' };
  const members = [member('a', 'z1', { dram: 900 * MiB }), member('b', 'z1', { dram: 500 * MiB }), member('c', 'z2', { dram: 100 * MiB }), member('d', 'z2', { dram: 200 * MiB })];
  assert.equal(choosePartner(members, self, need), 'd', 'the most room among the other zone');
  assert.equal(choosePartner(members, self, need, new Set(['d'])), 'c');
  assert.equal(choosePartner(members, self, need, new Set(['c', 'd'])), 'b', 'the same zone when no other has room');
  assert.equal(choosePartner(members, self, { size: 300 * MiB, medium: 'dram' }), 'b', 'room for the device comes before the zone');
  assert.equal(choosePartner(members, self, { size: 600 * MiB, medium: 'dram' }), undefined);
  assert.equal(choosePartner(members, self, { size: MiB, medium: 'flash' }), undefined, 'no member has the medium');
  // No zones known: the most room.
  assert.equal(choosePartner(members, { id: 'a', zone: null }, need), 'b');
  // Replicas this node named on b that b's record does not list yet count against b's room;
  // one it lists is in its room already.
  const named = new Map([['x1', { node: 'b', size: 495 * MiB }]]);
  assert.equal(choosePartner(members, { id: 'a', zone: null }, need, new Set(), named), 'd');
  const listing = members.map((m) => (m.id === 'b' ? { ...m, mirrored: [{ name: 'x1', policy: 'mirrored', size: 495 * MiB, role: 'replica', epoch: 0, state: 'ready' }] } : m));
  assert.equal(choosePartner(listing, { id: 'a', zone: null }, need, new Set(), named), 'b');
  // A node with mirror.partner set by hand admits only its own partner: never chosen.
  const handSet = { ...member('h', 'z9', { dram: 900 * MiB }), partner: '10.0.0.9:10811' };
  assert.equal(choosePartner([...members, handSet], self, need), 'd');
  // An older node's record: free and idle nvram count.
  const older = member('e', 'z3', { dram: 64 * MiB }, true);
  assert.equal(roomFor(older, 'dram'), 64 * MiB);
  assert.equal(choosePartner([older, member('f', 'z1', { dram: 900 * MiB })], self, need), 'e');
});

test('properties: a partner exists whenever one fits; it fits; it is in another zone whenever one that fits is; it has the most room of those', () => {
  const arbMember = fc.record({ id: fc.constantFrom('a', 'b', 'c', 'd', 'e', 'f'), zone: fc.option(fc.constantFrom('z1', 'z2', 'z3'), { nil: null }), room: fc.integer({ min: 0, max: 64 }) });
  fc.assert(
    fc.property(fc.uniqueArray(arbMember, { selector: (m) => m.id, maxLength: 6 }), fc.option(fc.constantFrom('z1', 'z2'), { nil: null }), fc.integer({ min: 0, max: 64 }), fc.subarray(['b', 'c']), fc.array(fc.record({ node: fc.constantFrom('b', 'c', 'd'), mib: fc.integer({ min: 0, max: 16 }) }), { maxLength: 4 }), (raw0, zone, size, avoided, choices) => {
      const named = new Map(choices.map((c, i) => [`dev${i}`, { node: c.node, size: c.mib * MiB }]));
      // Room as the chooser must see it: the record's, less what it already named there.
      const raw = raw0.map((m) => ({ ...m, left: m.room - choices.filter((c) => c.node === m.id).reduce((sum, c) => sum + c.mib, 0) }));
      const members = raw.map((m) => member(m.id, m.zone, { dram: m.room * MiB }));
      const self = { id: 'a', zone };
      const avoid = new Set(avoided);
      const fits = raw.filter((m) => m.id !== 'a' && !avoid.has(m.id) && m.left * MiB >= size * MiB);
      const chosen = choosePartner(members, self, { size: size * MiB, medium: 'dram' }, avoid, named);
      if (fits.length === 0) return chosen === undefined;
      const pick = fits.find((m) => m.id === chosen);
      if (pick === undefined) return false;
      const other = (m: (typeof raw)[number]): boolean => zone !== null && m.zone !== null && m.zone !== zone;
      if (fits.some(other) && !other(pick)) return false;
      const peers = fits.filter((m) => other(m) === other(pick));
      return peers.every((m) => m.left <= pick.left);
    }),
    { numRuns: 500 },
  );
});
