// free() against the real local flash file and a real swap volume over NBD: a write held
// in flight keeps the segment's range from being zeroed and reused until it has landed,
// so it never reaches the next owner (issue 10, item 7). The stores are the real ones,
// wrapped only to hold writes on cue.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { NbdClient } from '../../src/client/nbd-client.js';
import { HierarchyMemory } from '../../src/host/hierarchy-memory.js';
import { BufferStore, FileStore, RangeTier, VolumeStore, type RangeStore } from '../../src/host/tiers.js';
import { startNode, tempDir } from '../support/node-process.js';

const PAGE = 4096;

/** A store whose writes wait while `held` is set, until `release()`. */
class HeldStore implements RangeStore {
  held = false;
  private waiting: (() => void)[] = [];
  constructor(readonly inner: RangeStore) {}

  read(at: number, target: Buffer): Promise<void> {
    return this.inner.read(at, target);
  }

  async write(at: number, data: Buffer): Promise<void> {
    if (this.held) await new Promise<void>((resolve) => this.waiting.push(resolve));
    await this.inner.write(at, data);
  }

  zero(at: number, length: number): Promise<void> {
    return this.inner.zero(at, length);
  }

  /** Lets the held writes go (they are queued; the caller waits for them). */
  release(): void {
    this.held = false;
    for (const go of this.waiting.splice(0)) go();
  }

  get holding(): number {
    return this.waiting.length;
  }
}

/** Resolves after a few turns of the event loop: enough for anything not waiting on I/O to finish. */
const turns = async (n = 20) => {
  for (let i = 0; i < n; i++) await new Promise((resolve) => setImmediate(resolve));
};

for (const tier of ['local flash file', 'swap volume over NBD'] as const) {
  test(`free of a segment with a write in flight on the ${tier} waits for it; the range is zeroed and reused only then`, async (t) => {
    const dir = await tempDir(t);
    let store: HeldStore;
    let closeStore: () => Promise<void>;
    if (tier === 'local flash file') {
      const file = await FileStore.create(join(dir, 'flash.bin'), 2 * PAGE);
      store = new HeldStore(file);
      closeStore = () => file.close();
    } else {
      const n = await startNode({ cwd: dir });
      t.after(() => n.stop('SIGKILL'));
      const client = await NbdClient.connect({ uri: `nbd://${n.nbd.host}:${n.nbd.port}/default` });
      store = new HeldStore(new VolumeStore(client));
      closeStore = () => client.close();
    }
    const where = tier === 'local flash file' ? ({ medium: 'flash', device: 'local' } as const) : ({ medium: 'volume' } as const);
    const range = new RangeTier(tier === 'local flash file' ? 'local' : 'swap', tier === 'local flash file' ? 'flash' : 'volume', 2 * PAGE, store);
    const memory = HierarchyMemory.assemble({
      serverId: 'host-free',
      dram: new RangeTier('local', 'dram', 0, new BufferStore(0)),
      ...(tier === 'local flash file' ? { flash: range } : { swap: range }),
      pageCacheBytes: 0,
      closeTiers: closeStore,
    });
    t.after(() => memory.close());

    const old = await memory.alloc(PAGE, where);
    store.held = true;
    const write = old.write(0, Buffer.alloc(PAGE, 0xee));
    await turns();
    assert.equal(store.holding, 1, 'the old owner\'s write is in flight');
    let freed = false;
    const free = old.free().then(() => (freed = true));
    await turns();
    assert.equal(freed, false, 'free waits for the write');
    await assert.rejects(memory.alloc(2 * PAGE, where), { code: 'MS_HOST_NO_CAPACITY' }, 'the old range is not handed out while the write is in flight');
    await assert.rejects(old.read(0, 1), { code: 'MS_HOST_VIOLATION' }, 'no new I/O on a segment being freed');

    store.release();
    await write;
    await free;
    const next = await memory.alloc(2 * PAGE, where);
    assert.ok((await next.read(0, 2 * PAGE)).equals(Buffer.alloc(2 * PAGE)), 'the next owner gets zeros, not the old write');
    await next.write(0, Buffer.alloc(2 * PAGE, 0x11));
    const raw = Buffer.alloc(2 * PAGE);
    await store.inner.read(0, raw);
    assert.ok(raw.equals(Buffer.alloc(2 * PAGE, 0x11)), 'and the device holds only its bytes');
  });
}
