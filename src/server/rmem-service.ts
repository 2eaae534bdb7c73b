// The rmem service: the node's first type interface (DESIGN 4.4), on TCP 10810.
//
// Sessions belong to server ids, not to connections:
//
//   HELLO(server id, token)          -> new session, and its secret in the reply
//   connection lost                  -> session kept for the lease; regions untouched
//   HELLO(id, token, secret) in time -> same session, same regions (resumed flag set)
//   lease runs out                   -> session ended: its regions unreachable at once,
//                                       then freed and zeroed, server removed (FIG. 15)
//
// A connected session from which the node reads no frame (not even KEEPALIVE) for a lease
// is treated as lost: its connection is closed and the grace period starts. That covers
// a client that does not read its replies (the node stops reading it) or sends a frame
// too slowly; it spares a connection that holds nothing and whose next request waits
// for room in the service budget, which other connections hold. One coarse timer, a
// quarter of the lease, drives both. A HELLO with the session's secret for a server that
// is connected elsewhere takes the session over and closes the older connection, which
// is what a client that noticed a dead link before the node did needs.
//
// Who may do what: with a token configured, HELLO must present it (the way in, shared by
// every server). A server id that has a session (connected or within its lease) is
// resumed or taken over only with that session's secret, 32 random bytes the node gave
// the HELLO that opened it; without it, or with a wrong one, the HELLO is refused with
// SECRET and the session is untouched. Token and secret are compared in constant time.
//
// Bounded resources: a ConnectionGate caps connections and closes one whose HELLO does
// not succeed within `handshakeTimeoutMs`; each connection's RequestFlow caps its
// requests and bytes in flight, and one SharedBudget caps the bytes of all connections
// together, plus IDLE_RESERVE for each connection with nothing in flight, so that
// connections holding the whole budget (clients that do not read their replies, say)
// cannot keep another's HELLO, KEEPALIVE or modest request waiting (see
// rmem-connection.ts).

import { createServer, type Server, type Socket } from 'node:net';
import { tlsUpgrader, type TlsFiles } from '../net/tls.js';
import { LatencyHistogram } from '../net/latency.js';
import type { Admission } from '../net/connection-gate.js';
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { MisuseError } from '../errors.js';
import type { ServerMemory, Tenancy } from '../memory/server-memory.js';
import type { DeviceManager } from '../nvram/device-manager.js';
import type { Logger } from '../logger.js';
import { DRAIN_DEADLINE_MS, closeServer, listenOn, listenUnix, type ScopedListener } from '../net/listen.js';
import { dataEventInput, ownBufferInput, type SocketInput } from '../net/socket-input.js';
import type { BusyPoll } from '../net/busy-poll.js';
import { ConnectionGate } from '../net/connection-gate.js';
import { SharedBudget, newFlowStats, type FlowLimits, type FlowStats } from '../net/request-flow.js';
import { serviceLoad, type ServiceLoad } from '../net/service-load.js';
import type { ListenAddress } from '../units.js';
import { BufferPool, stagingPool } from '../memory/buffer-pool.js';
import { RmemConnection, type ConnectionHost, type RmemScope, type RmemStats } from './rmem-connection.js';
import type { JournalHolderJson, SessionInfo } from '../protocol/admin/api.js';
import { SESSION_SECRET_SIZE } from '../protocol/rmem/spec.js';
export type { SessionInfo };

/** Server ids of guests' cut-through sessions begin with this (guest:NAME/ID); TCP clients may not use it. */
export const GUEST_SERVER_PREFIX = 'guest:';

export interface RmemServiceOptions {
  /** Polls the event loop for a while after each chunk of input and each tick's replies (node.busyPoll); none: never. */
  busyPoll?: BusyPoll | undefined;
  memory: ServerMemory;
  nvram: DeviceManager;
  writeLogOf?: (device: string) => string | undefined;
  log: Logger;
  nodeId: string;
  leaseMs: number;
  token: string | undefined;
  /** Requests in flight per connection. */
  maxInFlight: number;
  /** Bytes in flight per connection: request bodies and replies not yet written. */
  maxInFlightBytes: number;
  /** Bytes in flight on all connections together. */
  maxInFlightBytesTotal: number;
  maxConnections: number;
  /** Connections open at once from one remote address. */
  maxConnectionsPerClient: number;
  /** A connection whose HELLO has not succeeded in this time is closed. */
  handshakeTimeoutMs: number;
  /** At shutdown, how long requests in flight may take before their connection is cut (default DRAIN_DEADLINE_MS). */
  drainDeadlineMs?: number;
  /** TLS on every TCP connection, from the first byte (rmem.tls=require); cut-through sockets stay plain. */
  tls?: TlsFiles;
}

/**
 * What a connection with nothing in flight may always take for one request, beyond the
 * service budget. Times the default 256 connections it is 32 MiB, as NBD's reserve is.
 */
export const IDLE_RESERVE = 128 * 1024;

/** Large reply buffers kept for reuse, at most this many bytes (outside any budget). */
const REPLY_POOL_BYTES = 32 * 1024 * 1024;
/** What the pool of JAPPEND bodies keeps (see RmemConnection.bodyTarget). */
const BODY_POOL_BYTES = 8 * 1024 * 1024;

interface Session {
  serverId: string;
  /** Proof of having opened the session: a HELLO that resumes it must present it. */
  secret: Buffer;
  /** What the session's regions belong to; a new session of the same id is a new tenancy. */
  tenancy: Tenancy;
  sessionId: bigint;
  connection: RmemConnection | undefined;
  lastSeen: number;
  since: number;
  disconnectedAt: number;
}

export class RmemService implements ConnectionHost {
  /** With rmem.tls: admitted plain sockets go through the TLS handshake first (within the HELLO deadline). */
  private readonly secure: { upgrade: (socket: Socket, admission: Admission) => void; close: () => void } | undefined;
  readonly memory: ServerMemory;
  readonly nvram: DeviceManager;
  readonly log: Logger;
  readonly busyPoll: BusyPoll | undefined;
  readonly flowLimits: FlowLimits;
  readonly flowStats: FlowStats;
  readonly budget: SharedBudget;
  readonly gate: ConnectionGate;
  readonly stats: RmemStats;
  readonly replyBuffers: BufferPool;
  readonly bodyBuffers: BufferPool;
  readonly drainDeadlineMs: number;
  private readonly options: RmemServiceOptions;
  private readonly sessions: Map<string, Session>;
  private readonly connections: Set<RmemConnection>;
  private server: Server | undefined;
  private timer: NodeJS.Timeout | undefined;
  private stopping: boolean;
  private bound: ListenAddress | undefined;
  /** Connections closed as lost (no frame read for a lease). */
  private stalled: number;

  constructor(options: RmemServiceOptions) {
    this.options = options;
    this.memory = options.memory;
    this.nvram = options.nvram;
    this.log = options.log;
    this.busyPoll = options.busyPoll;
    this.secure = options.tls === undefined
      ? undefined
      : tlsUpgrader<Admission>(
          options.tls,
          options.handshakeTimeoutMs,
          (secure, admission) => {
            if (this.stopping) secure.destroy();
            else this.connections.add(new RmemConnection(this.polled(dataEventInput(secure)), this, admission));
          },
          (error, remote) => {
            this.log.info({ remote, err: error.message }, 'rmem client failed the TLS handshake; disconnecting');
          },
        );
    this.flowLimits = { maxRequests: options.maxInFlight, maxBytes: options.maxInFlightBytes };
    this.flowStats = newFlowStats();
    this.budget = new SharedBudget(options.maxInFlightBytesTotal, { reserveBytes: IDLE_RESERVE, waitersFirst: true });
    this.gate = new ConnectionGate('rmem', { maxConnections: options.maxConnections, maxConnectionsPerClient: options.maxConnectionsPerClient, handshakeTimeoutMs: options.handshakeTimeoutMs }, options.log);
    this.stats = { requests: {}, latency: new LatencyHistogram(), errors: {}, bytesRead: 0, bytesWritten: 0, connectionsAccepted: 0, protocolErrors: 0 };
    this.replyBuffers = new BufferPool({ perClass: 8, maxBytes: REPLY_POOL_BYTES });
    this.bodyBuffers = stagingPool(BODY_POOL_BYTES);
    this.drainDeadlineMs = options.drainDeadlineMs ?? DRAIN_DEADLINE_MS;
    this.sessions = new Map();
    this.connections = new Set();
    this.server = undefined;
    this.timer = undefined;
    this.stopping = false;
    this.bound = undefined;
    this.stalled = 0;
  }

  get address(): ListenAddress | undefined {
    return this.bound;
  }

  get leaseMs(): number {
    return this.options.leaseMs;
  }

  async listen(address: ListenAddress): Promise<ListenAddress> {
    const server = createServer({ pauseOnConnect: this.secure === undefined }, (socket) => {
      this.accept(socket);
    });
    this.bound = await listenOn(server, address, 'rmem', this.log);
    this.server = server;
    const tick = Math.max(25, Math.floor(this.options.leaseMs / 4));
    this.timer = setInterval(() => {
      this.checkLeases();
    }, tick);
    this.timer.unref();
    return this.bound;
  }

  /**
   * Stops accepting, lets requests in flight finish (for drainDeadlineMs at most: a
   * connection still busy then is cut), closes every connection. Regions are volatile
   * and go with the node.
   */
  async close(): Promise<void> {
    this.stopping = true;
    this.secure?.close();
    if (this.timer !== undefined) clearInterval(this.timer);
    const server = this.server;
    this.server = undefined;
    await closeServer(server, this.connections);
  }

  /** Connections, pauses and bytes in flight, for metrics. */
  load(): ServiceLoad {
    return serviceLoad(this.gate.stats, this.flowStats, this.budget, this.stalled);
  }

  /** Bytes read from clients and not parsed yet, across connections. */
  unparsedBytes(): number {
    let n = 0;
    for (const connection of this.connections) n += connection.unparsedBytes;
    return n;
  }

  isStopping(): boolean {
    return this.stopping;
  }

  writeLogOf(device: string): string | undefined {
    return this.options.writeLogOf?.(device);
  }

  /**
   * Ends every session whose server id begins with `prefix` (a guest's namespace, when its
   * processes are gone): their connections are closed and their regions freed at once,
   * not after a lease, so the guest's next boot can open its server ids again.
   */
  endSessionsOf(prefix: string): void {
    for (const session of [...this.sessions.values()]) {
      if (!session.serverId.startsWith(prefix)) continue;
      session.connection?.destroy('its guest ended');
      this.endSession(session, 'rmem session of a guest that ended closed; regions freed and zeroed');
    }
  }

  /** Every journal open on a connection: which device, which session, and the path it came in by. */
  holders(): JournalHolderJson[] {
    // A guest's handle on a device detached from it since is no longer a hold (it answers not found).
    return [...this.connections].flatMap((c) => c.openDevices().filter(({ device }) => c.scope?.devices().has(device) ?? true).map(({ device, epoch }) => ({
      device,
      serverId: c.serverId ?? '?',
      via: c.scope === undefined ? ('tcp' as const) : ('unix' as const),
      remote: c.remote,
      epoch,
    }))).sort((x, y) => x.device.localeCompare(y.device) || x.serverId.localeCompare(y.serverId));
  }

  sessionsInfo(now = Date.now()): SessionInfo[] {
    return [...this.sessions.values()]
      .sort((a, b) => a.serverId.localeCompare(b.serverId))
      .map((s) => ({
        serverId: s.serverId,
        sessionId: s.sessionId.toString(16).padStart(16, '0'),
        state: s.connection === undefined ? 'disconnected' : 'connected',
        remote: s.connection?.remote,
        since: new Date(s.since).toISOString(),
        expiresInMs: s.connection === undefined ? Math.max(0, s.disconnectedAt + this.options.leaseMs - now) : undefined,
      }));
  }

  hello(connection: RmemConnection, presented: string, token: string, secret: Buffer | undefined, scope: RmemScope | undefined): { serverId: string; tenancy: Tenancy; resumed: boolean; sessionId: bigint; leaseMs: number; nodeId: string; secret: Buffer } {
    let serverId = presented;
    if (scope !== undefined) {
      // A guest's socket is its credential; its server ids live in a namespace of its own.
      serverId = `${scope.serverPrefix}${presented}`;
    } else {
      if (presented.startsWith(GUEST_SERVER_PREFIX)) {
        throw new MisuseError('MS_RMEM_INVALID', `server ids beginning with "${GUEST_SERVER_PREFIX}" belong to guests' cut-through sockets`);
      }
      const expected = this.options.token;
      if (expected !== undefined && !sameBytes(Buffer.from(expected, 'utf8'), Buffer.from(token, 'utf8'))) {
        this.log.warn({ remote: connection.remote, server: serverId }, 'rmem HELLO with a wrong token refused');
        throw new MisuseError('MS_RMEM_AUTH', `server ${serverId} presented no valid token`);
      }
    }
    const now = Date.now();
    const reply = { leaseMs: this.options.leaseMs, nodeId: this.options.nodeId };
    const existing = this.sessions.get(serverId);
    if (existing !== undefined) {
      // The id alone names the session; only its secret shows the HELLO comes from whoever opened it.
      if (secret === undefined || !sameBytes(existing.secret, secret)) {
        this.log.warn({ remote: connection.remote, server: serverId, presented: secret !== undefined }, 'rmem HELLO for a live session without its secret refused');
        throw new MisuseError('MS_RMEM_SECRET', secret === undefined
          ? `server ${serverId} has a session; only a HELLO with that session's secret resumes it`
          : `server ${serverId} has a session and that is not its secret`);
      }
      const previous = existing.connection;
      existing.connection = connection;
      existing.lastSeen = now;
      if (previous !== undefined && previous !== connection) previous.destroy(`server ${serverId} connected again from ${connection.remote}`);
      this.log.info({ server: serverId, remote: connection.remote }, 'rmem session resumed');
      return { ...reply, serverId, tenancy: existing.tenancy, resumed: true, sessionId: existing.sessionId, secret: existing.secret };
    }
    // No session (or its lease ran out): a new one, whatever secret was presented.
    const tenancy = this.memory.open(serverId);
    const session: Session = { serverId, secret: randomBytes(SESSION_SECRET_SIZE), tenancy, sessionId: randomBytes(8).readBigUInt64BE(0), connection, lastSeen: now, since: now, disconnectedAt: 0 };
    this.sessions.set(serverId, session);
    this.log.info({ server: serverId, remote: connection.remote }, 'rmem session opened');
    return { ...reply, serverId, tenancy, resumed: false, sessionId: session.sessionId, secret: session.secret };
  }

  touch(serverId: string): void {
    const session = this.sessions.get(serverId);
    if (session !== undefined) session.lastSeen = Date.now();
  }

  closed(connection: RmemConnection): void {
    this.connections.delete(connection);
    const serverId = connection.serverId;
    if (serverId === undefined) return;
    const session = this.sessions.get(serverId);
    if (session === undefined || session.connection !== connection) return;
    session.connection = undefined;
    session.disconnectedAt = Date.now();
    if (!this.memory.holds(session.tenancy) && !connection.busy) {
      // Nothing to keep for a reconnect, and no BIND still running: the session ends now.
      this.endSession(session, 'rmem session closed');
      return;
    }
    this.log.info({ server: serverId, leaseMs: this.options.leaseMs }, 'rmem connection lost; regions kept for the lease');
  }

  /**
   * A guest's cut-through listener (issue 12): a Unix socket at `path` whose connections
   * reach only `scope`'s devices and server ids, with the service's own limits and budget;
   * they count as one client (the guest) for rmem.maxConnectionsPerClient.
   */
  async listenScoped(path: string, scope: RmemScope, maxConnections = Infinity): Promise<ScopedListener> {
    const own = new Set<RmemConnection>();
    const server = createServer({ pauseOnConnect: true }, (accepted) => {
      if (this.stopping) {
        accepted.destroy();
        return;
      }
      const input = ownBufferInput(accepted, { allowHalfOpen: false });
      const socket = input.socket;
      const admission = this.gate.admitScoped(socket, scope.client, own.size, maxConnections);
      if (admission === undefined) return;
      this.stats.connectionsAccepted++;
      const connection = new RmemConnection(this.polled(input), this, admission, scope);
      own.add(connection);
      this.connections.add(connection);
      socket.once('close', () => own.delete(connection));
    });
    await listenUnix(server, path, 'rmem cut-through', this.log);
    return {
      path,
      connections: () => own.size,
      holding: () => [...own].flatMap((c) => c.openDevices().map((j) => j.device)),
      close: () => closeServer(server, own),
    };
  }

  /** `input`, poking the busy poll with every chunk when the node polls. */
  private polled(input: SocketInput): SocketInput {
    return this.busyPoll?.input(input) ?? input;
  }

  /** A connection accepted paused when it is to be read into a buffer of its own (no TLS: a TLS session takes its socket over). */
  private accept(accepted: Socket): void {
    if (this.stopping) {
      accepted.destroy();
      return;
    }
    if (this.secure !== undefined) {
      const admission = this.gate.admit(accepted);
      if (admission === undefined) return;
      this.stats.connectionsAccepted++;
      this.secure.upgrade(accepted, admission);
      return;
    }
    const input = ownBufferInput(accepted, { allowHalfOpen: false });
    const admission = this.gate.admit(input.socket);
    if (admission === undefined) return;
    this.stats.connectionsAccepted++;
    this.connections.add(new RmemConnection(this.polled(input), this, admission));
  }


  private checkLeases(now = Date.now()): void {
    const lease = this.options.leaseMs;
    for (const session of this.sessions.values()) {
      if (session.connection !== undefined) {
        // Not read because others hold the budget is not lost: its turn comes as they give it back.
        if (now - session.lastSeen > lease && !session.connection.waitingOnService) {
          this.stalled++;
          session.connection.destroy(`no request or keepalive for ${lease} ms`);
        }
        continue;
      }
      if (now - session.disconnectedAt <= lease) continue;
      this.endSession(session, 'rmem lease expired; regions freed and zeroed');
    }
  }

  /** Forgets a session: its regions are unreachable at once, then freed and zeroed in turn. */
  private endSession(session: Session, message: string): void {
    this.sessions.delete(session.serverId);
    const serverId = session.serverId;
    this.memory.end(session.tenancy).then(
      ({ regions, keptAsideBytes }) => {
        this.log.info({ server: serverId, regions }, message);
        // Handed to no one until a later release zeroes them (memstrata_server_memory_kept_aside_bytes).
        if (keptAsideBytes > 0) this.log.error({ server: serverId, keptAsideBytes, keptAside: this.memory.keptAside().filter((k) => k.serverId === serverId) }, 'rmem session ended but zeroing some of its memory failed; those pages are kept aside');
      },
      (error: unknown) => {
        this.log.error({ server: serverId, err: error }, 'rmem session ended but freeing its regions failed');
      },
    );
  }
}

/** Constant-time comparison (the length is not secret). */
function sameBytes(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}
