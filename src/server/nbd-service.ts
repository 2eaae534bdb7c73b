// The NBD service: the node's second type interface (DESIGN 4.2), on TCP 10809. It
// owns the listener and the set of connections; each connection runs its own handshake
// and requests (nbd-connection.ts) against the shared volumes, so several connections
// to one export see each other's completed writes and a FLUSH on any covers them all.

import { createServer, type Server } from 'node:net';
import type { Logger } from '../logger.js';
import type { VolumeIo } from '../storage/volume-io.js';
import type { VolumeManager } from '../storage/volume-manager.js';
import { closeServer, listenOn } from '../net/listen.js';
import type { ListenAddress } from '../units.js';
import { BufferPool } from './buffer-pool.js';
import { NbdConnection, type NbdHost, type NbdStats } from './nbd-connection.js';

export class NbdService implements NbdHost {
  readonly volumes: VolumeManager;
  readonly io: VolumeIo;
  readonly log: Logger;
  readonly stats: NbdStats;
  readonly payloadBuffers: BufferPool;
  private readonly connections: Set<NbdConnection>;
  private server: Server | undefined;
  private stopping: boolean;
  private bound: ListenAddress | undefined;

  constructor(options: { volumes: VolumeManager; io: VolumeIo; log: Logger }) {
    this.volumes = options.volumes;
    this.io = options.io;
    this.log = options.log;
    this.stats = { commands: {}, errors: {}, bytesRead: 0, bytesWritten: 0, handshakes: 0, protocolErrors: 0 };
    this.payloadBuffers = new BufferPool();
    this.connections = new Set();
    this.server = undefined;
    this.stopping = false;
    this.bound = undefined;
  }

  get address(): ListenAddress | undefined {
    return this.bound;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  async listen(address: ListenAddress): Promise<ListenAddress> {
    const server = createServer((socket) => {
      if (this.stopping) {
        socket.destroy();
        return;
      }
      this.connections.add(new NbdConnection(socket, this));
    });
    this.bound = await listenOn(server, address, 'NBD', this.log);
    this.server = server;
    return this.bound;
  }

  /** Stops accepting, lets requests in flight finish, then closes every connection. */
  async close(): Promise<void> {
    this.stopping = true;
    const server = this.server;
    this.server = undefined;
    await closeServer(server, this.connections);
  }

  isStopping(): boolean {
    return this.stopping;
  }

  closed(connection: NbdConnection): void {
    this.connections.delete(connection);
  }
}
