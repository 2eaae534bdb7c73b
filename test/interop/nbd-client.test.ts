// memstrata's NBD client against another server: nbdkit's memory plugin.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { NbdClient } from '../../src/client/nbd-client.js';
import { freePort } from '../support/node-process.js';
import { missing } from '../support/tools.js';

test('NBD client against nbdkit memory: handshake, writes, FUA, flush, reads, trim', async (t) => {
  if (missing('nbdkit') !== undefined) return;
  const port = await freePort();
  const nbdkit = spawn('nbdkit', ['--foreground', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), 'memory', '32M'], { stdio: 'ignore' });
  t.after(() => {
    nbdkit.kill('SIGKILL');
  });
  let client: NbdClient | undefined;
  for (let i = 0; i < 100 && client === undefined; i++) {
    client = await NbdClient.connect({ host: '127.0.0.1', port }).catch(async () => {
      await new Promise((r) => setTimeout(r, 50));
      return undefined;
    });
  }
  assert.ok(client !== undefined, 'nbdkit came up');
  t.after(() => client.close());
  assert.equal(client.size, 32 * 2 ** 20);
  assert.deepEqual([client.readOnly, client.canFlush, client.canTrim], [false, true, true]);
  const model = Buffer.alloc(client.size);
  const writes: Promise<void>[] = [];
  // Writes in flight together are not ordered (NBD): each has a 256 KiB slot of its own.
  for (let i = 0; i < 100; i++) {
    const within = Math.floor(Math.random() * 200000);
    const data = randomBytes(1 + Math.floor(Math.random() * (262144 - within)));
    data.copy(model, i * 262144 + within);
    writes.push(client.write(i * 262144 + within, data, { fua: client.canFua && i % 4 === 0 }));
  }
  await Promise.all(writes);
  await client.flush();
  assert.ok((await client.read(0, client.size)).equals(model));
  await client.trim(4096, 65536);
  assert.ok((await client.read(4096, 65536)).every((b) => b === 0), 'nbdkit memory reads trimmed space as zeros');
  await assert.rejects(client.read(client.size, 1), { code: 'MS_VOLUME_RANGE' });
});
