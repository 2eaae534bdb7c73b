// Push parser for the client side of an NBD connection, as the server reads it:
//
//   flags        4 bytes of client flags, once
//   option       16-byte option header (IHAVEOPT, option, length) + payload; the parser
//                then waits until the session calls resume() or startTransmission(),
//                because what follows depends on the answer (GO switches the protocol)
//   transmission 28-byte request header, reported at once through onRequest; a WRITE's
//                payload follows and is reported through onPayload once it is complete
//
// Holding: in transmission the session may call hold() from any callback; the parser
// then stops right after the message just reported (before a WRITE's payload, when that
// was its header) and keeps what follows unparsed, until release(). A session uses this
// to admit a request, and the memory its payload will take, before reading any more.
//
// Skipping: an option longer than MAX_OPTION_LENGTH is reported through onOversizedOption
// at its header and its payload is then read and dropped (the answer, NBD_REP_ERR_TOO_BIG,
// needs none of it); a WRITE the session refuses before its payload (discardPayload())
// has its payload dropped the same way and is reported through onPayload with empty data.
//
// Memory: bytes not parsed yet are kept as given (a subarray of the last chunk, no copy)
// while the parser waits or holds; a chunk fed as `transient` (a view of a read buffer
// the socket reuses, net/socket-input.ts) is valid only during feed(), so what is kept
// of it, and an option payload taken from it, is copied first. A WRITE payload is
// always copied into a buffer of its own from `allocate`, so a request in flight never
// keeps a socket chunk alive; payloadTarget() lets the socket read the rest of a
// payload straight into that buffer, which then needs no copy. An option payload kept
// is within MAX_OPTION_LENGTH; a skipped one takes no memory. A wrong magic or a WRITE
// larger than BLOCK.MAX cannot be skipped safely (the length of a WRITE says how far
// the stream goes, and a client that sends more than the maximum has broken it) and is
// reported once through onFatal; later input is ignored, as it is after stop().

import { MisuseError } from '../../errors.js';
import { readU64, type Cookie } from './codec.js';
import { BLOCK, CMD, IHAVEOPT, MAX_OPTION_LENGTH, OPTION_HEADER_SIZE, REQUEST_MAGIC, REQUEST_SIZE } from './spec.js';

export interface NbdRequest {
  flags: number;
  type: number;
  cookie: Cookie;
  offset: number;
  length: number;
  /** WRITE payload once onPayload has reported it; empty for other commands. */
  data: Buffer;
  /** The buffer `data` lives in, from `allocate`; give it back when done. */
  pooled: Buffer | undefined;
  /** Bytes the session has budgeted for this request; the parser sets 0. */
  cost: number;
  /** When its header was parsed (performance.now()), for the latency figures; the parser sets 0. */
  received: number;
}

export interface NbdParserHandlers {
  onClientFlags(flags: number): void;
  onOption(option: number, data: Buffer): void;
  /**
   * An option whose payload is longer than MAX_OPTION_LENGTH: reported at its header, as
   * onOption would be (the parser waits for resume()); its payload is then dropped.
   */
  onOversizedOption(option: number, length: number): void;
  /** A request header; for a WRITE, its payload is read next unless the session holds. */
  onRequest(request: NbdRequest): void;
  /** A WRITE's payload has arrived whole, in `request.data` (empty when discardPayload() dropped it). */
  onPayload(request: NbdRequest): void;
  onFatal(error: MisuseError): void;
  /** A buffer of at least `length` bytes for a WRITE payload (default: a fresh one). */
  allocate?(length: number): Buffer;
}

type Mode = 'flags' | 'option' | 'waiting' | 'transmission' | 'stopped';
/** Where the input stands: in a header, past a WRITE header (payload not begun), in a payload, in a payload being dropped. */
type Stage = 'header' | 'admit' | 'body' | 'skip';

const EMPTY = Buffer.alloc(0);

export class NbdServerParser {
  private readonly handlers: NbdParserHandlers;
  private mode: Mode;
  private stage: Stage;
  private held: boolean;
  private parsing: boolean;
  /** Input not parsed yet: kept while waiting or holding. */
  private pending: Buffer;
  private readonly header: Buffer;
  private headerHave: number;
  private headerSize: number;
  private body: Buffer | undefined;
  private bodyHave: number;
  /** Bytes of the payload being dropped still to come (stage 'skip'). */
  private skipLeft: number;
  /** The WRITE whose payload comes next or is being read or dropped. */
  private request: NbdRequest | undefined;
  /** The session refused the WRITE just reported: its payload is dropped. */
  private discard: boolean;
  private option: number;
  /** The transient chunk being parsed by feed(), if any: what is kept of it is copied. */
  private transient: Buffer | undefined;

  /** `afterFlags`: the client flags were read on another parser (a session upgraded to TLS goes on with options). */
  constructor(handlers: NbdParserHandlers, options: { afterFlags?: boolean } = {}) {
    this.handlers = handlers;
    this.mode = options.afterFlags === true ? 'option' : 'flags';
    this.stage = 'header';
    this.held = false;
    this.parsing = false;
    this.pending = EMPTY;
    this.header = Buffer.alloc(REQUEST_SIZE);
    this.headerHave = 0;
    this.headerSize = options.afterFlags === true ? OPTION_HEADER_SIZE : 4;
    this.body = undefined;
    this.bodyHave = 0;
    this.skipLeft = 0;
    this.request = undefined;
    this.discard = false;
    this.option = 0;
    this.transient = undefined;
  }

  get inTransmission(): boolean {
    return this.mode === 'transmission';
  }

  /** The session holds the parser (see hold()). */
  get holding(): boolean {
    return this.held;
  }

  /** Inside feed() or release(), that is, inside one of the handlers. */
  get busy(): boolean {
    return this.parsing;
  }

  /** No message is partly received and nothing waits to be parsed: the input ends cleanly here. */
  get atBoundary(): boolean {
    return this.pending.length === 0 && this.headerHave === 0 && this.stage === 'header' && this.body === undefined;
  }

  /**
   * Where the next bytes of the stream go, while they are a WRITE payload's and nothing
   * else waits to be parsed: the rest of the payload's buffer. A socket may read into it
   * and feed a view of it; bytes fed where they already belong are not copied again.
   * Undefined between messages, while holding, and with input kept unparsed.
   */
  payloadTarget(): Buffer | undefined {
    if (this.mode !== 'transmission' || this.stage !== 'body' || this.held || this.parsing || this.pending.length > 0) return undefined;
    return this.body?.subarray(this.bodyHave);
  }

  /** `transient`: the chunk's bytes are overwritten once this returns (anything kept is copied). */
  feed(chunk: Buffer, transient = false): void {
    if (this.mode === 'stopped' || chunk.length === 0) return;
    if (this.mode === 'waiting' || this.held || this.parsing) {
      this.pending = this.pending.length === 0 ? (transient ? Buffer.from(chunk) : chunk) : Buffer.concat([this.pending, chunk]);
      return;
    }
    this.transient = transient ? chunk : undefined;
    try {
      this.parse(chunk);
    } finally {
      this.transient = undefined;
    }
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

  /** Stops after the message being reported; what follows waits for release(). */
  hold(): void {
    if (this.mode === 'transmission') this.held = true;
  }

  /**
   * The WRITE whose header was just reported is refused: its payload is read and dropped
   * instead of given a buffer, then the WRITE is reported through onPayload with empty
   * data. Only between a WRITE header and its payload (from onRequest, or while holding
   * there).
   */
  discardPayload(): void {
    if (this.stage === 'admit') this.discard = true;
  }

  /** Parses what waited since hold(). Safe to call from a callback of this parser. */
  release(): void {
    if (!this.held) return;
    this.held = false;
    // From inside parse(), the running loop sees the flag and carries on itself.
    if (!this.parsing) this.drainPending();
  }

  /** Ignores all further input (after NBD_CMD_DISC, or when the connection is going away). */
  stop(): void {
    this.mode = 'stopped';
    this.pending = EMPTY;
    this.body = undefined;
    this.request = undefined;
  }

  private drainPending(): void {
    // Called from inside parse() (an option answered in its callback): the running loop
    // goes on by itself.
    if (this.parsing) return;
    const pending = this.pending;
    this.pending = EMPTY;
    if (pending.length > 0 || this.stage === 'admit') this.parse(pending);
  }

  private parse(chunk: Buffer): void {
    this.parsing = true;
    let at = 0;
    try {
      for (;;) {
        if (this.mode === 'stopped') return;
        if (this.mode === 'waiting' || this.held) {
          // Keep the rest, ahead of anything fed while this loop ran.
          const rest = chunk === this.transient ? Buffer.from(chunk.subarray(at)) : chunk.subarray(at);
          this.pending = this.pending.length === 0 ? rest : rest.length === 0 ? this.pending : Buffer.concat([rest, this.pending]);
          return;
        }
        if (this.stage === 'admit') this.beginPayload();
        if (at === chunk.length) {
          // Input fed while this loop ran (only from a callback) is parsed before returning.
          if (this.pending.length === 0) return;
          chunk = this.pending;
          this.pending = EMPTY;
          at = 0;
          continue;
        }
        if (this.stage === 'skip') at = this.skipBytes(chunk, at);
        else at = this.body === undefined ? this.parseHeader(chunk, at) : this.fillBody(chunk, at);
      }
    } finally {
      this.parsing = false;
    }
  }

  /** Collects a header (straight from the chunk when it is all there); returns the new position. */
  private parseHeader(chunk: Buffer, at: number): number {
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
      if (this.headerHave < this.headerSize) return at;
      this.headerHave = 0;
      head = this.header;
      headAt = 0;
    }
    if (this.mode === 'flags') {
      this.mode = 'option';
      this.headerSize = OPTION_HEADER_SIZE;
      this.handlers.onClientFlags(head.readUInt32BE(headAt));
      return at;
    }
    if (this.mode === 'option') return this.onOptionHeader(chunk, at, head, headAt);
    this.onRequestHeader(head, headAt);
    return at;
  }

  private onOptionHeader(chunk: Buffer, at: number, head: Buffer, headAt: number): number {
    if (head.readBigUInt64BE(headAt) !== IHAVEOPT) {
      this.fail('option does not start with IHAVEOPT');
      return at;
    }
    this.option = head.readUInt32BE(headAt + 8);
    const length = head.readUInt32BE(headAt + 12);
    if (length > MAX_OPTION_LENGTH) {
      // Dropped as it arrives, once the session has answered (it waits like any option).
      this.stage = 'skip';
      this.skipLeft = length;
      this.mode = 'waiting';
      this.handlers.onOversizedOption(this.option, length);
      return at;
    }
    if (chunk.length - at >= length) {
      // Options are answered before the parser goes on, so a view of the chunk will do,
      // unless the chunk's buffer is reused once feed() returns (an answer may take longer).
      const view = chunk.subarray(at, at + length);
      this.completeOption(chunk === this.transient ? Buffer.from(view) : view);
      return at + length;
    }
    this.body = Buffer.allocUnsafe(length);
    this.bodyHave = 0;
    return at;
  }

  private onRequestHeader(head: Buffer, headAt: number): void {
    if (head.readUInt32BE(headAt) !== REQUEST_MAGIC) {
      this.fail(`bad request magic 0x${head.readUInt32BE(headAt).toString(16)}`);
      return;
    }
    const request: NbdRequest = {
      flags: head.readUInt16BE(headAt + 4),
      type: head.readUInt16BE(headAt + 6),
      cookie: { hi: head.readUInt32BE(headAt + 8), lo: head.readUInt32BE(headAt + 12) },
      offset: readU64(head, headAt + 16),
      length: head.readUInt32BE(headAt + 24),
      data: EMPTY,
      pooled: undefined,
      cost: 0,
      received: 0,
    };
    if (request.type === CMD.WRITE) {
      // A WRITE's payload must be read to stay in step; one larger than any block we accept
      // is treated as a broken stream rather than buffered.
      if (request.length > BLOCK.MAX) {
        this.fail(`WRITE of ${request.length} bytes is larger than the maximum block size ${BLOCK.MAX}`);
        return;
      }
      this.request = request;
      this.stage = 'admit';
    }
    this.handlers.onRequest(request);
  }

  /** The session let a WRITE's payload in: give it a buffer of its own, or drop it if refused. */
  private beginPayload(): void {
    const request = this.request;
    if (request === undefined) return;
    if (this.discard && request.length > 0) {
      this.discard = false;
      this.stage = 'skip';
      this.skipLeft = request.length;
      return;
    }
    this.discard = false;
    if (request.length === 0) {
      this.stage = 'header';
      this.request = undefined;
      this.handlers.onPayload(request);
      return;
    }
    const pooled = this.handlers.allocate?.(request.length) ?? Buffer.allocUnsafe(request.length);
    request.pooled = pooled;
    this.body = pooled.subarray(0, request.length);
    this.bodyHave = 0;
    this.stage = 'body';
  }

  private fillBody(chunk: Buffer, at: number): number {
    const body = this.body;
    if (body === undefined) return at;
    const n = Math.min(body.length - this.bodyHave, chunk.length - at);
    // A chunk read into payloadTarget() is already where it belongs.
    if (chunk.buffer !== body.buffer || chunk.byteOffset + at !== body.byteOffset + this.bodyHave) chunk.copy(body, this.bodyHave, at, at + n);
    this.bodyHave += n;
    if (this.bodyHave < body.length) return at + n;
    this.body = undefined;
    if (this.mode === 'option') {
      this.completeOption(body);
      return at + n;
    }
    const request = this.request;
    this.request = undefined;
    this.stage = 'header';
    if (request !== undefined) {
      request.data = body;
      this.handlers.onPayload(request);
    }
    return at + n;
  }

  /** Drops payload bytes; at the end of a refused WRITE's payload, reports the WRITE. */
  private skipBytes(chunk: Buffer, at: number): number {
    const n = Math.min(this.skipLeft, chunk.length - at);
    this.skipLeft -= n;
    if (this.skipLeft > 0) return at + n;
    this.stage = 'header';
    const request = this.request;
    this.request = undefined;
    if (request !== undefined) this.handlers.onPayload(request);
    return at + n;
  }

  private completeOption(payload: Buffer): void {
    this.mode = 'waiting';
    this.handlers.onOption(this.option, payload);
  }

  private fail(message: string): void {
    this.stop();
    this.handlers.onFatal(new MisuseError('MS_NBD_PROTOCOL', message));
  }
}
