// The redundant piece of a `redundancy: 2` segment (issue 14, item 5) under interleavings
// that fast-check's scheduler chooses: writes in flight while a copy's node is lost and
// a new copy is rebuilt chunk by chunk. Every acknowledged write must end up on every
// live copy, the rebuilt one included, and reads never return bytes older than the last
// write acknowledged before they began.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { NetworkError } from '../../../src/errors.js';
import { REBUILD_CHUNK, RedundantPiece, type RedundancyHost } from '../../../src/host/redundant-piece.js';
import type { Piece } from '../../../src/host/tiers.js';

const LENGTH = 4 * REBUILD_CHUNK;

/** A copy in memory whose every read and write is a step the scheduler orders; it can be lost. */
class FakeCopy implements Piece {
  readonly medium = 'dram' as const;
  readonly length = LENGTH;
  readonly physical = [{ start: 0, length: LENGTH }];
  readonly bytes = Buffer.alloc(LENGTH);
  lost = false;
  released = false;
  /** Without a scheduler, every step runs at once. */
  constructor(
    readonly device: string,
    private readonly s?: fc.Scheduler,
  ) {}
  private step(what: string): Promise<unknown> {
    return this.s === undefined ? Promise.resolve() : this.s.schedule(Promise.resolve(), what);
  }
  failure(): NetworkError | undefined {
    return this.lost ? this.lostError() : undefined;
  }
  private lostError(): NetworkError {
    return new NetworkError('MS_HOST_NODE_LOST', `node ${this.device} is lost`, { details: { node: this.device } });
  }
  async read(offset: number, target: Buffer): Promise<void> {
    await this.step(`read ${this.device}@${offset}`);
    if (this.lost) throw this.lostError();
    this.bytes.copy(target, 0, offset, offset + target.length);
  }
  async write(offset: number, data: Buffer): Promise<void> {
    await this.step(`write ${this.device}@${offset}`);
    if (this.lost) throw this.lostError();
    data.copy(this.bytes, offset);
  }
  release(): Promise<void> {
    this.released = true;
    return Promise.resolve();
  }
}

const op = fc.oneof(
  fc.record({ kind: fc.constant('write' as const), offset: fc.integer({ min: 0, max: LENGTH / 4096 - 1 }).map((p) => p * 4096), pages: fc.integer({ min: 1, max: 80 }), value: fc.integer({ min: 1, max: 255 }) }),
  fc.record({ kind: fc.constant('read' as const), offset: fc.integer({ min: 0, max: LENGTH / 4096 - 1 }).map((p) => p * 4096), pages: fc.integer({ min: 1, max: 80 }) }),
  fc.record({ kind: fc.constant('lose' as const), which: fc.integer({ min: 0, max: 2 }) }),
);

test('writes in flight while a copy is lost and rebuilt reach every live copy; reads see every write acknowledged before them (fc.scheduler)', async () => {
  await fc.assert(
    fc.asyncProperty(fc.scheduler(), fc.array(op, { minLength: 3, maxLength: 14 }), async (s, program) => {
      const copies = [new FakeCopy('a', s), new FakeCopy('b', s)];
      const spares = [new FakeCopy('c', s), new FakeCopy('d', s)];
      const outcomes: string[] = [];
      const host: RedundancyHost = {
        replacement: (_length, _medium, avoid) => {
          const spare = spares.shift();
          assert.ok(spare === undefined || !avoid.includes(spare.device));
          if (spare !== undefined) copies.push(spare);
          return Promise.resolve(spare);
        },
        answering: (piece) => piece.failure() === undefined,
        rebuilt: (_piece, outcome) => outcomes.push(`${outcome.ok}: ${outcome.reason}`),
      };
      const piece = new RedundantPiece([copies[0]!, copies[1]!], host);
      // What is certainly on the piece: bytes of writes acknowledged, per byte the newest.
      const model = Buffer.alloc(LENGTH);
      // Bytes some write in flight may change: a read over them may see either value.
      const inFlight = new Uint16Array(LENGTH);
      const work: Promise<void>[] = [];
      for (const c of program) {
        if (c.kind === 'lose') {
          work.push(
            s.schedule(Promise.resolve(), `lose copy ${c.which}`).then(() => {
              // One loss at a time: only while two copies are live (a rebuild done, or none needed).
              const live = piece.copyInfo().filter((x) => x.state === 'ok').map((x) => x.device);
              if (live.length < 2) return;
              const victim = copies.find((x) => x.device === live[c.which % live.length]);
              if (victim === undefined) return;
              victim.lost = true;
              piece.notice();
            }),
          );
          continue;
        }
        const length = Math.min(c.pages * 4096, LENGTH - c.offset);
        if (c.kind === 'write') {
          const data = Buffer.alloc(length, c.value);
          work.push(
            s.schedule(Promise.resolve(), `write ${c.offset}+${length}`).then(async () => {
              for (let i = c.offset; i < c.offset + length; i++) inFlight[i] = (inFlight[i] ?? 0) + 1;
              try {
                await piece.write(c.offset, data);
                data.copy(model, c.offset);
              } finally {
                for (let i = c.offset; i < c.offset + length; i++) inFlight[i] = (inFlight[i] ?? 0) - 1;
              }
            }),
          );
        } else {
          work.push(
            s.schedule(Promise.resolve(), `read ${c.offset}+${length}`).then(async () => {
              const before = Buffer.from(model.subarray(c.offset, c.offset + length));
              const busy = Uint16Array.from(inFlight.subarray(c.offset, c.offset + length));
              const target = Buffer.alloc(length);
              await piece.read(c.offset, target);
              for (let i = 0; i < length; i++) {
                // Untouched by any write in flight at its start or since: it must be what was acknowledged.
                if (busy[i] === 0 && inFlight[c.offset + i] === 0 && target[i] !== before[i] && model[c.offset + i] === before[i]) {
                  assert.fail(`read at ${c.offset + i} saw ${target[i]}, expected ${before[i]}`);
                }
              }
            }),
          );
        }
      }
      await s.waitFor(Promise.allSettled(work));
      await s.waitFor(piece.settled());
      const results = await Promise.allSettled(work);
      for (const r of results) if (r.status === 'rejected') throw r.reason;
      // Quiet now: every live copy (the rebuilt one included) holds exactly what was acknowledged.
      const live = piece.copyInfo().filter((c) => c.state === 'ok');
      assert.equal(live.length, 2, `two live copies after the rebuild (${outcomes.join('; ')})`);
      for (const info of live) {
        const copy = copies.find((x) => x.device === info.device);
        assert.ok(copy !== undefined && !copy.lost);
        assert.ok(copy.bytes.equals(model), `copy ${info.device} equals the acknowledged writes`);
      }
      for (const copy of copies) if (copy.lost) assert.ok(copy.released, `the lost copy ${copy.device} was released`);
    }),
    { numRuns: 150 },
  );
});

test('with no copy left the piece is lost; with no node for a new copy it stays readable on one and says why', async () => {
  const a = new FakeCopy('a');
  const b = new FakeCopy('b');
  const reasons: string[] = [];
  const piece = new RedundantPiece([a, b], { replacement: () => Promise.resolve(undefined), answering: () => true, rebuilt: (_p, o) => reasons.push(o.reason) });
  await piece.write(0, Buffer.alloc(4096, 9));
  a.lost = true;
  piece.notice();
  await piece.settled();
  assert.deepEqual(reasons, ['no other node can hold a copy now']);
  const target = Buffer.alloc(4096);
  await piece.read(0, target);
  assert.ok(target.equals(Buffer.alloc(4096, 9)));
  assert.equal(piece.failure(), undefined);
  b.lost = true;
  assert.equal(piece.failure()?.code, 'MS_HOST_NODE_LOST');
  await assert.rejects(piece.read(0, target), (e: NetworkError) => e.code === 'MS_HOST_NODE_LOST');
});
