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
// every reply), so this input pauses softly, as a stream does: while paused it goes on
// reading, keeping copies of what arrives up to `size` bytes, and stops the socket only
// past that. resume() hands the copies over in order, in a later tick, then new reads.
//
// Invariants:
//   - a chunk from a `transient` input is a view of a buffer the next read overwrites:
//     a listener keeps nothing of it past its return without a copy (the parsers' feed
//     takes a `transient` flag and copies what they keep). Copies kept while paused are
//     handed over as they are (not transient, but a copy more does no harm).
//   - the buffer is the connection's own, so a slip in that rule can garble only its own
//     stream, never hand one client's bytes to another.
//   - nothing is handed to data() while paused; bytes read and kept while paused are at
//     most `size` plus one read (`size`): the bound a stream's buffer gives.
//   - end() comes after every byte read has been handed over.
//   - where the runtime's accepted Socket has no handle this can adopt (a future Node.js,
//     a socket that is not a stream handle), the input falls back to 'data' events, which
//     are not transient.

import { Socket, type OnReadOpts, type SocketConstructorOpts } from 'node:net';
import type { FlowSocket } from './request-flow.js';

/** Read buffer of an adopted connection: Node.js's own read size. */
export const READ_BUFFER_SIZE = 64 * 1024;

export interface InputHandlers {
  data(chunk: Buffer): void;
  /** The peer ended its side; after every chunk. */
  end(): void;
}

export interface SocketInput {
  readonly socket: Socket;
  /** Chunks are views of a buffer the next read reuses: keep nothing of them without a copy. */
  readonly transient: boolean;
  /** Sets the input's handlers; undefined drops what arrives (pause first). */
  listen(handlers: InputHandlers | undefined): void;
  pause(): void;
  resume(): void;
}

/** What a RequestFlow needs of a connection: reading paused and resumed through its input. */
export function flowSocketOf(input: SocketInput): FlowSocket {
  const socket = input.socket;
  return {
    pause: () => {
      input.pause();
    },
    resume: () => {
      input.resume();
    },
    get writableLength() {
      return socket.writableLength;
    },
    get writableHighWaterMark() {
      return socket.writableHighWaterMark;
    },
    on: (event, listener) => socket.on(event, listener),
  };
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
    pause() {
      socket.pause();
    },
    resume() {
      socket.resume();
    },
  };
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
  private readonly allowHalfOpen: boolean;
  private handlers: InputHandlers | undefined;
  private paused: boolean;
  /** The socket itself is stopped (the copies kept reached the limit). */
  private stopped: boolean;
  /** Copies of what was read while paused, oldest first. */
  private kept: Buffer[];
  private keptBytes: number;
  private handing: boolean;
  /** The peer's end arrived while copies were still kept. */
  private endPending: boolean;

  constructor(accepted: Socket, handle: AdoptableHandle, allowHalfOpen: boolean, size: number) {
    this.transient = true;
    this.buffer = Buffer.allocUnsafe(size);
    this.allowHalfOpen = allowHalfOpen;
    this.handlers = undefined;
    this.paused = false;
    this.stopped = false;
    this.kept = [];
    this.keptBytes = 0;
    this.handing = false;
    this.endPending = false;
    // `handle` is how Node.js's own server makes the Socket of an accepted connection.
    const opts: SocketConstructorOpts & { handle: AdoptableHandle; onread: OnReadOpts } = {
      handle,
      // Always half-open underneath: Node would end this side at the peer's end, before
      // the bytes kept during a pause are handed over; ended() does it after them.
      allowHalfOpen: true,
      readable: true,
      writable: true,
      onread: {
        buffer: this.buffer,
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
      if (this.kept.length > 0) this.endPending = true;
      else this.ended();
    });
    this.socket.on('close', () => {
      this.kept = [];
      this.keptBytes = 0;
    });
  }

  listen(handlers: InputHandlers | undefined): void {
    this.handlers = handlers;
  }

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    if (this.stopped) {
      this.stopped = false;
      this.socket.resume();
    }
    if (this.kept.length > 0 && !this.handing) {
      this.handing = true;
      process.nextTick(() => {
        this.handKept();
      });
    }
  }

  private onRead(nread: number): void {
    const chunk = this.buffer.subarray(0, nread);
    if (!this.paused && this.kept.length === 0) {
      this.handlers?.data(chunk);
      return;
    }
    this.kept.push(Buffer.from(chunk));
    this.keptBytes += nread;
    if (this.paused && !this.stopped && this.keptBytes >= this.buffer.length) {
      this.stopped = true;
      this.socket.pause();
    }
  }

  /** Hands over the copies kept while paused, until paused again. */
  private handKept(): void {
    this.handing = false;
    while (!this.paused && this.kept.length > 0) {
      const chunk = this.kept.shift();
      if (chunk === undefined) break;
      this.keptBytes -= chunk.length;
      this.handlers?.data(chunk);
    }
    if (this.kept.length === 0 && this.endPending) {
      this.endPending = false;
      this.ended();
    }
  }

  /** The peer's end, after its last byte; without half-open, this side ends then too (as Node does after 'end'). */
  private ended(): void {
    this.handlers?.end();
    if (!this.allowHalfOpen) this.socket.end();
  }
}
