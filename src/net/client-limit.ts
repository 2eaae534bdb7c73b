// Admission of a service's connections by remote address (admin API, rmem, mirror).
//
// A service-wide cap on connections bounds the node's memory, but alone it lets one
// client take every slot and lock everyone else out until its connections time out;
// this cap per remote address keeps room for the others (admin: admin.maxConnections
// and admin.maxConnectionsPerClient; rmem and mirror through their ConnectionGate).
//
// Invariants:
//   - open.get(a) is the number of admitted sockets from address a not yet closed; an
//     address at 0 has no entry, so the map never holds more entries than open sockets;
//   - a socket is refused (destroyed) iff its address already has `perClient` open, and
//     then nothing is counted for it but `refused`.
//
// Known limit: a client that owns many addresses (a /64 of IPv6, or every 127.x address
// on loopback) counts as many clients; only the service-wide cap holds it.

/** What the limit needs of a socket. */
export interface ClientSocket {
  readonly remoteAddress?: string | undefined;
  destroy(): unknown;
  once(event: 'close', listener: () => void): unknown;
}

export class ClientLimit {
  private readonly perClient: number;
  private readonly open: Map<string, number>;
  private refusedCount: number;

  constructor(perClient: number) {
    this.perClient = perClient;
    this.open = new Map();
    this.refusedCount = 0;
  }

  /** Connections refused so far because their address had `perClient` open. */
  get refused(): number {
    return this.refusedCount;
  }

  /** Open connections from one address. */
  openFrom(address: string): number {
    return this.open.get(address) ?? 0;
  }

  /** Admits the socket, or destroys it and returns false. */
  admit(socket: ClientSocket): boolean {
    // A socket already reset by its peer may have no address left: it is closing anyway.
    const address = socket.remoteAddress ?? '';
    const count = this.open.get(address) ?? 0;
    if (count >= this.perClient) {
      this.refusedCount++;
      socket.destroy();
      return false;
    }
    this.open.set(address, count + 1);
    socket.once('close', () => {
      const left = (this.open.get(address) ?? 1) - 1;
      if (left > 0) this.open.set(address, left);
      else this.open.delete(address);
    });
    return true;
  }
}
