// Crash loops: `kill -9` of a real node at random moments, then a restart on the same
// data directory, and a check that every write the node acknowledged as durable (a FUA
// write, or any write completed before a FLUSH that succeeded) is there (issue 10).
//
//   destage: a writer keeps 16 writes in flight over a volume larger than the cache,
//            with FUA on some and a FLUSH now and then; the cache evicts and destages
//            all the time (small DRAM, dirty data older than 50 ms written back)
//   resize:  flushed data, then grows and shrinks (to sizes inside a line) of the volume,
//            killed in the middle
//
// Each block's writes carry (block, version); a block may read back as any version from
// its last durable one to its last sent one, never older, never torn, never another
// block's. The seed of each cycle is printed; MEMSTRATA_SOAK=1 runs many more cycles.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NbdClient } from '../../src/client/nbd-client.js';
import { startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { rng } from '../support/rng.js';

const SOAK = process.env.MEMSTRATA_SOAK === '1';
const BLOCK = 4096;

function blockData(block: number, version: number): Buffer {
  const buf = Buffer.alloc(BLOCK);
  for (let i = 0; i < BLOCK; i += 8) {
    buf.writeUInt32LE(block, i);
    buf.writeUInt32LE(version, i + 4);
  }
  return buf;
}

/** The version a block holds, or a description of what is wrong with it. */
function versionOf(block: number, buf: Buffer): number | string {
  const version = buf.readUInt32LE(4);
  if (buf.every((b) => b === 0)) return 0;
  for (let i = 0; i < BLOCK; i += 8) {
    if (buf.readUInt32LE(i) !== block || buf.readUInt32LE(i + 4) !== version) return `torn or foreign at byte ${i}`;
  }
  return version;
}

const NODE_ARGS = [
  '--dram-size', '16MiB', '--flash-size', '16MiB', '--extent-size', '1MiB',
  '--set', 'partition.dram.cache.initial=4MiB', '--set', 'partition.dram.server.initial=0', '--set', 'partition.dram.nvram.initial=0',
  '--set', 'partition.flash.cache.initial=4MiB', '--set', 'partition.flash.server.initial=0', '--set', 'partition.flash.nvram.initial=0',
  '--set', 'volumes.defaultSize=16MiB', '--set', 'cache.maxDirtyAge=50ms',
];

async function start(dir: string): Promise<NodeProcess> {
  return startNode({ cwd: dir, small: false, args: NODE_ARGS, timeoutMs: 30_000 });
}

test('kill -9 during destage under a verifying writer: every FUA or flushed write survives', async (t) => {
  const dir = await tempDir(t);
  const blocks = 12 * 1024 * 1024 / BLOCK; // three times the DRAM cache
  const durable = new Uint32Array(blocks); // last version acknowledged as durable
  const sent = new Uint32Array(blocks); // last version sent (acknowledged or not)
  const cycles = SOAK ? 60 : 4;
  let version = 0;
  for (let cycle = 0; cycle < cycles; cycle++) {
    const seed = (Date.now() ^ (cycle * 7919)) >>> 0;
    const random = rng(seed);
    const node = await start(dir);
    t.after(() => node.stop('SIGKILL').then(() => undefined));
    // First, what the last crash left must be allowed.
    const client = await NbdClient.connect({ host: node.nbd.host, port: node.nbd.port, export: 'default' });
    for (let b = 0; b < blocks; b += 256) {
      const chunk = await client.read(b * BLOCK, 256 * BLOCK);
      for (let k = 0; k < 256; k++) {
        const block = b + k;
        const got = versionOf(block, chunk.subarray(k * BLOCK, (k + 1) * BLOCK));
        const low = durable[block] ?? 0;
        const high = sent[block] ?? 0;
        assert.ok(typeof got === 'number' && got >= low && got <= high, `cycle ${cycle} (seed ${seed}): block ${block} reads ${got}; durable ${low}, last sent ${high}`);
        // What survived becomes the floor: a later cycle must never read an older version.
        if (typeof got === 'number') durable[block] = got;
      }
    }
    // Then write until killed: 16 in flight, FUA on a fifth, a FLUSH every 64 writes.
    let killed = false;
    const killAt = 150 + Math.floor(random() * 600);
    const killer = new Promise<void>((resolve) => setTimeout(() => {
      killed = true;
      void node.stop('SIGKILL').then(() => resolve());
    }, killAt));
    const inFlightBlocks = new Set<number>();
    const worker = async (): Promise<void> => {
      let sinceFlush: [number, number][] = [];
      for (let n = 0; !killed; n++) {
        let block = Math.floor(random() * blocks);
        while (inFlightBlocks.has(block)) block = (block + 1) % blocks;
        inFlightBlocks.add(block);
        const v = ++version;
        sent[block] = v;
        const fua = random() < 0.2;
        try {
          await client.write(block * BLOCK, blockData(block, v), { fua });
          if (fua) durable[block] = Math.max(durable[block] ?? 0, v);
          else sinceFlush.push([block, v]);
          if (n % 64 === 63) {
            const covered = sinceFlush;
            sinceFlush = [];
            await client.flush();
            for (const [b, ver] of covered) durable[b] = Math.max(durable[b] ?? 0, ver);
          }
        } catch {
          return; // the node is gone
        } finally {
          inFlightBlocks.delete(block);
        }
      }
    };
    await Promise.all(Array.from({ length: 16 }, worker));
    await killer;
    await client.close().catch(() => undefined);
  }
  // A last start checks what the last kill left.
  const node = await start(dir);
  t.after(() => node.stop('SIGKILL').then(() => undefined));
  const client = await NbdClient.connect({ host: node.nbd.host, port: node.nbd.port, export: 'default' });
  for (let b = 0; b < blocks; b += 256) {
    const chunk = await client.read(b * BLOCK, 256 * BLOCK);
    for (let k = 0; k < 256; k++) {
      const got = versionOf(b + k, chunk.subarray(k * BLOCK, (k + 1) * BLOCK));
      assert.ok(typeof got === 'number' && got >= (durable[b + k] ?? 0) && got <= (sent[b + k] ?? 0), `block ${b + k} reads ${got} after the last kill`);
    }
  }
  await client.close();
});

test('kill -9 in the middle of volume resizes: flushed data below the smallest size survives, the size is one that was asked for', async (t) => {
  const dir = await tempDir(t);
  const MiB = 1024 * 1024;
  const cycles = SOAK ? 40 : 3;
  let node = await start(dir);
  t.after(() => node.stop('SIGKILL').then(() => undefined));
  const created = await fetch(`${node.url}/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'r', size: 8 * MiB }) });
  assert.equal(created.status, 201, await created.text());
  const keep = 3 * MiB + 5 * BLOCK; // never resized below this; not a multiple of a line
  {
    const client = await NbdClient.connect({ host: node.nbd.host, port: node.nbd.port, export: 'r' });
    for (let b = 0; b < keep / BLOCK; b++) await client.write(b * BLOCK, blockData(b, 1));
    await client.flush();
    // Unflushed writes too: they may be lost, but never half-written.
    for (let b = 0; b < keep / BLOCK; b += 7) await client.write(b * BLOCK, blockData(b, 2));
    await client.close();
  }
  const sizes = new Set<number>([8 * MiB]);
  for (let cycle = 0; cycle < cycles; cycle++) {
    const seed = (Date.now() ^ (cycle * 104729)) >>> 0;
    const random = rng(seed);
    const plan = Array.from({ length: 6 }, () => keep + Math.floor(random() * 40) * 12 * BLOCK);
    for (const s of plan) sizes.add(s);
    const resizes = (async () => {
      for (const size of plan) {
        const response = await fetch(`${node.url}/v1/volumes/r/resize`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ size }) }).catch(() => undefined);
        if (response === undefined) return;
        await response.text();
      }
    })();
    await new Promise((resolve) => setTimeout(resolve, Math.floor(random() * 40)));
    await node.stop('SIGKILL');
    await resizes;
    node = await start(dir);
    const list = (await (await fetch(`${node.url}/v1/volumes`)).json()) as { volumes: { name: string; size: number }[] };
    const size = list.volumes.find((v) => v.name === 'r')?.size;
    assert.ok(size !== undefined && sizes.has(size), `cycle ${cycle} (seed ${seed}): volume r has size ${size}, which was never asked for`);
    const client = await NbdClient.connect({ host: node.nbd.host, port: node.nbd.port, export: 'r' });
    const data = await client.read(0, keep);
    for (let b = 0; b < keep / BLOCK; b++) {
      const got = versionOf(b, data.subarray(b * BLOCK, (b + 1) * BLOCK));
      assert.ok(got === 1 || (got === 2 && b % 7 === 0), `cycle ${cycle} (seed ${seed}): block ${b} reads ${got}`);
    }
    await client.close();
  }
});
