// ConnectionGate: the connection cap and the handshake deadline, with mocked timers.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { pino } from 'pino';
import { ConnectionGate } from '../../../src/net/connection-gate.js';

class FakeSocket extends EventEmitter {
  destroyed = false;
  readonly remoteAddress = '127.0.0.1';
  destroy(): this {
    if (!this.destroyed) {
      this.destroyed = true;
      this.emit('close');
    }
    return this;
  }
}

const log = pino({ level: 'silent' });

test('the gate refuses connections past the cap and admits again once one closes', () => {
  const gate = new ConnectionGate('test', { maxConnections: 2, handshakeTimeoutMs: 60_000 }, log);
  const a = new FakeSocket();
  const b = new FakeSocket();
  const c = new FakeSocket();
  assert.ok(gate.admit(a));
  assert.ok(gate.admit(b));
  assert.equal(gate.admit(c), undefined);
  assert.equal(c.destroyed, true);
  assert.equal(gate.stats.refused, 1);
  a.destroy();
  const d = new FakeSocket();
  assert.ok(gate.admit(d));
  assert.equal(gate.stats.open, 2);
  b.destroy();
  d.destroy();
  assert.equal(gate.stats.open, 0);
});

test('a connection that does not finish its handshake in time is closed; one that does is left alone', (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  const gate = new ConnectionGate('test', { maxConnections: 10, handshakeTimeoutMs: 1000 }, log);
  const slow = new FakeSocket();
  const quick = new FakeSocket();
  gate.admit(slow);
  const admission = gate.admit(quick);
  assert.ok(admission);
  admission.handshakeDone();
  t.mock.timers.tick(999);
  assert.equal(slow.destroyed, false);
  t.mock.timers.tick(1);
  assert.equal(slow.destroyed, true);
  assert.equal(quick.destroyed, false);
  assert.equal(gate.stats.handshakeTimeouts, 1);
  assert.equal(gate.stats.open, 1);
});
