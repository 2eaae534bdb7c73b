// One rmem connection: frames in, requests validated and served, replies out.
//
//   socket -> FrameParser -> RequestFlow (budget) -> serve(op) -> ServerMemory -> reply -> corked socket
//
// Requests on one connection run concurrently and their replies go out as they are
// ready, in any order; each carries its tag back. Replies made in one tick leave in one
// corked write.
//
// Invariants (bounded resources, docs/rmem-protocol.md section 1):
//   - a request holds budget from the moment the node commits memory to it until its
//     reply is in the kernel's hands: its cost is its body plus the largest reply it can
//     get (codec replySize). The connection's RequestFlow caps requests and bytes, and
//     the service's SharedBudget caps the bytes of all connections together;
//   - a body that spans socket chunks is reserved before the parser allocates it, for
//     its length plus the largest reply its op can get, so no body is assembled outside
//     the budget and the request it becomes starts at once (never holding budget while
//     waiting for more);
//   - until HELLO succeeds, bodies are at most HANDSHAKE_MAX_BODY and every frame is
//     priced at its body plus HANDSHAKE_REPLY_SIZE (a HELLO reply or an error, all it
//     can get), not at what its op could get in a session, and the connection has one
//     request in flight at most: a peer that has not been admitted makes the node hold
//     about 5 KiB at most, for handshakeTimeout at most. A
//     frame is priced once, at its header, and served as it was priced: one priced
//     before HELLO gets NO_SESSION even if HELLO succeeded meanwhile;
//   - reading stops while anything waits for budget or the socket's write buffer is above
//     its high-water mark (a client that does not read its replies stops being read).
//
// A malformed request gets an error reply and the connection carries on; a frame that
// breaks the framing (bad magic, oversized body) gets one PROTOCOL error with tag 0 and
// the connection is closed. Either way nothing outside this connection is disturbed.

import type { Policy } from '../protocol/journal/policy.js';
import type { Socket } from 'node:net';
import { MisuseError, RuntimeError, isMemstrataError } from '../errors.js';
import type { ServerMemory, ServerRegion, Tenancy } from '../memory/server-memory.js';
import type { DeviceManager } from '../nvram/device-manager.js';
import type { NvramDevice } from '../nvram/device.js';
import { MAX_TARGET_NAME } from '../protocol/journal/record.js';
import {
  decodeBindRequest,
  decodeEmpty,
  decodeFreeRequest,
  decodeHelloRequest,
  decodeReadRequest,
  decodeReadvRequest,
  decodeWriteRequest,
  decodeWritevRequest,
  encodeBindReply,
  encodeCapacityReply,
  encodeEmptyReply,
  encodeErrorReply,
  encodeHelloReply,
  HANDSHAKE_REPLY_SIZE,
  maxReplySize,
  replySize,
  writeResponseHeader,
  decodeJopenRequest,
  decodeJappendRequest,
  decodeJreadRequest,
  decodeHandleRequest,
  encodeJopenReply,
  encodeJappendReply,
  encodeJreadReply,
  encodeJinfoReply,
  type JournalInfo,
  type Tag, decodeJcreateRequest, decodeJremoveRequest } from '../protocol/rmem/codec.js';
import { statusOf } from '../protocol/rmem/errors.js';
import { FrameParser, type Frame } from '../protocol/rmem/parser.js';
import { HANDSHAKE_MAX_BODY, HEADER_SIZE, MAX_BODY, MAX_DATA, OP, OP_NAME, STATUS, VERSION } from '../protocol/rmem/spec.js';
import type { Logger } from '../logger.js';
import { PooledBodies, type BufferPool } from '../memory/buffer-pool.js';
import { CorkedWriter } from '../net/corked-writer.js';
import type { LatencyHistogram } from '../net/latency.js';
import { RequestFlow, type FlowLimits, type FlowStats, type SharedBudget } from '../net/request-flow.js';
import { ReadGate, type SocketInput } from '../net/socket-input.js';
import type { BusyPoll } from '../net/busy-poll.js';
import type { Admission } from '../net/connection-gate.js';

/** What a connection needs from the service that owns it. */
/**
 * What a guest's cut-through socket may reach (issue 12): its own NVRAM devices, and
 * server memory under server ids of its own (serverPrefix + the id it presents). The
 * socket is the credential: no token is asked.
 */
export interface RmemScope {
  /** Names the guest's connections for the connection gate and logs. */
  readonly client: string;
  readonly serverPrefix: string;
  devices(): ReadonlySet<string>;
  /** JCREATE: allocates a device for the guest within its quota, attached to it. */
  createDevice?: (name: string, size: number, policy: Policy) => Promise<void>;
  /** JREMOVE: removes a device the guest allocated itself. */
  removeDevice?: (name: string) => Promise<void>;
}

export interface ConnectionHost {
  /** Poked after each tick's replies go out, so the loop polls for the next request (node.busyPoll). */
  readonly busyPoll: BusyPoll | undefined;
  readonly memory: ServerMemory;
  readonly nvram: DeviceManager;
  /** The volume whose write log the device is, if any; such devices are not open to clients. */
  writeLogOf(device: string): string | undefined;
  readonly log: Logger;
  /** Per connection: requests and bytes in flight. */
  readonly flowLimits: FlowLimits;
  readonly flowStats: FlowStats;
  /** Bytes in flight on all connections together. */
  readonly budget: SharedBudget;
  readonly stats: RmemStats;
  /** Large reply buffers, reused across requests and connections. */
  readonly replyBuffers: BufferPool;
  /** Buffers JAPPEND bodies that span socket reads are assembled in (see bodyTarget). */
  readonly bodyBuffers: BufferPool;
  isStopping(): boolean;
  /** At shutdown, how long requests in flight may take before the connection is cut. */
  readonly drainDeadlineMs: number;
  /** Admits a HELLO; returns the session's tenancy and reply fields, or throws a coded error. */
  hello(connection: RmemConnection, serverId: string, token: string, secret: Buffer | undefined, scope: RmemScope | undefined): { serverId: string; tenancy: Tenancy; resumed: boolean; sessionId: bigint; leaseMs: number; nodeId: string; secret: Buffer };
  /** Notes traffic for the lease. */
  touch(serverId: string): void;
  closed(connection: RmemConnection): void;
}

export interface RmemStats {
  requests: Record<string, number>;
  /** Per operation, from the request's header to its reply handed to the kernel (budget waits and the body included). */
  latency: LatencyHistogram;
  errors: Record<string, number>;
  bytesRead: number;
  bytesWritten: number;
  connectionsAccepted: number;
  protocolErrors: number;
}

/** A parsed request, what it holds of the budget, and whether HELLO had succeeded when it was priced. */
interface Request {
  frame: Frame;
  cost: number;
  admitted: boolean;
  /** When its header was parsed (performance.now()). */
  received: number;
}

/** A reply ready to go: its buffers, and what to do once the kernel has them. */
interface Reply {
  parts: readonly Buffer[];
  written: (() => void) | undefined;
}

export class RmemConnection {
  readonly socket: Socket;
  private readonly input: SocketInput;
  private readonly reading: ReadGate;
  readonly remote: string;
  serverId: string | undefined;
  /** The session this connection serves, once HELLO succeeded; every memory request is checked against it. */
  private tenancy: Tenancy | undefined;
  private readonly host: ConnectionHost;
  private readonly admission: Admission;
  private readonly parser: FrameParser;
  private readonly flow: RequestFlow<Request>;
  private readonly writer: CorkedWriter;
  /** Journals opened on this connection: handle -> device and the epoch it was opened with. */
  private readonly journals: Map<number, { device: NvramDevice; epoch: number }>;
  /** JAPPEND bodies assembled in buffers of the service's pool. */
  private readonly pooledBodies: PooledBodies;
  private nextHandle: number;
  /** Bytes reserved for the body the parser is assembling (0: none). */
  private reserved: number;
  /** Whether that body was priced as a request of an admitted connection. */
  private reservedAdmitted: boolean;
  /** When the header of the body being admitted or read (admitBody) was parsed. */
  private bodyStartedAt: number;
  private resumeScheduled: boolean;
  private closing: boolean;
  private idle: (() => void) | undefined;
  /** A guest's cut-through connection: what it may reach. */
  readonly scope: RmemScope | undefined;

  constructor(input: SocketInput, host: ConnectionHost, admission: Admission, scope?: RmemScope) {
    const socket = input.socket;
    this.socket = socket;
    this.input = input;
    this.scope = scope;
    this.remote = scope === undefined ? `${socket.remoteAddress ?? '?'}:${socket.remotePort ?? 0}` : scope.client;
    this.serverId = undefined;
    this.tenancy = undefined;
    this.host = host;
    this.admission = admission;
    this.writer = new CorkedWriter(socket, host.busyPoll?.pokeFn);
    this.journals = new Map();
    this.pooledBodies = new PooledBodies(host.bodyBuffers);
    this.nextHandle = 1;
    this.reserved = 0;
    this.reservedAdmitted = false;
    this.bodyStartedAt = 0;
    this.resumeScheduled = false;
    this.closing = false;
    this.idle = undefined;
    // One small request at a time until HELLO succeeds; the service's limits after.
    // Reading pauses through the input (an own-buffer input pauses softly) while the flow
    // asks or the parser has stopped after a frame that queued.
    this.reading = new ReadGate(input, () => this.parser.waiting);
    this.flow = new RequestFlow<Request>(this.reading, { maxRequests: 1, maxBytes: HANDSHAKE_MAX_BODY + HANDSHAKE_REPLY_SIZE }, host.flowStats, (request) => {
      this.start(request);
    }, host.budget);
    this.parser = new FrameParser('request', {
      onFrame: (frame) => {
        this.onFrame(frame);
      },
      onFatal: (error) => {
        this.onFatal(error);
      },
      admitBody: (op, length) => this.admitBody(op, length),
      bodyTarget: (op, _word, _tagHi, _tagLo, length) => this.bodyTarget(op, length),
      // A frame that had to queue stops the parser: the rest of the chunk waits as bytes.
      accepting: () => this.flow.queued === 0,
    }, HANDSHAKE_MAX_BODY);
    socket.setNoDelay(true);
    input.listen({
      data: (chunk) => {
        this.parser.feed(chunk, input.transient);
      },
      end: () => undefined,
      // The rest of a body that spans reads is read straight into its buffer.
      target: () => this.parser.bodyRest(),
    });
    socket.on('error', (error) => {
      host.log.debug({ remote: this.remote, err: error }, 'rmem connection error');
    });
    socket.on('close', () => {
      this.closing = true;
      this.flow.close();
      host.closed(this);
    });
  }

  /** Bytes read from the client and not parsed yet: what its input read on while paused, and its parser's backlog. */
  get unparsedBytes(): number {
    return this.input.pendingBytes() + this.parser.backlogBytes;
  }

  /** True while requests of this connection are still being served or their replies written. */
  get busy(): boolean {
    return this.flow.inFlight > 0;
  }

  /**
   * True while this connection's next request waits only for room in the service's
   * budget and its client reads every reply it was sent: other connections hold it
   * back, not its own client (which may well be sending KEEPALIVEs the node does not
   * read meanwhile). Requests of its own still in flight (a slow BIND) do not change that.
   */
  get waitingOnService(): boolean {
    return this.socket.writableLength === 0 && this.flow.waitingOnService;
  }

  /**
   * Shutdown: stops reading, answers what was parsed but not started with SHUTDOWN, lets
   * requests in flight finish, then ends this side. Resolves once nothing is in flight or
   * the socket has closed, at the latest after the host's drainDeadlineMs: a client that
   * does not read its replies (or storage that does not answer) is cut then, and the
   * replies not yet sent are lost.
   */
  async drainAndClose(): Promise<void> {
    this.closing = true;
    for (const request of this.flow.close()) {
      const tag: Tag = { hi: request.frame.tagHi, lo: request.frame.tagLo };
      this.writer.write(encodeErrorReply(request.frame.op, STATUS.SHUTDOWN, tag, 'the node is stopping'), () => {
        this.host.stats.latency.since(OP_NAME[request.frame.op] ?? 'UNKNOWN', request.received);
      });
    }
    this.input.pause();
    if (this.flow.inFlight > 0 && !this.socket.destroyed) {
      const deadlineMs = this.host.drainDeadlineMs;
      const deadline = setTimeout(() => {
        this.destroy(`requests still in flight ${deadlineMs} ms after the shutdown began`);
      }, deadlineMs);
      deadline.unref();
      await new Promise<void>((resolve) => {
        this.idle = resolve;
        this.socket.once('close', resolve);
      });
      clearTimeout(deadline);
    }
    this.socket.end();
  }

  destroy(reason: string): void {
    this.host.log.info({ remote: this.remote, server: this.serverId, reason }, 'rmem connection closed by the node');
    this.closing = true;
    this.socket.destroy();
  }

  private onFatal(error: MisuseError): void {
    this.host.stats.protocolErrors++;
    this.host.log.warn({ remote: this.remote, server: this.serverId, err: error.message }, 'rmem stream lost its framing; closing the connection');
    this.writer.write(encodeErrorReply(0, STATUS.PROTOCOL, { hi: 0, lo: 0 }, error.message));
    this.closing = true;
    this.socket.end();
  }

  /**
   * Where the parser assembles a body that spans socket reads. A JAPPEND's comes from
   * the service's pool, and goes back once the device has its records (the handler's
   * end): a fresh buffer per request was garbage the size of everything appended. Any
   * other body gets a fresh buffer (undefined); JAPPENDW too, though NvramDevice.append
   * settles only after its own entries are read, so that a writer's retry never leans
   * on that alone.
   */
  private bodyTarget(op: number, length: number): Buffer | undefined {
    if (op !== OP.JAPPEND || this.tenancy === undefined) return undefined;
    return this.pooledBodies.take(length);
  }

  /** Budgets a body that spans chunks, and the largest reply its op can get, before the parser allocates it. */
  private admitBody(op: number, length: number): boolean {
    this.bodyStartedAt = performance.now();
    const admitted = this.tenancy !== undefined;
    const bytes = length + (admitted ? maxReplySize(op) : HANDSHAKE_REPLY_SIZE);
    const granted = this.flow.reserve(bytes, () => {
      this.reserved = bytes;
      this.reservedAdmitted = admitted;
      // The node reads this connection again after a wait its client could do nothing about.
      if (admitted && this.serverId !== undefined) this.host.touch(this.serverId);
      this.parser.resume();
    });
    if (granted) {
      this.reserved = bytes;
      this.reservedAdmitted = admitted;
    }
    return granted;
  }

  private onFrame(frame: Frame): void {
    const reserved = this.reserved;
    this.reserved = 0;
    // Priced at its header: a reserved body as it was reserved, any other frame now.
    const admitted = reserved > 0 ? this.reservedAdmitted : this.tenancy !== undefined;
    if (!this.closing) {
      const name = OP_NAME[frame.op] ?? 'UNKNOWN';
      this.host.stats.requests[name] = (this.host.stats.requests[name] ?? 0) + 1;
      // A frame read is traffic for the lease, whether it runs now or waits for budget.
      if (admitted && this.serverId !== undefined) this.host.touch(this.serverId);
    }
    // Pushed even while closing: until the flow is closed a reservation goes back through it
    // (start() ends the request at once); once closed, close() has given it back already.
    const cost = frame.body.length + (admitted ? replySize(frame.op, frame.body) : HANDSHAKE_REPLY_SIZE);
    // A body that spanned chunks was priced at its header (admitBody): count from there.
    const received = reserved > 0 ? this.bodyStartedAt : performance.now();
    this.flow.push({ frame, cost, admitted, received }, cost, reserved);
  }

  /** Runs a request the flow dispatched; its budget comes back once its reply is written. */
  private start(request: Request): void {
    const { frame } = request;
    const tag: Tag = { hi: frame.tagHi, lo: frame.tagLo };
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
    if (this.closing) {
      this.done(request);
      return;
    }
    if (frame.op === OP.READ && request.admitted) {
      const reply = this.readNow(frame, tag);
      if (reply !== undefined) {
        this.finish(request, reply);
        return;
      }
    }
    this.serve(frame, tag, request.admitted).then(
      (reply) => {
        this.finish(request, reply);
      },
      (error: unknown) => {
        this.finish(request, this.errorReply(frame.op, tag, error));
      },
    );
  }

  private finish(request: Request, reply: Reply): void {
    const last = reply.parts.length - 1;
    reply.parts.forEach((part, i) => {
      if (i < last) {
        this.writer.write(part);
        return;
      }
      this.writer.write(part, () => {
        reply.written?.();
        this.host.stats.latency.since(OP_NAME[request.frame.op] ?? 'UNKNOWN', request.received);
        this.done(request);
      });
    });
  }

  /** Gives a request's budget back; the last one out lets a drain finish. */
  private done(request: Request): void {
    this.flow.done(request.cost);
    if (this.flow.inFlight === 0 && this.idle !== undefined) this.idle();
  }

  private async serve(frame: Frame, tag: Tag, admitted: boolean): Promise<Reply> {
    if (this.host.isStopping()) throw new RuntimeError('MS_SHUTTING_DOWN', 'the node is stopping');
    const { op, body } = frame;
    if (op === OP.HELLO) return this.onHello(body, tag);
    const serverId = this.serverId;
    const tenancy = this.tenancy;
    // Priced before HELLO (for an error reply at most): served as such.
    if (!admitted || serverId === undefined || tenancy === undefined) {
      if (OP_NAME[op] === undefined) throw new MisuseError('MS_RMEM_UNSUPPORTED', `unknown operation ${op}`);
      throw new MisuseError('MS_RMEM_NO_SESSION', `${OP_NAME[op] ?? op} before HELLO`);
    }
    this.host.touch(serverId);
    const memory = this.host.memory;
    switch (op) {
      case OP.KEEPALIVE:
        decodeEmpty(body, 'KEEPALIVE');
        return one(encodeEmptyReply(OP.KEEPALIVE, tag));
      case OP.CAPACITY:
        decodeEmpty(body, 'CAPACITY');
        return one(encodeCapacityReply(tag, memory.capacity(tenancy)));
      case OP.BIND:
        return this.onBind(tenancy, body, tag);
      case OP.READ:
        return this.onRead(tenancy, body, tag);
      case OP.WRITE:
        return this.onWrite(tenancy, body, tag);
      case OP.READV:
        return this.onReadv(tenancy, body, tag);
      case OP.WRITEV:
        return this.onWritev(tenancy, body, tag);
      case OP.JOPEN: {
        const { name, epoch } = decodeJopenRequest(body);
        if (this.journals.size >= MAX_JOURNALS) throw new MisuseError('MS_NVRAM_INVALID', `at most ${MAX_JOURNALS} journals may be open on one connection`);
        // A guest's socket shows its own devices only; another's is as unknown as none.
        if (this.scope !== undefined && !this.scope.devices().has(name)) throw notFound(name);
        const device = this.host.nvram.get(name);
        const volume = this.host.writeLogOf(name);
        // Records there are replayed into the volume: only the node itself may write them.
        if (volume !== undefined) throw new MisuseError('MS_NVRAM_INVALID', `NVRAM device ${name} is the write log of volume ${volume} and is not open to clients`);
        // On a mirror replica, a newer epoch takes the device over (failover).
        await this.host.nvram.openJournal(name, epoch);
        // It may have become a write log while this open waited.
        const claimed = this.host.writeLogOf(name);
        if (claimed !== undefined) throw new MisuseError('MS_NVRAM_INVALID', `NVRAM device ${name} is the write log of volume ${claimed} and is not open to clients`);
        const handle = this.nextHandle++;
        this.journals.set(handle, { device, epoch });
        return one(encodeJopenReply(tag, handle, journalInfo(device)));
      }
      case OP.JAPPEND:
      case OP.JAPPENDW: {
        try {
          const { handle, entries, writer } = decodeJappendRequest(body, op === OP.JAPPENDW);
          const journal = this.journal(handle);
          for (const e of entries) {
            if (e.target !== undefined && Buffer.byteLength(e.target.volume) > MAX_TARGET_NAME) {
              throw new MisuseError('MS_NVRAM_INVALID', `target volume name longer than ${MAX_TARGET_NAME} bytes`);
            }
          }
          // JAPPENDW: entry i is the writer's number firstSeq + i; a number the device already took is answered, not appended.
          const appended = await journal.device.append(journal.epoch, writer === undefined ? entries : entries.map((e, i) => ({ ...e, writer: { id: writer.id, seq: writer.firstSeq + i } })));
          return one(encodeJappendReply(tag, appended, op));
        } finally {
          // The append has settled, and a device's append settles only once its own
          // entries are encoded or refused: nothing reads the payloads any more.
          this.pooledBodies.release(body);
        }
      }
      case OP.JREAD: {
        const request = decodeJreadRequest(body);
        const records = await this.journal(request.handle).device.read(request.fromSeq, Math.min(request.maxRecords, 4096), Math.min(request.maxBytes, MAX_DATA));
        return { parts: encodeJreadReply(tag, records), written: undefined };
      }
      case OP.JTRIM: {
        const { handle, value } = decodeHandleRequest(body, true, 'JTRIM');
        const journal = this.journal(handle);
        await journal.device.trim(journal.epoch, value);
        return one(encodeEmptyReply(OP.JTRIM, tag));
      }
      case OP.JINFO: {
        const { handle } = decodeHandleRequest(body, false, 'JINFO');
        return one(encodeJinfoReply(tag, journalInfo(this.journal(handle).device)));
      }
      case OP.JCREATE: {
        const { name, size, policy } = decodeJcreateRequest(body);
        if (this.scope?.createDevice === undefined) throw new MisuseError('MS_RMEM_UNSUPPORTED', 'JCREATE is for guests\' cut-through sockets; create devices with the admin API');
        await this.scope.createDevice(name, size, policy);
        return one(encodeEmptyReply(OP.JCREATE, tag));
      }
      case OP.JREMOVE: {
        const { name } = decodeJremoveRequest(body);
        if (this.scope?.removeDevice === undefined) throw new MisuseError('MS_RMEM_UNSUPPORTED', 'JREMOVE is for guests\' cut-through sockets; remove devices with the admin API');
        await this.scope.removeDevice(name);
        return one(encodeEmptyReply(OP.JREMOVE, tag));
      }
      case OP.FREE: {
        const request = decodeFreeRequest(body);
        await memory.free(tenancy, request.regionId, request.key);
        return one(encodeEmptyReply(OP.FREE, tag));
      }
      default:
        throw new MisuseError('MS_RMEM_UNSUPPORTED', `unknown operation ${op}`);
    }
  }

  private onHello(body: Buffer, tag: Tag): Promise<Reply> {
    // Another version is refused by the decoder (MS_RMEM_VERSION) before its body is read.
    const hello = decodeHelloRequest(body);
    if (this.serverId !== undefined) throw new MisuseError('MS_RMEM_NO_SESSION', `HELLO on a connection that already belongs to server ${this.serverId}`);
    const { tenancy, serverId, ...session } = this.host.hello(this, hello.serverId, hello.token, hello.secret, this.scope);
    this.serverId = serverId;
    this.tenancy = tenancy;
    // Admitted: full-size frames from here on, and the handshake deadline no longer applies.
    this.parser.maxBody = MAX_BODY;
    this.flow.setLimits(this.host.flowLimits);
    this.admission.handshakeDone();
    return Promise.resolve(one(encodeHelloReply(tag, { version: VERSION, maxBody: MAX_BODY, ...session })));
  }

  private async onBind(tenancy: Tenancy, body: Buffer, tag: Tag): Promise<Reply> {
    const request = decodeBindRequest(body);
    const region = await this.host.memory.bind(tenancy, request.size, request.placement);
    return one(encodeBindReply(tag, { regionId: region.id, key: region.key, size: region.size, ranges: [...region.ranges] }));
  }

  private async onRead(tenancy: Tenancy, body: Buffer, tag: Tag): Promise<Reply> {
    const request = decodeReadRequest(body);
    if (request.length > MAX_DATA) throw tooBig(request.length);
    const region = this.host.memory.lookup(tenancy, request.regionId, request.key);
    const reply = this.dataReply(OP.READ, tag, request.length);
    try {
      await this.host.memory.read(region, request.offset, reply.subarray(HEADER_SIZE, HEADER_SIZE + request.length));
    } catch (error) {
      this.host.replyBuffers.release(reply);
      throw error;
    }
    this.host.stats.bytesRead += request.length;
    return this.pooled(reply, HEADER_SIZE + request.length);
  }

  /**
   * A READ of server memory in DRAM (or in flash while its reads are fast), answered in
   * the tick it was parsed, without a promise (ServerMemory.readNow). Undefined: nothing
   * was sent, and the request takes the ordinary path, which also answers every error.
   */
  private readNow(frame: Frame, tag: Tag): Reply | undefined {
    const tenancy = this.tenancy;
    if (tenancy === undefined || this.serverId === undefined || this.host.isStopping()) return undefined;
    let reply: Buffer | undefined;
    try {
      const request = decodeReadRequest(frame.body);
      if (request.length > MAX_DATA) return undefined;
      const region = this.host.memory.lookup(tenancy, request.regionId, request.key);
      reply = this.dataReply(OP.READ, tag, request.length);
      if (!this.host.memory.readNow(region, request.offset, reply.subarray(HEADER_SIZE, HEADER_SIZE + request.length))) {
        this.host.replyBuffers.release(reply);
        return undefined;
      }
      this.host.touch(this.serverId);
      this.host.stats.bytesRead += request.length;
      return this.pooled(reply, HEADER_SIZE + request.length);
    } catch {
      if (reply !== undefined) this.host.replyBuffers.release(reply);
      return undefined;
    }
  }

  private async onWrite(tenancy: Tenancy, body: Buffer, tag: Tag): Promise<Reply> {
    const request = decodeWriteRequest(body);
    const region = this.host.memory.lookup(tenancy, request.regionId, request.key);
    await this.host.memory.write(region, request.offset, request.data);
    this.host.stats.bytesWritten += request.data.length;
    return one(encodeEmptyReply(OP.WRITE, tag));
  }

  private async onReadv(tenancy: Tenancy, body: Buffer, tag: Tag): Promise<Reply> {
    const entries = decodeReadvRequest(body);
    const total = entries.reduce((sum, e) => sum + e.length, 0);
    if (total > MAX_DATA) throw tooBig(total);
    // Every entry is checked before any is read: a READV is served whole or not at all.
    const regions = entries.map((e) => this.checkedRegion(tenancy, e.regionId, e.key, e.offset, e.length));
    const reply = this.dataReply(OP.READV, tag, total);
    let at = HEADER_SIZE;
    const reads: Promise<void>[] = [];
    for (const [i, e] of entries.entries()) {
      const region = regions[i];
      if (region !== undefined) reads.push(this.host.memory.read(region, e.offset, reply.subarray(at, at + e.length)));
      at += e.length;
    }
    // The buffer goes back to the pool only once no entry's read can still write into it.
    const failure = firstFailure(await Promise.allSettled(reads));
    if (failure !== undefined) {
      this.host.replyBuffers.release(reply);
      throw failure.reason;
    }
    this.host.stats.bytesRead += total;
    return this.pooled(reply, HEADER_SIZE + total);
  }

  private async onWritev(tenancy: Tenancy, body: Buffer, tag: Tag): Promise<Reply> {
    const { entries, data } = decodeWritevRequest(body);
    const regions = entries.map((e) => this.checkedRegion(tenancy, e.regionId, e.key, e.offset, e.length));
    let at = 0;
    const writes: Promise<void>[] = [];
    for (const [i, e] of entries.entries()) {
      const region = regions[i];
      if (region !== undefined) writes.push(this.host.memory.write(region, e.offset, data.subarray(at, at + e.length)));
      at += e.length;
    }
    // The reply (and the budget held by the body) waits for every entry, failed or not.
    const failure = firstFailure(await Promise.allSettled(writes));
    if (failure !== undefined) throw failure.reason;
    this.host.stats.bytesWritten += data.length;
    return one(encodeEmptyReply(OP.WRITEV, tag));
  }

  /** The devices this connection has journals open on, with the epoch of each. */
  openDevices(): { device: string; epoch: number }[] {
    const latest = new Map<string, number>();
    for (const j of this.journals.values()) latest.set(j.device.name, Math.max(latest.get(j.device.name) ?? 0, j.epoch));
    return [...latest].map(([device, epoch]) => ({ device, epoch }));
  }

  private journal(handle: number): { device: NvramDevice; epoch: number } {
    const journal = this.journals.get(handle);
    if (journal === undefined) throw new MisuseError('MS_NVRAM_INVALID', `journal handle ${handle} was not opened on this connection`);
    // Detached from the guest since it was opened: gone for this connection.
    if (this.scope !== undefined && !this.scope.devices().has(journal.device.name)) throw notFound(journal.device.name);
    // Checked on every use, not only at JOPEN: a device that became a volume's write log
    // after this handle was opened belongs to the node from then on.
    const volume = this.host.writeLogOf(journal.device.name);
    if (volume !== undefined) throw new MisuseError('MS_NVRAM_INVALID', `NVRAM device ${journal.device.name} is the write log of volume ${volume} and is not open to clients`);
    return journal;
  }

  private checkedRegion(tenancy: Tenancy, regionId: number, key: bigint, offset: number, length: number): ServerRegion {
    const region = this.host.memory.lookup(tenancy, regionId, key);
    if (offset < 0 || offset + length > region.size) {
      throw new MisuseError('MS_RMEM_RANGE', `offset ${offset} length ${length} lies outside region ${regionId} of ${region.size} bytes`);
    }
    return region;
  }

  private errorReply(op: number, tag: Tag, error: unknown): Reply {
    const status = statusOf(error);
    const name = OP_NAME[op] ?? 'UNKNOWN';
    this.host.stats.errors[name] = (this.host.stats.errors[name] ?? 0) + 1;
    const message = error instanceof Error ? error.message : String(error);
    if (!isMemstrataError(error) || status === STATUS.IO) {
      this.host.log.error({ remote: this.remote, server: this.serverId, op: name, err: error }, 'rmem request failed');
    }
    // A refused HELLO (token, version, secret) ends the connection; the client has nothing more to say.
    const refused = op === OP.HELLO && this.serverId === undefined && (status === STATUS.AUTH || status === STATUS.VERSION || status === STATUS.SECRET);
    if (refused) this.closing = true;
    return {
      parts: [encodeErrorReply(op, status, tag, message)],
      written: refused
        ? () => {
            this.socket.end();
          }
        : undefined,
    };
  }

  /** A data reply's buffer with its header written; the caller fills in the data. */
  private dataReply(op: number, tag: Tag, length: number): Buffer {
    const buf = this.host.replyBuffers.acquire(HEADER_SIZE + length);
    writeResponseHeader(buf, op, STATUS.OK, tag, length);
    return buf;
  }

  /** The first `length` bytes of a pooled buffer, given back once the kernel has them. */
  private pooled(buf: Buffer, length: number): Reply {
    return {
      parts: [buf.subarray(0, length)],
      written: () => {
        this.host.replyBuffers.release(buf);
      },
    };
  }
}

/** Open journal handles one connection may hold. */
const MAX_JOURNALS = 1024;

function one(buf: Buffer): Reply {
  return { parts: [buf], written: undefined };
}

function firstFailure(results: readonly PromiseSettledResult<void>[]): PromiseRejectedResult | undefined {
  for (const r of results) if (r.status === 'rejected') return r;
  return undefined;
}

function journalInfo(device: NvramDevice): JournalInfo {
  const info = device.info();
  return { epoch: info.epoch, size: info.size, used: info.used, firstSeq: info.firstSeq ?? 0, lastSeq: info.lastSeq ?? 0, policy: info.policy };
}

function tooBig(length: number): MisuseError {
  return new MisuseError('MS_RMEM_TOO_BIG', `${length} bytes of data in one request exceeds the limit of ${MAX_DATA}`);
}

function notFound(name: string): MisuseError {
  return new MisuseError('MS_NVRAM_NOT_FOUND', `no NVRAM device named "${name}"`, { details: { name } });
}
