// An NBD client of memstrata's own (doc/proto.md of the NBD project): fixed newstyle
// handshake with NBD_OPT_GO, then READ, WRITE (with FUA), FLUSH and TRIM over simple
// replies, pipelined on one connection. The host library uses it for its swap volume;
// it works against memstrata's NBD service and any other NBD server (nbdkit, qemu-nbd).
//
//   connect -> "NBDMAGIC" "IHAVEOPT" flags -> client flags -> OPT_GO(export, BLOCK_SIZE)
//           -> INFO replies (size, flags, block sizes) -> ACK -> transmission
//
// Every failure is a coded error: MS_NBD_HANDSHAKE (not an NBD server, or it refused the
// export), MS_NBD_REQUEST (the server answered a request with an errno),
// MS_NBD_DISCONNECTED (the connection ended with requests in flight), and the misuse
// codes for requests this export cannot take (read-only, past the end, not offered).

import { connect, type Socket } from 'node:net';
import { MemstrataError, MisuseError, NetworkError } from '../errors.js';
import { CorkedWriter } from '../net/corked-writer.js';
import { encodeOption, encodeRequestHeader } from '../protocol/nbd/codec.js';
import { CLIENT, CMD, CMD_FLAG, ERRNO, FLAG, HANDSHAKE, IHAVEOPT, INFO, NBDMAGIC, OPT, OPTION_REPLY_MAGIC, REP, SIMPLE_REPLY_MAGIC } from '../protocol/nbd/spec.js';

export interface NbdClientOptions {
  /** `nbd://host:port/export` or `nbd+unix:///export?socket=PATH`; or give host, port (or path) and export. */
  uri?: string;
  host?: string;
  port?: number;
  /** A Unix socket instead of host and port, such as a guest's `MEMSTRATA_CTD_SOCKET`. */
  path?: string;
  export?: string;
  /** Connect and handshake time limit, ms (default 10000). */
  connectTimeoutMs?: number;
}

export interface BlockSizes {
  min: number;
  preferred: number;
  max: number;
}

interface Pending {
  type: number;
  length: number;
  resolve: (data: Buffer | undefined) => void;
  reject: (error: Error) => void;
}

const ERRNO_NAME: Readonly<Record<number, string>> = Object.fromEntries(Object.entries(ERRNO).map(([name, code]) => [code, name]));

/** Largest single request this client sends; larger reads and writes are split. */
const MAX_REQUEST = 32 * 1024 * 1024;

/**
 * A connection to one NBD export. Open it with {@link NbdClient.connect}; requests may be
 * issued concurrently and are pipelined. Writes in flight together are not ordered with
 * respect to each other, as in NBD itself; wait for one before an overlapping one.
 */
export class NbdClient {
  readonly exportName: string;
  /** Export size in bytes. */
  readonly size: number;
  /** Transmission flags (FLAG in the NBD spec). */
  readonly flags: number;
  readonly blockSizes: BlockSizes;
  readonly address: string;
  private readonly socket: Socket;
  private readonly writer: CorkedWriter;
  private readonly input: ByteQueue;
  private readonly pending: Map<number, Pending>;
  private readonly inFlight: Set<Promise<unknown>>;
  private nextCookie: number;
  private failure: MemstrataError | undefined;

  private constructor(socket: Socket, input: ByteQueue, address: string, exportName: string, size: number, flags: number, blockSizes: BlockSizes) {
    this.socket = socket;
    this.writer = new CorkedWriter(socket);
    this.input = input;
    this.address = address;
    this.exportName = exportName;
    this.size = size;
    this.flags = flags;
    this.blockSizes = blockSizes;
    this.pending = new Map();
    this.inFlight = new Set();
    this.nextCookie = 1;
    this.failure = undefined;
    void this.readReplies();
  }

  /** Connects, negotiates the export with NBD_OPT_GO, and is ready for I/O. */
  static async connect(options: NbdClientOptions): Promise<NbdClient> {
    const { host, port, path, exportName } = target(options);
    const address = path ?? `${host}:${port}`;
    const socket = path === undefined ? connect({ host, port, noDelay: true }) : connect({ path });
    const input = new ByteQueue();
    socket.on('data', (chunk: Buffer) => {
      input.push(chunk);
    });
    socket.on('error', (error) => {
      input.fail(disconnected(address, error.message));
    });
    socket.on('close', () => {
      input.fail(disconnected(address, 'the server closed the connection'));
    });
    const timer = setTimeout(() => {
      socket.destroy();
      input.fail(handshakeError(address, exportName, `no handshake within ${options.connectTimeoutMs ?? 10000} ms`));
    }, options.connectTimeoutMs ?? 10000);
    try {
      const { size, flags, blockSizes } = await handshake(socket, input, address, exportName);
      return new NbdClient(socket, input, address, exportName, size, flags, blockSizes);
    } catch (error) {
      socket.destroy();
      if (error instanceof MemstrataError) throw error;
      throw handshakeError(address, exportName, (error as Error).message);
    } finally {
      clearTimeout(timer);
    }
  }

  get readOnly(): boolean {
    return (this.flags & FLAG.READ_ONLY) !== 0;
  }

  get canFlush(): boolean {
    return (this.flags & FLAG.SEND_FLUSH) !== 0;
  }

  get canFua(): boolean {
    return (this.flags & FLAG.SEND_FUA) !== 0;
  }

  get canTrim(): boolean {
    return (this.flags & FLAG.SEND_TRIM) !== 0;
  }

  /** Reads `length` bytes at `offset`. */
  async read(offset: number, length: number): Promise<Buffer> {
    this.checkRange(offset, length);
    if (length <= MAX_REQUEST) return (await this.request(CMD.READ, 0, offset, length)) ?? Buffer.alloc(0);
    const parts: Promise<Buffer | undefined>[] = [];
    for (let at = 0; at < length; at += MAX_REQUEST) parts.push(this.request(CMD.READ, 0, offset + at, Math.min(MAX_REQUEST, length - at)));
    return Buffer.concat((await Promise.all(parts)).map((b) => b ?? Buffer.alloc(0)));
  }

  /** Writes `data` at `offset`; with `fua`, the server has it on stable storage when this resolves. */
  async write(offset: number, data: Uint8Array, options: { fua?: boolean } = {}): Promise<void> {
    this.checkRange(offset, data.length);
    if (this.readOnly) throw new MisuseError('MS_VOLUME_READ_ONLY', `NBD export "${this.exportName}" at ${this.address} is read-only`);
    if (options.fua === true && !this.canFua) throw unsupported(this, 'FUA');
    const flags = options.fua === true ? CMD_FLAG.FUA : 0;
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < data.length; at += MAX_REQUEST) {
      const piece = data.subarray(at, Math.min(data.length, at + MAX_REQUEST));
      parts.push(this.request(CMD.WRITE, flags, offset + at, piece.length, piece));
    }
    await Promise.all(parts);
  }

  /** Asks the server to make every completed write durable. */
  async flush(): Promise<void> {
    if (!this.canFlush) throw unsupported(this, 'FLUSH');
    await this.request(CMD.FLUSH, 0, 0, 0);
  }

  /** Tells the server the range is no longer needed (it may read back as anything, usually zeros). */
  async trim(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    if (this.readOnly) throw new MisuseError('MS_VOLUME_READ_ONLY', `NBD export "${this.exportName}" at ${this.address} is read-only`);
    if (!this.canTrim) throw unsupported(this, 'TRIM');
    for (let at = 0; at < length; at += MAX_REQUEST) await this.request(CMD.TRIM, 0, offset + at, Math.min(MAX_REQUEST, length - at));
  }

  /** Waits for requests in flight, says NBD_CMD_DISC, and closes the connection. */
  async close(): Promise<void> {
    await Promise.allSettled([...this.inFlight]);
    if (!this.socket.destroyed && this.failure === undefined) {
      this.failure = disconnected(this.address, 'the client closed the connection');
      this.writer.write(encodeRequestHeader(CMD.DISC, 0, { hi: 0, lo: 0 }, 0, 0));
      await new Promise<void>((resolve) => {
        this.socket.end(resolve);
      });
    }
    this.socket.destroy();
  }

  private request(type: number, flags: number, offset: number, length: number, data?: Uint8Array): Promise<Buffer | undefined> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    const cookie = this.nextCookie;
    this.nextCookie = this.nextCookie >= 0xffffffff ? 1 : this.nextCookie + 1;
    const done = new Promise<Buffer | undefined>((resolve, reject) => {
      this.pending.set(cookie, { type, length, resolve, reject });
      this.writer.write(encodeRequestHeader(type, flags, { hi: 0, lo: cookie }, offset, length));
      if (data !== undefined && data.length > 0) this.writer.write(Buffer.from(data.buffer, data.byteOffset, data.byteLength));
    });
    this.inFlight.add(done);
    const forget = (): void => {
      this.inFlight.delete(done);
    };
    done.then(forget, forget);
    return done;
  }

  private async readReplies(): Promise<void> {
    try {
      for (;;) {
        const header = await this.input.read(16);
        if (header.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) throw protocolError(this.address, `bad reply magic 0x${header.readUInt32BE(0).toString(16)}`);
        const error = header.readUInt32BE(4);
        const cookie = header.readUInt32BE(12);
        const request = header.readUInt32BE(8) === 0 ? this.pending.get(cookie) : undefined;
        if (request === undefined) throw protocolError(this.address, `reply to a request that was not sent (cookie ${header.readUInt32BE(8)}:${cookie})`);
        this.pending.delete(cookie);
        if (error !== 0) {
          request.reject(requestError(this, request.type, error));
          continue;
        }
        request.resolve(request.type === CMD.READ ? await this.input.read(request.length) : undefined);
      }
    } catch (error) {
      const failure = error instanceof MemstrataError ? error : disconnected(this.address, String(error));
      this.failure ??= failure;
      this.socket.destroy();
      const pending = [...this.pending.values()];
      this.pending.clear();
      for (const p of pending) p.reject(this.failure);
    }
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new MisuseError('MS_VOLUME_RANGE', `NBD request at ${offset} for ${length} bytes reaches past the end of export "${this.exportName}" (${this.size} bytes)`, {
        details: { offset, length, size: this.size },
      });
    }
  }
}

// ---- the handshake ----

async function handshake(socket: Socket, input: ByteQueue, address: string, exportName: string): Promise<{ size: number; flags: number; blockSizes: BlockSizes }> {
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  }).catch((error: unknown) => {
    throw new NetworkError('MS_NBD_DISCONNECTED', `cannot connect to NBD server ${address}: ${(error as Error).message}`, { cause: error });
  });
  const greeting = await input.read(18);
  if (greeting.readBigUInt64BE(0) !== NBDMAGIC || greeting.readBigUInt64BE(8) !== IHAVEOPT) throw handshakeError(address, exportName, 'not a newstyle NBD server');
  const serverFlags = greeting.readUInt16BE(16);
  if ((serverFlags & HANDSHAKE.FIXED_NEWSTYLE) === 0) throw handshakeError(address, exportName, 'the server does not speak fixed newstyle');
  const clientFlags = Buffer.alloc(4);
  clientFlags.writeUInt32BE(CLIENT.FIXED_NEWSTYLE | (serverFlags & HANDSHAKE.NO_ZEROES ? CLIENT.NO_ZEROES : 0), 0);
  socket.write(clientFlags);

  const name = Buffer.from(exportName);
  const data = Buffer.alloc(4 + name.length + 2 + 2);
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  data.writeUInt16BE(1, 4 + name.length);
  data.writeUInt16BE(INFO.BLOCK_SIZE, 6 + name.length);
  socket.write(encodeOption(OPT.GO, data));

  let size: number | undefined;
  let flags = 0;
  let blockSizes: BlockSizes = { min: 1, preferred: 4096, max: MAX_REQUEST };
  for (;;) {
    const header = await input.read(20);
    if (header.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw handshakeError(address, exportName, 'bad option reply magic');
    const type = header.readUInt32BE(12);
    const length = header.readUInt32BE(16);
    if (length > 64 * 1024) throw handshakeError(address, exportName, `option reply of ${length} bytes`);
    const body = await input.read(length);
    if (type === REP.ACK) break;
    if (type === REP.INFO && body.length >= 2) {
      const info = body.readUInt16BE(0);
      if (info === INFO.EXPORT && body.length >= 12) {
        size = Number(body.readBigUInt64BE(2));
        flags = body.readUInt16BE(10);
      } else if (info === INFO.BLOCK_SIZE && body.length >= 14) {
        blockSizes = { min: body.readUInt32BE(2), preferred: body.readUInt32BE(6), max: body.readUInt32BE(10) };
      }
      continue;
    }
    if ((type & 0x80000000) !== 0) {
      const message = body.toString('utf8');
      if (type === REP.ERR_UNKNOWN) {
        throw new MisuseError('MS_VOLUME_NOT_FOUND', `NBD server ${address} has no export "${exportName}"${message ? `: ${message}` : ''}`, { details: { address, export: exportName } });
      }
      throw handshakeError(address, exportName, `NBD_OPT_GO refused (reply type 0x${type.toString(16)})${message ? `: ${message}` : ''}`);
    }
    // Other replies (a future info type, say) are skipped.
  }
  if (size === undefined) throw handshakeError(address, exportName, 'the server did not send the export size');
  return { size, flags, blockSizes };
}

function target(options: NbdClientOptions): { host: string; port: number; path: string | undefined; exportName: string } {
  if (options.uri !== undefined) {
    const form = 'expected nbd://host[:port]/export or nbd+unix:///export?socket=PATH';
    let url: URL;
    try {
      url = new URL(options.uri);
    } catch {
      throw new MisuseError('MS_CONFIG_INVALID', `invalid NBD URI "${options.uri}": ${form}`);
    }
    const exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
    if (url.protocol === 'nbd+unix:') {
      const socket = url.searchParams.get('socket');
      if (socket === null || socket === '') throw new MisuseError('MS_CONFIG_INVALID', `invalid NBD URI "${options.uri}": ${form}`);
      return { host: '', port: 0, path: socket, exportName };
    }
    if (url.protocol !== 'nbd:') throw new MisuseError('MS_CONFIG_INVALID', `invalid NBD URI "${options.uri}": ${form}`);
    return { host: url.hostname.replace(/^\[|\]$/g, ''), port: url.port === '' ? 10809 : Number(url.port), path: undefined, exportName };
  }
  return { host: options.host ?? '127.0.0.1', port: options.port ?? 10809, path: options.path, exportName: options.export ?? '' };
}

function handshakeError(address: string, exportName: string, why: string): MemstrataError {
  return new NetworkError('MS_NBD_HANDSHAKE', `NBD handshake with ${address} for export "${exportName}" failed: ${why}`, { details: { address, export: exportName } });
}

function protocolError(address: string, why: string): MemstrataError {
  return new NetworkError('MS_NBD_HANDSHAKE', `NBD server ${address} broke the protocol: ${why}`, { details: { address } });
}

function disconnected(address: string, why: string): MemstrataError {
  return new NetworkError('MS_NBD_DISCONNECTED', `NBD connection to ${address} ended: ${why}`, { details: { address } });
}

function requestError(client: NbdClient, type: number, errno: number): MemstrataError {
  const name = ERRNO_NAME[errno] ?? `errno ${errno}`;
  const command = Object.entries(CMD).find(([, code]) => code === type)?.[0] ?? String(type);
  return new NetworkError('MS_NBD_REQUEST', `NBD server ${client.address} failed ${command} on export "${client.exportName}": ${name}`, {
    details: { address: client.address, export: client.exportName, command, errno: name },
  });
}

function unsupported(client: NbdClient, what: string): MemstrataError {
  return new MisuseError('MS_NBD_UNSUPPORTED', `NBD export "${client.exportName}" at ${client.address} does not offer ${what}`);
}

/** Socket bytes, read back in exact amounts by one reader at a time. */
class ByteQueue {
  private chunks: Buffer[] = [];
  private have = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private error: Error | undefined;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.have += chunk.length;
    const w = this.waiter;
    if (w !== undefined && this.have >= w.n) {
      this.waiter = undefined;
      w.resolve(this.take(w.n));
    }
  }

  fail(error: Error): void {
    this.error ??= error;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(this.error);
  }

  read(n: number): Promise<Buffer> {
    if (this.have >= n) return Promise.resolve(this.take(n));
    if (this.error !== undefined) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }

  private take(n: number): Buffer {
    this.have -= n;
    const first = this.chunks[0];
    if (first !== undefined && first.length >= n) {
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let at = 0;
    while (at < n) {
      const chunk = this.chunks[0];
      if (chunk === undefined) break;
      const k = Math.min(chunk.length, n - at);
      chunk.copy(out, at, 0, k);
      at += k;
      if (k === chunk.length) this.chunks.shift();
      else this.chunks[0] = chunk.subarray(k);
    }
    return out;
  }
}
