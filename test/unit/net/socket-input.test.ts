import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, connect, Socket, type Server } from 'node:net';
import { once } from 'node:events';
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { ownBufferInput, type InputHandlers, type SocketInput } from '../../../src/net/socket-input.js';

/**
 * One connection to a server whose connections get an own-buffer input: runs `body` with
 * the server's input and the client, then closes both.
 */
async function connection(options: { size?: number; allowHalfOpen?: boolean }, body: (input: SocketInput, client: Socket, server: Server) => Promise<void>): Promise<void> {
  const allowHalfOpen = options.allowHalfOpen ?? true;
  let resolve: (input: SocketInput) => void = () => undefined;
  const accepted = new Promise<SocketInput>((r) => (resolve = r));
  const server = createServer({ allowHalfOpen, pauseOnConnect: true }, (socket) => {
    resolve(ownBufferInput(socket, { allowHalfOpen, size: options.size }));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const address = server.address();
  assert.ok(address !== null && typeof address === 'object');
  const client = connect({ port: address.port, host: '127.0.0.1', allowHalfOpen: true });
  try {
    await body(await accepted, client, server);
  } finally {
    client.destroy();
    server.close();
  }
}

/** Collects what an input hands over: the bytes (copied at once), whether it came while paused, and the end. */
function collect(input: SocketInput) {
  const state = { bytes: [] as Buffer[], views: [] as Buffer[], paused: false, whilePaused: 0, ended: false, afterEnd: 0, handlers: undefined as unknown as InputHandlers };
  state.handlers = {
    data: (chunk) => {
      if (state.paused) state.whilePaused++;
      if (state.ended) state.afterEnd++;
      state.views.push(chunk);
      state.bytes.push(Buffer.from(chunk));
    },
    end: () => {
      state.ended = true;
    },
  };
  input.listen(state.handlers);
  return state;
}

async function until(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** Resumes a paused input, waits for its end, and checks it handed over exactly `sent`, nothing while paused or after the end. */
async function resumeToEnd(input: SocketInput, seen: ReturnType<typeof collect>, sent: Buffer): Promise<void> {
  seen.paused = false;
  input.resume();
  await until(() => seen.ended, 'the end');
  assert.deepEqual(Buffer.concat(seen.bytes), sent);
  assert.equal(seen.whilePaused, 0);
  assert.equal(seen.afterEnd, 0);
}

test('an accepted socket is read into one buffer of its own: chunks are views of it, in order, and the server no longer counts the accepted Socket', async () => {
  await connection({}, async (input, client, server) => {
    assert.equal(input.transient, true, 'this runtime lets the handle be adopted');
    const seen = collect(input);
    const sent = randomBytes(300_000);
    client.end(sent);
    await until(() => seen.ended, 'the end');
    assert.deepEqual(Buffer.concat(seen.bytes), sent);
    assert.ok(seen.views.length > 1);
    assert.ok(seen.views.every((v) => v.buffer === seen.views[0]?.buffer), 'every chunk a view of the same memory');
    const count = await new Promise<number>((r, j) => server.getConnections((e, n) => (e ? j(e) : r(n))));
    assert.equal(count, 0);
    input.socket.end();
    await once(input.socket, 'close');
  });
});

test('paused: nothing is handed over; what arrives meanwhile (more than the buffer: the socket stops) comes after resume, in order, then the end', async () => {
  await connection({ size: 1024 }, async (input, client) => {
    const seen = collect(input);
    input.pause();
    seen.paused = true;
    const sent = randomBytes(50_000);
    client.end(sent);
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(seen.bytes.length, 0);
    assert.equal(seen.ended, false, 'the end waits behind the bytes kept');
    await resumeToEnd(input, seen, sent);
  });
});

test('any schedule of pauses and resumes, from inside the handler or from timers, hands over every byte once, in order, never while paused', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.integer({ min: 1, max: 5000 }), { minLength: 1, maxLength: 12 }),
      fc.array(fc.constantFrom('pause-in-handler', 'resume-later', 'resume-now', 'none'), { minLength: 1, maxLength: 12 }),
      fc.integer({ min: 16, max: 4096 }),
      async (writes, actions, size) => {
        await connection({ size }, async (input, client) => {
          const seen = collect(input);
          let k = 0;
          const resume = (): void => {
            seen.paused = false;
            input.resume();
          };
          const data = seen.handlers.data;
          seen.handlers.data = (chunk) => {
            data(chunk);
            const action = actions[k++ % actions.length];
            if (action === 'none') return;
            seen.paused = true;
            input.pause();
            if (action === 'resume-later') setTimeout(resume, 1);
            else if (action === 'pause-in-handler') setImmediate(resume);
            else resume();
          };
          input.listen(seen.handlers);
          const sent = writes.map((n) => randomBytes(n));
          for (const piece of sent) {
            client.write(piece);
            await new Promise((r) => setImmediate(r));
          }
          client.end();
          await resumeToEnd(input, seen, Buffer.concat(sent));
          input.socket.destroy();
        });
      },
    ),
    { numRuns: 25 },
  );
});

test('a service that is not half-open ends its side after the last byte kept during a pause, not at the peer\'s end', async () => {
  await connection({ allowHalfOpen: false }, async (input, client) => {
    const got: Buffer[] = [];
    input.listen({
      data: (chunk) => {
        got.push(Buffer.from(chunk));
        input.socket.write(Buffer.from(chunk)); // an echo: each piece answered as it is handed over
      },
      end: () => undefined,
    });
    input.pause();
    const sent = randomBytes(20_000); // under the buffer: the socket reads on, to the peer's end, while paused
    client.end(sent);
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(input.socket.writableEnded, false, 'not ended while bytes are kept');
    const echoed: Buffer[] = [];
    client.on('data', (chunk: Buffer) => echoed.push(chunk));
    const clientEnded = once(client, 'end');
    input.resume();
    await clientEnded;
    assert.deepEqual(Buffer.concat(got), sent);
    assert.deepEqual(Buffer.concat(echoed), sent, 'every echo went out before this side ended');
  });
});

test('pausing again in the tick of each resume, hundreds of times, reads on no further than the bound; the bytes come through intact', async () => {
  const size = 4096;
  await connection({ size }, async (input, client) => {
    const seen = collect(input);
    input.pause();
    seen.paused = true;
    const sent = randomBytes(1 << 20);
    client.end(sent);
    let most = 0;
    for (let i = 0; i < 300; i++) {
      await new Promise((r) => setImmediate(r));
      most = Math.max(most, input.pendingBytes());
      input.resume();
      input.pause(); // as a service does when what it answers at once backs up again
    }
    assert.ok(most < 2 * size, `read on ${most} bytes with a ${size}-byte buffer`);
    assert.equal(seen.bytes.length, 0);
    await resumeToEnd(input, seen, sent);
  });
});

test('a trickle of one-byte segments while paused is held as bytes, under the bound, and handed over whole', async () => {
  const size = 1024;
  await connection({ size }, async (input, client) => {
    client.setNoDelay(true);
    const seen = collect(input);
    input.pause();
    seen.paused = true;
    const sent = randomBytes(3000);
    for (const byte of sent) {
      client.write(Buffer.from([byte]));
      if (byte % 8 === 0) await new Promise((r) => setImmediate(r));
    }
    client.end();
    await new Promise((r) => setTimeout(r, 100));
    assert.ok(input.pendingBytes() >= size && input.pendingBytes() < 2 * size, `${input.pendingBytes()} bytes read on`);
    await resumeToEnd(input, seen, sent);
  });
});

test('a socket without a handle to adopt falls back to data events (not transient)', () => {
  const bare = new Socket();
  const input = ownBufferInput(bare, { allowHalfOpen: true });
  assert.equal(input.transient, false);
  assert.equal(input.socket, bare);
  bare.destroy();
});
