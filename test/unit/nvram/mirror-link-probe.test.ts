// An idle mirror link probes its partner (docs/mirror-protocol.md): one that hangs without
// closing its connection is noticed with no request from the link's owner, and the owner
// hears what a partner that answers says it holds.

import { test } from 'node:test';
import { createServer, type Socket } from 'node:net';
import { MirrorLink } from '../../../src/nvram/mirror-link.js';
import { FrameParser } from '../../../src/protocol/rmem/parser.js';
import { MIRROR_REQUEST_MAGIC, MOP, MSTATUS, encodeName, reply } from '../../../src/protocol/mirror/codec.js';
import pino from 'pino';

// A link that never notices fails by this deadline (a hang), not by a clock in the test.
test('an idle link notices a partner that hangs right after its HELLO, with no request of its own', { timeout: 30_000 }, async (t) => {
  const timeoutMs = 1000;
  let hungAt = 0;
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    const parser = new FrameParser({ magic: MIRROR_REQUEST_MAGIC }, {
      onFrame: (f) => {
        // Answers HELLO, then never anything again (a stopped process: the kernel keeps the connection).
        if (f.op === MOP.HELLO && hungAt === 0) {
          socket.write(reply(f.op, MSTATUS.OK, f.tagLo, encodeName('partner')));
          hungAt = performance.now();
        }
      },
      onFatal: () => socket.destroy(),
    });
    socket.on('data', (c: Buffer) => parser.feed(c));
    socket.on('error', () => undefined);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  let downAt = 0;
  const down = new Promise<void>((resolve) => {
    const link = new MirrorLink({
      partner: { host: '127.0.0.1', port },
      nodeId: 'me',
      token: undefined,
      partnerId: 'partner',
      timeoutMs,
      retryMs: 60_000,
      log: pino({ level: 'silent' }),
      onUp: () => undefined,
      onDown: () => { downAt = performance.now(); link.close(); resolve(); },
      probe: () => 'm',
    });
    link.start();
  });
  t.after(() => { for (const s of sockets) s.destroy(); server.close(); });
  await down;
  const noticedAfter = Math.round(downAt - hungAt);
  console.log(`# noticed ${noticedAfter} ms after the partner stopped answering (mirror.timeout ${timeoutMs} ms)`);
});
