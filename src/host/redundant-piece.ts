// A piece of a `redundancy: 2` segment: the same bytes on two nodes (issue 14, item 5).
//
//   write   to every live copy and to a copy being rebuilt; done once each has answered.
//           A copy whose node was lost on the way is dropped, and the write stands on
//           the others (at least one live copy must hold it); a copy being rebuilt that
//           fails is dropped too, and the rebuild starts over elsewhere
//   read    from the first live copy whose node is answering, else from any other live one
//   loss    a copy whose node is lost is dropped; the owner starts a rebuild: a new copy
//           bound on a third node (another zone when there is one), filled chunk by chunk
//           from a live copy while reads and writes go on
//   gone    only when no live copy is left: failure() reports it, and the segment is lost
//
// Invariants:
//   - a write acknowledged while the piece had two live copies is on both;
//   - a rebuild never writes stale bytes over newer ones: copying a chunk and writing to
//     it exclude each other (ChunkLocks), and every write reaches the new copy too, so a
//     chunk holds the live copy's bytes from the moment it is copied on;
//   - a copy is read only once complete.

import { isMemstrataError, type MemstrataError } from '../errors.js';
import { settleAll } from '../settle.js';
import type { ByteRange } from '../memory/free-ranges.js';
import type { Piece, TierMedium } from './tiers.js';

/** Bytes copied at a time by a rebuild: writes to those bytes wait for it. */
export const REBUILD_CHUNK = 256 * 1024;
/** A rebuild that could not start or finish (no node with room, the new copy lost) is tried again after this. */
export const REBUILD_RETRY_MS = 1000;

/** A copy's state, for the mapping table. */
export type CopyState = 'ok' | 'lost' | 'rebuilding';

export interface CopyInfo {
  device: string;
  medium: TierMedium;
  physical: readonly ByteRange[];
  state: CopyState;
  /** Bytes copied so far, while rebuilding. */
  copied: number;
}

/** What a redundant piece needs from its owner: a new copy for a lost one, and whether a copy's node answers now. */
export interface RedundancyHost {
  /** Binds `length` bytes of `medium` on a node that holds none of `avoid`'s devices; undefined when none can. */
  replacement(length: number, medium: TierMedium, avoid: readonly string[]): Promise<Piece | undefined>;
  /** The piece's node answers now (not suspect): reads go there first. */
  answering(piece: Piece): boolean;
  /** A rebuild ended (done, or gave up for now with the reason). */
  rebuilt(piece: RedundantPiece, outcome: { ok: boolean; reason: string }): void;
}

/** Per-chunk mutual exclusion, in arrival order per chunk; callers lock chunks in ascending order. */
class ChunkLocks {
  private readonly tails = new Map<number, Promise<void>>();

  async lock(chunks: readonly number[]): Promise<() => void> {
    const releases: (() => void)[] = [];
    for (const chunk of chunks) {
      const previous = this.tails.get(chunk) ?? Promise.resolve();
      let release: () => void = () => undefined;
      const mine = new Promise<void>((resolve) => (release = resolve));
      const tail = previous.then(() => mine);
      this.tails.set(chunk, tail);
      await previous;
      releases.push(() => {
        release();
        if (this.tails.get(chunk) === tail) this.tails.delete(chunk);
      });
    }
    return () => {
      for (const r of releases) r();
    };
  }
}

interface Copy {
  piece: Piece;
  state: CopyState;
  /** While rebuilding: chunks already copied (writes to them go to this copy too). */
  copiedChunks: Set<number> | undefined;
}

export class RedundantPiece implements Piece {
  readonly medium: TierMedium;
  readonly length: number;
  private readonly host: RedundancyHost;
  private readonly copies: Copy[];
  private readonly locks: ChunkLocks;
  private rebuilding: Promise<void> | undefined;
  private released: boolean;
  /** The failure of the last live copy, once none is left. */
  private gone: MemstrataError | undefined;

  constructor(pieces: readonly Piece[], host: RedundancyHost) {
    const first = pieces[0];
    if (first === undefined || pieces.some((p) => p.length !== first.length || p.medium !== first.medium)) throw new Error('copies of a redundant piece must have one length and medium');
    this.medium = first.medium;
    this.length = first.length;
    this.host = host;
    this.copies = pieces.map((piece) => ({ piece, state: 'ok', copiedChunks: undefined }));
    this.locks = new ChunkLocks();
    this.rebuilding = undefined;
    this.released = false;
    this.gone = undefined;
  }

  /** The first live copy's device (the mapping table lists every copy, see copyInfo()). */
  get device(): string {
    return this.live()[0]?.piece.device ?? this.copies[0]?.piece.device ?? '?';
  }

  get physical(): readonly ByteRange[] {
    return this.live()[0]?.piece.physical ?? [];
  }

  /** Every copy with its state, for the mapping table. */
  copyInfo(): CopyInfo[] {
    return this.copies.map((c) => ({
      device: c.piece.device,
      medium: c.piece.medium,
      physical: c.piece.physical,
      state: c.state,
      copied: c.copiedChunks === undefined ? (c.state === 'ok' ? this.length : 0) : Math.min(this.length, c.copiedChunks.size * REBUILD_CHUNK),
    }));
  }

  failure(): MemstrataError | undefined {
    this.notice();
    return this.live().length === 0 ? (this.gone ?? this.copies[0]?.piece.failure()) : undefined;
  }

  async read(offset: number, target: Buffer): Promise<void> {
    for (;;) {
      this.notice();
      const live = this.live();
      if (live.length === 0) throw this.failure() ?? new Error('no copy is left');
      // A copy whose node answers first; the others only if it fails with its node lost.
      const ordered = [...live.filter((c) => this.host.answering(c.piece)), ...live.filter((c) => !this.host.answering(c.piece))];
      for (const copy of ordered) {
        try {
          await copy.piece.read(offset, target);
          return;
        } catch (error) {
          if (!this.dropIfLost(copy, error)) throw error;
        }
      }
    }
  }

  async write(offset: number, data: Buffer): Promise<void> {
    const unlock = await this.locks.lock(chunksOf(offset, data.length));
    try {
      this.notice();
      // Live copies, and the one being rebuilt: a chunk not copied yet is copied after this write, from a live copy that holds it.
      const targets = this.copies.filter((c) => c.state !== 'lost');
      const results = await Promise.allSettled(targets.map((c) => c.piece.write(offset, data)));
      let failure: Error | undefined;
      for (const [i, result] of results.entries()) {
        const copy = targets[i];
        if (result.status === 'fulfilled' || copy === undefined) continue;
        if (copy.state === 'rebuilding') this.drop(copy, isMemstrataError(result.reason) ? result.reason : undefined);
        else if (!this.dropIfLost(copy, result.reason)) failure ??= result.reason instanceof Error ? result.reason : new Error(String(result.reason));
      }
      if (failure !== undefined) throw failure;
      if (this.live().length === 0) throw this.failure() ?? new Error('no copy holds the write');
    } finally {
      unlock();
    }
  }

  async release(): Promise<void> {
    this.released = true;
    await this.rebuilding?.catch(() => undefined);
    await settleAll(this.copies.map((c) => c.piece.release()));
  }

  /** Looks for copies whose node was lost, drops them, and starts a rebuild when one is missing. */
  notice(): void {
    if (this.released) return;
    for (const copy of this.copies) {
      if (copy.state !== 'lost' && copy.piece.failure() !== undefined) this.drop(copy, copy.piece.failure());
    }
  }

  /** Waits for a rebuild under way (tests, close). */
  settled(): Promise<void> {
    return this.rebuilding ?? Promise.resolve();
  }

  private live(): Copy[] {
    return this.copies.filter((c) => c.state === 'ok');
  }

  /** A copy failed with its node lost: drop it (true); any other error is the caller's (false). */
  private dropIfLost(copy: Copy, error: unknown): boolean {
    if (!(isMemstrataError(error) && error.code === 'MS_HOST_NODE_LOST') && copy.piece.failure() === undefined) return false;
    this.drop(copy, isMemstrataError(error) ? error : copy.piece.failure());
    return true;
  }

  private drop(copy: Copy, why: MemstrataError | undefined): void {
    if (copy.state === 'lost') return;
    const wasLive = copy.state === 'ok';
    copy.state = 'lost';
    copy.copiedChunks = undefined;
    if (wasLive && this.live().length === 0) this.gone = why;
    // Its region goes when the node is back (the node reclaims it; see remote-node.ts).
    void copy.piece.release().catch(() => undefined);
    this.rebuild();
  }

  /** Starts a rebuild when fewer than two copies are live and none is being rebuilt. */
  private rebuild(): void {
    if (this.released || this.rebuilding !== undefined || this.live().length === 0 || this.live().length >= 2) return;
    this.rebuilding = this.runRebuild().finally(() => {
      this.rebuilding = undefined;
      // Still one copy short (no node had room, or the new copy was lost): try again later.
      if (!this.released && this.live().length === 1) setTimeout(() => { this.rebuild(); }, REBUILD_RETRY_MS).unref();
    });
  }

  private async runRebuild(): Promise<void> {
    const avoid = this.copies.filter((c) => c.state !== 'lost').map((c) => c.piece.device);
    let fresh: Piece | undefined;
    try {
      fresh = await this.host.replacement(this.length, this.medium, avoid);
    } catch (error) {
      this.host.rebuilt(this, { ok: false, reason: `no new copy: ${error instanceof Error ? error.message : String(error)}` });
      return;
    }
    if (fresh === undefined) {
      this.host.rebuilt(this, { ok: false, reason: 'no other node can hold a copy now' });
      return;
    }
    if (this.released) {
      await fresh.release().catch(() => undefined);
      return;
    }
    const copy: Copy = { piece: fresh, state: 'rebuilding', copiedChunks: new Set() };
    // Lost copies leave the list: the piece keeps its live copies and the one being made.
    for (let i = this.copies.length - 1; i >= 0; i--) if (this.copies[i]?.state === 'lost') this.copies.splice(i, 1);
    this.copies.push(copy);
    const buffer = Buffer.allocUnsafe(Math.min(REBUILD_CHUNK, this.length));
    const chunks = Math.ceil(this.length / REBUILD_CHUNK);
    try {
      for (let k = 0; k < chunks; k++) {
        if (this.released) throw new Error('the segment was freed');
        if (copy.state !== 'rebuilding') throw new Error(`the new copy on ${fresh.device} failed`);
        const unlock = await this.locks.lock([k]);
        try {
          const at = k * REBUILD_CHUNK;
          const view = buffer.subarray(0, Math.min(REBUILD_CHUNK, this.length - at));
          await this.read(at, view);
          await fresh.write(at, view);
          copy.copiedChunks?.add(k);
        } finally {
          unlock();
        }
      }
      if (copy.state !== 'rebuilding') throw new Error(`the new copy on ${fresh.device} failed`);
      copy.state = 'ok';
      copy.copiedChunks = undefined;
      this.host.rebuilt(this, { ok: true, reason: `new copy on ${fresh.device}` });
    } catch (error) {
      const index = this.copies.indexOf(copy);
      if (index >= 0) this.copies.splice(index, 1);
      if (copy.state !== 'lost') await fresh.release().catch(() => undefined);
      this.host.rebuilt(this, { ok: false, reason: error instanceof Error ? error.message : String(error) });
    }
  }
}

/** The rebuild chunks a byte range touches, ascending. */
function chunksOf(offset: number, length: number): number[] {
  if (length === 0) return [];
  const first = Math.floor(offset / REBUILD_CHUNK);
  const last = Math.floor((offset + length - 1) / REBUILD_CHUNK);
  return Array.from({ length: last - first + 1 }, (_, i) => first + i);
}
