// BusyPoll (src/net/busy-poll.ts): after a poke the event loop keeps turning until the
// window has passed since the last poke, one turn queued at a time; it never turns while
// off or once stopped; the time it spent is counted; an input it wraps pokes it with
// every chunk and hands everything else through unchanged. The clock is the test's.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Socket, connect, createServer, type AddressInfo } from 'node:net';
import { CorkedWriter } from '../../../src/net/corked-writer.js';
import { BusyPoll } from '../../../src/net/busy-poll.js';
import type { InputHandlers, SocketInput } from '../../../src/net/socket-input.js';

/** Resolves after the event loop's check phase has run `n` times. */
async function turns(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise<void>((resolve) => { setImmediate(resolve); });
}

test('a poke keeps the loop turning until the window has passed since the last poke, then it stops and counts the time', async () => {
  let now = 1000;
  const poll = new BusyPoll(200, () => now); // 200 us = 0.2 ms
  assert.equal(poll.active, false);
  poll.poke();
  assert.equal(poll.active, true);
  await turns(5);
  assert.equal(poll.active, true, 'still within the window: the clock has not moved');
  now += 0.15;
  poll.poke(); // a later chunk moves the end of the window
  now += 0.15;
  await turns(3);
  assert.equal(poll.active, true, '0.15 ms after the last poke, within its window');
  now += 0.06;
  await turns(2);
  assert.equal(poll.active, false, 'past the window: the last turn queued no other');
  assert.ok(Math.abs(poll.pollingSeconds - 0.36 / 1000) < 1e-9, `${poll.pollingSeconds} s`);
  // Pokes while polling queue no second turn: count the turns with a wrapped setImmediate.
  const original = globalThis.setImmediate;
  let queued = 0;
  globalThis.setImmediate = ((fn: (...args: unknown[]) => void, ...args: unknown[]) => {
    queued++;
    return original(fn, ...args);
  }) as typeof setImmediate;
  try {
    poll.poke();
    poll.poke();
    poll.poke();
    assert.equal(queued, 1, 'one turn queued for three pokes');
  } finally {
    globalThis.setImmediate = original;
  }
  now += 1;
  await turns(2);
  assert.equal(poll.active, false);
});

test('off at 0 and after stop(): no turn is ever queued, so nothing holds the loop open', async () => {
  const off = new BusyPoll(0, () => 0);
  off.poke();
  assert.equal(off.active, false);
  assert.equal(off.enabled, false);
  let now = 0;
  const poll = new BusyPoll(1000, () => now);
  poll.poke();
  assert.equal(poll.active, true);
  poll.stop();
  await turns(2);
  assert.equal(poll.active, false, 'the turn queued before stop() was the last');
  poll.poke();
  assert.equal(poll.active, false, 'a poke after stop() does nothing');
  assert.equal(poll.enabled, false);
  now += 5;
  assert.ok(poll.pollingSeconds >= 0);
});

/** A SocketInput that records what is asked of it and lets the test hand chunks over. */
function fakeInput(): { input: SocketInput; handlers: () => InputHandlers | undefined; calls: string[] } {
  let current: InputHandlers | undefined;
  const calls: string[] = [];
  const input: SocketInput = {
    socket: new Socket(),
    transient: true,
    listen(handlers) {
      current = handlers;
      calls.push(handlers === undefined ? 'listen(none)' : 'listen');
    },
    isPaused: () => {
      calls.push('isPaused');
      return true;
    },
    pendingBytes: () => {
      calls.push('pendingBytes');
      return 7;
    },
    pause: () => {
      calls.push('pause');
    },
    resume: () => {
      calls.push('resume');
    },
  };
  return { input, handlers: () => current, calls };
}

test('a wrapped input pokes with every chunk and hands chunks, end, targets and flow control through unchanged', async () => {
  let now = 0;
  const poll = new BusyPoll(100, () => now);
  const { input, handlers, calls } = fakeInput();
  assert.equal(new BusyPoll(0).input(input), input, 'off: the input itself');
  const wrapped = poll.input(input);
  assert.equal(wrapped.socket, input.socket);
  assert.equal(wrapped.transient, true);
  const got: string[] = [];
  const target = Buffer.alloc(16);
  // A reader that is a class instance: its methods see `this`.
  class Reader implements InputHandlers {
    readonly name = 'reader';
    data(chunk: Buffer): void {
      got.push(`${this.name}:${chunk.toString()}`);
    }
    end(): void {
      got.push(`${this.name}:end`);
    }
    target(): Buffer | undefined {
      got.push(`${this.name}:target`);
      return target;
    }
  }
  wrapped.listen(new Reader());
  const h = handlers();
  assert.ok(h !== undefined);
  assert.equal(poll.active, false);
  h.data(Buffer.from('one'));
  assert.equal(poll.active, true, 'the chunk poked');
  assert.equal(h.target?.(), target);
  h.end();
  assert.deepEqual(got, ['reader:one', 'reader:target', 'reader:end']);
  // A reader without target(): the wrapped handlers have none either.
  wrapped.listen({ data: () => undefined, end: () => undefined });
  assert.equal(handlers()?.target, undefined);
  wrapped.listen(undefined);
  assert.equal(handlers(), undefined);
  assert.equal(wrapped.isPaused(), true);
  assert.equal(wrapped.pendingBytes(), 7);
  wrapped.pause();
  wrapped.resume();
  assert.deepEqual(calls, ['listen', 'listen', 'listen(none)', 'isPaused', 'pendingBytes', 'pause', 'resume']);
  now += 1;
  await turns(2);
  assert.equal(poll.active, false);
});

test('a server connection\'s replies poke too: its CorkedWriter tells the poll once per tick, after the tick\'s writes reached the socket', async (t) => {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => server.close());
  const accepted = new Promise<Socket>((resolve) => server.once('connection', resolve));
  const client = connect((server.address() as AddressInfo).port, '127.0.0.1');
  t.after(() => client.destroy());
  const peer = await accepted;
  t.after(() => peer.destroy());
  let now = 0;
  const poll = new BusyPoll(100, () => now);
  assert.ok(poll.pokeFn !== undefined);
  assert.equal(new BusyPoll(0).pokeFn, undefined, 'off: nothing to call');
  let flushes = 0;
  const writer = new CorkedWriter(peer, () => {
    flushes++;
    poll.pokeFn?.();
  });
  const got = new Promise<string>((resolve) => {
    let text = '';
    client.on('data', (chunk: Buffer) => {
      text += chunk.toString();
      if (text.length >= 6) resolve(text);
    });
  });
  writer.write(Buffer.from('ab'));
  writer.write(Buffer.from('cd'));
  assert.equal(flushes, 0, 'not before the tick ends');
  assert.equal(poll.active, false);
  await new Promise<void>((resolve) => { process.nextTick(resolve); });
  assert.equal(flushes, 1, 'once for the tick\'s two writes');
  assert.equal(poll.active, true, 'the replies poked');
  writer.write(Buffer.from('ef'));
  assert.equal(await got, 'abcdef');
  assert.equal(flushes, 2);
  now += 1;
  await turns(2);
  assert.equal(poll.active, false);
});
