// Push parser for rmem frames: feed it socket chunks, it calls back once per complete
// frame. No I/O; the session layer owns the socket.
//
//   state HEADER: collect 20 header bytes (straight from the chunk when they are all
//                 there, else copied into a small buffer across chunks)
//   state BODY:   a body wholly inside the chunk is passed on as a subarray of it (no
//                 copy); one that spans chunks is assembled once into its own buffer
//
// A wrong magic or a body longer than the limit cannot be skipped safely (the stream
// has lost its framing), so the parser reports it once through `onFatal` and ignores
// all further input. Bodies passed to `onFrame` may be subarrays of a chunk: a consumer
// that keeps one past the request must copy it. A chunk fed as `transient` (a view of a
// read buffer the socket reuses, net/socket-input.ts) is valid only during feed(): a
// body goes into the buffer `bodyTarget` gives for it, if any, else a small body is
// copied out on its own and a larger one together with the rest of the chunk (one
// allocation for the frames that follow, as Node's own read would be), and what waits
// of it is copied. bodyRest() lets the socket read the rest of a body that spans reads
// straight into the body's buffer, which then needs no copy.
//
// Admission (server side): a body that spans chunks is the only memory the parser
// allocates, and a header alone can ask for MAX_BODY. With `admitBody`, the parser asks
// before it allocates; a refusal holds the parser (the rest of the chunk is kept, later
// chunks are queued behind it) until the owner calls resume(). So a peer makes the node
// hold a body only once the owner has budgeted for it, and `maxBody` may be lowered
// (before a handshake) or raised at any time between frames. With `accepting`, the
// parser stops after a frame the owner could not take at once (it is queued), keeping
// the rest of the chunk as bytes: a chunk of thousands of tiny frames never becomes
// thousands of objects waiting in a queue.

import { MisuseError } from '../../errors.js';
import { HEADER_SIZE, MAX_BODY, REQUEST_MAGIC, RESPONSE_MAGIC } from './spec.js';

/** Bodies up to this size inside a transient chunk are copied one by one (from Node's slab); larger ones with the rest of the chunk. */
const SMALL_BODY = 1024;

export interface Frame {
  op: number;
  /** `flags` in a request, `status` in a response. */
  word: number;
  tagHi: number;
  tagLo: number;
  body: Buffer;
}

export interface FrameHandlers {
  onFrame(frame: Frame): void;
  onFatal(error: MisuseError): void;
  /**
   * Optional: a buffer of exactly `length` bytes to assemble a body that spans chunks
   * into, or to copy one out of a transient chunk into (a reader's own buffer, saving an
   * allocation and a copy). Undefined: the parser allocates one.
   */
  bodyTarget?(op: number, word: number, tagHi: number, tagLo: number, length: number): Buffer | undefined;
  /**
   * Optional: asked before a body of `length` bytes that spans chunks is allocated.
   * False holds the parser until resume(); true (or no handler) goes on at once.
   */
  admitBody?(op: number, length: number): boolean;
  /** Optional: asked after each frame; false stops parsing until resume(). */
  accepting?(): boolean;
}

export class FrameParser {
  /** Longest body accepted; a longer one loses the framing. May change between frames. */
  maxBody: number;
  private readonly magic: number;
  private readonly handlers: FrameHandlers;
  private readonly header: Buffer;
  private headerHave: number;
  private body: Buffer | undefined;
  private bodyHave: number;
  private op: number;
  private word: number;
  private tagHi: number;
  private tagLo: number;
  private failed: boolean;
  /** Length of a body waiting for admission, or -1. */
  private held: number;
  /** Stopped between frames because the owner was not accepting. */
  private stopped: boolean;
  /** Input that arrived while held or stopped, in order. */
  private backlog: Buffer[];

  /** `direction` picks the rmem magic; another protocol with the same header passes its own magic. */
  constructor(direction: 'request' | 'response' | { magic: number }, handlers: FrameHandlers, maxBody = MAX_BODY) {
    this.magic = typeof direction === 'object' ? direction.magic : direction === 'request' ? REQUEST_MAGIC : RESPONSE_MAGIC;
    this.maxBody = maxBody;
    this.handlers = handlers;
    this.header = Buffer.alloc(HEADER_SIZE);
    this.headerHave = 0;
    this.body = undefined;
    this.bodyHave = 0;
    this.op = 0;
    this.word = 0;
    this.tagHi = 0;
    this.tagLo = 0;
    this.failed = false;
    this.held = -1;
    this.stopped = false;
    this.backlog = [];
  }

  /** True while a body waits for admission (see admitBody). */
  get holding(): boolean {
    return this.held >= 0;
  }

  /** True while parsing is stopped between frames (see accepting). */
  get waiting(): boolean {
    return this.stopped;
  }

  /**
   * True while a frame has begun and is not whole: part of its header, or its header and
   * part of its body, has arrived (not while a body waits for admission, nor between frames).
   */
  get midFrame(): boolean {
    return this.headerHave > 0 || this.body !== undefined;
  }

  /** Bytes kept unparsed while held or stopped. */
  get backlogBytes(): number {
    let n = 0;
    for (const chunk of this.backlog) n += chunk.length;
    return n;
  }

  /** True once the stream lost its framing; nothing more will be parsed. */
  get broken(): boolean {
    return this.failed;
  }

  /**
   * Stops assembling into `target` if a body is being assembled there (its reader gave
   * up, for instance on a timeout): the bytes so far move to a buffer of the parser's
   * own and the rest of the body lands there, so `target` is the caller's again.
   */
  detach(target: Buffer): void {
    if (this.body !== target) return;
    const own = Buffer.allocUnsafe(target.length);
    target.copy(own, 0, 0, this.bodyHave);
    this.body = own;
  }

  /**
   * Goes on after a hold: the body that waited for admission may now be allocated, or
   * the owner accepts frames again. Input kept meanwhile is parsed in order.
   */
  resume(): void {
    if (this.failed) return;
    if (this.held >= 0) {
      this.startBody(this.held);
      this.held = -1;
    } else if (this.stopped) {
      this.stopped = false;
    } else {
      return;
    }
    const backlog = this.backlog;
    this.backlog = [];
    for (const [i, chunk] of backlog.entries()) {
      this.feed(chunk);
      // Held or stopped again: what is left waits in order.
      if (this.held >= 0 || this.stopped) {
        this.backlog.push(...backlog.slice(i + 1));
        return;
      }
    }
  }

  /**
   * Where the next bytes of the stream go, while they are the rest of a body being
   * assembled and nothing waits to be parsed: the rest of that body's buffer. A socket
   * may read into it and feed a view of it; bytes fed where they already belong are not
   * copied again. Undefined otherwise.
   */
  bodyRest(): Buffer | undefined {
    if (this.body === undefined || this.failed || this.stopped || this.held >= 0 || this.backlog.length > 0) return undefined;
    return this.body.subarray(this.bodyHave);
  }

  /** `transient`: the chunk's bytes are overwritten once this returns (nothing of it is kept uncopied). */
  feed(chunk: Buffer, transient = false): void {
    if (this.held >= 0 || this.stopped) {
      if (!this.failed && chunk.length > 0) this.backlog.push(transient ? Buffer.from(chunk) : chunk);
      return;
    }
    let at = 0;
    while (at < chunk.length && !this.failed) {
      let body = this.body;
      if (body === undefined) {
        let length: number;
        if (this.headerHave === 0 && chunk.length - at >= HEADER_SIZE) {
          length = this.readHeader(chunk, at);
          at += HEADER_SIZE;
        } else {
          const n = Math.min(HEADER_SIZE - this.headerHave, chunk.length - at);
          chunk.copy(this.header, this.headerHave, at, at + n);
          this.headerHave += n;
          at += n;
          if (this.headerHave < HEADER_SIZE) return;
          this.headerHave = 0;
          length = this.readHeader(this.header, 0);
        }
        if (length < 0) return;
        if (chunk.length - at >= length) {
          if (transient) {
            // The body is copied anyway: straight into the reader's buffer when it has one.
            const target = length > 0 ? this.handlers.bodyTarget?.(this.op, this.word, this.tagHi, this.tagLo, length) : undefined;
            if (target !== undefined && target.length === length) {
              chunk.copy(target, 0, at, at + length);
              this.emit(target);
              at += length;
              if (this.stopAfterFrame(chunk, at, transient)) return;
              continue;
            }
            if (length <= SMALL_BODY) {
              this.emit(Buffer.from(chunk.subarray(at, at + length)));
              at += length;
              if (this.stopAfterFrame(chunk, at, transient)) return;
              continue;
            }
            // One copy of the rest of the chunk for this body and those after it, as
            // Node's own read buffer would be: parsed from here on as a chunk of its own.
            chunk = Buffer.from(chunk.subarray(at));
            at = 0;
            transient = false;
          }
          this.emit(chunk.subarray(at, at + length));
          at += length;
          if (this.stopAfterFrame(chunk, at, transient)) return;
          continue;
        }
        if (this.handlers.admitBody?.(this.op, length) === false) {
          this.held = length;
          if (at < chunk.length) this.backlog.push(transient ? Buffer.from(chunk.subarray(at)) : chunk.subarray(at));
          return;
        }
        body = this.startBody(length);
      }
      const n = Math.min(body.length - this.bodyHave, chunk.length - at);
      // A chunk read into bodyRest() is already where it belongs.
      if (chunk.buffer !== body.buffer || chunk.byteOffset + at !== body.byteOffset + this.bodyHave) chunk.copy(body, this.bodyHave, at, at + n);
      this.bodyHave += n;
      at += n;
      if (this.bodyHave === body.length) {
        this.body = undefined;
        this.emit(body);
        if (this.stopAfterFrame(chunk, at, transient)) return;
      }
    }
  }

  /** After a frame: stops, keeping the rest of the chunk, if the owner takes no more now. */
  private stopAfterFrame(chunk: Buffer, at: number, transient: boolean): boolean {
    if (this.failed || this.handlers.accepting?.() !== false) return false;
    this.stopped = true;
    if (at < chunk.length) this.backlog.push(transient ? Buffer.from(chunk.subarray(at)) : chunk.subarray(at));
    return true;
  }

  private startBody(length: number): Buffer {
    const target = this.handlers.bodyTarget?.(this.op, this.word, this.tagHi, this.tagLo, length);
    const body = target !== undefined && target.length === length ? target : Buffer.allocUnsafe(length);
    this.body = body;
    this.bodyHave = 0;
    return body;
  }

  /** Reads a header; returns the body length, or -1 after reporting a fatal error. */
  private readHeader(buf: Buffer, at: number): number {
    const magic = buf.readUInt32BE(at);
    if (magic !== this.magic) {
      return this.fail(`bad frame magic 0x${magic.toString(16).padStart(8, '0')}, expected 0x${this.magic.toString(16)}`);
    }
    const length = buf.readUInt32BE(at + 16);
    if (length > this.maxBody) return this.fail(`frame body of ${length} bytes exceeds the limit of ${this.maxBody}`);
    this.op = buf.readUInt16BE(at + 4);
    this.word = buf.readUInt16BE(at + 6);
    this.tagHi = buf.readUInt32BE(at + 8);
    this.tagLo = buf.readUInt32BE(at + 12);
    return length;
  }

  private emit(body: Buffer): void {
    this.handlers.onFrame({ op: this.op, word: this.word, tagHi: this.tagHi, tagLo: this.tagLo, body });
  }

  private fail(message: string): number {
    this.failed = true;
    this.handlers.onFatal(new MisuseError('MS_RMEM_PROTOCOL', message));
    return -1;
  }
}
