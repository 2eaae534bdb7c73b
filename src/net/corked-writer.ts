// Coalesced socket writes: everything queued in one tick leaves in one corked write
// (one writev), so a reply's header and payload, and replies finished together, share a
// system call. Used by both services and the rmem client.

import type { Socket } from 'node:net';

export class CorkedWriter {
  private readonly socket: Socket;
  private corked: boolean;
  /** Told each time a tick's writes are handed to the kernel (a server's busy poll, net/busy-poll.ts). */
  private readonly flushed: (() => void) | undefined;

  constructor(socket: Socket, flushed?: () => void) {
    this.socket = socket;
    this.corked = false;
    this.flushed = flushed;
  }

  /**
   * Queues bytes. `written` runs once the socket has handed them to the kernel (or at
   * once if the socket is gone), which is when a pooled buffer may be reused. Returns
   * false when the socket's buffer is full and the caller should stop producing.
   */
  write(buf: Buffer, written?: () => void): boolean {
    const socket = this.socket;
    if (socket.destroyed) {
      written?.();
      return true;
    }
    if (!this.corked) {
      this.corked = true;
      socket.cork();
      process.nextTick(() => {
        this.corked = false;
        socket.uncork();
        this.flushed?.();
      });
    }
    return socket.write(buf, written);
  }
}
