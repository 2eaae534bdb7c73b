// ConnectionGate: the connection cap and the handshake deadline, with mocked timers.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { pino } from 'pino';
import { ConnectionGate } from '../../../src/net/connection-gate.js';

class FakeSocket extends EventEmitter {
  destroyed = false;
  readonly remoteAddress: string;
  constructor(remoteAddress = '127.0.0.1') {
    super();
    this.remoteAddress = remoteAddress;
  }
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

test('with a per-client cap, one address gets no more than its share; other addresses are admitted, and a slot comes back when one closes', () => {
  const gate = new ConnectionGate('test', { maxConnections: 10, maxConnectionsPerClient: 2, handshakeTimeoutMs: 60_000 }, log);
  const a1 = new FakeSocket('10.0.0.1');
  const a2 = new FakeSocket('10.0.0.1');
  const a3 = new FakeSocket('10.0.0.1');
  assert.ok(gate.admit(a1));
  assert.ok(gate.admit(a2));
  assert.equal(gate.admit(a3), undefined);
  assert.equal(a3.destroyed, true);
  assert.deepEqual([gate.stats.refusedPerClient, gate.stats.refused, gate.stats.open], [1, 0, 2]);
  assert.ok(gate.admit(new FakeSocket('10.0.0.2')), 'another address is admitted');
  a1.destroy();
  assert.ok(gate.admit(new FakeSocket('10.0.0.1')), 'a slot of the address came back');
  assert.equal(gate.stats.open, 3);
});
