// One NBD connection: fixed newstyle handshake, option haggling, then transmission.
//
//   greeting -> client flags -> options (LIST, INFO, GO, EXPORT_NAME, STRUCTURED_REPLY,
//   LIST/SET_META_CONTEXT, ABORT; others NBD_REP_ERR_UNSUP) -> requests
//
// Every request passes one validator (command, flags, range, read-only, negotiated
// features) before it reaches the volume, and one function maps coded errors to NBD
// errnos. Requests run concurrently and replies go out as each completes, batched per
// tick in one corked write. Structured replies are used for READ and BLOCK_STATUS once
// negotiated, simple replies otherwise. A client that breaks the framing, or sets
// client flags we did not offer, is disconnected; nothing it sends can disturb another
// connection.

import type { Socket } from 'node:net';
import { isMemstrataError } from '../errors.js';
import type { Logger } from '../logger.js';
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
  OPT,
  OPT_NAME,
  REP,
} from '../protocol/nbd/spec.js';
import type { Volume, VolumeManager } from '../storage/volume-manager.js';
import type { VolumeIo } from '../storage/volume-io.js';
import type { BufferPool } from './buffer-pool.js';
import { CorkedWriter } from '../net/corked-writer.js';

export interface NbdHost {
  readonly volumes: VolumeManager;
  readonly io: VolumeIo;
  /** Large READ and WRITE payload buffers, reused once the socket has written them or the request is done. */
  readonly payloadBuffers: BufferPool;
  readonly log: Logger;
  readonly stats: NbdStats;
  isStopping(): boolean;
  closed(connection: NbdConnection): void;
}

export interface NbdStats {
  commands: Record<string, number>;
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

export class NbdConnection {
  readonly socket: Socket;
  readonly remote: string;
  private readonly host: NbdHost;
  private readonly parser: NbdServerParser;
  private noZeroes: boolean;
  private structured: boolean;
  /** The export the last SET_META_CONTEXT named, if it selected base:allocation. */
  private metaVolume: Volume | undefined;
  private baseAllocation: boolean;
  private volume: Volume | undefined;
  private readonly writer: CorkedWriter;
  private inFlight: number;
  private closing: boolean;
  private idle: (() => void) | undefined;

  constructor(socket: Socket, host: NbdHost) {
    this.socket = socket;
    this.remote = `${socket.remoteAddress ?? '?'}:${socket.remotePort ?? 0}`;
    this.host = host;
    this.noZeroes = false;
    this.structured = false;
    this.metaVolume = undefined;
    this.baseAllocation = false;
    this.volume = undefined;
    this.writer = new CorkedWriter(socket);
    this.inFlight = 0;
    this.closing = false;
    this.idle = undefined;
    this.parser = new NbdServerParser({
      onClientFlags: (flags) => {
        this.onClientFlags(flags);
      },
      onOption: (option, data) => {
        this.onOption(option, data);
      },
      onRequest: (request) => {
        this.onRequest(request);
      },
      allocate: (length) => this.host.payloadBuffers.acquire(length),
      onFatal: (error) => {
        this.host.stats.protocolErrors++;
        this.host.log.warn({ remote: this.remote, err: error.message }, 'NBD client broke the protocol; disconnecting');
        this.socket.destroy();
      },
    });
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => {
      this.parser.feed(chunk);
    });
    socket.on('error', (error) => {
      host.log.debug({ remote: this.remote, err: error }, 'NBD connection error');
    });
    socket.on('close', () => {
      this.closing = true;
      if (this.volume !== undefined) this.volume.connections--;
      this.volume = undefined;
      host.closed(this);
    });
    socket.write(encodeGreeting(HANDSHAKE.FIXED_NEWSTYLE | HANDSHAKE.NO_ZEROES));
  }

  /** The export this connection is attached to, once in transmission. */
  get exportName(): string | undefined {
    return this.volume?.name;
  }

  /** Stops reading, lets requests in flight finish, then closes. */
  async drainAndClose(): Promise<void> {
    this.closing = true;
    this.socket.pause();
    if (this.inFlight > 0) await new Promise<void>((resolve) => (this.idle = resolve));
    this.socket.end();
  }

  // ---- handshake ----

  private onClientFlags(flags: number): void {
    if ((flags & ~(CLIENT.FIXED_NEWSTYLE | CLIENT.NO_ZEROES)) !== 0) {
      this.host.log.warn({ remote: this.remote, flags }, 'NBD client set unknown client flags; disconnecting');
      this.socket.destroy();
      return;
    }
    this.noZeroes = (flags & CLIENT.NO_ZEROES) !== 0;
  }

  private onOption(option: number, data: Buffer): void {
    try {
      // ABORT is answered even while stopping (proto.md: "error further options ... other than NBD_OPT_ABORT").
      if (this.host.isStopping() && option !== OPT.ABORT) {
        this.optionError(option, REP.ERR_SHUTDOWN, 'the node is stopping');
        return;
      }
      switch (option) {
        case OPT.EXPORT_NAME:
          this.selectByExportName(data);
          break;
        case OPT.ABORT:
          this.socket.end(encodeOptionReply(option, REP.ACK));
          break;
        case OPT.LIST:
          if (data.length !== 0) {
            this.optionError(option, REP.ERR_INVALID, 'NBD_OPT_LIST takes no data');
            break;
          }
          for (const v of this.host.volumes.list()) {
            this.send(encodeOptionReply(option, REP.SERVER, serverPayload(v.name, describe(v))));
          }
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
          this.optionError(option, REP.ERR_POLICY, 'TLS is not offered by this node');
          break;
        default:
          this.optionError(option, REP.ERR_UNSUP, `option ${OPT_NAME[option] ?? option} is not supported`);
      }
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      this.optionError(option, REP.ERR_INVALID, message);
    }
  }

  private selectByExportName(data: Buffer): void {
    const name = data.toString('utf8');
    const volume = this.host.volumes.find(name);
    if (volume === undefined) {
      // EXPORT_NAME cannot answer an error: the spec says to close.
      this.host.log.info({ remote: this.remote, export: name }, 'NBD client asked for an unknown export');
      this.socket.destroy();
      return;
    }
    this.attach(volume);
    this.send(encodeExportNameReply(volume.size, this.transmissionFlags(volume), this.noZeroes));
    this.parser.startTransmission();
  }

  private infoOrGo(option: number, data: Buffer): void {
    const { name, infos } = decodeInfoRequest(data);
    const volume = this.host.volumes.find(name);
    if (volume === undefined) {
      this.optionError(option, REP.ERR_UNKNOWN, `no export named "${name}"`);
      return;
    }
    const flags = this.transmissionFlags(volume);
    this.send(encodeOptionReply(option, REP.INFO, infoExportPayload(volume.size, flags)));
    for (const info of new Set(infos)) {
      if (info === INFO.NAME) this.send(encodeOptionReply(option, REP.INFO, infoStringPayload(INFO.NAME, volume.name)));
      if (info === INFO.DESCRIPTION) this.send(encodeOptionReply(option, REP.INFO, infoStringPayload(INFO.DESCRIPTION, describe(volume))));
      if (info === INFO.BLOCK_SIZE) this.send(encodeOptionReply(option, REP.INFO, infoBlockSizePayload(BLOCK.MIN, BLOCK.PREFERRED, BLOCK.MAX)));
    }
    this.send(encodeOptionReply(option, REP.ACK));
    if (option === OPT.INFO) {
      this.parser.resume();
      return;
    }
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
    if (volume === undefined) {
      this.optionError(option, REP.ERR_UNKNOWN, `no export named "${name}"`);
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

  private attach(volume: Volume): void {
    // Meta contexts chosen for another export do not carry over.
    if (this.metaVolume !== volume) this.baseAllocation = false;
    volume.connections++;
    this.volume = volume;
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
    this.parser.resume();
  }

  private optionError(option: number, type: number, message: string): void {
    this.send(encodeOptionError(option, type, message));
    this.parser.resume();
  }

  // ---- transmission ----

  private onRequest(request: NbdRequest): void {
    if (this.closing) return;
    const name = CMD_NAME[request.type] ?? 'UNKNOWN';
    this.host.stats.commands[name] = (this.host.stats.commands[name] ?? 0) + 1;
    if (request.type === CMD.DISC) {
      if (request.pooled !== undefined) this.host.payloadBuffers.release(request.pooled);
      void this.drainAndClose();
      return;
    }
    this.inFlight++;
    this.serve(request)
      .catch((error: unknown) => {
        this.host.stats.errors[name] = (this.host.stats.errors[name] ?? 0) + 1;
        const errno = errnoOf(error);
        if (errno === ERRNO.EIO) this.host.log.error({ remote: this.remote, command: name, err: error }, 'NBD request failed');
        this.replyError(request, errno, error instanceof Error ? error.message : String(error));
      })
      .finally(() => {
        // The payload has been copied into the cache or written to the store by now.
        if (request.pooled !== undefined) this.host.payloadBuffers.release(request.pooled);
        this.inFlight--;
        if (this.inFlight === 0 && this.idle !== undefined) this.idle();
      });
  }

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
        this.host.stats.bytesRead += request.length;
        this.send(this.structured ? encodeOffsetDataHead(request.cookie, request.offset, data.length, true) : encodeSimpleReply(request.cookie, 0));
        this.send(data, () => {
          this.host.payloadBuffers.release(pooled);
        });
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
        await io.zero(volume, request.offset, request.length, { fua, allocate: false });
        break;
      case CMD.WRITE_ZEROES: {
        const allocate = (request.flags & CMD_FLAG.NO_HOLE) !== 0;
        // Zeroing with NO_HOLE writes every byte, which is not fast; FAST_ZERO asks us to
        // refuse rather than be slow.
        if (allocate && (request.flags & CMD_FLAG.FAST_ZERO) !== 0) throw new NbdError(ERRNO.ENOTSUP, 'zeroing with NO_HOLE is not fast on this export');
        await io.zero(volume, request.offset, request.length, { fua, allocate });
        break;
      }
      case CMD.CACHE:
        await io.prefetch(volume, request.offset, request.length);
        break;
      case CMD.BLOCK_STATUS: {
        let extents = io.blockStatus(volume, request.offset, request.length);
        if ((request.flags & CMD_FLAG.REQ_ONE) !== 0) extents = extents.slice(0, 1);
        this.send(encodeBlockStatus(request.cookie, BASE_ALLOCATION_ID, extents, true));
        return;
      }
      default:
        throw new NbdError(ERRNO.EINVAL, `unknown command ${request.type}`);
    }
    this.send(encodeSimpleReply(request.cookie, 0));
  }

  /** The one request validator: everything a backend may then trust. */
  private validate(request: NbdRequest): Volume {
    const volume = this.volume;
    if (volume === undefined) throw new NbdError(ERRNO.EINVAL, 'no export attached');
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
    if (this.structured) this.send(encodeStructuredError(request.cookie, errno, message));
    else this.send(encodeSimpleReply(request.cookie, errno));
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

