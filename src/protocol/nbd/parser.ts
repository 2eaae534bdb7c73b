// Push parser for the client side of an NBD connection, as the server reads it:
//
//   flags        4 bytes of client flags, once
//   option       16-byte option header (IHAVEOPT, option, length) + payload; the parser
//                then waits until the session calls resume() or startTransmission(),
//                because what follows depends on the answer (GO switches the protocol)
//   transmission 28-byte request header (+ payload for WRITE)
//
// Bytes that arrive while the parser waits are kept and parsed on resume. A request
// payload wholly inside one chunk is passed on as a subarray of it; one that spans
// chunks is assembled once into its own buffer. A wrong magic or an oversized payload
// cannot be skipped safely and is reported once through onFatal; later input is ignored.

import { MisuseError } from '../../errors.js';
import { readU64, type Cookie } from './codec.js';
import { BLOCK, CMD, IHAVEOPT, MAX_OPTION_LENGTH, OPTION_HEADER_SIZE, REQUEST_MAGIC, REQUEST_SIZE } from './spec.js';

export interface NbdRequest {
  flags: number;
  type: number;
  cookie: Cookie;
  offset: number;
  length: number;
  /** WRITE payload; empty for other commands. */
  data: Buffer;
  /** The buffer `data` was assembled in when it came from `allocate`; give it back when done. */
  pooled: Buffer | undefined;
}

export interface NbdParserHandlers {
  onClientFlags(flags: number): void;
  onOption(option: number, data: Buffer): void;
  onRequest(request: NbdRequest): void;
  onFatal(error: MisuseError): void;
  /** Optional: a buffer of at least `length` bytes for a WRITE payload that spans chunks. */
  allocate?(length: number): Buffer;
}

type Mode = 'flags' | 'option' | 'waiting' | 'transmission' | 'failed';

const EMPTY = Buffer.alloc(0);

export class NbdServerParser {
  private readonly handlers: NbdParserHandlers;
  private mode: Mode;
  private pending: Buffer;
  private header: Buffer;
  private headerHave: number;
  private headerSize: number;
  private body: Buffer | undefined;
  private bodyHave: number;
  private request: NbdRequest | undefined;
  private option: number;

  constructor(handlers: NbdParserHandlers) {
    this.handlers = handlers;
    this.mode = 'flags';
    this.pending = EMPTY;
    this.header = Buffer.alloc(REQUEST_SIZE);
    this.headerHave = 0;
    this.headerSize = 4;
    this.body = undefined;
    this.bodyHave = 0;
    this.request = undefined;
    this.option = 0;
  }

  get inTransmission(): boolean {
    return this.mode === 'transmission';
  }

  feed(chunk: Buffer): void {
    if (this.mode === 'failed') return;
    if (this.mode === 'waiting') {
      this.pending = this.pending.length === 0 ? chunk : Buffer.concat([this.pending, chunk]);
      return;
    }
    this.parse(chunk);
  }

  /** After an option was answered: parse the next option. */
  resume(): void {
    if (this.mode !== 'waiting') return;
    this.mode = 'option';
    this.headerSize = OPTION_HEADER_SIZE;
    this.drainPending();
  }

  /** After NBD_OPT_GO or EXPORT_NAME succeeded: what follows are requests. */
  startTransmission(): void {
    if (this.mode !== 'waiting') return;
    this.mode = 'transmission';
    this.headerSize = REQUEST_SIZE;
    this.drainPending();
  }

  private drainPending(): void {
    const pending = this.pending;
    this.pending = EMPTY;
    if (pending.length > 0) this.parse(pending);
  }

  private parse(chunk: Buffer): void {
    let at = 0;
    while (at < chunk.length) {
      if (this.mode === 'waiting') {
        this.pending = chunk.subarray(at);
        return;
      }
      if (this.mode === 'failed') return;
      if (this.body === undefined) {
        // Collect a header, straight from the chunk when it is all there.
        let head: Buffer;
        let headAt: number;
        if (this.headerHave === 0 && chunk.length - at >= this.headerSize) {
          head = chunk;
          headAt = at;
          at += this.headerSize;
        } else {
          const n = Math.min(this.headerSize - this.headerHave, chunk.length - at);
          chunk.copy(this.header, this.headerHave, at, at + n);
          this.headerHave += n;
          at += n;
          if (this.headerHave < this.headerSize) return;
          this.headerHave = 0;
          head = this.header;
          headAt = 0;
        }
        const length = this.onHeader(head, headAt);
        if (length === null) continue;
        if (length < 0) return;
        if (length === 0) {
          this.complete(EMPTY);
          continue;
        }
        if (chunk.length - at >= length) {
          this.complete(chunk.subarray(at, at + length));
          at += length;
          continue;
        }
        if (this.mode === 'transmission' && this.request !== undefined && this.handlers.allocate !== undefined) {
          const pooled = this.handlers.allocate(length);
          this.request.pooled = pooled;
          this.body = pooled.subarray(0, length);
        } else {
          this.body = Buffer.allocUnsafe(length);
        }
        this.bodyHave = 0;
      }
      const body = this.body;
      const n = Math.min(body.length - this.bodyHave, chunk.length - at);
      chunk.copy(body, this.bodyHave, at, at + n);
      this.bodyHave += n;
      at += n;
      if (this.bodyHave === body.length) {
        this.body = undefined;
        this.complete(body);
      }
    }
  }

  /**
   * Reads a header; returns the payload length to collect, -1 after a fatal error, or
   * null when the header was the whole message (the client flags).
   */
  private onHeader(buf: Buffer, at: number): number | null {
    if (this.mode === 'flags') {
      this.mode = 'option';
      this.headerSize = OPTION_HEADER_SIZE;
      this.handlers.onClientFlags(buf.readUInt32BE(at));
      return null;
    }
    if (this.mode === 'option') {
      if (buf.readBigUInt64BE(at) !== IHAVEOPT) return this.fail('option does not start with IHAVEOPT');
      this.option = buf.readUInt32BE(at + 8);
      const length = buf.readUInt32BE(at + 12);
      if (length > MAX_OPTION_LENGTH) return this.fail(`option payload of ${length} bytes is larger than ${MAX_OPTION_LENGTH}`);
      return length;
    }
    if (buf.readUInt32BE(at) !== REQUEST_MAGIC) return this.fail(`bad request magic 0x${buf.readUInt32BE(at).toString(16)}`);
    const request: NbdRequest = {
      flags: buf.readUInt16BE(at + 4),
      type: buf.readUInt16BE(at + 6),
      cookie: { hi: buf.readUInt32BE(at + 8), lo: buf.readUInt32BE(at + 12) },
      offset: readU64(buf, at + 16),
      length: buf.readUInt32BE(at + 24),
      data: EMPTY,
      pooled: undefined,
    };
    this.request = request;
    if (request.type !== CMD.WRITE) return 0;
    // A WRITE's payload must be read to stay in step; one larger than any block we accept
    // is treated as a broken stream rather than buffered.
    if (request.length > BLOCK.MAX) return this.fail(`WRITE of ${request.length} bytes is larger than the maximum block size ${BLOCK.MAX}`);
    return request.length;
  }

  private complete(payload: Buffer): void {
    if (this.mode === 'option') {
      this.mode = 'waiting';
      this.handlers.onOption(this.option, payload);
      return;
    }
    const request = this.request;
    if (request === undefined) return;
    this.request = undefined;
    request.data = payload;
    this.handlers.onRequest(request);
  }

  private fail(message: string): number {
    this.mode = 'failed';
    this.handlers.onFatal(new MisuseError('MS_NBD_PROTOCOL', message));
    return -1;
  }
}
