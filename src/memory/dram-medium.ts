// DRAM medium: process memory, one Buffer per chunk of an extent (64 KiB, a cache line),
// allocated on first write.
//
//   chunks: [ Buffer | undefined ] x (capacity / chunkSize)
//
// A chunk never written reads as zeros and holds no memory, so a node configured with
// 1 GiB of DRAM holds only what has been used, and never more than `capacity`.
// `zero` over whole chunks drops their buffers, which is how memory goes back to the
// process when extents return to `free` or a server's region is released. A view (view())
// of a chunk dropped so keeps that chunk's old buffer alive with its old bytes, and only
// that chunk: the extent's next owner writes into new ones. (With one buffer per extent,
// a view of one line kept its whole extent alive: a client that never read a reply sent
// from a cache line could hold sixteen times that line after the cache gave the extent
// away.)

import { RuntimeError } from '../errors.js';
import type { MediumName } from '../kinds.js';
import { checkRange, type Medium, type MediumCapabilities } from './medium.js';

/** The size of a buffer of the medium: a cache line, so that a view never keeps more alive. */
const CHUNK = 64 * 1024;

export class DramMedium implements Medium {
  readonly name: MediumName = 'dram';
  readonly capacity: number;
  readonly extentSize: number;
  readonly capabilities: MediumCapabilities = { persistent: false, lazy: true };
  /** CHUNK, or the extent where CHUNK does not divide it (small extents in tests). */
  private readonly chunkSize: number;
  private chunks: (Buffer | undefined)[];
  private held: number;
  private isOpen: boolean;

  constructor(options: { capacity: number; extentSize: number }) {
    this.capacity = options.capacity;
    this.extentSize = options.extentSize;
    this.chunkSize = options.extentSize % CHUNK === 0 ? CHUNK : options.extentSize;
    this.chunks = [];
    this.held = 0;
    this.isOpen = false;
  }

  async open(): Promise<void> {
    this.chunks = new Array<Buffer | undefined>(Math.ceil(this.capacity / this.chunkSize)).fill(undefined);
    this.held = 0;
    this.isOpen = true;
    return Promise.resolve();
  }

  async read(offset: number, target: Uint8Array): Promise<void> {
    this.readSync(offset, target);
    return Promise.resolve();
  }

  readSync(offset: number, target: Uint8Array): void {
    this.check(offset, target.length);
    this.walk(offset, target.length, (chunk, within, n, done) => {
      if (chunk === undefined) target.fill(0, done, done + n);
      else target.set(chunk.subarray(within, within + n), done);
    });
  }

  /** Within one chunk that has been written (see Medium.view). */
  view(offset: number, length: number): Buffer | undefined {
    this.check(offset, length);
    const index = Math.floor(offset / this.chunkSize);
    const within = offset - index * this.chunkSize;
    if (length === 0 || within + length > this.chunkSize) return undefined;
    return this.chunks[index]?.subarray(within, within + length);
  }

  async write(offset: number, source: Uint8Array): Promise<void> {
    this.writeSync(offset, source);
    return Promise.resolve();
  }

  writeSync(offset: number, source: Uint8Array): void {
    this.check(offset, source.length);
    this.walk(offset, source.length, (chunk, within, n, done, index) => {
      if (chunk === undefined) {
        chunk = Buffer.alloc(this.chunkSize);
        this.chunks[index] = chunk;
        this.held += this.chunkSize;
      }
      chunk.set(source.subarray(done, done + n), within);
    });
  }

  async zero(offset: number, length: number): Promise<void> {
    this.check(offset, length);
    this.walk(offset, length, (chunk, within, n, _done, index) => {
      if (chunk === undefined) return;
      if (n === this.chunkSize) {
        this.chunks[index] = undefined;
        this.held -= this.chunkSize;
      } else {
        chunk.fill(0, within, within + n);
      }
    });
    return Promise.resolve();
  }

  async sync(): Promise<void> {
    this.check(0, 0);
    return Promise.resolve();
  }

  async close(): Promise<void> {
    this.chunks = [];
    this.held = 0;
    this.isOpen = false;
    return Promise.resolve();
  }

  async resident(): Promise<number> {
    return Promise.resolve(this.held);
  }

  /** Visits the piece of each chunk that [offset, offset + length) covers, in order. */
  private walk(
    offset: number,
    length: number,
    visit: (chunk: Buffer | undefined, within: number, n: number, done: number, index: number) => void,
  ): void {
    let done = 0;
    while (done < length) {
      const at = offset + done;
      const index = Math.floor(at / this.chunkSize);
      const within = at - index * this.chunkSize;
      const n = Math.min(this.chunkSize - within, length - done);
      visit(this.chunks[index], within, n, done, index);
      done += n;
    }
  }

  private check(offset: number, length: number): void {
    if (!this.isOpen) throw new RuntimeError('MS_MEDIUM_CLOSED', 'dram: medium is not open');
    checkRange(this, offset, length);
  }
}
