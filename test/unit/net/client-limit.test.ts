import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import fc from 'fast-check';
import { ClientLimit } from '../../../src/net/client-limit.js';

class FakeSocket extends EventEmitter {
  destroyed = false;
  constructor(readonly remoteAddress: string | undefined) {
    super();
  }
  destroy(): void {
    this.destroyed = true;
  }
  close(): void {
    this.emit('close');
  }
}

test('one address gets at most perClient sockets; others are unaffected', () => {
  const limit = new ClientLimit(2);
  const a = [new FakeSocket('10.0.0.1'), new FakeSocket('10.0.0.1'), new FakeSocket('10.0.0.1')];
  assert.deepEqual(a.map((s) => limit.admit(s)), [true, true, false]);
  assert.deepEqual(a.map((s) => s.destroyed), [false, false, true]);
  assert.equal(limit.refused, 1);
  assert.equal(limit.admit(new FakeSocket('10.0.0.2')), true, 'another address still gets in');
  a[0]?.close();
  assert.equal(limit.admit(new FakeSocket('10.0.0.1')), true, 'a closed socket frees its slot');
  assert.equal(limit.openFrom('10.0.0.1'), 2);
});

test('counts follow opens and closes in any order (model)', () => {
  const addresses = ['a', 'b', 'c'];
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 4 }),
      fc.array(fc.oneof(fc.record({ open: fc.constantFrom(...addresses) }), fc.record({ close: fc.nat() })), { maxLength: 60 }),
      (perClient, steps) => {
        const limit = new ClientLimit(perClient);
        const live: FakeSocket[] = [];
        for (const step of steps) {
          if ('open' in step) {
            const socket = new FakeSocket(step.open);
            const expected = live.filter((s) => s.remoteAddress === step.open).length < perClient;
            assert.equal(limit.admit(socket), expected);
            assert.equal(socket.destroyed, !expected);
            if (expected) live.push(socket);
          } else if (live.length > 0) {
            const [socket] = live.splice(step.close % live.length, 1);
            socket?.close();
          }
          for (const address of addresses) assert.equal(limit.openFrom(address), live.filter((s) => s.remoteAddress === address).length);
        }
      },
    ),
  );
});
