// A raw NBD client for tests: it writes exactly the bytes a test asks for (including
// what libnbd refuses to send) and decodes what comes back without judging it, so a
// test can assert on every field the spec talks about.

import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import {
  CMD,
  IHAVEOPT,
  OPT,
  OPTION_REPLY_MAGIC,
  REP,
  REPLY_FLAG_DONE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from '../../src/protocol/nbd/spec.js';

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export interface Chunk {
  flags: number;
  type: number;
  payload: Buffer;
}

/** One reply as it came off the wire: a simple reply, or every chunk of a structured one. */
export interface Reply {
  cookie: bigint;
  simple: boolean;
  /** Simple reply: its error; structured: the errno of the first error chunk, or 0. */
  error: number;
  /** A simple READ reply's data. */
  data: Buffer | undefined;
  chunks: Chunk[];
}

export interface RequestOptions {
  flags?: number;
  cookie?: bigint;
  offset?: number | bigint;
  length?: number;
  data?: Buffer;
}

export class RawNbd {
  /** The connection: the plain socket, or the TLS one after startTls(). */
  socket: Socket;
  /** Bytes received and not yet read, as they came (no copying until a read needs it). */
  private chunks: Buffer[];
  private length: number;
  private waiter: (() => void) | undefined;
  /** The peer closed or ended its side. */
  ended: boolean;
  closed: boolean;
  /** Cookies of READs in flight with simple replies, and their lengths (a simple reply carries no length). */
  private readonly simpleReads: Map<bigint, number>;
  private nextCookie: bigint;
  structured: boolean;

  constructor(socket: Socket) {
    this.socket = socket;
    this.chunks = [];
    this.length = 0;
    this.waiter = undefined;
    this.ended = false;
    this.closed = false;
    this.simpleReads = new Map();
    this.nextCookie = 1n;
    this.structured = false;
    this.listen(socket);
  }

  private listen(socket: Socket): void {
    socket.on('data', (c: Buffer) => {
      this.chunks.push(c);
      this.length += c.length;
      this.wake();
    });
    socket.on('end', () => {
      // The server is done: close our side too, as libnbd does on EOF.
      this.ended = true;
      socket.end();
      this.wake();
    });
    socket.on('close', () => {
      this.ended = true;
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }

  /**
   * After NBD_REP_ACK to STARTTLS: the TLS handshake on this connection, then everything
   * goes through TLS. Rejects when the handshake fails.
   */
  async startTls(options: ConnectionOptions): Promise<TLSSocket> {
    const plain = this.socket;
    for (const event of ['data', 'end', 'close'] as const) plain.removeAllListeners(event);
    const secure = tlsConnect({ socket: plain, servername: 'localhost', ...options });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', reject);
      secure.once('close', () => reject(new Error('closed during the TLS handshake')));
    });
    this.socket = secure;
    this.listen(secure);
    return secure;
  }

  static async open(address: { host: string; port: number }, options: { allowHalfOpen?: boolean; localAddress?: string } = {}): Promise<RawNbd> {
    const socket = connect({ host: address.host, port: address.port, allowHalfOpen: options.allowHalfOpen ?? true, localAddress: options.localAddress });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    socket.setNoDelay(true);
    return new RawNbd(socket);
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  /** Stops taking bytes off the socket: what the server sends backs up in the kernel, as with a client that never reads. */
  stopReading(): void {
    this.socket.pause();
  }

  startReading(): void {
    this.socket.resume();
  }

  /** Bytes received and not yet read by the test. */
  get available(): number {
    return this.length;
  }

  async read(count: number): Promise<Buffer> {
    while (this.length < count) {
      if (this.ended) throw new Error(`connection ended with ${this.length} of ${count} bytes`);
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
    const first = this.chunks[0];
    if (first !== undefined && first.length >= count) {
      this.take(count);
      return first.subarray(0, count);
    }
    const out = Buffer.allocUnsafe(count);
    let have = 0;
    while (have < count) {
      const c = this.chunks[0]!;
      const n = Math.min(c.length, count - have);
      c.copy(out, have, 0, n);
      have += n;
      this.take(n);
    }
    return out;
  }

  /** Drops `n` bytes from the front (at most the first chunk). */
  private take(n: number): void {
    const c = this.chunks[0]!;
    if (n === c.length) this.chunks.shift();
    else this.chunks[0] = c.subarray(n);
    this.length -= n;
  }

  /** Resolves once the peer has ended the connection (EOF), with whatever bytes were left unread. */
  async untilEnd(): Promise<Buffer> {
    while (!this.ended) await new Promise<void>((resolve) => (this.waiter = resolve));
    return Buffer.concat(this.chunks);
  }

  /** Reads the greeting, sends the client flags, returns the handshake flags. */
  async greet(clientFlags = 3): Promise<number> {
    const greeting = await this.read(18);
    assert.equal(greeting.toString('latin1', 0, 8), 'NBDMAGIC');
    assert.equal(greeting.toString('latin1', 8, 16), 'IHAVEOPT');
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(clientFlags, 0);
    this.socket.write(flags);
    return greeting.readUInt16BE(16);
  }

  option(opt: number, data: Buffer = Buffer.alloc(0)): void {
    this.socket.write(optionBytes(opt, data));
  }

  async reply(): Promise<OptionReply> {
    const head = await this.read(20);
    assert.equal(head.readBigUInt64BE(0), OPTION_REPLY_MAGIC, 'option reply magic');
    const length = head.readUInt32BE(16);
    return { option: head.readUInt32BE(8), type: head.readUInt32BE(12), data: Buffer.from(await this.read(length)) };
  }

  /** Replies to one option up to and including the final one (ACK or an error). */
  async replies(): Promise<OptionReply[]> {
    const all: OptionReply[] = [];
    for (;;) {
      const r = await this.reply();
      all.push(r);
      if (r.type === REP.ACK || r.type >= 0x80000000) return all;
    }
  }

  async negotiateStructured(): Promise<void> {
    this.option(OPT.STRUCTURED_REPLY);
    assert.equal((await this.reply()).type, REP.ACK);
    this.structured = true;
  }

  async setMeta(name: string, queries: string[]): Promise<OptionReply[]> {
    this.option(OPT.SET_META_CONTEXT, metaPayload(name, queries));
    return this.replies();
  }

  /** NBD_OPT_GO; returns the export size and transmission flags, or throws with the error reply. */
  async go(name = '', infos: number[] = []): Promise<{ size: number; flags: number; replies: OptionReply[] }> {
    this.option(OPT.GO, infoPayload(name, infos));
    const replies = await this.replies();
    const last = replies[replies.length - 1];
    if (last?.type !== REP.ACK) throw new Error(`GO failed: ${last?.type.toString(16)} ${last?.data.toString()}`);
    const info = replies.find((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === 0);
    assert.ok(info !== undefined, 'NBD_INFO_EXPORT');
    return { size: Number(info.data.readBigUInt64BE(2)), flags: info.data.readUInt16BE(10), replies };
  }

  /** Greets, optionally negotiates structured replies and contexts, and enters transmission. */
  static async attach(address: { host: string; port: number }, options: { structured?: boolean; meta?: string[]; name?: string } = {}): Promise<{ nbd: RawNbd; size: number; flags: number }> {
    const nbd = await RawNbd.open(address);
    await nbd.greet();
    if (options.structured === true || options.meta !== undefined) await nbd.negotiateStructured();
    if (options.meta !== undefined) await nbd.setMeta(options.name ?? '', options.meta);
    const { size, flags } = await nbd.go(options.name ?? '');
    return { nbd, size, flags };
  }

  /** Sends one request; returns its cookie. */
  request(type: number, options: RequestOptions = {}): bigint {
    const cookie = options.cookie ?? this.nextCookie++;
    const length = options.length ?? options.data?.length ?? 0;
    if (type === CMD.READ && !this.structured) this.simpleReads.set(cookie, length);
    this.socket.write(requestBytes(type, { ...options, cookie, length }));
    return cookie;
  }

  /** Reads one whole reply (all chunks of a structured one). */
  async next(): Promise<Reply> {
    const magic = (await this.read(4)).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12);
      const error = rest.readUInt32BE(0);
      const cookie = rest.readBigUInt64BE(4);
      const readLength = this.simpleReads.get(cookie);
      this.simpleReads.delete(cookie);
      const data = readLength !== undefined && error === 0 ? Buffer.from(await this.read(readLength)) : undefined;
      return { cookie, simple: true, error, data, chunks: [] };
    }
    assert.equal(magic, STRUCTURED_REPLY_MAGIC, `reply magic 0x${magic.toString(16)}`);
    const chunks: Chunk[] = [];
    let cookie = -1n;
    for (let first = true; ; first = false) {
      if (!first) assert.equal((await this.read(4)).readUInt32BE(0), STRUCTURED_REPLY_MAGIC, 'structured reply magic');
      const head = await this.read(16);
      const c = head.readBigUInt64BE(4);
      if (first) cookie = c;
      // The server sends each reply's chunks together; this client relies on it.
      assert.equal(c, cookie, 'chunks of one reply share a cookie');
      const payload = Buffer.from(await this.read(head.readUInt32BE(12)));
      chunks.push({ flags: head.readUInt16BE(0), type: head.readUInt16BE(2), payload });
      if ((head.readUInt16BE(0) & REPLY_FLAG_DONE) !== 0) break;
    }
    const errorChunk = chunks.find((c) => (c.type & 0x8000) !== 0);
    return { cookie, simple: false, error: errorChunk === undefined ? 0 : errorChunk.payload.readUInt32BE(0), data: undefined, chunks };
  }

  /** Sends a request and reads its reply (nothing else may be in flight). */
  async call(type: number, options: RequestOptions = {}): Promise<Reply> {
    const cookie = this.request(type, options);
    const reply = await this.next();
    assert.equal(reply.cookie, cookie);
    return reply;
  }

  /** Waits up to `ms` (a bound on the test, not an assertion on speed) for the peer to end the connection. */
  async closedWithin(ms = 5000): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.ended && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    return this.ended;
  }

  destroy(): void {
    this.socket.destroy();
  }
}

export function optionBytes(opt: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const head = Buffer.alloc(16);
  head.writeBigUInt64BE(IHAVEOPT, 0);
  head.writeUInt32BE(opt, 8);
  head.writeUInt32BE(data.length, 12);
  return Buffer.concat([head, data]);
}

export function requestBytes(type: number, options: RequestOptions & { cookie: bigint }): Buffer {
  const data = options.data ?? Buffer.alloc(0);
  const head = Buffer.alloc(28);
  head.writeUInt32BE(REQUEST_MAGIC, 0);
  head.writeUInt16BE(options.flags ?? 0, 4);
  head.writeUInt16BE(type, 6);
  head.writeBigUInt64BE(options.cookie, 8);
  head.writeBigUInt64BE(BigInt(options.offset ?? 0), 16);
  head.writeUInt32BE(options.length ?? data.length, 24);
  return data.length === 0 ? head : Buffer.concat([head, data]);
}

/** NBD_OPT_INFO / NBD_OPT_GO payload. */
export function infoPayload(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name, 'utf8');
  const buf = Buffer.alloc(6 + n.length + infos.length * 2);
  buf.writeUInt32BE(n.length, 0);
  n.copy(buf, 4);
  buf.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((info, i) => buf.writeUInt16BE(info, 6 + n.length + i * 2));
  return buf;
}

/** NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT payload. */
export function metaPayload(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const u32 = (v: number): Buffer => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v, 0);
    return b;
  };
  parts.push(u32(Buffer.byteLength(name)), Buffer.from(name), u32(queries.length));
  for (const q of queries) parts.push(u32(Buffer.byteLength(q)), Buffer.from(q));
  return Buffer.concat(parts);
}

/** The resident set size of a process, from /proc (Linux), in bytes. */
export async function rssOf(pid: number): Promise<number> {
  const { readFile } = await import('node:fs/promises');
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const m = /VmRSS:\s+(\d+) kB/.exec(status);
  if (m === null) throw new Error('no VmRSS');
  return Number(m[1]) * 1024;
}
