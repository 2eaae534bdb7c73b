import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, connect, Socket, type Server } from 'node:net';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
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

/**
 * A reader of length-prefixed messages (4-byte length, then the payload) that offers the
 * rest of each payload as the input's read target, as the NBD parser does with a WRITE's.
 * Each payload lives inside an arena with guard bytes on both sides. A payload may be
 * moved to a new arena, as a connection that gives a payload buffer up does: the old one
 * is kept, as the input's contract asks, until the next chunk has been handed over, then
 * filled with a mark that must stay.
 */
function framedReader(input: SocketInput) {
  const GUARD = 64;
  const state = {
    messages: [] as Buffer[],
    arenas: [] as Buffer[],
    retired: [] as Buffer[],
    direct: 0,
    whilePaused: 0,
    paused: false,
    ended: false,
    offer: true,
  };
  const header = Buffer.alloc(4);
  let headerHave = 0;
  let arena: Buffer | undefined;
  let payload: Buffer | undefined;
  let have = 0;
  let letGo: Buffer[] = [];
  const begin = (length: number): void => {
    arena = Buffer.alloc(length + 2 * GUARD, 0xab);
    state.arenas.push(arena);
    payload = arena.subarray(GUARD, GUARD + length);
    have = 0;
    if (length === 0) finish();
  };
  const finish = (): void => {
    state.messages.push(payload ?? Buffer.alloc(0));
    payload = undefined;
    arena = undefined;
  };
  const handlers: InputHandlers = {
    data: (chunk) => {
      if (state.paused) state.whilePaused++;
      const retiring = letGo;
      letGo = [];
      let at = 0;
      while (at < chunk.length) {
        if (payload === undefined) {
          const n = Math.min(4 - headerHave, chunk.length - at);
          chunk.copy(header, headerHave, at, at + n);
          headerHave += n;
          at += n;
          if (headerHave === 4) {
            headerHave = 0;
            begin(header.readUInt32BE(0));
          }
          continue;
        }
        const n = Math.min(payload.length - have, chunk.length - at);
        if (chunk.buffer === payload.buffer && chunk.byteOffset + at === payload.byteOffset + have) state.direct += n;
        else chunk.copy(payload, have, at, at + n);
        have += n;
        at += n;
        if (have === payload.length) finish();
      }
      // A chunk has been handed over since these were given up: the socket is done with them.
      for (const old of retiring) {
        old.fill(0xcd);
        state.retired.push(old);
      }
    },
    end: () => {
      state.ended = true;
    },
    target: () => (state.offer && payload !== undefined ? payload.subarray(have) : undefined),
  };
  input.listen(handlers);
  /** Moves the payload being read to a new arena; the old one must never be written again. */
  const move = (): void => {
    if (payload === undefined || arena === undefined) return;
    const old = arena;
    const kept = Buffer.from(payload.subarray(0, have));
    const length = payload.length;
    begin(length);
    kept.copy(payload);
    have = kept.length;
    letGo.push(old);
  };
  const intact = (): boolean =>
    state.arenas.every((a) => state.retired.includes(a) || letGo.includes(a) || (a.subarray(0, GUARD).every((b) => b === 0xab) && a.subarray(a.length - GUARD).every((b) => b === 0xab))) &&
    state.retired.every((a) => a.every((b) => b === 0xcd));
  return { state, handlers, move, intact };
}

function framed(payloads: Buffer[]): Buffer {
  return Buffer.concat(payloads.flatMap((p) => [Buffer.from([p.length >>> 24, (p.length >>> 16) & 0xff, (p.length >>> 8) & 0xff, p.length & 0xff]), p]));
}

test('a reader\'s target: the rest of a payload is read straight into it, handed over as a view of it where it belongs, nothing written outside it', async () => {
  await connection({}, async (input, client) => {
    const reader = framedReader(input);
    const payloads = [randomBytes(1 << 20), randomBytes(10), randomBytes(300_000), randomBytes(20_000)];
    client.end(framed(payloads));
    await until(() => reader.state.ended, 'the end');
    assert.deepEqual(reader.state.messages, payloads);
    assert.ok(reader.state.direct > 1_000_000, `${reader.state.direct} bytes read straight into their place`);
    assert.ok(reader.intact(), 'no byte written outside the targets');
  });
});

test('targets under any schedule of pauses, resumes, declined and given-up targets: every payload whole and in order, never handed over while paused, nothing written outside a target or into one after the next chunk', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.oneof(fc.integer({ min: 0, max: 100 }), fc.integer({ min: 16 * 1024, max: 400_000 })), { minLength: 1, maxLength: 8 }),
      fc.array(fc.constantFrom('pause-in-handler', 'resume-later', 'resume-now', 'pause-later', 'move-now', 'move-later', 'decline', 'none'), { minLength: 1, maxLength: 12 }),
      fc.integer({ min: 1024, max: 64 * 1024 }),
      async (sizes, actions, size) => {
        await connection({ size }, async (input, client) => {
          const reader = framedReader(input);
          let k = 0;
          const resume = (): void => {
            reader.state.paused = false;
            input.resume();
          };
          const data = reader.handlers.data;
          reader.handlers.data = (chunk) => {
            data(chunk);
            const action = actions[k++ % actions.length];
            reader.state.offer = action !== 'decline';
            if (action === 'none' || action === 'decline') return;
            if (action === 'move-now') return reader.move();
            if (action === 'move-later') return void setImmediate(reader.move);
            if (action === 'pause-later') {
              // Between reads, after the input was given a target: the next read may land in it while paused.
              setImmediate(() => {
                reader.state.paused = true;
                input.pause();
                setTimeout(resume, 1);
              });
              return;
            }
            reader.state.paused = true;
            input.pause();
            if (action === 'resume-later') setTimeout(resume, 1);
            else if (action === 'pause-in-handler') setImmediate(resume);
            else resume();
          };
          input.listen(reader.handlers);
          const payloads = sizes.map((n) => randomBytes(n));
          const stream = framed(payloads);
          for (let at = 0; at < stream.length; at += 70_000) {
            client.write(stream.subarray(at, at + 70_000));
            await new Promise((r) => setImmediate(r));
          }
          client.end();
          reader.state.paused = false;
          input.resume();
          await until(() => reader.state.ended, 'the end');
          assert.deepEqual(reader.state.messages, payloads);
          assert.equal(reader.state.whilePaused, 0);
          assert.ok(reader.intact(), 'nothing written outside a live target');
          input.socket.destroy();
        });
      },
    ),
    { numRuns: 30 },
  );
});

test('a tick that throws during a read into a target, caught by an uncaughtException handler, cuts the connection instead of letting a read land where the input does not expect it', async () => {
  // Node.js drops the buffer the generator returned when this happens (the next read
  // lands in the last one's); node:test catches uncaught exceptions itself, so the
  // process that has the handler is a child of its own.
  const module = new URL('../../../src/net/socket-input.js', import.meta.url).href;
  const script = `
    import { createServer, connect } from 'node:net';
    import { once } from 'node:events';
import { spawn } from 'node:child_process';
    const { ownBufferInput } = await import(${JSON.stringify(module)});
    process.on('uncaughtException', () => undefined);
    const length = 100000;
    const payload = Buffer.alloc(length);
    let have = -4, direct = 0, thrown = false;
    const server = createServer({ pauseOnConnect: true }, (socket) => {
      const input = ownBufferInput(socket, { allowHalfOpen: true });
      input.listen({
        data: (chunk) => {
          let at = 0;
          if (have < 0) { const n = Math.min(-have, chunk.length); have += n; at = n; }
          const n = Math.min(length - have, chunk.length - at);
          if (chunk.buffer === payload.buffer && chunk.byteOffset + at === payload.byteOffset + have) direct += n;
          else chunk.copy(payload, have, at, at + n);
          have += n;
          if (!thrown) { thrown = true; process.nextTick(() => { throw new Error('a tick throws'); }); }
        },
        end: () => undefined,
        target: () => (have >= 0 && have < length ? payload.subarray(have) : undefined),
      });
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const client = connect(server.address().port, '127.0.0.1');
    await once(client, 'connect');
    const sent = Buffer.alloc(length);
    for (let i = 0; i < length; i++) sent[i] = (i * 7) & 0xff;
    const head = Buffer.alloc(4); head.writeUInt32BE(length);
    client.write(Buffer.concat([head, sent.subarray(0, 10)]));
    await new Promise((r) => setTimeout(r, 100));
    client.on('error', () => undefined);
    const closed = once(client, 'close');
    client.write(sent.subarray(10));
    await Promise.race([closed, new Promise((r) => setTimeout(r, 2000))]);
    const wrong = payload.subarray(0, have).equals(sent.subarray(0, have)) ? 0 : 1;
    console.log(JSON.stringify({ cut: client.destroyed, have, direct, wrong }));
    client.destroy(); server.close();
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
  await once(child, 'exit');
  const result = JSON.parse(out) as { cut: boolean; have: number; direct: number; wrong: number };
  assert.equal(result.wrong, 0, `no byte handed over from where it did not land (${JSON.stringify(result)})`);
  assert.equal(result.cut, true, 'the connection was cut');
  assert.ok(result.have < 100_000, 'the payload was not completed from a read Node.js put elsewhere');
});

test('a socket without a handle to adopt falls back to data events (not transient)', () => {
  const bare = new Socket();
  const input = ownBufferInput(bare, { allowHalfOpen: true });
  assert.equal(input.transient, false);
  assert.equal(input.socket, bare);
  bare.destroy();
});
