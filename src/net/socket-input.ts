// The input side of an accepted connection: the chunks a session's parser is fed, and
// their end.
//
// Node.js reads a socket into a fresh allocation for every read (64 KiB, then trimmed to
// what arrived). Under large writes that churn is most of a service's cost: a `perf` of
// the node during 1M sequential NBD writes showed 31% of its main thread in the kernel
// zeroing fresh pages (malloc gives the freed reads back and faults them in again), and
// every read is one more ArrayBuffer for the collector (docs/BENCHMARKS.md, bench/nbd).
// Node offers reads into a buffer of the caller's own (`onread`) for a Socket it makes,
// but not for one a server accepts. So `ownBufferInput` wraps the accepted socket's
// handle in a new Socket made with `onread`: every read lands in one buffer this
// connection owns, allocated once.
//
//   accepted Socket (server, paused on connect) --handle--> new Socket({ handle, onread })
//        |                                                    | each read: data(view of `buffer`)
//        +-- lets go of the handle, destroyed (the server's count drops; the service's
//            own connection set keeps the new one, and shutdown drains that set)
//
// Pausing: Node stops reading an `onread` socket at once on pause() and starts again on
// resume(), a system call each way, where a 'data' socket reads on into its stream's
// buffer. A service pauses its input whenever its replies back up (1 MiB READs: after
// every reply), so this input pauses softly, as a stream does: while paused it reads on
// into a spill buffer of its own and stops the socket only once that holds `size` bytes.
// resume() hands the spill over as one chunk in a later tick, and only then reads again.
//
// Targets: after every read the input asks its reader where the next bytes belong (the
// rest of a WRITE payload's buffer, InputHandlers.target), and Node reads them there
// (`onread` with a buffer generator). The chunk handed over is then a view of that
// buffer at the place the bytes belong, and the reader's copy is skipped. Bytes that
// land in a target after a pause stay there and are handed over before the spill.
//
// Invariants:
//   - a chunk from a `transient` input is a view of a buffer the next read overwrites
//     (the read buffer, or the spill once handed over): a listener keeps nothing of it
//     past its return without a copy (the parsers' feed takes a `transient` flag and
//     copies what they keep).
//   - the read and spill buffers are the connection's own, so a slip in that rule can
//     garble only its own stream. A target is a request's buffer, from a pool shared by
//     connections: the input reads into one only as the reader allows (below).
//   - nothing is handed to data() while paused. Bytes read on meanwhile are under twice
//     `size` (the socket stops at `size`, and stays stopped until they are handed over,
//     whatever pauses and resumes come between), held in one buffer: memory follows the
//     bytes, not the number of reads (a client trickling one byte per segment costs no
//     more than one sending whole segments). Once handed over, a spill over 4 KiB goes.
//   - end() comes after every byte read has been handed over.
//   - a read lands in a target only if the reader gave it after the last chunk and the
//     input was not paused then; the reader keeps that memory for it until the next
//     chunk is handed over or the socket can read no more.
//   - Node.js drops the buffer the generator returned when a tick queued during the
//     read's callback throws and an 'uncaughtException' handler catches it: the next
//     read lands in the last one's buffer while the input expects it in the new one.
//     The node has no such handler (an uncaught exception ends it); in a process that
//     has one, every connection whose last or next read buffer is a target is cut at
//     any uncaught exception, before it can read again.
//   - where the runtime's accepted Socket has no handle this can adopt (a future Node.js,
//     a socket that is not a stream handle), the input falls back to 'data' events, which
//     are not transient.

import { Socket, type OnReadOpts, type SocketConstructorOpts } from 'node:net';
import type { FlowSocket } from './request-flow.js';

/** Read buffer of an adopted connection: Node.js's own read size. */
export const READ_BUFFER_SIZE = 64 * 1024;

const EMPTY = Buffer.alloc(0);
/** The spill a connection keeps between pauses (what a few request headers take); a larger one is let go once handed over. */
const SPILL_KEPT = 4096;
/** A reader's target smaller than this is not read into directly: the copy it saves is small, and a read of the input's own buffer takes what follows too. */
const TARGET_MIN = 16 * 1024;

export interface InputHandlers {
  data(chunk: Buffer): void;
  /** The peer ended its side; after every chunk. */
  end(): void;
  /**
   * Optional: where the next bytes of the stream belong, when the reader knows (the rest
   * of a WRITE payload's buffer). An own-buffer input reads them there itself, and data()
   * gets a view of that buffer at the place they belong (a reader whose copy would land
   * on the same bytes skips it). Asked after every read. The socket may write into a
   * target until the next chunk is handed over, or until it can read no more (the end
   * has come, or it is destroyed): until then the reader must not reuse that memory for
   * anything else, even if it gives the payload up.
   */
  target?(): Buffer | undefined;
}

export interface SocketInput {
  readonly socket: Socket;
  /** Chunks are views of a buffer the next read reuses: keep nothing of them without a copy. */
  readonly transient: boolean;
  /** Sets the input's handlers; undefined drops what arrives (pause first). */
  listen(handlers: InputHandlers | undefined): void;
  /** Paused by pause() (an own-buffer input may still be reading on into its spill). */
  isPaused(): boolean;
  /** Bytes read from the socket and not yet handed over. */
  pendingBytes(): number;
  pause(): void;
  resume(): void;
}

/**
 * A connection's reading as its RequestFlow and its parser want it: paused while the flow
 * asks (budget, replies backing up) or while the parser has stopped between frames (the
 * rest of a chunk waits in it as bytes, and its owner resumes it a little later). Without
 * the second, what the flow lets in while the parser is stopped piles up in the parser,
 * faster than it is parsed. The flow drives it as its socket; the owner calls update()
 * once the parser goes on.
 */
export class ReadGate implements FlowSocket {
  private readonly input: SocketInput;
  private readonly parserStopped: () => boolean;
  private flowPaused: boolean;

  constructor(input: SocketInput, parserStopped: () => boolean) {
    this.input = input;
    this.parserStopped = parserStopped;
    this.flowPaused = false;
  }

  get writableLength(): number {
    return this.input.socket.writableLength;
  }

  get writableHighWaterMark(): number {
    return this.input.socket.writableHighWaterMark;
  }

  on(event: 'drain', listener: () => void): void {
    this.input.socket.on(event, listener);
  }

  pause(): void {
    this.flowPaused = true;
    this.update();
  }

  resume(): void {
    this.flowPaused = false;
    this.update();
  }

  update(): void {
    if (this.flowPaused || this.parserStopped()) this.input.pause();
    else this.input.resume();
  }
}

/** Input through the socket's 'data' and 'end' events. */
export function dataEventInput(socket: Socket): SocketInput {
  let current: InputHandlers | undefined;
  const onData = (chunk: Buffer): void => current?.data(chunk);
  const onEnd = (): void => current?.end();
  return {
    socket,
    transient: false,
    listen(handlers) {
      if (current === undefined && handlers !== undefined) {
        socket.on('data', onData);
        socket.on('end', onEnd);
      } else if (current !== undefined && handlers === undefined) {
        socket.removeListener('data', onData);
        socket.removeListener('end', onEnd);
      }
      current = handlers;
    },
    isPaused() {
      return socket.isPaused();
    },
    pendingBytes() {
      return socket.readableLength;
    },
    pause() {
      socket.pause();
    },
    resume() {
      socket.resume();
    },
  };
}

/** Own-buffer inputs alive, for the cut at an uncaught exception (see the header). */
const live = new Set<OwnBufferInput>();
let watchingUncaught = false;

function watchUncaught(): void {
  if (watchingUncaught) return;
  watchingUncaught = true;
  process.on('uncaughtExceptionMonitor', () => {
    for (const input of live) input.cutIfTargeted();
  });
}

/** What of an accepted socket's internals the adoption relies on. */
interface AdoptableHandle {
  readStart(): number;
  useUserBuffer(buffer: Uint8Array): void;
}

function adoptableHandle(socket: Socket): AdoptableHandle | undefined {
  const handle = (socket as unknown as { _handle?: Partial<AdoptableHandle> | null })._handle;
  if (handle === undefined || handle === null) return undefined;
  if (typeof handle.readStart !== 'function' || typeof handle.useUserBuffer !== 'function') return undefined;
  return handle as AdoptableHandle;
}

/**
 * `onread` for a socket this process connects (a client: it never pauses): every read
 * lands in one buffer of the connection's own and is handed to `feed` as a transient
 * chunk, overwritten by the next read.
 */
export function ownReadBuffer(feed: (chunk: Buffer) => void, size = READ_BUFFER_SIZE): OnReadOpts {
  return {
    buffer: Buffer.allocUnsafe(size),
    callback: (length: number, buffer: Uint8Array): boolean => {
      feed((buffer as Buffer).subarray(0, length));
      return true;
    },
  };
}

/**
 * The input of a socket a server accepted with `pauseOnConnect: true`, read into a
 * buffer of its own (`size` bytes); 'data' events where the handle cannot be adopted.
 * Call it in the server's connection listener, before anything else sees the socket.
 */
export function ownBufferInput(accepted: Socket, options: { allowHalfOpen: boolean; size?: number }): SocketInput {
  const handle = adoptableHandle(accepted);
  if (handle === undefined || accepted.destroyed) {
    accepted.resume();
    return dataEventInput(accepted);
  }
  return new OwnBufferInput(accepted, handle, options.allowHalfOpen, options.size ?? READ_BUFFER_SIZE);
}

class OwnBufferInput implements SocketInput {
  readonly socket: Socket;
  readonly transient: boolean;
  private readonly buffer: Buffer;
  /** Where the next read lands: `buffer`, or a reader's target (see InputHandlers.target). */
  private current: Buffer;
  /** Where the last read landed. */
  private last: Buffer;
  private readonly allowHalfOpen: boolean;
  private handlers: InputHandlers | undefined;
  private paused: boolean;
  /** The socket itself is stopped (what was read on while paused reached `buffer.length`). */
  private stopped: boolean;
  /** What was read while paused, in order, at the front of one buffer (grown by doubling, kept for the connection). */
  private spill: Buffer;
  private spillLength: number;
  /** Bytes read into a reader's target after it paused: they stay there, handed over before the spill. */
  private early: Buffer | undefined;
  private handing: boolean;
  /** The peer's end arrived while bytes read on were still to be handed over. */
  private endPending: boolean;

  constructor(accepted: Socket, handle: AdoptableHandle, allowHalfOpen: boolean, size: number) {
    this.transient = true;
    this.buffer = Buffer.allocUnsafe(size);
    this.current = this.buffer;
    this.last = this.buffer;
    this.allowHalfOpen = allowHalfOpen;
    this.handlers = undefined;
    this.paused = false;
    this.stopped = false;
    this.spill = EMPTY;
    this.spillLength = 0;
    this.early = undefined;
    this.handing = false;
    this.endPending = false;
    // `handle` is how Node.js's own server makes the Socket of an accepted connection.
    const opts: SocketConstructorOpts & { handle: AdoptableHandle; onread: OnReadOpts } = {
      handle,
      // Always half-open underneath: Node would end this side at the peer's end, before
      // the bytes read on during a pause are handed over; ended() does it after them.
      allowHalfOpen: true,
      readable: true,
      writable: true,
      onread: {
        // Asked for the buffer of the next read when the socket starts and after each read.
        buffer: () => this.nextBuffer(),
        callback: (nread: number): boolean => {
          if (nread > 0) this.onRead(nread);
          return true;
        },
      },
    };
    this.socket = new Socket(opts);
    // The accepted Socket lets go of the handle: destroying it then closes nothing, emits
    // its 'close' and takes it off the server's count.
    (accepted as unknown as { _handle: unknown })._handle = null;
    accepted.destroy();
    this.socket.on('end', () => {
      if (this.spillLength > 0 || this.early !== undefined) this.endPending = true;
      else this.ended();
    });
    this.socket.on('close', () => {
      this.spill = EMPTY;
      this.spillLength = 0;
      this.early = undefined;
      live.delete(this);
    });
    live.add(this);
    watchUncaught();
  }

  listen(handlers: InputHandlers | undefined): void {
    this.handlers = handlers;
  }

  isPaused(): boolean {
    return this.paused;
  }

  pendingBytes(): number {
    return this.spillLength + (this.early?.length ?? 0);
  }

  pause(): void {
    this.paused = true;
  }

  /** The reader's target while bytes go straight to it (not paused, nothing spilled), else the input's own buffer. */
  private nextBuffer(): Buffer {
    let next = this.buffer;
    if (!this.paused && this.spillLength === 0 && this.early === undefined && !this.handing && this.handlers?.target !== undefined) {
      const target = this.handlers.target();
      if (target !== undefined && target.length >= TARGET_MIN) next = target;
    }
    this.current = next;
    return next;
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    if (this.spillLength > 0 || this.early !== undefined) {
      // Handed over in a later tick; the socket stays stopped until they are.
      if (!this.handing) {
        this.handing = true;
        process.nextTick(() => {
          this.handSpill();
        });
      }
      return;
    }
    this.restart();
  }

  private restart(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.socket.resume();
  }

  /** At an uncaught exception: Node.js may not read where this input expects (see the header) if a target is involved. */
  cutIfTargeted(): void {
    if ((this.current !== this.buffer || this.last !== this.buffer) && !this.socket.destroyed) this.socket.destroy();
  }

  private onRead(nread: number): void {
    const source = this.current;
    this.last = source;
    if (!this.paused && this.spillLength === 0 && this.early === undefined) {
      this.handlers?.data(source.subarray(0, nread));
      return;
    }
    if (source !== this.buffer) {
      // Into the reader's target, which it paused after giving: they stay where they
      // belong (the next read is the input's own), and are handed over first.
      this.early = source.subarray(0, nread);
      return;
    }
    const need = this.spillLength + nread;
    if (need > this.spill.length) {
      let capacity = Math.max(SPILL_KEPT, this.spill.length);
      while (capacity < need) capacity *= 2;
      const grown = Buffer.allocUnsafe(capacity);
      this.spill.copy(grown, 0, 0, this.spillLength);
      this.spill = grown;
    }
    source.copy(this.spill, this.spillLength, 0, nread);
    this.spillLength = need;
    if (!this.stopped && this.spillLength >= this.buffer.length) {
      this.stopped = true;
      this.socket.pause();
    }
  }

  /** Hands over what was read on while paused, as one transient chunk, then reads again. */
  private handSpill(): void {
    this.handing = false;
    if (this.paused) return;
    const early = this.early;
    if (early !== undefined) {
      this.early = undefined;
      this.handlers?.data(early);
      if (this.socket.destroyed) return;
      // Paused again by them: the spill waits for the next resume.
      if (this.paused && this.spillLength > 0) return;
    }
    if (this.spillLength > 0) {
      const length = this.spillLength;
      this.spillLength = 0;
      // The handler copies what it keeps (transient), so the spill is free again once it returns.
      this.handlers?.data(this.spill.subarray(0, length));
      // A spill a trickle or a burst grew goes, so an idle connection keeps SPILL_KEPT at most.
      if (this.spillLength === 0 && this.spill.length > SPILL_KEPT) this.spill = EMPTY;
      if (this.socket.destroyed) return;
    }
    if (this.endPending && this.spillLength === 0) {
      this.endPending = false;
      this.ended();
    }
    if (!this.paused) this.restart();
  }

  /** The peer's end, after its last byte; without half-open, this side ends then too (as Node does after 'end'). */
  private ended(): void {
    this.handlers?.end();
    if (!this.allowHalfOpen) this.socket.end();
  }
}
