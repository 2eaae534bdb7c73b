// The NBD service: the node's second type interface (DESIGN 4.2), on TCP 10809. It
// owns the listener, the admission of connections and the resources they share; each
// connection runs its own handshake and requests (nbd-connection.ts) against the shared
// volumes, so several connections to one export see each other's completed writes and a
// FLUSH on any covers them all.
//
// Bounds (all from the nbd.* settings):
//   - connections: at most maxConnections open; one more is closed at once. A client
//     that has not entered transmission (or sent ABORT) within handshakeTimeoutMs is cut;
//   - per connection: maxInFlight requests and maxInFlightBytes of payloads and replies;
//   - per service: maxInFlightBytesTotal across every connection, plus IDLE_RESERVE for
//     each connection with nothing in flight, so a client whose connections hold the
//     whole budget (say, by never reading replies) cannot stall another's small requests;
//   - storage work the budget cannot see: at most ZERO_SLOTS pieces of long TRIMs and
//     WRITE_ZEROES in storage at once, and CPU-bound steps (those pieces, BLOCK_STATUS
//     walks, CACHE) one per event-loop turn (TurnQueue), so other clients' sockets are
//     polled between any two.
// What one client can make the node hold is therefore about maxInFlightBytesTotal +
// maxConnections x (IDLE_RESERVE + a socket chunk + an option payload), plus the pool
// of reusable buffers (at most POOL_MAX_BYTES kept), plus storage's bookkeeping for
// ZERO_SLOTS zeroing pieces.

import { createServer, type Server, type Socket } from 'node:net';
import type { Admission } from '../net/connection-gate.js';
import { LatencyHistogram } from '../net/latency.js';
import { tlsUpgrader, type TlsFiles } from '../net/tls.js';
import type { Logger } from '../logger.js';
import { ConnectionGate } from '../net/connection-gate.js';
import { SharedBudget, newFlowStats, type FlowLimits, type FlowStats } from '../net/request-flow.js';
import type { VolumeIo } from '../storage/volume-io.js';
import type { VolumeManager } from '../storage/volume-manager.js';
import { closeServer, listenOn, listenUnix, type ScopedListener } from '../net/listen.js';
import { dataEventInput, ownBufferInput, type SocketInput } from '../net/socket-input.js';
import type { BusyPoll } from '../net/busy-poll.js';
import type { ListenAddress } from '../units.js';
import { BufferPool } from '../memory/buffer-pool.js';
import { NbdConnection, type ExportCatalog, type NbdHost, type NbdStats } from './nbd-connection.js';
import { Semaphore } from './semaphore.js';
import { TurnQueue } from './turn-queue.js';

export interface NbdLimits {
  maxConnections: number;
  handshakeTimeoutMs: number;
  /** Requests in flight per connection. */
  maxInFlight: number;
  /** Bytes in flight per connection. */
  maxInFlightBytes: number;
  /** Bytes in flight across all connections. */
  maxInFlightBytesTotal: number;
}

/** What a connection with nothing in flight may always take for one request, beyond the service budget. */
export const IDLE_RESERVE = 256 * 1024;
/**
 * Reusable payload buffers kept per size class from 1 MiB, and in all. 1M READs at QD8
 * keep eight or more replies in the socket at once: with four kept, 43% of them took a
 * fresh 1 MiB buffer (docs/BENCHMARKS.md, bench/nbd).
 */
const POOL_PER_CLASS = 16;
/** Request payloads and replies from 4 KiB up are pooled (buffer-pool.ts), up to 1 MiB of each class below 1 MiB. */
const POOL_FROM = 4096;
const POOL_SMALL_CLASS_BYTES = 1024 * 1024;
const POOL_MAX_BYTES = 32 * 1024 * 1024;
/** Pieces (64 MiB each) of long TRIMs and WRITE_ZEROES in storage at once, across the service. */
export const ZERO_SLOTS = 2;

export class NbdService implements NbdHost {
  readonly volumes: VolumeManager;
  readonly io: VolumeIo;
  readonly log: Logger;
  readonly stats: NbdStats;
  readonly payloadBuffers: BufferPool;
  readonly limits: FlowLimits;
  readonly budget: SharedBudget;
  readonly flowStats: FlowStats;
  readonly gate: ConnectionGate;
  readonly turns: TurnQueue;
  readonly zeroSlots: Semaphore;
  readonly tls: NbdHost['tls'];
  /** Destroys sockets still in their TLS handshake (at close). */
  private closeTls: () => void = () => undefined;
  private readonly connections: Set<NbdConnection>;
  private server: Server | undefined;
  private stopping: boolean;
  private bound: ListenAddress | undefined;
  readonly busyPoll: BusyPoll | undefined;

  /** `tls`: NBD_OPT_STARTTLS offered (`on`) or required (`require`, FORCEDTLS) on the TCP service; cut-through sockets never offer it. */
  constructor(options: { volumes: VolumeManager; io: VolumeIo; log: Logger; limits: NbdLimits; tls?: { mode: 'on' | 'require'; files: TlsFiles }; busyPoll?: BusyPoll | undefined }) {
    this.volumes = options.volumes;
    this.busyPoll = options.busyPoll;
    this.io = options.io;
    this.log = options.log;
    this.stats = { commands: {}, latency: new LatencyHistogram(), errors: {}, bytesRead: 0, bytesWritten: 0, handshakes: 0, protocolErrors: 0 };
    this.payloadBuffers = new BufferPool({ perClass: POOL_PER_CLASS, maxBytes: POOL_MAX_BYTES, minSize: POOL_FROM, smallClassBytes: POOL_SMALL_CLASS_BYTES });
    const { limits } = options;
    this.limits = { maxRequests: limits.maxInFlight, maxBytes: limits.maxInFlightBytes };
    this.budget = new SharedBudget(limits.maxInFlightBytesTotal, { reserveBytes: IDLE_RESERVE });
    this.flowStats = newFlowStats();
    this.gate = new ConnectionGate('NBD', { maxConnections: limits.maxConnections, handshakeTimeoutMs: limits.handshakeTimeoutMs }, options.log);
    this.turns = new TurnQueue();
    this.zeroSlots = new Semaphore(ZERO_SLOTS);
    this.connections = new Set();
    this.server = undefined;
    this.stopping = false;
    this.bound = undefined;
    const tls = options.tls;
    this.tls = tls === undefined ? undefined : { require: tls.mode === 'require', upgrade: this.upgradeFn(tls.files, limits.handshakeTimeoutMs) };
  }

  /** Starts the TLS session on a socket whose STARTTLS was answered: a new connection, in option haggling. */
  private upgradeFn(files: TlsFiles, handshakeTimeoutMs: number): (socket: Socket, state: { noZeroes: boolean }, admission: Admission) => void {
    const upgrader = tlsUpgrader<{ state: { noZeroes: boolean }; admission: Admission }>(
      files,
      handshakeTimeoutMs,
      (secure, { state, admission }) => {
        if (this.stopping) {
          secure.destroy();
          return;
        }
        this.log.debug({ remote: `${secure.remoteAddress ?? '?'}:${secure.remotePort ?? 0}`, protocol: secure.getProtocol(), authorized: secure.authorized }, 'NBD session upgraded to TLS');
        this.connections.add(new NbdConnection(this.polled(dataEventInput(secure)), this, admission, { secure: true, noZeroes: state.noZeroes }));
      },
      (error, remote) => {
        this.log.info({ remote, err: error.message }, 'NBD client failed the TLS handshake; disconnecting');
      },
    );
    this.closeTls = upgrader.close;
    return (socket, state, admission) => {
      if (this.stopping) socket.destroy();
      else upgrader.upgrade(socket, { state, admission });
    };
  }

  get address(): ListenAddress | undefined {
    return this.bound;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  async listen(address: ListenAddress): Promise<ListenAddress> {
    // Half-open: a client that sends NBD_CMD_DISC and shuts its side (libnbd does) must
    // still get the replies to what it sent before; the connection ends this side itself.
    // A service with TLS reads through 'data' events: a TLS session takes its socket over.
    const ownBuffer = this.tls === undefined;
    const server = createServer({ allowHalfOpen: true, pauseOnConnect: ownBuffer }, (accepted) => {
      if (this.stopping) {
        accepted.destroy();
        return;
      }
      const input = ownBuffer ? ownBufferInput(accepted, { allowHalfOpen: true }) : dataEventInput(accepted);
      const admission = this.gate.admit(input.socket);
      if (admission === undefined) return;
      this.connections.add(new NbdConnection(this.polled(input), this, admission));
    });
    this.bound = await listenOn(server, address, 'NBD', this.log);
    this.server = server;
    return this.bound;
  }

  /** `input`, poking the busy poll with every chunk when the node polls. */
  private polled(input: SocketInput): SocketInput {
    return this.busyPoll?.input(input) ?? input;
  }

  /** Stops accepting, answers what connections sent (ESHUTDOWN for what is not yet served), then closes them. */
  async close(): Promise<void> {
    this.stopping = true;
    this.closeTls();
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

  /**
   * A cut-through listener (issue 12): a Unix socket at `path` serving only the exports
   * `catalog` shows, with the service's own limits and budget. Its connections count as
   * one client (`client`) for the connection gate. Closing it drains and closes them.
   */
  async listenScoped(path: string, catalog: ExportCatalog, client: string, maxConnections = Infinity): Promise<ScopedListener> {
    const own = new Set<NbdConnection>();
    const host: NbdHost = {
      volumes: catalog,
      io: this.io,
      payloadBuffers: this.payloadBuffers,
      log: this.log,
      stats: this.stats,
      limits: this.limits,
      budget: this.budget,
      flowStats: this.flowStats,
      turns: this.turns,
      zeroSlots: this.zeroSlots,
      busyPoll: this.busyPoll,
      tls: undefined,
      isStopping: () => this.stopping,
      closed: (connection) => {
        own.delete(connection);
        this.connections.delete(connection);
      },
    };
    const server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (accepted) => {
      if (this.stopping) {
        accepted.destroy();
        return;
      }
      const input = ownBufferInput(accepted, { allowHalfOpen: true });
      const admission = this.gate.admitScoped(input.socket, client, own.size, maxConnections);
      if (admission === undefined) return;
      const connection = new NbdConnection(this.polled(input), host, admission);
      own.add(connection);
      this.connections.add(connection);
    });
    await listenUnix(server, path, 'NBD cut-through', this.log);
    return {
      path,
      connections: () => own.size,
      holding: () => [...own].map((c) => c.exportName).filter((name): name is string => name !== undefined),
      close: () => closeServer(server, own),
    };
  }
}

