// Admission for one service's connections: a cap on how many are open at once, on how
// many come from one remote address, and a deadline for finishing the handshake (NBD
// option haggling, rmem HELLO, mirror HELLO).
//
// Invariants:
//   - at most `maxConnections` sockets admitted and not yet closed, and at most
//     `maxConnectionsPerClient` of them from one remote address (net/client-limit.ts);
//     one more is closed at once, before any byte is read from it or any state is made
//     for it;
//   - a connection that has not called handshakeDone() within `handshakeTimeoutMs` of
//     being admitted is destroyed (a client that stops mid-handshake holds a slot for
//     that long at most).
//
// One timer per connection in handshake; they are few and short-lived, unlike requests.

import type { Logger } from '../logger.js';
import { ClientLimit } from './client-limit.js';

export interface GateLimits {
  maxConnections: number;
  /** Connections from one remote address; absent: only maxConnections applies. */
  maxConnectionsPerClient?: number;
  handshakeTimeoutMs: number;
}

export interface GateStats {
  accepted: number;
  /** Connections closed at once because the service had `maxConnections` open. */
  refused: number;
  /** Connections closed at once because their address had `maxConnectionsPerClient` open. */
  refusedPerClient: number;
  /** Connections closed because their handshake did not finish in time. */
  handshakeTimeouts: number;
  open: number;
}

export function newGateStats(): GateStats {
  return { accepted: 0, refused: 0, refusedPerClient: 0, handshakeTimeouts: 0, open: 0 };
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
  private readonly clients: ClientLimit | undefined;
  private warnedFull: boolean;
  /** Addresses warned about at their per-client cap, until they drop below it. */
  private readonly warnedClients: Set<string>;

  constructor(service: string, limits: GateLimits, log: Logger, stats: GateStats = newGateStats()) {
    this.service = service;
    this.limits = limits;
    this.log = log;
    this.stats = stats;
    this.clients = limits.maxConnectionsPerClient === undefined ? undefined : new ClientLimit(limits.maxConnectionsPerClient);
    this.warnedFull = false;
    this.warnedClients = new Set();
  }

  /**
   * Admits a connection on a guest's own socket (issue 12): closed at once when that socket
   * has `max` open already (`open`), so one guest cannot take the service's connections;
   * otherwise admitted as one client named `client` (a Unix socket has no address).
   */
  admitScoped(socket: GateSocket, client: string, open: number, max: number): Admission | undefined {
    if (open >= max) {
      this.stats.refusedPerClient++;
      socket.destroy();
      return undefined;
    }
    return this.admit({ destroy: () => socket.destroy(), once: (event, listener) => socket.once(event, listener), remoteAddress: client, remotePort: 0 });
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
    const clients = this.clients;
    if (clients !== undefined && !clients.admit(socket)) {
      this.stats.refusedPerClient++;
      const remote = socket.remoteAddress ?? '';
      if (!this.warnedClients.has(remote)) {
        this.warnedClients.add(remote);
        this.log.warn({ service: this.service, maxConnectionsPerClient: this.limits.maxConnectionsPerClient, remote }, 'per-client connection limit reached; refusing new connections from this address');
      }
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
      const remote = socket.remoteAddress ?? '';
      if (this.warnedClients.has(remote) && (this.clients?.openFrom(remote) ?? 0) < (this.limits.maxConnectionsPerClient ?? Infinity)) this.warnedClients.delete(remote);
    });
    return { handshakeDone: clear };
  }
}
