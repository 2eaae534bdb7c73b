// Admission for one service's connections: a cap on how many are open at once, and a
// deadline for finishing the handshake (NBD option haggling, rmem HELLO, mirror HELLO).
//
// Invariants:
//   - at most `maxConnections` sockets admitted and not yet closed; one more is closed
//     at once, before any byte is read from it or any state is made for it;
//   - a connection that has not called handshakeDone() within `handshakeTimeoutMs` of
//     being admitted is destroyed (a client that stops mid-handshake holds a slot for
//     that long at most).
//
// One timer per connection in handshake; they are few and short-lived, unlike requests.

import type { Logger } from '../logger.js';

export interface GateLimits {
  maxConnections: number;
  handshakeTimeoutMs: number;
}

export interface GateStats {
  accepted: number;
  /** Connections closed at once because the service had `maxConnections` open. */
  refused: number;
  /** Connections closed because their handshake did not finish in time. */
  handshakeTimeouts: number;
  open: number;
}

export function newGateStats(): GateStats {
  return { accepted: 0, refused: 0, handshakeTimeouts: 0, open: 0 };
}

/** What the gate needs of a socket. */
export interface GateSocket {
  destroy(): unknown;
  once(event: 'close', listener: () => void): unknown;
  readonly remoteAddress?: string | undefined;
  readonly remotePort?: number | undefined;
}

export interface Admission {
  /** The handshake finished: the deadline no longer applies. */
  handshakeDone(): void;
}

export class ConnectionGate {
  readonly stats: GateStats;
  private readonly service: string;
  private readonly limits: GateLimits;
  private readonly log: Logger;
  private warnedFull: boolean;

  constructor(service: string, limits: GateLimits, log: Logger, stats: GateStats = newGateStats()) {
    this.service = service;
    this.limits = limits;
    this.log = log;
    this.stats = stats;
    this.warnedFull = false;
  }

  /** Admits a new socket, or closes it and returns undefined when the service is full. */
  admit(socket: GateSocket): Admission | undefined {
    if (this.stats.open >= this.limits.maxConnections) {
      this.stats.refused++;
      if (!this.warnedFull) {
        this.warnedFull = true;
        this.log.warn({ service: this.service, maxConnections: this.limits.maxConnections, remote: socket.remoteAddress }, 'connection limit reached; refusing new connections');
      }
      socket.destroy();
      return undefined;
    }
    this.stats.open++;
    this.stats.accepted++;
    let timer: NodeJS.Timeout | undefined = setTimeout(() => {
      timer = undefined;
      this.stats.handshakeTimeouts++;
      this.log.info({ service: this.service, remote: socket.remoteAddress, timeoutMs: this.limits.handshakeTimeoutMs }, 'handshake not finished in time; closing the connection');
      socket.destroy();
    }, this.limits.handshakeTimeoutMs);
    timer.unref();
    const clear = (): void => {
      if (timer !== undefined) clearTimeout(timer);
      timer = undefined;
    };
    socket.once('close', () => {
      clear();
      this.stats.open--;
      if (this.stats.open < this.limits.maxConnections) this.warnedFull = false;
    });
    return { handshakeDone: clear };
  }
}
