// One rmem connection: frames in, requests validated and served, replies out.
//
//   socket -> FrameParser -> dispatch(op) -> ServerMemory -> reply -> corked socket
//
// Requests on one connection run concurrently and their replies go out as they are
// ready, in any order; each carries its tag back. Replies made in one tick leave in one
// corked write. Reading pauses while `maxInFlight` requests are in progress or while the
// socket's write buffer is full (a client that does not read its replies stops being
// read), so one connection cannot make the node buffer without bound.
//
// A malformed request gets an error reply and the connection carries on; a frame that
// breaks the framing (bad magic, oversized body) gets one PROTOCOL error with tag 0 and
// the connection is closed. Either way nothing outside this connection is disturbed.

import type { Socket } from 'node:net';
import { MisuseError, RuntimeError, isMemstrataError } from '../errors.js';
import type { ServerMemory, ServerRegion } from '../memory/server-memory.js';
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
  type Tag,
} from '../protocol/rmem/codec.js';
import { statusOf } from '../protocol/rmem/errors.js';
import { FrameParser, type Frame } from '../protocol/rmem/parser.js';
import { HEADER_SIZE, MAX_BODY, MAX_DATA, OP, OP_NAME, STATUS, VERSION } from '../protocol/rmem/spec.js';
import type { Logger } from '../logger.js';
import type { BufferPool } from './buffer-pool.js';
import { CorkedWriter } from '../net/corked-writer.js';

/** What a connection needs from the service that owns it. */
export interface ConnectionHost {
  readonly memory: ServerMemory;
  readonly nvram: DeviceManager;
  /** The volume whose write log the device is, if any; such devices are not open to clients. */
  writeLogOf(device: string): string | undefined;
  readonly log: Logger;
  readonly maxInFlight: number;
  readonly stats: RmemStats;
  /** Large reply buffers, reused across requests and connections. */
  readonly replyBuffers: BufferPool;
  isStopping(): boolean;
  /** Admits a HELLO; returns the session's reply fields or throws a coded error. */
  hello(connection: RmemConnection, serverId: string, token: string): { resumed: boolean; sessionId: bigint; leaseMs: number; nodeId: string };
  /** Notes traffic for the lease. */
  touch(serverId: string): void;
  closed(connection: RmemConnection): void;
}

export interface RmemStats {
  requests: Record<string, number>;
  errors: Record<string, number>;
  bytesRead: number;
  bytesWritten: number;
  connectionsAccepted: number;
  protocolErrors: number;
}

export class RmemConnection {
  readonly socket: Socket;
  readonly remote: string;
  serverId: string | undefined;
  private readonly host: ConnectionHost;
  private readonly parser: FrameParser;
  private readonly writer: CorkedWriter;
  /** Journals opened on this connection: handle -> device and the epoch it was opened with. */
  private readonly journals: Map<number, { device: NvramDevice; epoch: number }>;
  private nextHandle: number;
  private inFlight: number;
  private pausedForInFlight: boolean;
  private pausedForDrain: boolean;
  private closing: boolean;
  private idle: (() => void) | undefined;

  constructor(socket: Socket, host: ConnectionHost) {
    this.socket = socket;
    this.remote = `${socket.remoteAddress ?? '?'}:${socket.remotePort ?? 0}`;
    this.serverId = undefined;
    this.host = host;
    this.writer = new CorkedWriter(socket);
    this.journals = new Map();
    this.nextHandle = 1;
    this.inFlight = 0;
    this.pausedForInFlight = false;
    this.pausedForDrain = false;
    this.closing = false;
    this.idle = undefined;
    this.parser = new FrameParser('request', {
      onFrame: (frame) => {
        this.onFrame(frame);
      },
      onFatal: (error) => {
        this.onFatal(error);
      },
    }, MAX_BODY);
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => {
      this.parser.feed(chunk);
    });
    socket.on('drain', () => {
      this.pausedForDrain = false;
      this.updateFlow();
    });
    socket.on('error', (error) => {
      host.log.debug({ remote: this.remote, err: error }, 'rmem connection error');
    });
    socket.on('close', () => {
      this.closing = true;
      host.closed(this);
    });
  }

  /** True while requests of this connection are still being served. */
  get busy(): boolean {
    return this.inFlight > 0;
  }

  /** Stops reading, lets requests in flight finish, then closes. */
  async drainAndClose(): Promise<void> {
    this.closing = true;
    this.socket.pause();
    if (this.inFlight > 0) await new Promise<void>((resolve) => (this.idle = resolve));
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
    this.send(encodeErrorReply(0, STATUS.PROTOCOL, { hi: 0, lo: 0 }, error.message));
    this.closing = true;
    this.socket.end();
  }

  private onFrame(frame: Frame): void {
    if (this.closing) return;
    const tag: Tag = { hi: frame.tagHi, lo: frame.tagLo };
    const name = OP_NAME[frame.op] ?? 'UNKNOWN';
    this.host.stats.requests[name] = (this.host.stats.requests[name] ?? 0) + 1;
    this.inFlight++;
    this.updateFlow();
    this.dispatch(frame, tag)
      .catch((error: unknown) => {
        this.replyError(frame.op, tag, error);
      })
      .finally(() => {
        this.inFlight--;
        if (this.inFlight === 0 && this.idle !== undefined) this.idle();
        this.updateFlow();
      });
  }

  private async dispatch(frame: Frame, tag: Tag): Promise<void> {
    if (this.host.isStopping()) throw new RuntimeError('MS_SHUTTING_DOWN', 'the node is stopping');
    const { op, body } = frame;
    if (op === OP.HELLO) return this.onHello(body, tag);
    const serverId = this.serverId;
    if (serverId === undefined) {
      if (OP_NAME[op] === undefined) throw new MisuseError('MS_RMEM_UNSUPPORTED', `unknown operation ${op}`);
      throw new MisuseError('MS_RMEM_NO_SESSION', `${OP_NAME[op] ?? op} before HELLO`);
    }
    this.host.touch(serverId);
    const memory = this.host.memory;
    switch (op) {
      case OP.KEEPALIVE:
        decodeEmpty(body, 'KEEPALIVE');
        this.send(encodeEmptyReply(OP.KEEPALIVE, tag));
        return;
      case OP.CAPACITY:
        decodeEmpty(body, 'CAPACITY');
        this.send(encodeCapacityReply(tag, memory.capacity(serverId)));
        return;
      case OP.BIND:
        return this.onBind(serverId, body, tag);
      case OP.READ:
        return this.onRead(serverId, body, tag);
      case OP.WRITE:
        return this.onWrite(serverId, body, tag);
      case OP.READV:
        return this.onReadv(serverId, body, tag);
      case OP.WRITEV:
        return this.onWritev(serverId, body, tag);
      case OP.JOPEN: {
        const { name, epoch } = decodeJopenRequest(body);
        if (this.journals.size >= MAX_JOURNALS) throw new MisuseError('MS_NVRAM_INVALID', `at most ${MAX_JOURNALS} journals may be open on one connection`);
        const device = this.host.nvram.get(name);
        const volume = this.host.writeLogOf(name);
        // Records there are replayed into the volume: only the node itself may write them.
        if (volume !== undefined) throw new MisuseError('MS_NVRAM_INVALID', `NVRAM device ${name} is the write log of volume ${volume} and is not open to clients`);
        // On a mirror replica, a newer epoch takes the device over (failover).
        await this.host.nvram.openJournal(name, epoch);
        const handle = this.nextHandle++;
        this.journals.set(handle, { device, epoch });
        this.send(encodeJopenReply(tag, handle, journalInfo(device)));
        return;
      }
      case OP.JAPPEND: {
        const { handle, entries } = decodeJappendRequest(body);
        const journal = this.journal(handle);
        for (const e of entries) {
          if (e.target !== undefined && Buffer.byteLength(e.target.volume) > MAX_TARGET_NAME) {
            throw new MisuseError('MS_NVRAM_INVALID', `target volume name longer than ${MAX_TARGET_NAME} bytes`);
          }
        }
        const appended = await journal.device.append(journal.epoch, entries);
        this.send(encodeJappendReply(tag, appended));
        return;
      }
      case OP.JREAD: {
        const request = decodeJreadRequest(body);
        const records = await this.journal(request.handle).device.read(request.fromSeq, Math.min(request.maxRecords, 4096), Math.min(request.maxBytes, MAX_DATA));
        for (const part of encodeJreadReply(tag, records)) this.send(part);
        return;
      }
      case OP.JTRIM: {
        const { handle, value } = decodeHandleRequest(body, true, 'JTRIM');
        const journal = this.journal(handle);
        await journal.device.trim(journal.epoch, value);
        this.send(encodeEmptyReply(OP.JTRIM, tag));
        return;
      }
      case OP.JINFO: {
        const { handle } = decodeHandleRequest(body, false, 'JINFO');
        this.send(encodeJinfoReply(tag, journalInfo(this.journal(handle).device)));
        return;
      }
      case OP.FREE: {
        const request = decodeFreeRequest(body);
        await memory.free(serverId, request.regionId, request.key);
        this.send(encodeEmptyReply(OP.FREE, tag));
        return;
      }
      default:
        throw new MisuseError('MS_RMEM_UNSUPPORTED', `unknown operation ${op}`);
    }
  }

  private async onHello(body: Buffer, tag: Tag): Promise<void> {
    const hello = decodeHelloRequest(body);
    if (this.serverId !== undefined) throw new MisuseError('MS_RMEM_NO_SESSION', `HELLO on a connection that already belongs to server ${this.serverId}`);
    if (hello.version !== VERSION) {
      throw new MisuseError('MS_RMEM_VERSION', `protocol version ${hello.version} is not supported; this node speaks version ${VERSION}`);
    }
    const session = this.host.hello(this, hello.serverId, hello.token);
    this.serverId = hello.serverId;
    this.send(encodeHelloReply(tag, { version: VERSION, maxBody: MAX_BODY, ...session }));
    return Promise.resolve();
  }

  private async onBind(serverId: string, body: Buffer, tag: Tag): Promise<void> {
    const request = decodeBindRequest(body);
    const region = await this.host.memory.bind(serverId, request.size, request.placement);
    this.send(encodeBindReply(tag, { regionId: region.id, key: region.key, size: region.size, ranges: [...region.ranges] }));
  }

  private async onRead(serverId: string, body: Buffer, tag: Tag): Promise<void> {
    const request = decodeReadRequest(body);
    if (request.length > MAX_DATA) throw tooBig(request.length);
    const region = this.host.memory.lookup(serverId, request.regionId, request.key);
    const reply = this.dataReply(OP.READ, tag, request.length);
    try {
      await this.host.memory.read(region, request.offset, reply.subarray(HEADER_SIZE, HEADER_SIZE + request.length));
    } catch (error) {
      this.host.replyBuffers.release(reply);
      throw error;
    }
    this.host.stats.bytesRead += request.length;
    this.sendPooled(reply, HEADER_SIZE + request.length);
  }

  private async onWrite(serverId: string, body: Buffer, tag: Tag): Promise<void> {
    const request = decodeWriteRequest(body);
    const region = this.host.memory.lookup(serverId, request.regionId, request.key);
    await this.host.memory.write(region, request.offset, request.data);
    this.host.stats.bytesWritten += request.data.length;
    this.send(encodeEmptyReply(OP.WRITE, tag));
  }

  private async onReadv(serverId: string, body: Buffer, tag: Tag): Promise<void> {
    const entries = decodeReadvRequest(body);
    const total = entries.reduce((sum, e) => sum + e.length, 0);
    if (total > MAX_DATA) throw tooBig(total);
    // Every entry is checked before any is read: a READV is served whole or not at all.
    const regions = entries.map((e) => this.checkedRegion(serverId, e.regionId, e.key, e.offset, e.length));
    const reply = this.dataReply(OP.READV, tag, total);
    let at = HEADER_SIZE;
    const reads: Promise<void>[] = [];
    for (const [i, e] of entries.entries()) {
      const region = regions[i];
      if (region !== undefined) reads.push(this.host.memory.read(region, e.offset, reply.subarray(at, at + e.length)));
      at += e.length;
    }
    try {
      await Promise.all(reads);
    } catch (error) {
      this.host.replyBuffers.release(reply);
      throw error;
    }
    this.host.stats.bytesRead += total;
    this.sendPooled(reply, HEADER_SIZE + total);
  }

  private async onWritev(serverId: string, body: Buffer, tag: Tag): Promise<void> {
    const { entries, data } = decodeWritevRequest(body);
    const regions = entries.map((e) => this.checkedRegion(serverId, e.regionId, e.key, e.offset, e.length));
    let at = 0;
    const writes: Promise<void>[] = [];
    for (const [i, e] of entries.entries()) {
      const region = regions[i];
      if (region !== undefined) writes.push(this.host.memory.write(region, e.offset, data.subarray(at, at + e.length)));
      at += e.length;
    }
    await Promise.all(writes);
    this.host.stats.bytesWritten += data.length;
    this.send(encodeEmptyReply(OP.WRITEV, tag));
  }

  private journal(handle: number): { device: NvramDevice; epoch: number } {
    const journal = this.journals.get(handle);
    if (journal === undefined) throw new MisuseError('MS_NVRAM_INVALID', `journal handle ${handle} was not opened on this connection`);
    return journal;
  }

  private checkedRegion(serverId: string, regionId: number, key: bigint, offset: number, length: number): ServerRegion {
    const region = this.host.memory.lookup(serverId, regionId, key);
    if (offset < 0 || offset + length > region.size) {
      throw new MisuseError('MS_RMEM_RANGE', `offset ${offset} length ${length} lies outside region ${regionId} of ${region.size} bytes`);
    }
    return region;
  }

  private replyError(op: number, tag: Tag, error: unknown): void {
    const status = statusOf(error);
    const name = OP_NAME[op] ?? 'UNKNOWN';
    this.host.stats.errors[name] = (this.host.stats.errors[name] ?? 0) + 1;
    const message = error instanceof Error ? error.message : String(error);
    if (!isMemstrataError(error) || status === STATUS.IO) {
      this.host.log.error({ remote: this.remote, server: this.serverId, op: name, err: error }, 'rmem request failed');
    }
    this.send(encodeErrorReply(op, status, tag, message));
    // A refused HELLO (token, version) ends the connection; the client has nothing more to say.
    if (op === OP.HELLO && this.serverId === undefined && (status === STATUS.AUTH || status === STATUS.VERSION)) {
      this.closing = true;
      this.socket.end();
    }
  }

  /** A data reply's buffer with its header written; the caller fills in the data. */
  private dataReply(op: number, tag: Tag, length: number): Buffer {
    const buf = this.host.replyBuffers.acquire(HEADER_SIZE + length);
    writeResponseHeader(buf, op, STATUS.OK, tag, length);
    return buf;
  }

  /** Sends the first `length` bytes of a pooled buffer and gives it back once the kernel has it. */
  private sendPooled(buf: Buffer, length: number): void {
    this.send(buf.subarray(0, length), () => {
      this.host.replyBuffers.release(buf);
    });
  }

  /** Queues a reply (batched per tick by the writer); stops reading while the socket is full. */
  private send(buf: Buffer, written?: () => void): void {
    if (!this.writer.write(buf, written)) {
      this.pausedForDrain = true;
      this.updateFlow();
    }
  }

  private updateFlow(): void {
    const limit = this.host.maxInFlight;
    if (this.inFlight >= limit) this.pausedForInFlight = true;
    else if (this.inFlight <= limit >> 1) this.pausedForInFlight = false;
    if (this.closing) return;
    if (this.pausedForInFlight || this.pausedForDrain) this.socket.pause();
    else this.socket.resume();
  }
}

/** Open journal handles one connection may hold. */
const MAX_JOURNALS = 1024;

function journalInfo(device: NvramDevice): JournalInfo {
  const info = device.info();
  return { epoch: info.epoch, size: info.size, used: info.used, firstSeq: info.firstSeq ?? 0, lastSeq: info.lastSeq ?? 0, policy: info.policy };
}

function tooBig(length: number): MisuseError {
  return new MisuseError('MS_RMEM_TOO_BIG', `${length} bytes of data in one request exceeds the limit of ${MAX_DATA}`);
}
