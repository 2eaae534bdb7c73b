// Backpressure for one connection of a request/reply service (NBD, rmem, mirror).
//
//   socket 'data' -> parser -> push(request) -> [FIFO of parsed requests] -> dispatch
//                                                 ^ held while over budget
//   reply written to the kernel (write callback) -> done(cost) -> dispatch more
//
// Invariants:
//   - at most `maxRequests` requests are dispatched and not yet done, and the bytes they
//     hold (request payloads, reply buffers not yet handed to the kernel) add up to at
//     most `maxBytes`, except for a single request larger than the budget, which is
//     dispatched alone so that progress is always possible;
//   - while anything waits in the queue, or the socket's write buffer is above its
//     high-water mark (a client that does not read its replies), the socket is paused:
//     what a client can make the node hold is the budget, plus one chunk and one frame
//     being assembled by the parser, plus the parsed requests of that chunk (a few
//     dozen bytes each, and no payload buffer is allocated before dispatch);
//   - requests are dispatched in the order they were parsed;
//   - with a ServiceBudget shared by the service's connections, a request is dispatched
//     only when that budget admits it too (see service-budget.ts); a flow blocked by it
//     waits there and is woken when another connection gives bytes back.
//
// `dispatch` runs synchronously from push(), done() or a wake-up, never after close().

import type { BudgetWaiter, ServiceBudget } from './service-budget.js';

/** What the flow needs of a socket; node's net.Socket has it. */
export interface FlowSocket {
  pause(): unknown;
  resume(): unknown;
  readonly writableLength: number;
  readonly writableHighWaterMark: number;
  on(event: 'drain', listener: () => void): unknown;
}

export interface FlowLimits {
  /** Requests dispatched and not yet done. */
  maxRequests: number;
  /** Bytes held by dispatched requests and their unwritten replies. */
  maxBytes: number;
}

/** Counters a service shares across its connections (metrics). */
export interface FlowStats {
  /** Times a connection stopped being read because it was over its budget. */
  pauses: number;
  /** Connections not being read right now. */
  pausedNow: number;
}

export function newFlowStats(): FlowStats {
  return { pauses: 0, pausedNow: 0 };
}

interface Waiting<R> {
  request: R;
  cost: number;
}

export class RequestFlow<R> implements BudgetWaiter {
  private readonly socket: FlowSocket;
  private readonly limits: FlowLimits;
  private readonly stats: FlowStats;
  private readonly dispatch: (request: R) => void;
  /** FIFO ring of parsed requests waiting for budget. */
  private ring: (Waiting<R> | undefined)[];
  private head: number;
  private size: number;
  private requests: number;
  private bytes: number;
  private paused: boolean;
  private closed: boolean;
  private readonly shared: ServiceBudget | undefined;
  /** The head of the queue waits for the shared budget (set by fits()). */
  private blockedByShared: boolean;

  constructor(socket: FlowSocket, limits: FlowLimits, stats: FlowStats, dispatch: (request: R) => void, shared?: ServiceBudget) {
    this.socket = socket;
    this.limits = limits;
    this.stats = stats;
    this.dispatch = dispatch;
    this.ring = new Array<Waiting<R> | undefined>(16);
    this.head = 0;
    this.size = 0;
    this.requests = 0;
    this.bytes = 0;
    this.paused = false;
    this.closed = false;
    this.shared = shared;
    this.blockedByShared = false;
    socket.on('drain', () => {
      this.pump();
    });
  }

  /** Requests dispatched and not yet done. */
  get inFlight(): number {
    return this.requests;
  }

  /** Bytes held by requests dispatched and not yet done. */
  get bytesInFlight(): number {
    return this.bytes;
  }

  /** Parsed requests waiting for budget. */
  get queued(): number {
    return this.size;
  }

  /**
   * A parsed request that will hold `cost` bytes (its payload and the reply it asks
   * for) from dispatch until done(cost). Dispatched now if the budget allows and
   * nothing waits before it; queued otherwise.
   */
  push(request: R, cost: number): void {
    if (this.closed) return;
    if (this.size === 0 && this.fits(cost)) {
      this.start(request, cost);
    } else {
      this.enqueue({ request, cost });
    }
    this.updatePause();
  }

  /** A dispatched request is over and its reply is in the kernel's hands: give back its budget. */
  done(cost: number): void {
    this.requests--;
    this.bytes -= cost;
    this.shared?.give(cost);
    this.pump();
  }

  /** The shared budget has room again: dispatch what fits; true while still blocked by it. */
  retry(): boolean {
    this.blockedByShared = false;
    this.pump();
    return this.blockedByShared;
  }

  /** Drops what waits and stops dispatching; the connection is going away. Returns the dropped requests. */
  close(): R[] {
    this.closed = true;
    const dropped: R[] = [];
    for (let w = this.dequeue(); w !== undefined; w = this.dequeue()) dropped.push(w.request);
    this.shared?.leave(this);
    this.setPaused(false);
    return dropped;
  }

  private pump(): void {
    if (this.closed) return;
    for (;;) {
      const next = this.peek();
      if (next === undefined || !this.fits(next.cost)) break;
      this.dequeue();
      this.start(next.request, next.cost);
      if (this.closed) return;
    }
    this.updatePause();
  }

  private start(request: R, cost: number): void {
    this.requests++;
    this.bytes += cost;
    this.shared?.take(cost);
    this.dispatch(request);
  }

  private fits(cost: number): boolean {
    const own = this.requests === 0 || (this.requests < this.limits.maxRequests && this.bytes + cost <= this.limits.maxBytes);
    if (!own || this.shared === undefined) return own;
    if (this.shared.admits(cost, this.requests === 0)) return true;
    this.blockedByShared = true;
    this.shared.wait(this);
    return false;
  }

  private updatePause(): void {
    if (this.closed) return;
    const backedUp = this.socket.writableLength > this.socket.writableHighWaterMark;
    this.setPaused(this.size > 0 || backedUp || this.requests >= this.limits.maxRequests || this.bytes >= this.limits.maxBytes);
  }

  private setPaused(paused: boolean): void {
    if (paused === this.paused) return;
    this.paused = paused;
    if (paused) {
      this.stats.pauses++;
      this.stats.pausedNow++;
      this.socket.pause();
    } else {
      this.stats.pausedNow--;
      if (!this.closed) this.socket.resume();
    }
  }

  private enqueue(w: Waiting<R>): void {
    if (this.size === this.ring.length) {
      const grown = new Array<Waiting<R> | undefined>(this.ring.length * 2);
      for (let i = 0; i < this.size; i++) grown[i] = this.ring[(this.head + i) % this.ring.length];
      this.ring = grown;
      this.head = 0;
    }
    this.ring[(this.head + this.size) % this.ring.length] = w;
    this.size++;
  }

  private peek(): Waiting<R> | undefined {
    return this.size === 0 ? undefined : this.ring[this.head];
  }

  private dequeue(): Waiting<R> | undefined {
    if (this.size === 0) return undefined;
    const w = this.ring[this.head];
    this.ring[this.head] = undefined;
    this.head = (this.head + 1) % this.ring.length;
    this.size--;
    return w;
  }
}
