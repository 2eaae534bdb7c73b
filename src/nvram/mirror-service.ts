// The mirror service (default 127.0.0.1:10811): the partner's end of the mirror link.
// It keeps replicas of the partner's mirrored devices in this node's nvram extents and
// answers each request only once the records are in memory here.
//
// Requests on one connection are applied one after another, in the order they came, so
// a RESET and the APPENDs sent after it land in that order. A connection must say HELLO
// (version, node id, token) first. A malformed frame ends the connection (its framing is
// lost); a malformed body gets a PROTOCOL reply and the connection goes on.
//
// Bounded resources, as for rmem (src/server/rmem-connection.ts): a ConnectionGate caps
// connections and closes one whose HELLO has not succeeded in time; until then bodies
// are at most MIRROR_HANDSHAKE_MAX_BODY and each frame is priced for an error reply at
// most (MIRROR_HANDSHAKE_REPLY_SIZE), whatever its op; a frame is priced once, at its
// header, and served as it was priced (one read before HELLO was applied is refused).
// Each connection's RequestFlow admits requests into the in-order chain only within its
// budget of requests and bytes (a request holds its body and the largest reply it can
// get until that reply is in the kernel's hands), one SharedBudget caps all connections
// together, plus IDLE_RESERVE for a connection with nothing in flight (so the partner's
// requests one at a time still move while others hold the budget), a body that spans
// chunks is reserved before it is allocated, and the socket is not read while anything
// waits or the replies are not being read.
//
// After HELLO a connection may be idle for as long as it likes (the partner's link is,
// between requests), but not stalled: one whose frame has begun and whose next byte does
// not come, or whose replies sit unread in its socket, for `stallTimeoutMs` is closed,
// so it cannot keep what it holds of the budget (a reserved body, unwritten replies)
// for longer. Replies leave in pieces of REPLY_PIECE, one after another, so a peer that
// reads a large reply slowly is seen to read it; a body must arrive at MIN_RATE at least
// after a grace of the stall timeout, so one that trickles a byte now and then cannot
// hold a large reservation for ever. A remote
// address may hold at most `maxConnectionsPerClient` connections, and a HELLO from a node
// id closes that node's older connections (what a partner left behind a partition, half
// open, would otherwise fill its share for good). One coarse timer, a quarter of the
// stall timeout, checks every connection.

import { createServer, type Server, type Socket } from 'node:net';
import { tlsUpgrader, type TlsFiles } from '../net/tls.js';
import { timingSafeEqual } from 'node:crypto';
import { MemstrataError, MisuseError, RuntimeError } from '../errors.js';
import type { Logger } from '../logger.js';
import { DRAIN_DEADLINE_MS, closeServer, listenOn } from '../net/listen.js';
import { CorkedWriter } from '../net/corked-writer.js';
import { ConnectionGate, type Admission } from '../net/connection-gate.js';
import { RequestFlow, SharedBudget, newFlowStats, type FlowLimits, type FlowStats } from '../net/request-flow.js';
import { ReadGate, dataEventInput, ownBufferInput, type SocketInput } from '../net/socket-input.js';
import type { BusyPoll } from '../net/busy-poll.js';
import { serviceLoad, type ServiceLoad } from '../net/service-load.js';
import { FrameParser, type Frame } from '../protocol/rmem/parser.js';
import { PooledBodies, stagingPool, type BufferPool } from '../memory/buffer-pool.js';
import type { ListenAddress } from '../units.js';
import {
  MIRROR_HANDSHAKE_MAX_BODY,
  MIRROR_HANDSHAKE_REPLY_SIZE,
  MIRROR_MAX_BODY,
  MIRROR_REQUEST_MAGIC,
  MIRROR_VERSION,
  MOP,
  MSTATUS,
  decodeAppend,
  decodeEpoch,
  decodeFetch,
  decodeHello,
  decodeName,
  decodeReset,
  decodeTrim,
  encodeName,
  encodeState,
  errorReply,
  maxMirrorReplySize,
  reply,
} from '../protocol/mirror/codec.js';
import type { DeviceManager } from './device-manager.js';
import { RECORD_FLAG } from '../protocol/journal/record.js';

const STATUS_OF: Partial<Record<string, number>> = {
  MS_MIRROR_PROTOCOL: MSTATUS.PROTOCOL,
  MS_MIRROR_AUTH: MSTATUS.AUTH,
  MS_NVRAM_NOT_FOUND: MSTATUS.NOT_FOUND,
  MS_NVRAM_FENCED: MSTATUS.FENCED,
  MS_NVRAM_NO_CAPACITY: MSTATUS.NO_CAPACITY,
  MS_NVRAM_INVALID: MSTATUS.PROTOCOL,
  MS_NVRAM_EXISTS: MSTATUS.CONFLICT,
  MS_NVRAM_REPLICA: MSTATUS.CONFLICT,
  MS_MIRROR_CONFLICT: MSTATUS.CONFLICT,
  MS_MIRROR_GAP: MSTATUS.GAP,
  MS_NVRAM_FULL: MSTATUS.FULL,
  MS_NVRAM_RECOVERING: MSTATUS.RECOVERING,
  MS_SHUTTING_DOWN: MSTATUS.SHUTDOWN,
};

export interface MirrorServiceOptions {
  /** Polls the event loop for a while after each chunk of input and each tick's replies (node.busyPoll); none: never. */
  busyPoll?: BusyPoll | undefined;
  nvram: DeviceManager;
  nodeId: string;
  token: string | undefined;
  /** The only node id a HELLO is accepted from (the configured partner); any when undefined. */
  partnerId?: string | undefined;
  /** Why a node may not mirror here (in a cluster that chooses partners: it is not a member); undefined to admit it. */
  refuse?: ((nodeId: string) => string | undefined) | undefined;
  log: Logger;
  /** Requests admitted per connection (applied in order, one at a time). */
  maxInFlight: number;
  /** Bytes in flight per connection: request bodies and replies not yet written. */
  maxInFlightBytes: number;
  /** Bytes in flight on all connections together. */
  maxInFlightBytesTotal: number;
  maxConnections: number;
  /** Connections open at once from one remote address. */
  maxConnectionsPerClient: number;
  /** The slowest a body may arrive, or a reply be read, after the stall grace (bytes/s); default MIN_RATE. */
  minRate?: number;
  /** A connection whose HELLO has not succeeded in this time is closed. */
  handshakeTimeoutMs: number;
  /** After HELLO, a connection whose frame or replies do not move for this long is closed. */
  stallTimeoutMs: number;
  /** At shutdown, how long the request being applied may take before its connection is cut (default DRAIN_DEADLINE_MS). */
  drainDeadlineMs?: number;
  /** TLS on every connection from the first byte (mirror.tls=require). */
  tls?: TlsFiles;
}

/** What a connection with nothing in flight may always take for one request, beyond the service budget. */
export const IDLE_RESERVE = 256 * 1024;

export class MirrorService {
  /** Destroys sockets still in their TLS handshake (at close). */
  private closeTls: () => void = () => undefined;
  private readonly options: MirrorServiceOptions;
  private server: Server | undefined;
  private readonly connections: Set<MirrorConnection>;
  readonly flowLimits: FlowLimits;
  readonly flowStats: FlowStats;
  readonly budget: SharedBudget;
  /** Buffers APPEND bodies are assembled in (see MirrorConnection.bodyTarget). */
  readonly bodyBuffers: BufferPool;
  readonly gate: ConnectionGate;
  address: ListenAddress | undefined;
  /** Requests served, for metrics. */
  served: number;
  /** Connections closed because they stalled, for metrics. */
  stalled: number;
  private timer: NodeJS.Timeout | undefined;

  constructor(options: MirrorServiceOptions) {
    this.options = options;
    this.server = undefined;
    this.connections = new Set();
    this.flowLimits = { maxRequests: options.maxInFlight, maxBytes: options.maxInFlightBytes };
    this.flowStats = newFlowStats();
    this.budget = new SharedBudget(options.maxInFlightBytesTotal, { reserveBytes: IDLE_RESERVE, waitersFirst: true });
    this.bodyBuffers = stagingPool(BODY_POOL_BYTES);
    this.gate = new ConnectionGate('mirror', { maxConnections: options.maxConnections, maxConnectionsPerClient: options.maxConnectionsPerClient, handshakeTimeoutMs: options.handshakeTimeoutMs }, options.log);
    this.address = undefined;
    this.served = 0;
    this.stalled = 0;
    this.timer = undefined;
  }

  /** Connections, pauses and bytes in flight, for metrics. */
  load(): ServiceLoad {
    return serviceLoad(this.gate.stats, this.flowStats, this.budget, this.stalled);
  }

  async listen(address: ListenAddress): Promise<ListenAddress> {
    const serve = (accepted: SocketInput, admission: Admission): void => {
      const input = this.options.busyPoll?.input(accepted) ?? accepted;
      const connection = new MirrorConnection(input, this.options, this, admission);
      this.connections.add(connection);
      input.socket.once('close', () => this.connections.delete(connection));
    };
    const tls = this.options.tls;
    // With TLS, an admitted socket goes through the handshake first (within the HELLO deadline).
    const secure = tls === undefined
      ? undefined
      : tlsUpgrader<Admission>(tls, this.options.handshakeTimeoutMs, (socket, admission) => {
          serve(dataEventInput(socket), admission);
        }, (error, remote) => {
          this.options.log.warn({ remote, err: error.message }, 'mirror client failed the TLS handshake; disconnecting');
        });
    this.closeTls = secure?.close ?? (() => undefined);
    // Without TLS, a connection is read into a buffer of its own (a TLS session takes its socket over).
    const server = createServer({ noDelay: true, pauseOnConnect: secure === undefined }, (accepted) => {
      if (secure !== undefined) {
        const admission = this.gate.admit(accepted);
        if (admission !== undefined) secure.upgrade(accepted, admission);
        return;
      }
      const input = ownBufferInput(accepted, { allowHalfOpen: false });
      const admission = this.gate.admit(input.socket);
      if (admission !== undefined) serve(input, admission);
    });
    this.server = server;
    this.address = await listenOn(server, address, 'mirror', this.options.log);
    const timeoutMs = this.options.stallTimeoutMs;
    this.timer = setInterval(() => {
      const now = performance.now();
      for (const connection of this.connections) if (connection.cutIfStalled(now, timeoutMs)) this.stalled++;
    }, Math.max(5, Math.floor(timeoutMs / 4)));
    this.timer.unref();
    return this.address;
  }

  /** Closes every connection of `nodeId` but `newest` (a HELLO from that node just succeeded on it). */
  replaced(newest: MirrorConnection, nodeId: string): void {
    for (const connection of this.connections) {
      if (connection !== newest && connection.partnerNode === nodeId) {
        this.options.log.warn({ partner: nodeId, remote: connection.socket.remoteAddress }, 'mirror partner connected again; closing its older connection');
        connection.socket.destroy();
      }
    }
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
    this.closeTls();
    await closeServer(this.server, this.connections);
    this.server = undefined;
  }
}

/** What the pool of APPEND bodies keeps. */
const BODY_POOL_BYTES = 8 * 1024 * 1024;
/** The slowest a body may arrive, or a reply be read, after the stall timeout's grace: 256 KiB/s. */
export const MIN_RATE = 256 * 1024;
/** Replies are handed to the socket in pieces of this size, each once the one before is taken. */
const REPLY_PIECE = 256 * 1024;

/** A parsed request, what it holds of the budget, and whether HELLO had been applied when it was priced. */
interface Request {
  frame: Frame;
  cost: number;
  admitted: boolean;
}

class MirrorConnection {
  readonly socket: Socket;
  private readonly input: SocketInput;
  private readonly reading: ReadGate;
  private readonly options: MirrorServiceOptions;
  private readonly service: MirrorService;
  private readonly admission: Admission;
  private readonly writer: CorkedWriter;
  private readonly parser: FrameParser;
  private readonly flow: RequestFlow<Request>;
  /** Requests admitted by the flow, applied strictly in order. */
  private chain: Promise<void>;
  /** Replies being written, in order, piece after piece. */
  private output: Promise<void>;
  /** When the reply being written began to be written (undefined: none), and its length. */
  private replySince: number | undefined;
  private replyLength: number;
  private partner: string | undefined;
  /** Bytes reserved for the body the parser is assembling (0: none). */
  private reserved: number;
  /** Whether that body was priced as a request of an admitted peer. */
  private reservedAdmitted: boolean;
  private resumeScheduled: boolean;
  private closing: boolean;
  /** When a byte last arrived, or the node last resumed reading (performance.now()). */
  private lastInput: number;
  /** When a reply was last handed to the socket or taken from it by the kernel. */
  private lastOutput: number;
  /** When the node began reading the reserved body of the frame being received (undefined: none), and its length. */
  private bodySince: number | undefined;
  private bodyLength: number;
  /** APPEND bodies in buffers of the service's pool. */
  private readonly pooledBodies: PooledBodies;

  constructor(input: SocketInput, options: MirrorServiceOptions, service: MirrorService, admission: Admission) {
    const socket = input.socket;
    this.socket = socket;
    this.input = input;
    this.options = options;
    this.service = service;
    this.admission = admission;
    this.writer = new CorkedWriter(socket, options.busyPoll?.pokeFn);
    this.chain = Promise.resolve();
    this.output = Promise.resolve();
    this.replySince = undefined;
    this.replyLength = 0;
    this.partner = undefined;
    this.reserved = 0;
    this.reservedAdmitted = false;
    this.resumeScheduled = false;
    this.closing = false;
    this.lastInput = performance.now();
    this.lastOutput = this.lastInput;
    this.bodySince = undefined;
    this.bodyLength = 0;
    this.pooledBodies = new PooledBodies(service.bodyBuffers);
    // One small request at a time until HELLO succeeds; the service's limits after.
    // Reading pauses through the input (an own-buffer input pauses softly) while the flow
    // asks or the parser has stopped after a frame that queued.
    this.reading = new ReadGate(input, () => this.parser.waiting);
    this.flow = new RequestFlow<Request>(this.reading, { maxRequests: 1, maxBytes: MIRROR_HANDSHAKE_MAX_BODY + MIRROR_HANDSHAKE_REPLY_SIZE }, service.flowStats, (request) => {
      this.admit(request);
    }, service.budget);
    this.parser = new FrameParser({ magic: MIRROR_REQUEST_MAGIC }, {
      onFrame: (f) => {
        const reserved = this.reserved;
        this.reserved = 0;
        this.bodySince = undefined;
        // Priced at its header: a reserved body as it was reserved, any other frame now.
        const admitted = reserved > 0 ? this.reservedAdmitted : this.partner !== undefined;
        // The parser copies what it keeps of a transient chunk (or the body is its own buffer), so holding the body until the request is applied is safe.
        const cost = f.body.length + (admitted ? maxMirrorReplySize(f.op) : MIRROR_HANDSHAKE_REPLY_SIZE);
        this.flow.push({ frame: f, cost, admitted }, cost, reserved);
      },
      bodyTarget: (op, _word, _tagHi, _tagLo, length) => this.bodyTarget(op, length),
      onFatal: (error) => {
        options.log.warn({ err: error, remote: socket.remoteAddress }, 'mirror connection sent a malformed frame; closing it');
        this.closing = true;
        socket.destroy();
      },
      admitBody: (op, length) => {
        // The body and the largest reply its op can get: the request then starts at once.
        const admitted = this.partner !== undefined;
        const bytes = length + (admitted ? maxMirrorReplySize(op) : MIRROR_HANDSHAKE_REPLY_SIZE);
        const granted = this.flow.reserve(bytes, () => {
          this.reserved = bytes;
          this.reservedAdmitted = admitted;
          this.bodySince = performance.now();
          this.bodyLength = length;
          this.parser.resume();
        });
        if (granted) {
          this.reserved = bytes;
          this.reservedAdmitted = admitted;
          this.bodySince = performance.now();
          this.bodyLength = length;
        }
        return granted;
      },
      // A frame that had to queue stops the parser: the rest of the chunk waits as bytes.
      accepting: () => this.flow.queued === 0,
    }, MIRROR_HANDSHAKE_MAX_BODY);
    input.listen({
      data: (chunk) => {
        this.lastInput = performance.now();
        this.parser.feed(chunk, input.transient);
      },
      end: () => undefined,
      // The rest of a body that spans reads is read straight into its buffer.
      target: () => this.parser.bodyRest(),
    });
    socket.on('error', () => undefined);
    socket.once('close', () => {
      this.closing = true;
      this.flow.close();
    });
  }

  /**
   * Shutdown: stops reading, lets the request being applied finish (those admitted after
   * it are dropped unanswered), then ends this side. Resolves once the chain is idle or
   * the socket has closed, at the latest after drainDeadlineMs: a request stuck in
   * storage must not keep the node from stopping.
   */
  async drainAndClose(): Promise<void> {
    this.closing = true;
    this.flow.close();
    this.input.pause();
    if (!this.socket.destroyed) {
      const deadlineMs = this.options.drainDeadlineMs ?? DRAIN_DEADLINE_MS;
      const deadline = setTimeout(() => {
        this.options.log.warn({ partner: this.partner, remote: this.socket.remoteAddress, deadlineMs }, 'mirror connection still busy at the shutdown deadline; cutting it');
        this.socket.destroy();
      }, deadlineMs);
      deadline.unref();
      await new Promise<void>((resolve) => {
        this.chain.then(resolve, resolve);
        this.socket.once('close', resolve);
      });
      clearTimeout(deadline);
    }
    this.socket.end();
  }

  get partnerNode(): string | undefined {
    return this.partner;
  }

  /**
   * Closes the connection if it stalled after HELLO: a frame begun whose next byte has
   * not come, or replies its peer has not taken, for `timeoutMs`. Time the node itself
   * spends not reading (waiting for budget) does not count. True if it was closed.
   */
  cutIfStalled(now: number, timeoutMs: number): boolean {
    if (this.closing || this.partner === undefined || this.socket.destroyed) return false;
    if (this.input.isPaused()) this.lastInput = now;
    const frame = this.parser.midFrame && now - this.lastInput > timeoutMs;
    const replies = this.socket.writableLength > 0 && now - this.lastOutput > timeoutMs;
    const rate = this.options.minRate ?? MIN_RATE;
    const slow = this.bodySince !== undefined && now - this.bodySince > timeoutMs + (this.bodyLength / rate) * 1000;
    const slowReply = this.replySince !== undefined && now - this.replySince > timeoutMs + (this.replyLength / rate) * 1000;
    if (!frame && !replies && !slow && !slowReply) return false;
    const stalled = frame ? 'frame' : replies ? 'replies' : slow ? 'slow body' : 'slow reader';
    this.options.log.warn({ partner: this.partner, remote: this.socket.remoteAddress, timeoutMs, stalled }, {
      frame: 'mirror connection began a frame and sent nothing more; closing it',
      replies: 'mirror connection does not read its replies; closing it',
      'slow body': `mirror connection sends a frame slower than ${rate / 1024} KiB/s; closing it`,
      'slow reader': `mirror connection reads a reply slower than ${rate / 1024} KiB/s; closing it`,
    }[stalled]);
    this.closing = true;
    this.socket.destroy();
    return true;
  }

  /**
   * Where the parser puts an admitted peer's APPEND body (one that spans reads, or one
   * whole in a read the socket input reuses): a buffer from the service's pool, back once
   * the replica has placed the records (see handle). A fresh buffer per APPEND was
   * garbage the size of everything mirrored: the partner ran a full collection every few
   * hundred milliseconds for it. A body a closed connection leaves behind is not pooled
   * again (the socket may still read into it).
   */
  private bodyTarget(op: number, length: number): Buffer | undefined {
    if (op !== MOP.APPEND || this.partner === undefined) return undefined;
    return this.pooledBodies.take(length);
  }

  /** A request the flow admitted joins the chain; its budget comes back once its reply is written. */
  private admit(request: Request): void {
    if (this.parser.waiting && this.flow.queued === 0 && !this.resumeScheduled) {
      // The queue has drained: parse the rest, outside the flow's dispatch loop.
      this.resumeScheduled = true;
      queueMicrotask(() => {
        this.resumeScheduled = false;
        if (this.closing) return;
        this.parser.resume();
        this.reading.update();
      });
    }
    this.chain = this.chain.then(async () => {
      if (this.closing) {
        this.flow.done(request.cost);
        return;
      }
      const { buf, last } = await this.serve(request.frame, request.admitted);
      this.lastOutput = performance.now();
      this.send(buf, () => { this.flow.done(request.cost); });
      if (last) void this.output.then(() => this.socket.end());
    });
  }

  /**
   * Writes a reply after those before it, REPLY_PIECE at a time, each piece once the
   * kernel took the one before, so that a reply read slowly shows progress; `done` runs
   * once the whole reply is in the kernel's hands (or the socket is gone).
   */
  private send(buf: Buffer, done: () => void): void {
    const piece = (part: Buffer): Promise<void> =>
      new Promise<void>((resolve) => {
        this.writer.write(part, () => {
          this.lastOutput = performance.now();
          resolve();
        });
      });
    this.output = this.output.then(async () => {
      this.replySince = performance.now();
      this.replyLength = buf.length;
      for (let at = 0; at < buf.length; at += REPLY_PIECE) await piece(buf.subarray(at, at + REPLY_PIECE));
      this.replySince = undefined;
      done();
    });
  }

  /** The reply to one request, and whether it is the last this connection gets. */
  private async serve(f: Frame, admitted: boolean): Promise<{ buf: Buffer; last: boolean }> {
    const tag = f.tagLo;
    try {
      const body = await this.handle(f.op, f.body, admitted);
      this.service.served++;
      return { buf: reply(f.op, MSTATUS.OK, tag, body), last: false };
    } catch (error) {
      const status = error instanceof MemstrataError ? (STATUS_OF[error.code] ?? MSTATUS.IO) : MSTATUS.IO;
      const message = error instanceof Error ? error.message : String(error);
      if (status === MSTATUS.IO) this.options.log.error({ err: error, partner: this.partner }, 'mirror request failed');
      // A refused HELLO, or anything read before one succeeded, ends the connection.
      const last = status === MSTATUS.AUTH || (status === MSTATUS.PROTOCOL && (!admitted || this.partner === undefined));
      if (last) this.closing = true;
      return { buf: errorReply(f.op, status, tag, message), last };
    }
  }

  private async handle(op: number, body: Buffer, admitted: boolean): Promise<Buffer | undefined> {
    const { nvram } = this.options;
    if (op === MOP.HELLO) return this.hello(body);
    // Priced before HELLO was applied (for an error reply at most): served as such.
    if (!admitted || this.partner === undefined) throw new MisuseError('MS_MIRROR_PROTOCOL', 'HELLO must come first on a mirror connection, and nothing may follow it before its reply');
    switch (op) {
      case MOP.STATE: {
        const device = nvram.find(decodeName(body, 'STATE'));
        if (device === undefined) return encodeState(undefined);
        const info = device.info();
        return encodeState({ role: device.role, policy: device.policy, recovering: device.recovering, size: device.size, epoch: device.epoch, trimmedTo: device.trimPoint, lastSeq: info.lastSeq ?? 0 });
      }
      case MOP.RESET: {
        const reset = decodeReset(body);
        // This connection feeds the replica from now on; APPENDs of older ones are refused.
        await nvram.resetReplica(reset, this);
        this.options.log.info({ device: reset.name, partner: this.partner, epoch: reset.epoch, firstSeq: reset.firstSeq }, 'mirror resync of a replica started');
        return undefined;
      }
      case MOP.APPEND: {
        try {
          const { name, epoch, records, encoded } = decodeAppend(body);
          if (records.some((r) => (r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) !== 0)) {
            throw new MisuseError('MS_MIRROR_PROTOCOL', 'malformed mirror frame: APPEND carries an epoch or trim marker');
          }
          await nvram.get(name).replicate(epoch, records, encoded, this);
          return undefined;
        } finally {
          // The replica has copied the records (replicate settles once every place did).
          this.pooledBodies.release(body);
        }
      }
      case MOP.TRIM: {
        const { name, epoch, upTo } = decodeTrim(body);
        const device = nvram.get(name);
        if (device.role !== 'replica') throw new RuntimeError('MS_MIRROR_CONFLICT', `device ${name} is a primary here`);
        if (!device.acceptsFrom(this)) throw new RuntimeError('MS_MIRROR_CONFLICT', `replica ${name} was reset from a newer mirror connection; trims from an older one are refused`);
        await device.trim(epoch, upTo);
        return undefined;
      }
      case MOP.EPOCH: {
        const { name, epoch } = decodeEpoch(body);
        const device = nvram.get(name);
        if (device.role !== 'replica') throw new RuntimeError('MS_MIRROR_CONFLICT', `device ${name} is a primary here`);
        device.raiseEpoch(epoch);
        return undefined;
      }
      case MOP.DROP: {
        const name = decodeName(body, 'DROP');
        const device = nvram.find(name);
        if (device?.role === 'replica') await nvram.remove(name);
        return undefined;
      }
      case MOP.FETCH: {
        const { name, fromSeq, maxBytes } = decodeFetch(body);
        const device = nvram.get(name);
        if (device.recovering) throw new RuntimeError('MS_NVRAM_RECOVERING', `device ${name} is recovering here and has nothing to give`);
        return Buffer.concat(await device.collect(fromSeq, Number.MAX_SAFE_INTEGER, Math.min(maxBytes, MIRROR_MAX_BODY / 2)));
      }
      default:
        throw new MisuseError('MS_MIRROR_PROTOCOL', `unknown mirror operation ${op}`);
    }
  }

  private hello(body: Buffer): Buffer {
    const hello = decodeHello(body);
    if (hello.version !== MIRROR_VERSION) throw new MisuseError('MS_MIRROR_PROTOCOL', `mirror protocol version ${hello.version} is not supported; this node speaks ${MIRROR_VERSION}`);
    const expected = this.options.token;
    if (expected !== undefined) {
      const a = Buffer.from(hello.token);
      const b = Buffer.from(expected);
      if (a.length !== b.length || !timingSafeEqual(a, b)) throw new MisuseError('MS_MIRROR_AUTH', `mirror partner ${hello.nodeId} presented the wrong token`);
    }
    const partnerId = this.options.partnerId;
    if (partnerId !== undefined && hello.nodeId !== partnerId) {
      throw new MisuseError('MS_MIRROR_AUTH', `mirror peer says it is node ${hello.nodeId}; only the configured partner ${partnerId} (mirror.partnerId) is accepted`);
    }
    const refused = this.options.refuse?.(hello.nodeId);
    if (refused !== undefined) throw new MisuseError('MS_MIRROR_AUTH', `mirror peer ${hello.nodeId} is not admitted: ${refused}`);
    this.partner = hello.nodeId;
    // A node has one link: its older connections are what a partition or a crash left.
    this.service.replaced(this, hello.nodeId);
    // Admitted: full-size frames from here on, and the handshake deadline no longer applies.
    this.parser.maxBody = MIRROR_MAX_BODY;
    this.flow.setLimits(this.service.flowLimits);
    this.admission.handshakeDone();
    this.options.log.info({ partner: hello.nodeId, remote: this.socket.remoteAddress }, 'mirror partner connected');
    return encodeName(this.options.nodeId);
  }
}
