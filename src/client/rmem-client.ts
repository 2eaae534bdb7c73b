// RmemClient: borrow memory from a memstrata node over the rmem protocol.
//
// One TCP connection carries many requests at once (pipelining); each has a tag and
// replies may come back in any order. Requests issued in one tick leave in one corked
// write. Timeouts are checked by one coarse timer, not a timer per request. A keepalive
// goes out when the connection has been quiet for a third of the lease.
//
// When the connection drops, requests in flight fail with MS_RMEM_DISCONNECTED (the
// caller decides whether to retry: READ and WRITE are safe to repeat, BIND is not), and
// the client reconnects with backoff for up to one lease. A successful HELLO within the
// lease resumes the session with its regions; requests issued meanwhile wait for it. If
// the node no longer knows the session (the lease ran out) the client emits
// `sessionLost` and every region it held is gone.
//
// Resuming takes the session's secret, which the node returned to the HELLO that opened
// the session (protocol version 2): the client keeps it in `session.secret` and presents
// it on every reconnect, so nobody else who knows the server id can take the session
// over. A refused resume (MS_RMEM_SECRET, MS_RMEM_AUTH) is not retried.

import { EventEmitter } from 'node:events';
import { connect as netConnect, isIP, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import { MisuseError, NetworkError, asError, type MemstrataError } from '../errors.js';
import {
  decodeBindReply,
  decodeCapacityReply,
  decodeHelloReply,
  encodeBindRequest,
  encodeEmptyRequest,
  encodeFreeRequest,
  encodeHelloRequest,
  encodeReadRequest,
  encodeReadvRequest,
  encodeWriteHead,
  encodeWritevHead,
  type BindReply,
  type CapacityEntry,
  type HelloReply,
  type Placement,
  type Tag,
  type WireRange,
  type JournalInfo,
  type JournalEntry,
  encodeJcreateRequest,
  encodeJopenRequest,
  encodeJremoveRequest,
  decodeJopenReply,
  encodeJappendEntries,
  encodeJappendHead,
  decodeJappendReply,
  encodeJreadRequest,
  encodeHandleRequest,
  decodeJinfoReply,
} from '../protocol/rmem/codec.js';
import { MAX_TARGET_NAME, decodeRecord, type JournalRecord } from '../protocol/journal/record.js';
import { errorOf } from '../protocol/rmem/errors.js';
import { CorkedWriter } from '../net/corked-writer.js';
import { ownReadBuffer } from '../net/socket-input.js';
import { FrameParser, type Frame } from '../protocol/rmem/parser.js';
import { MAX_DATA, MAX_VECTOR, OP, OP_NAME, STATUS, VERSION, type PerformanceClass, type WireMediumName } from '../protocol/rmem/spec.js';

export type { CapacityEntry, WireRange, PerformanceClass, WireMediumName as MediumName, JournalInfo, JournalRecord };

/** A region bound on a node: what every read, write and free names. */
export interface Region {
  /** Region id, unique on the node while it runs. */
  readonly regionId: number;
  /** Random 64-bit key; the node serves the region only with it. */
  readonly key: bigint;
  /** Bytes, a whole number of 4 KiB pages. */
  readonly size: number;
  /** Where the region lives on the node: medium and physical address ranges. */
  readonly ranges: readonly WireRange[];
}

/** An open journal: what appends, reads and trims name. Handles belong to one connection. */
export interface Journal {
  readonly device: string;
  readonly handle: number;
  readonly epoch: number;
  /** The device as it was when opened. */
  readonly info: JournalInfo;
}

/** Where a bind's memory should come from. */
export type BindWhere = { medium: WireMediumName } | { class: PerformanceClass } | { medium: WireMediumName; address: number };

export interface RmemClientOptions {
  /** Node address; default 127.0.0.1. */
  host?: string;
  /** rmem port; default 10810. */
  port?: number;
  /**
   * A Unix socket instead of host and port: a guest's cut-through socket
   * (`MEMSTRATA_NVRAM_SOCKET`), which reaches that guest's own NVRAM devices.
   */
  path?: string;
  /** This server's id, 1 to 64 bytes; sessions and regions belong to it. */
  serverId: string;
  /** Shared token, when the node is configured with one. */
  token?: string;
  /** Per-request timeout in ms; default 10000. */
  timeoutMs?: number;
  /** Connect (and HELLO) timeout in ms; default 5000. */
  connectTimeoutMs?: number;
  /** Send keepalives on a quiet connection; default true. */
  keepalive?: boolean;
  /** Reconnect and resume the session after a lost connection; default true. */
  reconnect?: boolean;
  /**
   * The secret of a session this server opened earlier (`session.secret` of that client),
   * to resume it from a new client, for instance after a restart. Without it, connect
   * opens a new session, and fails with MS_RMEM_SECRET while the server id still has one.
   */
  sessionSecret?: Uint8Array;
  /**
   * TLS to a node with rmem.tls=require: node:tls connection options, such as `ca` (the
   * CA that signed the node's certificate) and `cert`/`key` (this server's, when the node
   * has tls.ca). The node's certificate is checked against `ca` (or the system's CAs),
   * for the host name given (or `servername`).
   */
  tls?: ConnectionOptions;
}

interface Pending {
  op: number;
  tag: number;
  /** Where a READ's data should land (readInto), or undefined. */
  target: Buffer | undefined;
  deadline: number;
  frames: Buffer[] | undefined;
  resolve(frame: Frame): void;
  reject(error: MemstrataError): void;
}

type State = 'connected' | 'reconnecting' | 'closed';

/**
 * Bytes of encoded entries (payloads, target names and fixed fields) coalesced into one
 * JAPPEND at most: such a request mostly arrives in one socket read (64 KiB), which the
 * node parses in place, where a larger one is assembled into a buffer of its own.
 */
const COALESCE_BYTES = 56 * 1024;

/** Appends of one tick to one journal, sent as one JAPPEND (see journalAppend). */
interface AppendBatch {
  handle: number;
  /** The entries encoded (encodeJappendEntries), back to back, and their count and bytes. */
  parts: Buffer[];
  count: number;
  length: number;
  /** Each caller's entries: `count` from `first`. */
  callers: { first: number; count: number; resolve(appended: { seq: number; timestamp: number }[]): void; reject(error: Error): void }[];
}

/**
 * Whether an append may share a JAPPEND with others: nothing in it that the node refuses
 * on its own (an empty append, a target name too long, too many entries), which would
 * fail the appends it was sent with, and not larger than COALESCE_BYTES encoded.
 */
function coalescable(entries: readonly JournalEntry[], bytes: number): boolean {
  return entries.length > 0 && entries.length <= MAX_VECTOR && bytes <= COALESCE_BYTES && entries.every((e) => e.target === undefined || Buffer.byteLength(e.target.volume) <= MAX_TARGET_NAME);
}

export interface RmemClientEvents {
  /** The connection dropped; the client is trying to resume (or, with reconnect off, is closed). */
  disconnected: [error: Error | undefined];
  /** The session was resumed on a new connection, regions intact. */
  reconnected: [];
  /** The node no longer had the session: every region of this client is gone. */
  sessionLost: [];
}

export class RmemClient extends EventEmitter<RmemClientEvents> {
  /** The node's HELLO answer: lease, session id, node id, limits, and the session's secret (keep it private). */
  session: HelloReply;
  private readonly options: Required<Omit<RmemClientOptions, 'token' | 'sessionSecret' | 'path' | 'tls'>> & { token: string; path: string | undefined; tls: ConnectionOptions | undefined };
  private socket: Socket;
  private parser: FrameParser;
  private state: State;
  private readonly pending: Map<number, Pending>;
  private readonly waiting: Pending[];
  private nextTag: number;
  private writer: CorkedWriter;
  /** Appends made this tick, not sent yet (see journalAppend). */
  private appends: AppendBatch | undefined;
  private lastSent: number;
  private readonly timer: NodeJS.Timeout;

  private constructor(options: RmemClient['options'], connection: Connection) {
    super();
    this.options = options;
    this.socket = connection.socket;
    this.parser = connection.parser;
    this.session = connection.session;
    this.state = 'connected';
    this.pending = new Map();
    this.waiting = [];
    this.nextTag = 1;
    this.writer = new CorkedWriter(connection.socket);
    this.appends = undefined;
    this.lastSent = Date.now();
    const tick = Math.max(20, Math.min(250, Math.floor(options.timeoutMs / 4), Math.floor(connection.session.leaseMs / 6)));
    this.timer = setInterval(() => {
      this.onTick();
    }, tick);
    this.timer.unref();
    this.attach(connection);
  }

  /** Connects, says HELLO, and resolves once the node has admitted the session. */
  static async connect(options: RmemClientOptions): Promise<RmemClient> {
    const full = {
      host: options.host ?? '127.0.0.1',
      port: options.port ?? 10810,
      path: options.path,
      serverId: options.serverId,
      token: options.token ?? '',
      timeoutMs: options.timeoutMs ?? 10_000,
      connectTimeoutMs: options.connectTimeoutMs ?? 5_000,
      keepalive: options.keepalive ?? true,
      reconnect: options.reconnect ?? true,
      tls: options.tls,
    };
    if (full.tls !== undefined && full.path !== undefined) throw new MisuseError('MS_RMEM_INVALID', 'tls is for TCP connections to a node, not for a cut-through socket (path)');
    const id = Buffer.byteLength(full.serverId, 'utf8');
    if (id === 0 || id > 64) throw new MisuseError('MS_RMEM_INVALID', `serverId must be 1 to 64 bytes, got ${id}`);
    const secret = options.sessionSecret === undefined ? undefined : Buffer.from(options.sessionSecret);
    return new RmemClient(full, await handshake(full, secret));
  }

  /** Per medium: capacity, server partition, what can be bound now and by growing, and this server's use. */
  async capacity(): Promise<CapacityEntry[]> {
    const tag = this.tag();
    const frame = await this.request(OP.CAPACITY, tag, [encodeEmptyRequest(OP.CAPACITY, tag)]);
    return decodeCapacityReply(frame.body);
  }

  /**
   * Binds `size` bytes (rounded up to 4 KiB pages). `where` names a medium, a
   * performance class (`highest`: DRAM first; `capacity`: flash first), or a medium
   * and a physical address. Default: class `highest`. Fails with MS_RMEM_NO_CAPACITY
   * when the node cannot provide it.
   */
  async bind(size: number, where: BindWhere = { class: 'highest' }): Promise<Region> {
    const placement: Placement =
      'class' in where ? { kind: 'class', class: where.class } : 'address' in where ? { kind: 'address', medium: where.medium, address: where.address } : { kind: 'medium', medium: where.medium };
    const tag = this.tag();
    const frame = await this.request(OP.BIND, tag, [encodeBindRequest(tag, { size, placement })]);
    const reply: BindReply = decodeBindReply(frame.body);
    return { regionId: reply.regionId, key: reply.key, size: reply.size, ranges: reply.ranges };
  }

  /** Reads `length` bytes at `offset` in the region. */
  async read(region: Region, offset: number, length: number): Promise<Buffer> {
    checkData(length);
    const tag = this.tag();
    const frame = await this.request(OP.READ, tag, [encodeReadRequest(tag, { regionId: region.regionId, key: region.key, offset, length })]);
    return frame.body;
  }

  /**
   * Reads `target.length` bytes at `offset` straight into `target` (no allocation per
   * read: reuse one buffer across reads). Resolves with the number of bytes read.
   */
  async readInto(region: Region, offset: number, target: Uint8Array): Promise<number> {
    checkData(target.length);
    const tag = this.tag();
    const into = Buffer.from(target.buffer, target.byteOffset, target.byteLength);
    const frame = await this.request(OP.READ, tag, [encodeReadRequest(tag, { regionId: region.regionId, key: region.key, offset, length: target.length })], into);
    if (frame.body !== into) frame.body.copy(into);
    return frame.body.length;
  }

  /** Writes `data` at `offset` in the region. */
  async write(region: Region, offset: number, data: Uint8Array): Promise<void> {
    checkData(data.length);
    const tag = this.tag();
    const head = encodeWriteHead(tag, { regionId: region.regionId, key: region.key, offset }, data.length);
    await this.request(OP.WRITE, tag, [head, Buffer.from(data.buffer, data.byteOffset, data.byteLength)]);
  }

  /** Reads several ranges, of one or more regions, in one request. */
  async readv(entries: readonly { region: Region; offset: number; length: number }[]): Promise<Buffer[]> {
    checkData(entries.reduce((sum, e) => sum + e.length, 0));
    const access = entries.map((e) => ({ regionId: e.region.regionId, key: e.region.key, offset: e.offset, length: e.length }));
    const tag = this.tag();
    const frame = await this.request(OP.READV, tag, [encodeReadvRequest(tag, access)]);
    const result: Buffer[] = [];
    let at = 0;
    for (const e of entries) {
      result.push(frame.body.subarray(at, at + e.length));
      at += e.length;
    }
    return result;
  }

  /** Writes several ranges, of one or more regions, in one request. */
  async writev(entries: readonly { region: Region; offset: number; data: Uint8Array }[]): Promise<void> {
    checkData(entries.reduce((sum, e) => sum + e.data.length, 0));
    const access = entries.map((e) => ({ regionId: e.region.regionId, key: e.region.key, offset: e.offset, length: e.data.length }));
    const tag = this.tag();
    const frames = [encodeWritevHead(tag, access), ...entries.map((e) => Buffer.from(e.data.buffer, e.data.byteOffset, e.data.byteLength))];
    await this.request(OP.WRITEV, tag, frames);
  }

  /** Frees a region; its memory is zeroed on the node. */
  async free(region: Region): Promise<void> {
    const tag = this.tag();
    await this.request(OP.FREE, tag, [encodeFreeRequest(tag, { regionId: region.regionId, key: region.key })]);
  }

  // ---- NVRAM journals ----

  /**
   * Opens a journal (an NVRAM device) with an epoch. A higher epoch than the device has
   * seen fences every older writer; an older one fails with MS_NVRAM_FENCED.
   */
  async journalOpen(device: string, epoch: number): Promise<Journal> {
    const tag = this.tag();
    const frame = await this.request(OP.JOPEN, tag, [encodeJopenRequest(tag, device, epoch)]);
    const { handle, info } = decodeJopenReply(frame.body);
    return { device, handle, epoch, info };
  }

  /**
   * Appends records; resolves with their sequence numbers and timestamps once they are
   * durable under the device's policy. A full device fails with MS_NVRAM_FULL.
   *
   * Appends to one journal made in the same tick (until the promise jobs and nextTick
   * callbacks running now are done) without `writer` leave as one JAPPEND, in call
   * order, up to MAX_VECTOR records and COALESCE_BYTES of encoded entries: one request,
   * one turn of the node's append path and one reply for all of them, instead of one
   * each. They are appended together or not at all: a full device refuses their sum,
   * and any failure fails each of them. Nothing else waits for them: any other request
   * of this client first sends the appends made before it, so requests leave in the
   * order they were made.
   *
   * With `writer` (16 hex digits and the writer's number for the first entry; entry i
   * gets firstSeq + i), a retry of numbers the device already took is answered with the
   * first append's sequence numbers and appends nothing: what a multipath client re-sends
   * after a failover lands once (MultipathJournal does this). Such an append leaves alone.
   */
  async journalAppend(journal: Journal, entries: readonly { payload: Uint8Array; target?: { volume: string; offset: number } }[], writer?: { id: string; firstSeq: number }): Promise<{ seq: number; timestamp: number }[]> {
    const wire = entries.map((e) => ({ payload: Buffer.from(e.payload.buffer, e.payload.byteOffset, e.payload.byteLength), target: e.target }));
    // Encoded now, as the call finds its arguments: an entry that cannot be (an offset out
    // of range) fails this call alone, and a target the caller changes later is not read again.
    const body = encodeJappendEntries(wire);
    if (writer !== undefined || !coalescable(wire, body.length)) {
      const tag = this.tag();
      const head = encodeJappendHead(tag, journal.handle, wire.length, body.length, writer);
      const frame = await this.request(writer === undefined ? OP.JAPPEND : OP.JAPPENDW, tag, [head, ...body.parts]);
      return decodeJappendReply(frame.body);
    }
    let batch = this.appends;
    if (batch !== undefined && (batch.handle !== journal.handle || batch.count + wire.length > MAX_VECTOR || batch.length + body.length > COALESCE_BYTES)) {
      this.sendAppends();
      batch = undefined;
    }
    if (batch === undefined) {
      const fresh: AppendBatch = { handle: journal.handle, parts: [], count: 0, length: 0, callers: [] };
      this.appends = batch = fresh;
      process.nextTick(() => {
        if (this.appends === fresh) this.sendAppends();
      });
    }
    const first = batch.count;
    for (const part of body.parts) batch.parts.push(part);
    batch.count += wire.length;
    batch.length += body.length;
    const into = batch;
    return new Promise((resolve, reject) => {
      into.callers.push({ first, count: wire.length, resolve, reject });
    });
  }

  /** Sends the appends coalesced so far as one JAPPEND and hands each caller its part of the reply. */
  private sendAppends(): void {
    const batch = this.appends;
    if (batch === undefined) return;
    this.appends = undefined;
    const tag = this.tag();
    const head = encodeJappendHead(tag, batch.handle, batch.count, batch.length);
    this.request(OP.JAPPEND, tag, [head, ...batch.parts]).then(
      (frame) => {
        let appended: { seq: number; timestamp: number }[];
        try {
          appended = decodeJappendReply(frame.body);
          if (appended.length !== batch.count) throw new MisuseError('MS_RMEM_PROTOCOL', `JAPPEND reply: ${appended.length} records for ${batch.count} appended`);
        } catch (error) {
          for (const c of batch.callers) c.reject(asError(error));
          return;
        }
        for (const c of batch.callers) c.resolve(appended.slice(c.first, c.first + c.count));
      },
      (error: unknown) => {
        for (const c of batch.callers) c.reject(asError(error));
      },
    );
  }

  /**
   * Allocates an NVRAM device (from inside a guest, on its rmem socket): it is attached to
   * the guest and counts against its --nvram-quota (MS_RMEM_NO_CAPACITY past it).
   */
  async journalCreate(device: string, size: number, policy: JournalInfo['policy'] = 'local'): Promise<void> {
    const tag = this.tag();
    await this.request(OP.JCREATE, tag, [encodeJcreateRequest(tag, device, size, policy)]);
  }

  /** Removes an NVRAM device the guest allocated itself (on its rmem socket). */
  async journalRemove(device: string): Promise<void> {
    const tag = this.tag();
    await this.request(OP.JREMOVE, tag, [encodeJremoveRequest(tag, device)]);
  }

  /** Reads acknowledged records from `fromSeq` on, in order. */
  async journalRead(journal: Journal, fromSeq: number, maxRecords = 1024, maxBytes = 8 * 1024 * 1024): Promise<JournalRecord[]> {
    const tag = this.tag();
    const frame = await this.request(OP.JREAD, tag, [encodeJreadRequest(tag, journal.handle, fromSeq, maxRecords, maxBytes)]);
    const count = frame.body.readUInt32BE(0);
    const records: JournalRecord[] = [];
    let at = 4;
    for (let i = 0; i < count; i++) {
      const result = decodeRecord(frame.body, at);
      if (!('record' in result)) throw new MisuseError('MS_RMEM_PROTOCOL', `JREAD reply: record ${i} is ${'corrupt' in result ? result.corrupt : 'incomplete'}`);
      records.push({ ...result.record, payload: Buffer.from(result.record.payload) });
      at += result.size;
    }
    return records;
  }

  /** Frees every record up to and including `upToSeq`. */
  async journalTrim(journal: Journal, upToSeq: number): Promise<void> {
    const tag = this.tag();
    await this.request(OP.JTRIM, tag, [encodeHandleRequest(OP.JTRIM, tag, journal.handle, upToSeq)]);
  }

  async journalInfo(journal: Journal): Promise<JournalInfo> {
    const tag = this.tag();
    const frame = await this.request(OP.JINFO, tag, [encodeHandleRequest(OP.JINFO, tag, journal.handle)]);
    return decodeJinfoReply(frame.body);
  }

  /** Tells the node this server is alive (sent automatically on a quiet connection). */
  async keepalive(): Promise<void> {
    const tag = this.tag();
    await this.request(OP.KEEPALIVE, tag, [encodeEmptyRequest(OP.KEEPALIVE, tag)]);
  }

  /** Requests in flight or waiting for a reconnect. */
  get inFlight(): number {
    return this.pending.size;
  }

  get connected(): boolean {
    return this.state === 'connected';
  }

  /**
   * Closes the connection. Regions stay on the node for the lease and are freed then;
   * free them first to release them at once.
   */
  async close(): Promise<void> {
    if (this.state === 'closed') return;
    this.state = 'closed';
    clearInterval(this.timer);
    this.failAll(new NetworkError('MS_RMEM_DISCONNECTED', 'client closed'));
    const socket = this.socket;
    if (socket.destroyed) return;
    await new Promise<void>((resolve) => {
      socket.once('close', () => {
        resolve();
      });
      socket.end();
    });
  }

  // ---- requests ----

  private tag(): Tag {
    const lo = this.nextTag;
    this.nextTag = lo >= 0xffffffff ? 1 : lo + 1;
    return { hi: 0, lo };
  }

  /** Sends one request (its frames built with `tag`) and resolves with the reply. */
  private request(op: number, tag: Tag, frames: Buffer[], target?: Buffer): Promise<Frame> {
    // Appends made before this request leave before it.
    if (this.appends !== undefined) this.sendAppends();
    return new Promise<Frame>((resolve, reject) => {
      if (this.state === 'closed') {
        reject(new NetworkError('MS_RMEM_DISCONNECTED', `${OP_NAME[op] ?? op}: client is closed`));
        return;
      }
      const pending: Pending = { op, tag: tag.lo, target, deadline: Date.now() + this.options.timeoutMs, frames: undefined, resolve, reject };
      this.pending.set(tag.lo, pending);
      if (this.state === 'connected') this.send(frames);
      else {
        pending.frames = frames;
        this.waiting.push(pending);
      }
    });
  }

  private send(frames: readonly Buffer[]): void {
    for (const frame of frames) this.writer.write(frame);
    this.lastSent = Date.now();
  }

  private onFrame(frame: Frame): void {
    const pending = this.pending.get(frame.tagLo);
    if (pending === undefined || frame.tagHi !== 0) return; // a reply to a request that already timed out
    this.pending.delete(frame.tagLo);
    if (frame.word === STATUS.OK) pending.resolve(frame);
    else pending.reject(errorOf(frame.word, frame.body.toString('utf8'), OP_NAME[pending.op] ?? String(pending.op)));
  }

  private onTick(): void {
    const now = Date.now();
    for (const [tag, pending] of this.pending) {
      if (pending.deadline > now) continue;
      this.pending.delete(tag);
      const at = this.waiting.indexOf(pending);
      if (at >= 0) this.waiting.splice(at, 1);
      this.fail(pending, new NetworkError('MS_RMEM_TIMEOUT', `${OP_NAME[pending.op] ?? pending.op}: no reply within ${this.options.timeoutMs} ms`));
    }
    if (this.options.keepalive && this.state === 'connected' && now - this.lastSent > this.session.leaseMs / 3) {
      this.keepalive().catch(() => undefined);
    }
  }

  // ---- connection loss and resume ----

  private attach(connection: Connection): void {
    const { socket } = connection;
    this.socket = socket;
    this.writer = new CorkedWriter(socket);
    this.parser = connection.parser;
    connection.handlers.onFrame = (frame) => {
      this.onFrame(frame);
    };
    connection.handlers.onFatal = (error) => {
      socket.destroy(error);
    };
    connection.handlers.bodyTarget = (_op, word, tagHi, tagLo, length) => {
      if (word !== STATUS.OK || tagHi !== 0) return undefined;
      const target = this.pending.get(tagLo)?.target;
      return target !== undefined && target.length === length ? target : undefined;
    };
    let failure: Error | undefined;
    socket.on('error', (error) => {
      failure = error;
    });
    socket.once('close', () => {
      if (this.socket === socket) this.lost(failure);
    });
  }

  private lost(error: Error | undefined): void {
    if (this.state !== 'connected') return;
    const reason = new NetworkError('MS_RMEM_DISCONNECTED', `connection to ${where(this.options)} lost${error === undefined ? '' : `: ${error.message}`}`);
    for (const [tag, pending] of this.pending) {
      if (pending.frames !== undefined) continue;
      this.pending.delete(tag);
      this.fail(pending, reason);
    }
    if (!this.options.reconnect) {
      this.state = 'closed';
      clearInterval(this.timer);
      this.failAll(reason);
      this.emit('disconnected', error);
      return;
    }
    this.state = 'reconnecting';
    this.emit('disconnected', error);
    void this.resume(Date.now() + this.session.leaseMs);
  }

  private async resume(giveUpAt: number): Promise<void> {
    let delay = 50;
    let refused: Error | undefined;
    while (this.state === 'reconnecting' && Date.now() < giveUpAt) {
      try {
        const connection = await handshake(this.options, this.session.secret);
        if (this.state !== 'reconnecting') {
          connection.socket.destroy();
          return;
        }
        this.session = connection.session;
        this.state = 'connected';
        this.attach(connection);
        if (connection.session.resumed) this.emit('reconnected');
        else this.emit('sessionLost');
        const waiting = this.waiting.splice(0);
        for (const pending of waiting) {
          const frames = pending.frames;
          pending.frames = undefined;
          if (frames !== undefined && this.pending.get(pending.tag) === pending) this.send(frames);
        }
        return;
      } catch (error) {
        // Refused, not unreachable: trying again cannot help.
        if (isRefusal(error)) {
          refused = error as Error;
          break;
        }
        await new Promise((resolve) => setTimeout(resolve, delay).unref());
        delay = Math.min(delay * 2, 1000);
      }
    }
    if (this.state === 'reconnecting') {
      this.state = 'closed';
      clearInterval(this.timer);
      const why = refused === undefined ? 'could not reconnect within the lease' : `the node refused to resume the session (${refused.message})`;
      this.failAll(new NetworkError('MS_RMEM_DISCONNECTED', `${where(this.options)}: ${why}; the session and its regions are gone`));
      this.emit('sessionLost');
    }
  }

  /** Rejects one request; a readInto buffer stops being written the moment its read fails. */
  private fail(pending: Pending, error: MemstrataError): void {
    if (pending.target !== undefined) this.parser.detach(pending.target);
    pending.reject(error);
  }

  private failAll(error: MemstrataError): void {
    for (const pending of this.pending.values()) this.fail(pending, error);
    this.pending.clear();
    this.waiting.length = 0;
  }
}

interface Connection {
  socket: Socket;
  parser: FrameParser;
  /** Where the parser sends frames; the client points these at itself after HELLO. */
  handlers: {
    onFrame(frame: Frame): void;
    onFatal(error: Error): void;
    bodyTarget?(op: number, word: number, tagHi: number, tagLo: number, length: number): Buffer | undefined;
  };
  session: HelloReply;
}

function where(options: { host: string; port: number; path: string | undefined }): string {
  return options.path ?? `${options.host}:${options.port}`;
}

function isRefusal(error: unknown): boolean {
  const code = (error as { code?: unknown }).code;
  return code === 'MS_RMEM_SECRET' || code === 'MS_RMEM_AUTH' || code === 'MS_RMEM_VERSION';
}

/** Opens a socket, sends HELLO (with the secret of the session to resume, if any), and waits for its reply. */
async function handshake(options: RmemClient['options'], secret: Buffer | undefined): Promise<Connection> {
  let resolveHello: (frame: Frame) => void = () => undefined;
  let rejectHello: (error: Error) => void = () => undefined;
  const hello = new Promise<Frame>((resolve, reject) => {
    resolveHello = resolve;
    rejectHello = reject;
  });
  const handlers: Connection['handlers'] = {
    onFrame: (frame) => {
      resolveHello(frame);
    },
    onFatal: (error) => {
      rejectHello(error);
    },
  };
  const parser = new FrameParser('response', {
    onFrame: (frame) => {
      handlers.onFrame(frame);
    },
    onFatal: (error) => {
      handlers.onFatal(error);
    },
    bodyTarget: (op, word, tagHi, tagLo, length) => handlers.bodyTarget?.(op, word, tagHi, tagLo, length),
  });
  const onError = (error: Error): void => {
    rejectHello(new NetworkError('MS_RMEM_UNREACHABLE', `cannot reach rmem at ${where(options)}: ${error.message}`, { cause: error }));
  };
  const onClose = (): void => {
    rejectHello(new NetworkError('MS_RMEM_UNREACHABLE', `rmem at ${where(options)} closed the connection during HELLO`));
  };
  // Without TLS, the socket reads into one buffer of this connection's own (no allocation
  // per read); each read is parsed before the next overwrites it, and a READ reply is
  // copied from it straight into readInto's buffer. TLS takes the socket's reads over.
  const onread = ownReadBuffer((chunk) => {
    parser.feed(chunk, true);
  });
  let socket: Socket;
  if (options.path !== undefined) {
    socket = netConnect({ path: options.path, onread });
  } else if (options.tls !== undefined) {
    socket = tlsConnect({ ...options.tls, host: options.host, port: options.port, ...(options.tls.servername === undefined && isIP(options.host) === 0 ? { servername: options.host } : {}) });
    socket.on('data', (chunk: Buffer) => {
      parser.feed(chunk);
    });
  } else {
    socket = netConnect({ host: options.host, port: options.port, onread });
  }
  if (options.path === undefined) socket.setNoDelay(true);
  socket.on('error', onError);
  socket.on('close', onClose);
  const timer = setTimeout(() => {
    rejectHello(new NetworkError('MS_RMEM_UNREACHABLE', `no HELLO reply from ${where(options)} within ${options.connectTimeoutMs} ms`));
  }, options.connectTimeoutMs);
  socket.write(encodeHelloRequest({ hi: 0, lo: 0 }, { version: VERSION, serverId: options.serverId, token: options.token, ...(secret === undefined ? {} : { secret }) }));
  try {
    const frame = await hello;
    if (frame.word !== STATUS.OK) throw errorOf(frame.word, frame.body.toString('utf8'), 'HELLO');
    const session = decodeHelloReply(frame.body);
    socket.off('error', onError);
    socket.off('close', onClose);
    return { socket, parser, handlers, session };
  } catch (error) {
    socket.destroy();
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

function checkData(length: number): void {
  if (length > MAX_DATA) throw new MisuseError('MS_RMEM_TOO_BIG', `${length} bytes in one request exceeds the limit of ${MAX_DATA}`);
}
