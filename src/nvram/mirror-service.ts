// The mirror service (default 127.0.0.1:10811): the partner's end of the mirror link.
// It keeps replicas of the partner's mirrored devices in this node's nvram extents and
// answers each request only once the records are in memory here.
//
// Requests on one connection are applied one after another, in the order they came, so
// a RESET and the APPENDs sent after it land in that order. A connection must say HELLO
// (version, node id, token) first. A malformed frame ends the connection (its framing is
// lost); a malformed body gets a PROTOCOL reply and the connection goes on.

import { createServer, type Server, type Socket } from 'node:net';
import { timingSafeEqual } from 'node:crypto';
import { MemstrataError, MisuseError, RuntimeError } from '../errors.js';
import type { Logger } from '../logger.js';
import { closeServer, listenOn } from '../net/listen.js';
import { CorkedWriter } from '../net/corked-writer.js';
import { FrameParser, type Frame } from '../protocol/rmem/parser.js';
import type { ListenAddress } from '../units.js';
import {
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
  nvram: DeviceManager;
  nodeId: string;
  token: string | undefined;
  log: Logger;
}

export class MirrorService {
  private readonly options: MirrorServiceOptions;
  private server: Server | undefined;
  private readonly connections: Set<MirrorConnection>;
  address: ListenAddress | undefined;
  /** Requests served, for metrics. */
  served: number;

  constructor(options: MirrorServiceOptions) {
    this.options = options;
    this.server = undefined;
    this.connections = new Set();
    this.address = undefined;
    this.served = 0;
  }

  async listen(address: ListenAddress): Promise<ListenAddress> {
    const server = createServer({ noDelay: true }, (socket) => {
      const connection = new MirrorConnection(socket, this.options, this);
      this.connections.add(connection);
      socket.once('close', () => this.connections.delete(connection));
    });
    this.server = server;
    this.address = await listenOn(server, address, 'mirror', this.options.log);
    return this.address;
  }

  async close(): Promise<void> {
    await closeServer(this.server, this.connections);
    this.server = undefined;
  }
}

class MirrorConnection {
  readonly socket: Socket;
  private readonly options: MirrorServiceOptions;
  private readonly service: MirrorService;
  private readonly writer: CorkedWriter;
  private chain: Promise<void>;
  private partner: string | undefined;

  constructor(socket: Socket, options: MirrorServiceOptions, service: MirrorService) {
    this.socket = socket;
    this.options = options;
    this.service = service;
    this.writer = new CorkedWriter(socket);
    this.chain = Promise.resolve();
    this.partner = undefined;
    const parser = new FrameParser({ magic: MIRROR_REQUEST_MAGIC }, {
      onFrame: (f) => {
        // Applied strictly in order; socket chunks are fresh buffers, so holding a view is safe.
        const frame = { ...f, body: f.body };
        this.chain = this.chain.then(() => this.serve(frame));
      },
      onFatal: (error) => {
        options.log.warn({ err: error, remote: socket.remoteAddress }, 'mirror connection sent a malformed frame; closing it');
        socket.destroy();
      },
    }, MIRROR_MAX_BODY);
    socket.on('data', (chunk: Buffer) => { parser.feed(chunk); });
    socket.on('error', () => undefined);
  }

  async drainAndClose(): Promise<void> {
    await this.chain;
    this.socket.end();
  }

  private async serve(f: Frame): Promise<void> {
    const tag = f.tagLo;
    try {
      const body = await this.handle(f.op, f.body);
      this.service.served++;
      this.writer.write(reply(f.op, MSTATUS.OK, tag, body));
    } catch (error) {
      const status = error instanceof MemstrataError ? (STATUS_OF[error.code] ?? MSTATUS.IO) : MSTATUS.IO;
      const message = error instanceof Error ? error.message : String(error);
      if (status === MSTATUS.IO) this.options.log.error({ err: error, partner: this.partner }, 'mirror request failed');
      this.writer.write(errorReply(f.op, status, tag, message));
      if (status === MSTATUS.AUTH || (status === MSTATUS.PROTOCOL && this.partner === undefined)) this.socket.end();
    }
  }

  private async handle(op: number, body: Buffer): Promise<Buffer | undefined> {
    const { nvram } = this.options;
    if (op === MOP.HELLO) return this.hello(body);
    if (this.partner === undefined) throw new MisuseError('MS_MIRROR_PROTOCOL', 'HELLO must come first on a mirror connection');
    switch (op) {
      case MOP.STATE: {
        const device = nvram.find(decodeName(body, 'STATE'));
        if (device === undefined) return encodeState(undefined);
        const info = device.info();
        return encodeState({ role: device.role, policy: device.policy, recovering: device.recovering, size: device.size, epoch: device.epoch, trimmedTo: device.trimPoint, lastSeq: info.lastSeq ?? 0 });
      }
      case MOP.RESET: {
        const reset = decodeReset(body);
        await nvram.resetReplica(reset);
        this.options.log.info({ device: reset.name, partner: this.partner, epoch: reset.epoch, firstSeq: reset.firstSeq }, 'mirror resync of a replica started');
        return undefined;
      }
      case MOP.APPEND: {
        const { name, epoch, records, encoded } = decodeAppend(body);
        if (records.some((r) => (r.flags & (RECORD_FLAG.EPOCH | RECORD_FLAG.TRIM)) !== 0)) {
          throw new MisuseError('MS_MIRROR_PROTOCOL', 'malformed mirror frame: APPEND carries an epoch or trim marker');
        }
        await nvram.get(name).replicate(epoch, records, encoded);
        return undefined;
      }
      case MOP.TRIM: {
        const { name, epoch, upTo } = decodeTrim(body);
        const device = nvram.get(name);
        if (device.role !== 'replica') throw new RuntimeError('MS_MIRROR_CONFLICT', `device ${name} is a primary here`);
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
    this.partner = hello.nodeId;
    this.options.log.info({ partner: hello.nodeId, remote: this.socket.remoteAddress }, 'mirror partner connected');
    return encodeName(this.options.nodeId);
  }
}
