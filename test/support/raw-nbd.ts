// A raw NBD client for tests that drive the handshake byte by byte: a socket with a byte
// queue, the greeting, options and their replies, and an upgrade to TLS after STARTTLS.

import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import { IHAVEOPT, OPTION_REPLY_MAGIC } from '../../src/protocol/nbd/spec.js';
import type { NodeProcess } from './node-process.js';

/** A socket with a byte queue: read(n) resolves with exactly n bytes, or rejects on close. */
export class Raw {
  private buffered = Buffer.alloc(0);
  private waiter: (() => void) | undefined;
  closed = false;
  socket: Socket;
  constructor(socket: Socket) {
    this.socket = socket;
    this.listen(socket);
  }
  private listen(socket: Socket): void {
    socket.on('data', (c: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, c]);
      this.waiter?.();
    });
    socket.on('close', () => {
      this.closed = true;
      this.waiter?.();
    });
    socket.on('error', () => undefined);
  }
  /**
   * After NBD_REP_ACK to STARTTLS: the TLS handshake on this socket, then everything
   * through TLS. Rejects when the handshake fails.
   */
  async startTls(options: ConnectionOptions): Promise<TLSSocket> {
    const plain = this.socket;
    plain.removeAllListeners('data');
    plain.removeAllListeners('close');
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
  static async open(n: NodeProcess): Promise<Raw> {
    const socket = connect(n.nbd.port, n.nbd.host);
    await new Promise<void>((resolve) => socket.once('connect', resolve));
    return new Raw(socket);
  }
  async read(count: number): Promise<Buffer> {
    while (this.buffered.length < count) {
      if (this.closed) throw new Error('closed');
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
    const out = this.buffered.subarray(0, count);
    this.buffered = this.buffered.subarray(count);
    return out;
  }
  async closedByPeer(): Promise<boolean> {
    for (let i = 0; i < 100 && !this.closed; i++) await new Promise((r) => setTimeout(r, 20));
    return this.closed;
  }
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
    const head = Buffer.alloc(16);
    head.writeBigUInt64BE(IHAVEOPT, 0);
    head.writeUInt32BE(opt, 8);
    head.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([head, data]));
  }
  async reply(): Promise<{ option: number; type: number; data: Buffer }> {
    const head = await this.read(20);
    assert.equal(head.readBigUInt64BE(0), OPTION_REPLY_MAGIC);
    const length = head.readUInt32BE(16);
    return { option: head.readUInt32BE(8), type: head.readUInt32BE(12), data: await this.read(length) };
  }
}


/** The data of NBD_OPT_INFO or NBD_OPT_GO: an export name and the information requests. */
export function named(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name);
  const buf = Buffer.alloc(6 + n.length + infos.length * 2);
  buf.writeUInt32BE(n.length, 0);
  n.copy(buf, 4);
  buf.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((info, i) => buf.writeUInt16BE(info, 6 + n.length + i * 2));
  return buf;
}
