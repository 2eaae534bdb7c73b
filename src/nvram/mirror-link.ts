// The connection from this node to its mirror partner's mirror service: requests go out
// in order and are answered in order (the partner applies them one after another), so
// records sent after a resync's snapshot reach the replica after it.
//
//   down --connect, HELLO--> up --socket error, close, or a reply later than the timeout--> down
//   (while down, a connection is tried again every `retryMs`)
//
// Every request in flight when the link goes down fails with MS_MIRROR_UNREACHABLE; the
// owner (mirroring.ts) hears `onDown` first, so it has already decided whether devices
// degrade or refuse by the time those failures reach them.

import { connect, isIP, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import { MemstrataError, NetworkError } from '../errors.js';
import type { Logger } from '../logger.js';
import { FrameParser, type Frame } from '../protocol/rmem/parser.js';
import { CorkedWriter } from '../net/corked-writer.js';
import { ownReadBuffer } from '../net/socket-input.js';
import { formatAddress, type ListenAddress } from '../units.js';
import {
  MIRROR_MAX_BODY,
  MIRROR_RESPONSE_MAGIC,
  MIRROR_VERSION,
  MOP,
  MOP_NAME,
  MSTATUS,
  MSTATUS_NAME,
  decodeName,
  encodeHello,
  encodeName,
  errorMessage,
  request,
  requestParts,
} from '../protocol/mirror/codec.js';

export interface LinkReply {
  status: number;
  body: Buffer;
}

interface Pending {
  op: number;
  sentAt: number;
  resolve: (reply: LinkReply) => void;
  reject: (error: Error) => void;
}

export interface MirrorLinkOptions {
  partner: ListenAddress;
  nodeId: string;
  token: string | undefined;
  /** The node id the partner must answer HELLO with; any when undefined. */
  partnerId?: string | undefined;
  timeoutMs: number;
  retryMs: number;
  log: Logger;
  onUp: (partnerNode: string) => void;
  onDown: (why: string) => void;
  /** TLS to the partner (mirror.tls=require): its certificate checked against the CA, this node's presented. */
  tls?: ConnectionOptions | undefined;
  /** A device to ask STATE of when the link has been idle for half the timeout (none: no probe), so a partner that stopped answering is noticed. */
  probe?: (() => string | undefined) | undefined;
  /** The partner's answer to a probe: what it holds of that device. */
  onProbe?: ((device: string, reply: LinkReply) => void) | undefined;
}

export class MirrorLink {
  private readonly options: MirrorLinkOptions;
  private socket: Socket | undefined;
  private writer: CorkedWriter | undefined;
  private readonly pending: Map<number, Pending>;
  private nextTag: number;
  private upValue: boolean;
  private closed: boolean;
  private retryTimer: NodeJS.Timeout | undefined;
  private watchdog: NodeJS.Timeout | undefined;
  /** When the last request went out (performance.now()). */
  private lastSent: number;
  /** Partner's node id, once a HELLO was answered. */
  partnerNode: string | undefined;

  constructor(options: MirrorLinkOptions) {
    this.options = options;
    this.socket = undefined;
    this.writer = undefined;
    this.pending = new Map();
    this.nextTag = 1;
    this.upValue = false;
    this.closed = false;
    this.retryTimer = undefined;
    this.watchdog = undefined;
    this.lastSent = 0;
    this.partnerNode = undefined;
  }

  get up(): boolean {
    return this.upValue;
  }

  get address(): string {
    return formatAddress(this.options.partner);
  }

  /** The node id the partner must answer HELLO with, when one is expected. */
  get expectedNode(): string | undefined {
    return this.options.partnerId;
  }

  start(): void {
    this.connect();
    this.watchdog = setInterval(() => { this.checkTimeouts(); }, Math.max(50, Math.floor(this.options.timeoutMs / 4)));
    this.watchdog.unref();
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.watchdog);
    this.drop('link closed');
  }

  /**
   * Sends one request; resolves with the reply, or fails with MS_MIRROR_UNREACHABLE. A
   * body given as parts is written as it is, not copied: the caller keeps them unchanged
   * until the request settles. Nothing reads them after: a reply comes only after the
   * request was written, and a request fails only once its socket is destroyed (drop),
   * which discards what it had not written yet.
   */
  send(op: number, body: Buffer | readonly Buffer[]): Promise<LinkReply> {
    if (!this.upValue) return Promise.reject(unreachable(this.address, 'not connected'));
    return this.raw(op, body);
  }

  private raw(op: number, body: Buffer | readonly Buffer[]): Promise<LinkReply> {
    const writer = this.writer;
    if (writer === undefined) return Promise.reject(unreachable(this.address, 'not connected'));
    const tag = this.nextTag;
    this.nextTag = this.nextTag >= 0xffffffff ? 1 : this.nextTag + 1;
    this.lastSent = performance.now();
    return new Promise<LinkReply>((resolve, reject) => {
      this.pending.set(tag, { op, sentAt: this.lastSent, resolve, reject });
      if (Buffer.isBuffer(body)) writer.write(request(op, tag, body));
      else for (const part of requestParts(op, tag, body)) writer.write(part);
    });
  }

  private connect(): void {
    if (this.closed) return;
    const { partner, log } = this.options;
    const tls = this.options.tls;
    // Without TLS, the socket reads into one buffer of this link's own (no allocation per
    // read); each read is parsed before the next overwrites it. TLS takes the reads over.
    const onread = ownReadBuffer((chunk) => {
      parser.feed(chunk, true);
    });
    const socket: Socket = tls === undefined
      ? connect({ host: partner.host, port: partner.port, noDelay: true, onread })
      : tlsConnect({ ...tls, host: partner.host, port: partner.port, ...(isIP(partner.host) === 0 ? { servername: partner.host } : {}) }).setNoDelay(true);
    this.socket = socket;
    const parser = new FrameParser({ magic: MIRROR_RESPONSE_MAGIC }, {
      onFrame: (f) => { this.onReply(f); },
      onFatal: (error) => {
        log.error({ err: error, partner: this.address }, 'mirror partner sent a malformed frame; reconnecting');
        socket.destroy();
      },
    }, MIRROR_MAX_BODY);
    if (tls !== undefined) socket.on('data', (chunk: Buffer) => { parser.feed(chunk); });
    socket.on('error', () => undefined);
    socket.once('close', () => {
      if (this.socket === socket) this.drop('connection closed');
    });
    socket.once(tls === undefined ? 'connect' : 'secureConnect', () => {
      this.writer = new CorkedWriter(socket);
      void this.hello(socket);
    });
  }

  private async hello(socket: Socket): Promise<void> {
    const { nodeId, token, log } = this.options;
    try {
      const reply = await this.raw(MOP.HELLO, encodeHello({ version: MIRROR_VERSION, nodeId, token: token ?? '' }));
      if (reply.status !== MSTATUS.OK) {
        log.error({ partner: this.address, status: MSTATUS_NAME[reply.status], message: errorMessage(reply.body) }, 'mirror partner refused HELLO');
        socket.destroy();
        return;
      }
      const partnerNode = decodeName(reply.body, 'HELLO reply');
      const expected = this.options.partnerId;
      if (expected !== undefined && partnerNode !== expected) {
        log.error({ partner: this.address, partnerNode, expected }, `the node at the mirror partner's address is ${partnerNode}, not the configured mirror.partnerId ${expected}; not mirroring to it`);
        socket.destroy();
        return;
      }
      this.partnerNode = partnerNode;
      this.upValue = true;
      this.options.onUp(this.partnerNode);
    } catch {
      socket.destroy();
    }
  }

  private onReply(f: Frame): void {
    const waiter = this.pending.get(f.tagLo);
    if (waiter === undefined) return;
    this.pending.delete(f.tagLo);
    // The body may be a view of the socket's chunk; keep a copy.
    waiter.resolve({ status: f.word, body: Buffer.from(f.body) });
  }

  private checkTimeouts(): void {
    const now = performance.now();
    for (const p of this.pending.values()) {
      if (now - p.sentAt > this.options.timeoutMs) {
        this.options.log.warn({ partner: this.address, op: MOP_NAME[p.op], timeoutMs: this.options.timeoutMs }, 'mirror partner did not answer in time; dropping the link');
        this.socket?.destroy();
        this.drop(`no answer to ${MOP_NAME[p.op] ?? p.op} within ${this.options.timeoutMs} ms`);
      }
      break; // in order: the oldest is first
    }
    // Idle: a read-only request, whose answer (or its absence) says whether the partner still answers.
    if (this.upValue && this.pending.size === 0 && now - this.lastSent > this.options.timeoutMs / 2) {
      const device = this.options.probe?.();
      if (device !== undefined) {
        void this.raw(MOP.STATE, encodeName(device)).then(
          (reply) => { this.options.onProbe?.(device, reply); },
          () => undefined,
        );
      }
    }
  }

  private drop(why: string): void {
    const wasUp = this.upValue;
    this.upValue = false;
    const socket = this.socket;
    this.socket = undefined;
    this.writer = undefined;
    socket?.destroy();
    // Owner first: it decides how devices go on before their requests fail.
    if (wasUp) this.options.onDown(why);
    const error = unreachable(this.address, why);
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) p.reject(error);
    if (!this.closed && this.retryTimer === undefined) {
      this.retryTimer = setTimeout(() => {
        this.retryTimer = undefined;
        this.connect();
      }, this.options.retryMs);
      this.retryTimer.unref();
    }
  }
}

function unreachable(address: string, why: string): MemstrataError {
  return new NetworkError('MS_MIRROR_UNREACHABLE', `mirror partner ${address}: ${why}`, { details: { partner: address } });
}
