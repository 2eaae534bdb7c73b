// DRAM medium: process memory, one Buffer per extent, allocated on first write.
//
//   extents: [ Buffer | undefined ] x (capacity / extentSize)
//
// An extent never written reads as zeros and holds no memory, so a node configured with
// 1 GiB of DRAM holds only what has been used, and never more than `capacity`.
// `zero` over whole extents drops their buffers, which is how memory goes back to the
// process when extents return to `free` or a server's region is released.

import { RuntimeError } from '../errors.js';
import type { MediumName } from '../kinds.js';
import { checkRange, type Medium, type MediumCapabilities } from './medium.js';

export class DramMedium implements Medium {
  readonly name: MediumName = 'dram';
  readonly capacity: number;
  readonly extentSize: number;
  readonly capabilities: MediumCapabilities = { persistent: false, lazy: true };
  private extents: (Buffer | undefined)[];
  private held: number;
  private isOpen: boolean;

  constructor(options: { capacity: number; extentSize: number }) {
    this.capacity = options.capacity;
    this.extentSize = options.extentSize;
    this.extents = [];
    this.held = 0;
    this.isOpen = false;
  }

  async open(): Promise<void> {
    this.extents = new Array<Buffer | undefined>(Math.ceil(this.capacity / this.extentSize)).fill(undefined);
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
    this.walk(offset, target.length, (extent, within, n, done) => {
      if (extent === undefined) target.fill(0, done, done + n);
      else target.set(extent.subarray(within, within + n), done);
    });
  }

  async write(offset: number, source: Uint8Array): Promise<void> {
    this.check(offset, source.length);
    this.walk(offset, source.length, (extent, within, n, done, index) => {
      if (extent === undefined) {
        // Buffer.alloc is calloc underneath: untouched pages stay unmapped until written.
        extent = Buffer.alloc(this.extentSize);
        this.extents[index] = extent;
        this.held += this.extentSize;
      }
      extent.set(source.subarray(done, done + n), within);
    });
    return Promise.resolve();
  }

  async zero(offset: number, length: number): Promise<void> {
    this.check(offset, length);
    this.walk(offset, length, (extent, within, n, _done, index) => {
      if (extent === undefined) return;
      if (n === this.extentSize) {
        this.extents[index] = undefined;
        this.held -= this.extentSize;
      } else {
        extent.fill(0, within, within + n);
      }
    });
    return Promise.resolve();
  }

  async sync(): Promise<void> {
    this.check(0, 0);
    return Promise.resolve();
  }

  async close(): Promise<void> {
    this.extents = [];
    this.held = 0;
    this.isOpen = false;
    return Promise.resolve();
  }

  async resident(): Promise<number> {
    return Promise.resolve(this.held);
  }

  /** Visits the piece of each extent that [offset, offset + length) covers, in order. */
  private walk(
    offset: number,
    length: number,
    visit: (extent: Buffer | undefined, within: number, n: number, done: number, index: number) => void,
  ): void {
    let done = 0;
    while (done < length) {
      const at = offset + done;
      const index = Math.floor(at / this.extentSize);
      const within = at - index * this.extentSize;
      const n = Math.min(this.extentSize - within, length - done);
      visit(this.extents[index], within, n, done, index);
      done += n;
    }
  }

  private check(offset: number, length: number): void {
    if (!this.isOpen) throw new RuntimeError('MS_MEDIUM_CLOSED', 'dram: medium is not open');
    checkRange(this, offset, length);
  }
}
