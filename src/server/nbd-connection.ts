// One NBD connection: fixed newstyle handshake, option haggling, then transmission.
//
//   greeting -> client flags -> options (LIST, INFO, GO, EXPORT_NAME, STRUCTURED_REPLY,
//   LIST/SET_META_CONTEXT, STARTTLS, ABORT; others NBD_REP_ERR_UNSUP) -> requests -> end
//
// TLS (nbd.tls, proto.md "TLS support"): `off` answers STARTTLS with NBD_REP_ERR_POLICY
// (NOTLS); `on` upgrades when the client asks; `require` (FORCEDTLS) answers every option
// but STARTTLS and ABORT with NBD_REP_ERR_TLS_REQD, and drops a client that sends
// EXPORT_NAME, until TLS is up. STARTTLS is answered with NBD_REP_ACK; once the ACK has
// reached the kernel, this connection lets go of the socket (its listeners removed,
// nothing more parsed: a client must wait for the ACK before its TLS hello) and the host
// wraps it in TLS and starts a new connection on it, in option haggling, with no state of
// this one but the client flags (the spec asks that no negotiation state survive).
//
//   socket input -> parser -> READ/FLUSH/... header -> flow.push --> dispatch: served
//                           -> WRITE header -> flow.reserve -> payload read -> flow.push
//                    parser held <-- while a request or a reservation waits for budget
//   reply handed to the kernel (write callback) -> flow.done(cost) -> next request
//
// Invariants:
//   - bounded memory: every request is admitted by the RequestFlow (its connection's
//     budget and the service's SharedBudget) before any memory is taken for it. A
//     WRITE's payload is reserved at its header and read only once the reservation is
//     granted, into a buffer of its own; a READ's reply buffer is allocated when it is
//     dispatched. A request's cost (costOf: its payload, its reply, what storage keeps
//     while working on it, a fixed overhead) is kept in request.cost and given back
//     only when its reply has been handed to the kernel. While a request waits for
//     budget the parser holds and the socket is not read, so a client can make one
//     connection hold its budget, plus one socket chunk kept unparsed, plus the header
//     waiting; and all its connections together the service budget, plus a small
//     reserve each (net/request-flow.ts). An option longer than the parser keeps is
//     dropped as it arrives and answered NBD_REP_ERR_TOO_BIG.
//   - a responsive event loop: storage work that can complete without I/O (long
//     TRIM/WRITE_ZEROES in 64 MiB pieces, BLOCK_STATUS walks of at most 128 MiB, CACHE)
//     waits for a turn of its own (TurnQueue), and at most the service's zeroSlots
//     zeroing pieces are in storage at once.
//   - every request admitted gets exactly one reply, unless the socket is gone; replies
//     go out as requests complete, batched per tick in one corked write.
//   - ending: after NBD_CMD_DISC, after the client's EOF (libnbd half-closes after
//     DISC), or at shutdown, the requests already received are all answered before this
//     side ends; the socket is half-open capable so the client's FIN does not end it
//     first (proto.md: "The server MUST handle all outstanding requests"). At shutdown,
//     requests not yet served (waiting for budget included: they are charged their
//     header only from then on) and any that arrive meanwhile get NBD_ESHUTDOWN.
//   - one validator (validate) runs before any backend; one function (errnoOf) maps
//     errors to NBD errnos. A client that breaks the framing, or sets client flags we
//     did not offer, is disconnected (hangUp: nothing more of its input is parsed, not
//     even the rest of the chunk at hand); nothing it sends can disturb another
//     connection.
//
// Known limits: a connection that never reads its replies keeps its budget until it
// closes (its requests stop being read, others go on); structured replies carry each
// READ in one chunk; base:allocation is the only meta context.

import type { Socket } from 'node:net';
import { isMemstrataError } from '../errors.js';
import type { Logger } from '../logger.js';
import type { Admission } from '../net/connection-gate.js';
import type { LatencyHistogram } from '../net/latency.js';
import { DRAIN_DEADLINE_MS } from '../net/listen.js';
import { RequestFlow, type FlowLimits, type FlowSocket, type FlowStats, type SharedBudget } from '../net/request-flow.js';
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  encodeBlockStatus,
  encodeExportNameReply,
  encodeGreeting,
  encodeOffsetDataHead,
  encodeOptionError,
  encodeOptionReply,
  encodeSimpleReply,
  encodeStructuredError,
  infoBlockSizePayload,
  infoExportPayload,
  infoStringPayload,
  metaContextPayload,
  serverPayload,
} from '../protocol/nbd/codec.js';
import { NbdServerParser, type NbdRequest } from '../protocol/nbd/parser.js';
import {
  BASE_ALLOCATION,
  BASE_ALLOCATION_ID,
  BLOCK,
  CLIENT,
  CMD,
  CMD_FLAG,
  CMD_NAME,
  ERRNO,
  FLAG,
  HANDSHAKE,
  INFO,
  MAX_OPTION_LENGTH,
  OPT,
  OPT_NAME,
  REP,
} from '../protocol/nbd/spec.js';
import type { Volume } from '../storage/volume-manager.js';
import type { CacheViews, VolumeIo } from '../storage/volume-io.js';
import type { BufferPool } from '../memory/buffer-pool.js';
import { CorkedWriter } from '../net/corked-writer.js';
import type { SocketInput } from '../net/socket-input.js';
import type { BusyPoll } from '../net/busy-poll.js';
import type { Semaphore } from './semaphore.js';
import type { TurnQueue } from './turn-queue.js';

/** The exports a connection may see: every volume (the TCP service), or a guest's own (its cut-through socket). */
export interface ExportCatalog {
  list(): Volume[];
  /** The volume an export name selects ("" the default), or undefined: an unknown export. */
  find(name: string): Volume | undefined;
}

export interface NbdHost {
  /** Poked after each tick's replies go out, so the loop polls for the next request (node.busyPoll). */
  readonly busyPoll: BusyPoll | undefined;
  readonly volumes: ExportCatalog;
  /** TLS on this service: undefined answers STARTTLS with NBD_REP_ERR_POLICY. */
  readonly tls: { require: boolean; upgrade(socket: Socket, state: { noZeroes: boolean }, admission: Admission): void } | undefined;
  readonly io: VolumeIo;
  /** READ and WRITE payload buffers from 4 KiB up, reused once the socket has written them or the request is done. */
  readonly payloadBuffers: BufferPool;
  readonly log: Logger;
  readonly stats: NbdStats;
  /** Requests and bytes in flight per connection. */
  readonly limits: FlowLimits;
  /** Bytes in flight across the service's connections. */
  readonly budget: SharedBudget;
  readonly flowStats: FlowStats;
  /** Turns of the event loop for CPU-bound storage steps (zeroing pieces, BLOCK_STATUS walks, CACHE), one per iteration. */
  readonly turns: TurnQueue;
  /** Pieces of long TRIMs and WRITE_ZEROES in storage at once, across the service. */
  readonly zeroSlots: Semaphore;
  isStopping(): boolean;
  closed(connection: NbdConnection): void;
}

export interface NbdStats {
  commands: Record<string, number>;
  /** Per command, from the request's header to its reply handed to the kernel (budget waits and a WRITE's payload included). */
  latency: LatencyHistogram;
  errors: Record<string, number>;
  bytesRead: number;
  bytesWritten: number;
  handshakes: number;
  protocolErrors: number;
}

/**
 * Which command flags each command accepts. FUA is valid on every command once
 * NBD_FLAG_SEND_FUA is advertised, which it always is here: "the server MUST accept all
 * commands with this bit set (even by ignoring the bit)" (proto.md, Command flags).
 */
const ALLOWED_FLAGS: Readonly<Record<number, number>> = {
  [CMD.READ]: CMD_FLAG.FUA | CMD_FLAG.DF,
  [CMD.WRITE]: CMD_FLAG.FUA,
  [CMD.DISC]: CMD_FLAG.FUA,
  [CMD.FLUSH]: CMD_FLAG.FUA,
  [CMD.TRIM]: CMD_FLAG.FUA,
  [CMD.CACHE]: CMD_FLAG.FUA,
  [CMD.WRITE_ZEROES]: CMD_FLAG.FUA | CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO,
  [CMD.BLOCK_STATUS]: CMD_FLAG.FUA | CMD_FLAG.REQ_ONE,
};

/** What a request holds besides its data: the parsed request, its promise, reply headers, an error text. */
const REQUEST_OVERHEAD = 512;
/**
 * BLOCK_STATUS looks at no more than this much of the export per request (the spec lets a
 * reply cover less; the client asks again from where it ends): storage walks it at once.
 */
export const BLOCK_STATUS_SPAN = 128 * 1024 * 1024;
/** Descriptors in one BLOCK_STATUS reply at most (the spec asks for no more than 2^20). */
const MAX_EXTENTS = 8192;
/** A TRIM or WRITE_ZEROES up to this long goes to storage in one call, at once. */
const ZERO_DIRECT = 1024 * 1024;
/**
 * READs from this size on send the cache lines they cover whole from the cache's own
 * memory when it can (readViews; the parts of lines at their ends are copied): the copy
 * into a reply buffer cost the node a fifth of its time on 1 MiB reads, while for a few
 * KiB it costs less than lending the memory out.
 */
const READ_VIEW_MIN = 64 * 1024;
/** A longer one goes in pieces of this size, one after another, each in one of the service's zeroing slots. */
const ZERO_PIECE = 64 * 1024 * 1024;
/**
 * What storage holds while it zeroes, per 64 KiB line or chunk of the range it has at once
 * (a lock, its closure, promises): about 4 KiB, measured (128 pieces of 64 MiB in storage
 * at once grew the node by 572 MiB). A zeroing request is charged for ZERO_DIRECT at most:
 * a longer one has no more than one piece in storage, and only in a zeroing slot.
 */
const ZERO_BOOKKEEPING_PER_64K = 4096;
/** What storage may hold for one CACHE request: DirectVolumeIo reads the range through a buffer of up to 1 MiB. */
const PREFETCH_WORKING_SET = 1024 * 1024;
/** After this side has ended, how long the client has to close its side before the socket is destroyed. */
const LINGER_MS = 2000;
/** Event-loop turns without input a connection waits at shutdown before it ends its side. */
const QUIET_ROUNDS = 2;

/**
 * The bytes a request makes the node hold from admission until its reply is in the
 * kernel's hands: its payload or reply, and what storage keeps while it works on it.
 */
function costOf(request: NbdRequest): number {
  switch (request.type) {
    case CMD.WRITE:
      return REQUEST_OVERHEAD + request.length;
    case CMD.READ:
      // A READ over the maximum is refused without a reply buffer.
      return REQUEST_OVERHEAD + (request.length <= BLOCK.MAX ? request.length : 0);
    case CMD.BLOCK_STATUS:
      return REQUEST_OVERHEAD + 4 + 8 * MAX_EXTENTS;
    case CMD.CACHE:
      return REQUEST_OVERHEAD + Math.min(request.length, PREFETCH_WORKING_SET);
    case CMD.TRIM:
    case CMD.WRITE_ZEROES:
      return REQUEST_OVERHEAD + Math.ceil(Math.min(request.length, ZERO_DIRECT) / 65536) * ZERO_BOOKKEEPING_PER_64K;
    default:
      return REQUEST_OVERHEAD;
  }
}

/** What a request costs once it is only to be refused (at shutdown): its header, and a WRITE payload already read. */
function refusedCostOf(request: NbdRequest): number {
  return REQUEST_OVERHEAD + request.data.length;
}

/** The description of an export for people, the same in NBD_REP_SERVER and NBD_INFO_DESCRIPTION. */
function describe(volume: Volume): string {
  return `memstrata volume ${volume.name}, ${volume.size} bytes${volume.readOnly ? ', read-only' : ''}`;
}

class NbdError extends Error {
  readonly errno: number;
  constructor(errno: number, message: string) {
    super(message);
    this.errno = errno;
  }
}

/** How a connection starts: on a fresh socket (greeting first), or on a socket upgraded to TLS (in option haggling). */
export interface NbdStart {
  secure: boolean;
  /** The client flags of the session before the upgrade. */
  noZeroes?: boolean;
}

export class NbdConnection {
  readonly socket: Socket;
  readonly remote: string;
  /** The session runs over TLS. */
  readonly secure: boolean;
  /** STARTTLS was answered: the socket belongs to the TLS connection that follows. */
  private handedOver: boolean;
  private readonly input: SocketInput;
  private readonly listeners: { data: (chunk: Buffer) => void; end: () => void; error: (error: Error) => void; close: () => void };
  private readonly host: NbdHost;
  private readonly admission: Admission;
  private readonly parser: NbdServerParser;
  private readonly writer: CorkedWriter;
  private readonly flow: RequestFlow<NbdRequest>;
  private noZeroes: boolean;
  private structured: boolean;
  /** The export the last SET_META_CONTEXT named, if it selected base:allocation. */
  private metaVolume: Volume | undefined;
  private baseAllocation: boolean;
  private volume: Volume | undefined;
  /** A WRITE whose header has been parsed and whose payload has not: waiting for its reservation, arriving, or being dropped. */
  private receiving: NbdRequest | undefined;
  /** Bytes the flow has reserved, or is to reserve, for `receiving` (0 for a refused WRITE whose payload is dropped). */
  private receivingReserved: number;
  /** What the flow asks of the socket. */
  private flowPaused: boolean;
  /** Option replies back up in the socket: stop reading options until they drain. */
  private optionsBackedUp: boolean;
  private readingPaused: boolean;
  private discReceived: boolean;
  private inputEnded: boolean;
  private stopRequested: boolean;
  /** Input arrived since the last look: at shutdown, this side ends only after QUIET_ROUNDS turns without any. */
  private sawInput: boolean;
  private quietRounds: number;
  private quietCheck: boolean;
  /** This side has ended (or is ending): nothing more is parsed or answered. */
  private finished: boolean;
  private linger: NodeJS.Timeout | undefined;
  private readonly closedPromise: Promise<void>;

  constructor(input: SocketInput, host: NbdHost, admission: Admission, start: NbdStart = { secure: false }) {
    const socket = input.socket;
    this.socket = socket;
    this.input = input;
    this.remote = `${socket.remoteAddress ?? '?'}:${socket.remotePort ?? 0}`;
    this.host = host;
    this.admission = admission;
    this.secure = start.secure;
    this.handedOver = false;
    this.noZeroes = start.noZeroes ?? false;
    this.structured = false;
    this.metaVolume = undefined;
    this.baseAllocation = false;
    this.volume = undefined;
    this.receiving = undefined;
    this.receivingReserved = 0;
    this.flowPaused = false;
    this.optionsBackedUp = false;
    this.readingPaused = false;
    this.discReceived = false;
    this.inputEnded = false;
    this.stopRequested = false;
    this.sawInput = false;
    this.quietRounds = 0;
    this.quietCheck = false;
    this.finished = false;
    this.linger = undefined;
    this.writer = new CorkedWriter(socket, host.busyPoll?.pokeFn);
    // The flow pauses and resumes reading through this; see applyReading().
    const flowSocket: FlowSocket = {
      pause: () => {
        this.flowPaused = true;
        this.applyReading();
      },
      resume: () => {
        this.flowPaused = false;
        this.applyReading();
      },
      get writableLength() {
        return socket.writableLength;
      },
      get writableHighWaterMark() {
        return socket.writableHighWaterMark;
      },
      on: (event, listener) => socket.on(event, listener),
    };
    this.flow = new RequestFlow<NbdRequest>(flowSocket, host.limits, host.flowStats, (request) => {
      this.dispatch(request);
    }, host.budget);
    this.parser = new NbdServerParser({
      onClientFlags: (flags) => {
        this.onClientFlags(flags);
      },
      onOption: (option, data) => {
        this.onOption(option, data);
      },
      onOversizedOption: (option, length) => {
        this.onOversizedOption(option, length);
      },
      onRequest: (request) => {
        this.onRequest(request);
      },
      onPayload: (request) => {
        this.onPayload(request);
      },
      allocate: (length) => this.host.payloadBuffers.acquire(length),
      onFatal: (error) => {
        this.host.stats.protocolErrors++;
        this.host.log.warn({ remote: this.remote, err: error.message }, 'NBD client broke the protocol; disconnecting');
        this.hangUp();
      },
    }, { afterFlags: start.secure });
    let closed: () => void = () => undefined;
    this.closedPromise = new Promise<void>((resolve) => (closed = resolve));
    socket.setNoDelay(true);
    this.listeners = {
      data: (chunk: Buffer) => {
        this.sawInput = true;
        this.parser.feed(chunk, input.transient);
      },
      end: () => {
        this.onEnd();
      },
      error: (error: Error) => {
        host.log.debug({ remote: this.remote, err: error }, 'NBD connection error');
      },
      close: () => {
        this.onClose();
        closed();
      },
    };
    input.listen({ data: this.listeners.data, end: this.listeners.end, target: () => this.parser.payloadTarget() });
    socket.on('error', this.listeners.error);
    socket.on('close', this.listeners.close);
    if (!start.secure) socket.write(encodeGreeting(HANDSHAKE.FIXED_NEWSTYLE | HANDSHAKE.NO_ZEROES));
  }

  /** The export this connection is attached to, once in transmission. */
  get exportName(): string | undefined {
    return this.volume?.name;
  }

  /**
   * Shutdown: requests already admitted finish; those waiting for budget and any that
   * arrive get NBD_ESHUTDOWN, each charged its header only (a WRITE whose payload had not
   * been admitted has it read and dropped); once nothing is in flight and a turn passes
   * with no input, this side ends. Resolves when the socket has closed, at the latest
   * after DRAIN_DEADLINE_MS (a client that does not read its replies is cut then).
   */
  async drainAndClose(): Promise<void> {
    if (this.socket.destroyed || this.handedOver) return;
    this.stopRequested = true;
    this.sawInput = true; // bytes already in the kernel are read before this side ends
    this.refuseWaiting();
    this.applyReading();
    this.maybeFinish();
    const deadline = setTimeout(() => {
      this.hangUp();
    }, DRAIN_DEADLINE_MS);
    deadline.unref();
    await this.closedPromise;
    clearTimeout(deadline);
  }

  /**
   * At shutdown, what waits for budget will only get NBD_ESHUTDOWN: it costs its header
   * from now on, so it is answered as soon as this connection's own requests allow, not
   * when other connections give budget back (they may never: a client that does not read).
   */
  private refuseWaiting(): void {
    this.flow.reprice((request) => (request.cost = refusedCostOf(request)));
    const writing = this.receiving;
    if (writing !== undefined && this.flow.cancelReserve()) {
      writing.cost = refusedCostOf(writing);
      this.receivingReserved = 0;
      this.parser.discardPayload();
      this.release();
    }
  }

  // ---- reading and ending ----

  /**
   * The socket is read unless the flow asks otherwise (over budget, replies backing up;
   * it keeps reading a reserved payload itself), or option replies back up. Once this
   * side has ended, input is read and dropped, so that unread bytes never turn our close
   * into a reset that would lose replies.
   */
  private applyReading(): void {
    const pause = !this.finished && (this.flowPaused || this.optionsBackedUp);
    if (pause === this.readingPaused || this.socket.destroyed) return;
    this.readingPaused = pause;
    if (pause) this.input.pause();
    else this.input.resume();
  }

  private onEnd(): void {
    this.inputEnded = true;
    // A WRITE whose payload was arriving when the input ended can never be served.
    if (this.receiving !== undefined && !this.parser.holding) this.abandon(this.receiving);
    this.maybeFinish();
  }

  private onClose(): void {
    if (this.linger !== undefined) clearTimeout(this.linger);
    this.finished = true;
    this.parser.stop();
    // Gives back what waits and what is reserved; requests in flight give theirs when answered.
    this.flow.close();
    if (this.receiving !== undefined) this.abandon(this.receiving);
    if (this.volume !== undefined) this.volume.connections--;
    this.volume = undefined;
    this.host.closed(this);
  }

  /** Ends this side once whatever ended the conversation (DISC, EOF, shutdown) has been answered. */
  private maybeFinish(): void {
    if (this.finished || this.socket.destroyed) return;
    if (!this.discReceived && !this.inputEnded && !this.stopRequested) return;
    if (this.flow.inFlight > 0 || this.flow.queued > 0 || this.receiving !== undefined) return;
    if (this.stopRequested && !this.discReceived && !this.inputEnded) {
      // Requests the client sent before it heard of the shutdown may still sit in the
      // kernel: they get ESHUTDOWN rather than a reset. Two check phases with no input
      // between them mean a whole poll phase found nothing to read.
      if (this.sawInput) {
        this.sawInput = false;
        this.quietRounds = 0;
      }
      if (this.quietRounds < QUIET_ROUNDS) {
        if (!this.quietCheck) {
          this.quietCheck = true;
          setImmediate(() => {
            this.quietCheck = false;
            this.quietRounds++;
            this.maybeFinish();
          });
        }
        return;
      }
    }
    this.finish();
  }

  private finish(): void {
    this.finished = true;
    this.parser.stop();
    this.admission.handshakeDone();
    this.applyReading();
    this.socket.end();
    this.linger = setTimeout(() => this.socket.destroy(), LINGER_MS);
    this.linger.unref();
  }

  /**
   * Drops the connection (a hard disconnect, proto.md "Terminating the session"): nothing
   * more is parsed, not even the rest of the chunk being parsed, and nothing waiting is
   * dispatched; requests already in storage finish unanswered.
   */
  private hangUp(): void {
    this.finished = true;
    this.parser.stop();
    this.flow.close();
    this.socket.destroy();
  }

  /**
   * Drops a WRITE whose payload will never arrive whole (the input ended, or the
   * connection closed); its reservation goes back when the flow closes.
   */
  private abandon(request: NbdRequest): void {
    this.receiving = undefined;
    this.receivingReserved = 0;
    this.parser.stop();
    // The socket may read into the rest of the payload's buffer (payloadTarget) for as long
    // as it reads at all: pooled again only once it cannot, else left to the collector.
    if (request.pooled !== undefined && (this.inputEnded || this.socket.destroyed)) this.host.payloadBuffers.release(request.pooled);
    request.pooled = undefined;
    this.maybeFinish();
  }

  // ---- handshake ----

  private onClientFlags(flags: number): void {
    if ((flags & ~(CLIENT.FIXED_NEWSTYLE | CLIENT.NO_ZEROES)) !== 0) {
      // "the server MUST drop the TCP connection" (proto.md, Client flags): whatever came
      // with the flags is not looked at.
      this.host.log.warn({ remote: this.remote, flags }, 'NBD client set unknown client flags; disconnecting');
      this.hangUp();
      return;
    }
    this.noZeroes = (flags & CLIENT.NO_ZEROES) !== 0;
  }

  private onOption(option: number, data: Buffer): void {
    try {
      if (this.host.isStopping() && option === OPT.EXPORT_NAME) {
        this.refuseExportName('the node is stopping');
        return;
      }
      // ABORT is answered even while stopping (proto.md: "error further options ... other than NBD_OPT_ABORT").
      if (this.host.isStopping() && option !== OPT.ABORT) {
        this.optionError(option, REP.ERR_SHUTDOWN, 'the node is stopping');
        return;
      }
      // FORCEDTLS: nothing but STARTTLS and ABORT before TLS (proto.md, "FORCEDTLS mode").
      if (this.host.tls?.require === true && !this.secure && option !== OPT.STARTTLS && option !== OPT.ABORT) {
        if (option === OPT.EXPORT_NAME) {
          // It cannot be answered with an error: the session ends.
          this.host.log.info({ remote: this.remote }, 'NBD client asked for an export without TLS, which this node requires; disconnecting');
          this.hangUp();
          return;
        }
        this.optionError(option, REP.ERR_TLS_REQD, 'this node requires TLS: send NBD_OPT_STARTTLS first');
        return;
      }
      switch (option) {
        case OPT.EXPORT_NAME:
          this.selectByExportName(data);
          break;
        case OPT.ABORT:
          this.send(encodeOptionReply(option, REP.ACK));
          this.finish();
          break;
        case OPT.LIST:
          if (data.length !== 0) {
            this.optionError(option, REP.ERR_INVALID, 'NBD_OPT_LIST takes no data');
            break;
          }
          for (const v of this.host.volumes.list()) this.send(encodeOptionReply(option, REP.SERVER, serverPayload(v.name, describe(v))));
          this.optionAck(option);
          break;
        case OPT.INFO:
        case OPT.GO:
          this.infoOrGo(option, data);
          break;
        case OPT.STRUCTURED_REPLY:
          if (data.length !== 0) this.optionError(option, REP.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
          else if (this.structured) this.optionError(option, REP.ERR_INVALID, 'structured replies are already negotiated');
          else {
            this.structured = true;
            this.optionAck(option);
          }
          break;
        case OPT.LIST_META_CONTEXT:
        case OPT.SET_META_CONTEXT:
          this.metaContext(option, data);
          break;
        case OPT.STARTTLS:
          if (this.host.tls === undefined) this.optionError(option, REP.ERR_POLICY, 'TLS is not offered here');
          else if (this.secure) this.optionError(option, REP.ERR_INVALID, 'TLS is already negotiated');
          else if (data.length !== 0) this.optionError(option, REP.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
          else this.startTls(this.host.tls);
          break;
        default:
          this.optionError(option, REP.ERR_UNSUP, `option ${OPT_NAME[option] ?? option} is not supported`);
      }
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      this.optionError(option, REP.ERR_INVALID, message);
    }
  }

  /**
   * Answers STARTTLS and hands the socket over to TLS: nothing more is parsed here (input
   * after STARTTLS and before our ACK breaks the protocol and would only fail the TLS
   * handshake), this connection's listeners leave the socket, and once the ACK is in the
   * kernel the host starts the TLS session on it.
   */
  private startTls(tls: NonNullable<NbdHost['tls']>): void {
    const socket = this.socket;
    this.handedOver = true;
    this.finished = true;
    this.parser.stop();
    this.flow.close();
    this.input.pause();
    this.input.listen(undefined);
    socket.removeListener('close', this.listeners.close);
    this.host.closed(this);
    const state = { noZeroes: this.noZeroes };
    socket.write(encodeOptionReply(OPT.STARTTLS, REP.ACK), (error) => {
      socket.removeListener('error', this.listeners.error);
      if (error !== undefined && error !== null) {
        socket.destroy();
        return;
      }
      tls.upgrade(socket, state, this.admission);
    });
  }

  /** An option too long to keep: its payload is dropped as it arrives. */
  private onOversizedOption(option: number, length: number): void {
    // ABORT ignores its data, and while the node stops every option gets the same answer.
    if (option === OPT.ABORT || this.host.isStopping()) {
      this.onOption(option, Buffer.alloc(0));
      return;
    }
    if (option === OPT.EXPORT_NAME) {
      // Names are at most 4096 bytes (proto.md, Conventions).
      this.refuseExportName(`an export name of ${length} bytes`);
      return;
    }
    this.optionError(option, REP.ERR_TOO_BIG, `option data of ${length} bytes is more than the ${MAX_OPTION_LENGTH} this server takes`);
  }

  /**
   * NBD_OPT_EXPORT_NAME has no error reply: a server unwilling to serve it "MUST terminate
   * the session" (proto.md, NBD_OPT_EXPORT_NAME). Nothing after it is parsed; the replies
   * to earlier options still go out before the connection closes.
   */
  private refuseExportName(reason: string): void {
    this.host.log.info({ remote: this.remote, reason }, 'NBD_OPT_EXPORT_NAME refused; ending the session');
    this.finish();
  }

  private selectByExportName(data: Buffer): void {
    const name = data.toString('utf8');
    const volume = this.host.volumes.find(name);
    const unavailable = whyUnavailable(name, volume);
    if (volume === undefined || unavailable !== undefined) {
      this.refuseExportName(unavailable ?? `no export named "${name}"`);
      return;
    }
    this.attach(volume);
    this.send(encodeExportNameReply(volume.size, this.transmissionFlags(volume), this.noZeroes));
    this.parser.startTransmission();
  }

  private infoOrGo(option: number, data: Buffer): void {
    const { name, infos } = decodeInfoRequest(data);
    const volume = this.host.volumes.find(name);
    const unavailable = whyUnavailable(name, volume);
    if (volume === undefined || unavailable !== undefined) {
      // "The requested export is not available" (proto.md, NBD_REP_ERR_UNKNOWN).
      this.optionError(option, REP.ERR_UNKNOWN, unavailable ?? `no export named "${name}"`);
      return;
    }
    this.send(encodeOptionReply(option, REP.INFO, infoExportPayload(volume.size, this.transmissionFlags(volume))));
    for (const info of new Set(infos)) {
      if (info === INFO.NAME) this.send(encodeOptionReply(option, REP.INFO, infoStringPayload(INFO.NAME, volume.name)));
      if (info === INFO.DESCRIPTION) this.send(encodeOptionReply(option, REP.INFO, infoStringPayload(INFO.DESCRIPTION, describe(volume))));
      if (info === INFO.BLOCK_SIZE) this.send(encodeOptionReply(option, REP.INFO, infoBlockSizePayload(BLOCK.MIN, BLOCK.PREFERRED, BLOCK.MAX)));
    }
    if (option === OPT.INFO) {
      this.optionAck(option);
      return;
    }
    this.send(encodeOptionReply(option, REP.ACK));
    this.attach(volume);
    this.parser.startTransmission();
  }

  private metaContext(option: number, data: Buffer): void {
    const set = option === OPT.SET_META_CONTEXT;
    // "Issuing this command replaces all previously-set metadata contexts (including when
    // this command fails)" (proto.md, NBD_OPT_SET_META_CONTEXT).
    if (set) {
      this.metaVolume = undefined;
      this.baseAllocation = false;
    }
    if (set && !this.structured) {
      this.optionError(option, REP.ERR_INVALID, 'NBD_OPT_SET_META_CONTEXT needs structured replies first');
      return;
    }
    const { name, queries } = decodeMetaContextRequest(data);
    const volume = this.host.volumes.find(name);
    const unavailable = whyUnavailable(name, volume);
    if (volume === undefined || unavailable !== undefined) {
      // "The requested export is not available" (proto.md, NBD_REP_ERR_UNKNOWN).
      this.optionError(option, REP.ERR_UNKNOWN, unavailable ?? `no export named "${name}"`);
      return;
    }
    // `base:` is a wildcard for LIST only: SET "MUST ignore this form". Queries of other
    // namespaces and unknown leaves are ignored, not errors.
    const wanted = set
      ? queries.includes(BASE_ALLOCATION)
      : queries.length === 0 || queries.some((q) => q === BASE_ALLOCATION || q === 'base:');
    if (set && wanted) {
      this.metaVolume = volume;
      this.baseAllocation = true;
    }
    if (wanted) this.send(encodeOptionReply(option, REP.META_CONTEXT, metaContextPayload(set ? BASE_ALLOCATION_ID : 0, BASE_ALLOCATION)));
    this.optionAck(option);
  }

  /** Enters transmission on `volume`: the handshake is over. */
  private attach(volume: Volume): void {
    // Meta contexts chosen for another export do not carry over.
    if (this.metaVolume !== volume) this.baseAllocation = false;
    volume.connections++;
    this.volume = volume;
    this.admission.handshakeDone();
    this.host.stats.handshakes++;
    this.host.log.debug({ remote: this.remote, export: volume.name, structured: this.structured }, 'NBD client attached');
  }

  private transmissionFlags(volume: Volume): number {
    let flags = FLAG.HAS_FLAGS | FLAG.SEND_FLUSH | FLAG.SEND_FUA | FLAG.SEND_CACHE | FLAG.CAN_MULTI_CONN;
    if (volume.readOnly) flags |= FLAG.READ_ONLY;
    else flags |= FLAG.SEND_TRIM | FLAG.SEND_WRITE_ZEROES | FLAG.SEND_FAST_ZERO;
    if (this.structured) flags |= FLAG.SEND_DF;
    return flags;
  }

  private optionAck(option: number): void {
    this.send(encodeOptionReply(option, REP.ACK));
    this.nextOption();
  }

  private optionError(option: number, type: number, message: string): void {
    this.send(encodeOptionError(option, type, message));
    this.nextOption();
  }

  /** Parses the next option, once the replies so far have drained if they back up (a client that never reads them). */
  private nextOption(): void {
    if (this.socket.writableLength <= this.socket.writableHighWaterMark) {
      this.parser.resume();
      return;
    }
    this.optionsBackedUp = true;
    this.applyReading();
    this.socket.once('drain', () => {
      this.optionsBackedUp = false;
      this.applyReading();
      this.parser.resume();
    });
  }

  // ---- transmission ----

  private onRequest(request: NbdRequest): void {
    const name = CMD_NAME[request.type] ?? 'UNKNOWN';
    this.host.stats.commands[name] = (this.host.stats.commands[name] ?? 0) + 1;
    if (request.type === CMD.DISC) {
      // Nothing waits in the flow here (the parser holds while anything does); what is in
      // flight is answered, then this side ends. The client sends nothing after DISC.
      this.discReceived = true;
      this.parser.stop();
      this.maybeFinish();
      return;
    }
    request.received = performance.now();
    const refused = this.host.isStopping();
    if (request.type === CMD.WRITE) {
      this.receiving = request;
      if (refused) {
        // It will get ESHUTDOWN: its payload is read and dropped, not budgeted.
        request.cost = refusedCostOf(request);
        this.receivingReserved = 0;
        this.parser.discardPayload();
        return;
      }
      // The payload is budgeted before a byte of it is read; until then nothing is parsed.
      request.cost = costOf(request);
      this.receivingReserved = request.cost;
      const granted = this.flow.reserve(request.cost, () => {
        this.release();
      });
      if (!granted) this.parser.hold();
      return;
    }
    request.cost = refused ? refusedCostOf(request) : costOf(request);
    this.flow.push(request, request.cost);
    if (this.flow.queued > 0) this.parser.hold();
  }

  /** A WRITE's payload is in (reserved at its header), or was dropped (refused: nothing reserved). */
  private onPayload(request: NbdRequest): void {
    const reserved = this.receivingReserved;
    this.receiving = undefined;
    this.receivingReserved = 0;
    this.flow.push(request, request.cost, reserved);
    if (this.flow.queued > 0) this.parser.hold();
  }

  /** The flow admitted a request: serve it, and parse on if the parser held for it. */
  private dispatch(request: NbdRequest): void {
    this.run(request);
    this.release();
  }

  /** Lets the parser go on after it held for budget. */
  private release(): void {
    this.parser.release();
    // After EOF, once the parser has taken in all there is (not from inside one of its
    // callbacks), a WRITE still short of its payload will never get it.
    if (this.inputEnded && !this.parser.busy && !this.parser.holding && this.receiving !== undefined) this.abandon(this.receiving);
  }

  private run(request: NbdRequest): void {
    if (request.type === CMD.READ && this.readNow(request)) return;
    if (request.type === CMD.WRITE && this.writeNow(request)) return;
    const name = CMD_NAME[request.type] ?? 'UNKNOWN';
    this.serve(request)
      .catch((error: unknown) => {
        this.host.stats.errors[name] = (this.host.stats.errors[name] ?? 0) + 1;
        const errno = errnoOf(error);
        if (errno === ERRNO.EIO) this.host.log.error({ remote: this.remote, command: name, err: error }, 'NBD request failed');
        this.replyError(request, errno, error instanceof Error ? error.message : String(error));
      })
      .finally(() => {
        // The storage call has settled: the payload has been copied into the cache or written.
        if (request.pooled !== undefined) this.host.payloadBuffers.release(request.pooled);
        request.pooled = undefined;
      });
  }

  /**
   * A READ the storage layer can answer at once (a cache hit in DRAM, or in flash while
   * its reads are fast: storage/volume-io.ts readNow): the reply is queued in this same
   * tick, without a promise, so the replies to every request of one socket read leave in
   * one corked write. False: nothing was sent, and the request takes the ordinary path
   * (which also answers every error).
   */
  private readNow(request: NbdRequest): boolean {
    const { io } = this.host;
    if (io.readNow === undefined) return false;
    let volume: Volume;
    try {
      volume = this.validate(request);
    } catch {
      return false;
    }
    if (request.length >= READ_VIEW_MIN && io.readViews !== undefined) {
      let views: CacheViews | undefined;
      try {
        views = io.readViews(volume, request.offset, request.length);
      } catch {
        views = undefined; // the ordinary path reports errors
      }
      if (views !== undefined) {
        this.replyViews(request, views);
        return true;
      }
    }
    const pooled = this.host.payloadBuffers.acquire(request.length);
    const data = pooled.subarray(0, request.length);
    let read = false;
    try {
      read = io.readNow(volume, request.offset, data);
    } catch {
      read = false; // the ordinary path reports errors
    }
    if (!read) {
      this.host.payloadBuffers.release(pooled);
      return false;
    }
    this.replyRead(request, pooled, data);
    return true;
  }

  /**
   * A WRITE (not FUA) the storage layer can store at once (a cache hit in DRAM:
   * storage/volume-io.ts writeNow): its payload goes back to the pool and its reply is
   * queued in this same tick, without a promise. False: nothing was written, and the
   * request takes the ordinary path (which also answers every error).
   */
  private writeNow(request: NbdRequest): boolean {
    const { io } = this.host;
    if (io.writeNow === undefined || (request.flags & CMD_FLAG.FUA) !== 0 || request.data.length !== request.length) return false;
    let written = false;
    try {
      written = io.writeNow(this.validate(request), request.offset, request.data);
    } catch {
      written = false; // the ordinary path reports errors
    }
    if (!written) return false;
    if (request.pooled !== undefined) this.host.payloadBuffers.release(request.pooled);
    request.pooled = undefined;
    this.host.stats.bytesWritten += request.length;
    this.send(encodeSimpleReply(request.cookie, 0), () => {
      this.complete(request);
    });
    return true;
  }

  /** A READ's reply: its header and data in one corked write; the pooled buffer goes back once sent. */
  private replyRead(request: NbdRequest, pooled: Buffer, data: Buffer): void {
    this.host.stats.bytesRead += request.length;
    this.send(this.structured ? encodeOffsetDataHead(request.cookie, request.offset, data.length, true) : encodeSimpleReply(request.cookie, 0));
    this.send(data, () => {
      this.host.payloadBuffers.release(pooled);
      this.complete(request);
    });
  }

  /**
   * A READ's reply sent from the cache's memory: its header and the views in one corked
   * write; the loan ends once the socket has handed the last of them to the kernel (or
   * is gone). Until then the reply's cost stays in the flow, as a pooled buffer's does.
   */
  private replyViews(request: NbdRequest, views: CacheViews): void {
    this.host.stats.bytesRead += request.length;
    this.send(this.structured ? encodeOffsetDataHead(request.cookie, request.offset, request.length, true) : encodeSimpleReply(request.cookie, 0));
    const last = views.buffers.length - 1;
    views.buffers.forEach((buf, i) => {
      this.send(
        buf,
        i < last
          ? undefined
          : () => {
              views.release();
              this.complete(request);
            },
      );
    });
  }

  /** Serves a request and sends its reply; throws (before any reply) to answer an error. */
  private async serve(request: NbdRequest): Promise<void> {
    const volume = this.validate(request);
    const { io } = this.host;
    const fua = (request.flags & CMD_FLAG.FUA) !== 0;
    switch (request.type) {
      case CMD.READ: {
        const pooled = this.host.payloadBuffers.acquire(request.length);
        const data = pooled.subarray(0, request.length);
        try {
          await io.read(volume, request.offset, data);
        } catch (error) {
          this.host.payloadBuffers.release(pooled);
          throw error;
        }
        this.replyRead(request, pooled, data);
        return;
      }
      case CMD.WRITE:
        await io.write(volume, request.offset, request.data, fua);
        this.host.stats.bytesWritten += request.length;
        break;
      case CMD.FLUSH:
        await io.flush(volume);
        break;
      case CMD.TRIM:
      case CMD.WRITE_ZEROES: {
        const allocate = request.type === CMD.WRITE_ZEROES && (request.flags & CMD_FLAG.NO_HOLE) !== 0;
        // Zeroing with NO_HOLE writes every byte, which is not fast; FAST_ZERO asks us to
        // refuse rather than be slow.
        if (allocate && (request.flags & CMD_FLAG.FAST_ZERO) !== 0) throw new NbdError(ERRNO.ENOTSUP, 'zeroing with NO_HOLE is not fast on this export');
        if (request.length <= ZERO_DIRECT) await io.zero(volume, request.offset, request.length, { fua, allocate });
        else await this.zeroInPieces(volume, request.offset, request.length, { fua, allocate });
        break;
      }
      case CMD.CACHE:
        // Staging lines the cache holds already completes without I/O: a turn of its own.
        await this.host.turns.wait();
        await io.prefetch(volume, request.offset, request.length);
        break;
      case CMD.BLOCK_STATUS: {
        // Storage walks the range at once, without I/O: a turn of its own. The reply may
        // cover less than asked (proto.md, NBD_CMD_BLOCK_STATUS); the client asks again
        // from where it ends.
        await this.host.turns.wait();
        let extents = io.blockStatus(volume, request.offset, Math.min(request.length, BLOCK_STATUS_SPAN));
        extents = extents.slice(0, (request.flags & CMD_FLAG.REQ_ONE) !== 0 ? 1 : MAX_EXTENTS);
        this.send(encodeBlockStatus(request.cookie, BASE_ALLOCATION_ID, extents, true), () => {
          this.complete(request);
        });
        return;
      }
      default:
        throw new NbdError(ERRNO.EINVAL, `unknown command ${request.type}`);
    }
    this.send(encodeSimpleReply(request.cookie, 0), () => {
      this.complete(request);
    });
  }

  /**
   * A long TRIM or WRITE_ZEROES: pieces of ZERO_PIECE one after another, each in one of
   * the service's zeroing slots (so storage never holds the work of more than a few
   * pieces, whatever is pipelined) and started at a turn of its own (zeroing chunks that
   * are zero already completes without I/O, and would otherwise keep the event loop from
   * polling other clients). At shutdown it stops between pieces with ESHUTDOWN; the
   * pieces done stay zeroed.
   */
  private async zeroInPieces(volume: Volume, offset: number, length: number, options: { fua: boolean; allocate: boolean }): Promise<void> {
    const { io, turns, zeroSlots } = this.host;
    const end = offset + length;
    for (let at = offset; at < end; at += ZERO_PIECE) {
      // The slot first, then the turn: a slot handed over on release would otherwise start
      // the next piece in the same macrotask.
      await zeroSlots.acquire();
      try {
        await turns.wait();
        if (this.host.isStopping()) throw new NbdError(ERRNO.ESHUTDOWN, `the node is stopping (${at - offset} of ${length} bytes zeroed)`);
        await io.zero(volume, at, Math.min(ZERO_PIECE, end - at), options);
      } finally {
        zeroSlots.release();
      }
    }
  }

  /** The reply is in the kernel's hands: the request gives its budget back. */
  private complete(request: NbdRequest): void {
    if (request.received > 0) this.host.stats.latency.since(CMD_NAME[request.type] ?? 'UNKNOWN', request.received);
    this.flow.done(request.cost);
    this.maybeFinish();
  }

  /** The one request validator: everything a backend may then trust. */
  private validate(request: NbdRequest): Volume {
    const volume = this.volume;
    if (volume === undefined) throw new NbdError(ERRNO.EINVAL, 'no export attached');
    // proto.md: at shutdown, requests not yet serviced and any received afterwards SHOULD get ESHUTDOWN.
    if (this.host.isStopping()) throw new NbdError(ERRNO.ESHUTDOWN, 'the node is stopping');
    const allowed = ALLOWED_FLAGS[request.type];
    if (allowed === undefined) throw new NbdError(ERRNO.EINVAL, `unknown command ${request.type}`);
    if ((request.flags & ~allowed) !== 0) throw new NbdError(ERRNO.EINVAL, `flags 0x${request.flags.toString(16)} are not valid for ${CMD_NAME[request.type] ?? request.type}`);
    if ((request.flags & CMD_FLAG.DF) !== 0 && !this.structured) throw new NbdError(ERRNO.EINVAL, 'DF needs structured replies');
    if (request.type === CMD.FLUSH) return volume;
    if (request.type === CMD.BLOCK_STATUS && !this.baseAllocation) throw new NbdError(ERRNO.EINVAL, 'BLOCK_STATUS needs the base:allocation meta context');
    if (request.length === 0) throw new NbdError(ERRNO.EINVAL, 'zero-length request');
    if ((request.type === CMD.READ || request.type === CMD.CACHE) && request.length > BLOCK.MAX) {
      // With structured replies EOVERFLOW tells the client to retry smaller (proto.md,
      // NBD_CMD_READ); a simple-reply client must not ask for more than the maximum at all.
      const errno = request.type === CMD.CACHE || this.structured ? ERRNO.EOVERFLOW : ERRNO.EINVAL;
      throw new NbdError(errno, `${request.length} bytes is more than the maximum payload ${BLOCK.MAX}`);
    }
    if (request.offset + request.length > volume.size) {
      // proto.md, Error values: a write beyond the end SHOULD get ENOSPC, a read or trim EINVAL.
      const errno = request.type === CMD.WRITE || request.type === CMD.WRITE_ZEROES ? ERRNO.ENOSPC : ERRNO.EINVAL;
      throw new NbdError(errno, `offset ${request.offset} length ${request.length} reaches past the end of the export (${volume.size} bytes)`);
    }
    if (volume.readOnly && (request.type === CMD.WRITE || request.type === CMD.TRIM || request.type === CMD.WRITE_ZEROES)) {
      throw new NbdError(ERRNO.EPERM, `export ${volume.name} is read-only`);
    }
    return volume;
  }

  private replyError(request: NbdRequest, errno: number, message: string): void {
    // Structured replies carry a message; a READ must get one once they are negotiated.
    const reply = this.structured ? encodeStructuredError(request.cookie, errno, message) : encodeSimpleReply(request.cookie, errno);
    this.send(reply, () => {
      this.complete(request);
    });
  }

  /** Queues bytes; everything sent in one tick leaves in one corked write. */
  private send(buf: Buffer, written?: () => void): void {
    this.writer.write(buf, written);
  }
}

/** The one mapping from errors to NBD errnos. */
export function errnoOf(error: unknown): number {
  if (error instanceof NbdError) return error.errno;
  if (isMemstrataError(error)) {
    switch (error.code) {
      case 'MS_VOLUME_READ_ONLY':
        return ERRNO.EPERM;
      case 'MS_VOLUME_RANGE':
      case 'MS_NBD_UNSUPPORTED':
      case 'MS_NBD_PROTOCOL':
        return ERRNO.EINVAL;
      case 'MS_SHUTTING_DOWN':
        return ERRNO.ESHUTDOWN;
      case 'MS_PARTITION_NO_CAPACITY':
      case 'MS_EXTENTS_EXHAUSTED':
        return ERRNO.ENOSPC;
      default:
        return ERRNO.EIO;
    }
  }
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG') return ERRNO.ENOSPC;
  return ERRNO.EIO;
}

/** Why a volume that exists cannot be served now (its write log is recovering), or undefined. */
function whyUnavailable(name: string, volume: Volume | undefined): string | undefined {
  return volume?.recovering === undefined ? undefined : `export "${name}" is recovering: ${volume.recovering.why}`;
}
