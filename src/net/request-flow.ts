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
//   - with a SharedBudget (a service-wide cap), the bytes of all its flows together stay
//     within its `maxBytes` as well, except for a single request while nothing else is
//     in flight anywhere in it, and for one request of at most `reserveBytes` on a
//     connection with nothing in flight (so a client whose connections hold the whole
//     budget cannot stall another's modest requests); a flow whose next request does
//     not fit waits, paused, until another flow gives bytes back;
//   - a flow is in the SharedBudget's waiting list exactly while its next request (or
//     its body's reservation) fits its own limits but not the service's
//     (`waitingOnService`): one held back by its own requests in flight is not, and is
//     pumped again when those give their bytes back. The list is kept oldest first, and
//     a flow keeps its place in it until it is served, stops waiting on the service, or
//     closes. With `waitersFirst`, no flow takes budget past a waiting flow older than
//     it (except through the idle reserve), so a large request is not starved by a
//     stream of small ones on other connections; the price is that, while the oldest
//     waiter does not fit, smaller requests that would fit wait behind it;
//   - reserve(): a body that is still arriving (one that spans socket chunks) is budgeted
//     before the parser allocates it, for the whole cost of the request it can become
//     (its length and the largest reply its operation can get); that request starts at
//     once, giving back what it does not need. A flow never holds budget while it waits
//     for more, so flows that share a budget cannot deadlock each other. While a reserved
//     body arrives the socket is read, so a reservation always ends.
//     A reservation still waiting may be withdrawn (cancelReserve: the body will be
//     dropped as it arrives instead of kept);
//   - reprice(): the requests waiting may be given new costs (at shutdown, when all they
//     will get is an error reply), and are dispatched as those fit.
//
// `dispatch` and `granted` run synchronously from push(), reserve(), done() or a drain,
// never after close().

export interface SharedBudgetOptions {
  /** What a connection with nothing in flight may take beyond maxBytes, for one request (default 0). */
  reserveBytes?: number;
  /** Serve waiting flows oldest first: no flow takes budget past an older waiter, except through the reserve (default false). */
  waitersFirst?: boolean;
}

/** Bytes several flows share: the cap of one service across all its connections. */
export class SharedBudget {
  readonly maxBytes: number;
  /** What a connection with nothing in flight may take beyond maxBytes, for one request. */
  readonly reserveBytes: number;
  readonly waitersFirst: boolean;
  private used: number;
  /** Flows waiting for room in this budget, oldest first; each keeps its place until it leaves. */
  private readonly waiting: Set<() => void>;
  /** A wake-up round is running; `again` asks it for one more pass. */
  private waking: boolean;
  private again: boolean;

  constructor(maxBytes: number, options: SharedBudgetOptions = {}) {
    this.maxBytes = maxBytes;
    this.reserveBytes = options.reserveBytes ?? 0;
    this.waitersFirst = options.waitersFirst ?? false;
    this.used = 0;
    this.waiting = new Set();
    this.waking = false;
    this.again = false;
  }

  /** Bytes held now by every flow of the service. */
  get bytes(): number {
    return this.used;
  }

  /** Flows waiting for room now. */
  get waiters(): number {
    return this.waiting.size;
  }

  /**
   * True when `cost` more fits: an `idle` connection has its reserve; otherwise, with
   * waitersFirst, only the oldest waiter (or anyone while none waits) may take budget;
   * with nothing in flight anything fits, else what stays within maxBytes.
   */
  fits(cost: number, idle = false, waiter?: () => void): boolean {
    if (idle && cost <= this.reserveBytes) return true;
    if (this.waitersFirst && !this.isOldest(waiter)) return false;
    return this.used === 0 || this.used + cost <= this.maxBytes;
  }

  add(delta: number): void {
    this.used += delta;
    if (delta < 0) this.wake();
  }

  /** The flow waits for room; one already waiting keeps its place. */
  wait(wake: () => void): void {
    this.waiting.add(wake);
  }

  /** The flow no longer waits for room (served, held back by its own limits now, or closed). */
  cancel(wake: () => void): void {
    if (!this.waiting.has(wake)) return;
    const oldest = this.isOldest(wake);
    this.waiting.delete(wake);
    // The next waiter may have been held back only by its place behind this one.
    if (oldest && this.waitersFirst) this.wake();
  }

  /** True while the flow waits for room. */
  isWaiting(wake: () => void): boolean {
    return this.waiting.has(wake);
  }

  /** True when no flow waits, or `waiter` is the one that has waited longest. */
  private isOldest(waiter: (() => void) | undefined): boolean {
    for (const first of this.waiting) return first === waiter;
    return true;
  }

  /**
   * Lets every waiting flow try again, oldest first; those that still do not fit keep
   * their place. A flow served or leaving meanwhile asks for one more pass.
   */
  private wake(): void {
    if (this.waiting.size === 0) return;
    if (this.waking) {
      this.again = true;
      return;
    }
    this.waking = true;
    try {
      do {
        this.again = false;
        for (const wake of [...this.waiting]) if (this.waiting.has(wake)) wake();
      } while (this.again && this.waiting.size > 0);
    } finally {
      this.waking = false;
    }
  }
}

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

export class RequestFlow<R> {
  private readonly socket: FlowSocket;
  private limits: FlowLimits;
  private readonly stats: FlowStats;
  private readonly dispatch: (request: R) => void;
  private readonly shared: SharedBudget | undefined;
  private readonly wakeFn: () => void;
  /** FIFO ring of parsed requests waiting for budget. */
  private ring: (Waiting<R> | undefined)[];
  private head: number;
  private size: number;
  private requests: number;
  private bytes: number;
  private paused: boolean;
  private closed: boolean;
  /** A reservation waiting for budget: its size and who to tell. */
  private pendingReserve: { bytes: number; granted: () => void } | undefined;
  /** Bytes of a granted reservation whose body is still arriving (0: none). */
  private receiving: number;

  constructor(socket: FlowSocket, limits: FlowLimits, stats: FlowStats, dispatch: (request: R) => void, shared?: SharedBudget) {
    this.socket = socket;
    this.limits = limits;
    this.stats = stats;
    this.dispatch = dispatch;
    this.shared = shared;
    this.wakeFn = () => {
      this.pump();
    };
    this.pendingReserve = undefined;
    this.receiving = 0;
    this.ring = new Array<Waiting<R> | undefined>(16);
    this.head = 0;
    this.size = 0;
    this.requests = 0;
    this.bytes = 0;
    this.paused = false;
    this.closed = false;
    socket.on('drain', () => {
      this.pump();
    });
  }

  /**
   * Changes this flow's own limits (a connection admitted by its handshake gets the
   * service's; before, one small request at a time), and serves what they now let through.
   */
  setLimits(limits: FlowLimits): void {
    this.limits = limits;
    this.pump();
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
   * True while the next request, or the reservation of a body, fits this connection's
   * own limits and waits only for room in the service's budget: it is held back by
   * other connections, not by its own.
   */
  get waitingOnService(): boolean {
    return this.shared?.isWaiting(this.wakeFn) ?? false;
  }

  /**
   * A parsed request that will hold `cost` bytes (its payload and the reply it asks
   * for) from dispatch until done(cost). Dispatched now if the budget allows and
   * nothing waits before it; queued otherwise. With `reserved` (the body came through
   * reserve()), it is dispatched at once and gives back what it does not need.
   */
  push(request: R, cost: number, reserved = 0): void {
    // Closed: close() gave back every reservation already, so there is nothing to give here.
    if (this.closed) return;
    if (reserved > 0) {
      // Its reservation covered it whole (the caller's promise): it starts now, whatever else waits.
      this.receiving = 0;
      this.start(request, cost, reserved);
      this.updatePause();
      return;
    }
    if (this.size > 0) {
      // Behind the head, which decides whether and on what this flow waits.
      this.enqueue({ request, cost });
    } else {
      const blocked = this.blockedBy(cost, false);
      if (blocked === 'none') {
        this.start(request, cost, 0);
      } else {
        this.enqueue({ request, cost });
        this.waitOn(blocked);
      }
    }
    this.updatePause();
  }

  /**
   * Budgets `bytes` for a body that is still arriving (see the invariants): its length
   * and the largest reply its request can get. True: taken now. False: the socket is
   * paused and `granted` runs once the bytes are taken; until then the caller parses
   * nothing more. The request the body becomes is pushed with `reserved` = `bytes` and
   * a cost of at most `bytes`.
   */
  reserve(bytes: number, granted: () => void): boolean {
    if (this.closed) return false;
    if (this.size > 0 || this.pendingReserve !== undefined) {
      // Behind queued requests: the head decides whether and on what this flow waits.
      this.pendingReserve = { bytes, granted };
      this.updatePause();
      return false;
    }
    const blocked = this.blockedBy(bytes, true);
    if (blocked === 'none') {
      this.take(bytes);
      this.receiving = bytes;
      this.updatePause();
      return true;
    }
    this.pendingReserve = { bytes, granted };
    this.waitOn(blocked);
    this.updatePause();
    return false;
  }

  /**
   * Withdraws a reservation that is still waiting for budget: its body will not be kept.
   * False when there is none (no reservation, or one granted already).
   */
  cancelReserve(): boolean {
    if (this.closed || this.pendingReserve === undefined) return false;
    this.pendingReserve = undefined;
    if (this.size === 0) this.shared?.cancel(this.wakeFn);
    this.updatePause();
    return true;
  }

  /**
   * Gives every waiting request the cost `costOf` returns for it now, and dispatches what
   * then fits. A request keeps its reservation; a cost below it gives the rest back at
   * dispatch.
   */
  reprice(costOf: (request: R) => number): void {
    if (this.closed) return;
    for (let i = 0; i < this.size; i++) {
      const w = this.ring[(this.head + i) % this.ring.length];
      if (w !== undefined) w.cost = costOf(w.request);
    }
    this.pump();
  }

  /** A dispatched request is over and its reply is in the kernel's hands: give back its budget. */
  done(cost: number): void {
    this.requests--;
    this.give(cost);
    this.pump();
  }

  /** Drops what waits and stops dispatching; the connection is going away. Returns the dropped requests. */
  close(): R[] {
    this.closed = true;
    this.shared?.cancel(this.wakeFn);
    const dropped: R[] = [];
    const unreserved = this.receiving;
    this.receiving = 0;
    this.pendingReserve = undefined;
    for (let w = this.dequeue(); w !== undefined; w = this.dequeue()) dropped.push(w.request);
    this.setPaused(false);
    this.give(unreserved);
    return dropped;
  }

  private pump(): void {
    if (this.closed) return;
    for (;;) {
      const next = this.peek();
      if (next === undefined) break;
      const blocked = this.blockedBy(next.cost, false);
      if (blocked !== 'none') {
        this.waitOn(blocked);
        this.updatePause();
        return;
      }
      this.dequeue();
      this.start(next.request, next.cost, 0);
      if (this.closed) return;
    }
    const pending = this.pendingReserve;
    if (pending === undefined) {
      this.shared?.cancel(this.wakeFn);
    } else {
      const blocked = this.blockedBy(pending.bytes, true);
      if (blocked === 'none') {
        this.pendingReserve = undefined;
        this.shared?.cancel(this.wakeFn);
        this.take(pending.bytes);
        this.receiving = pending.bytes;
        this.updatePause();
        pending.granted();
        return;
      }
      this.waitOn(blocked);
    }
    this.updatePause();
  }

  private start(request: R, cost: number, reserved: number): void {
    this.requests++;
    this.take(cost - reserved);
    this.dispatch(request);
  }

  private take(bytes: number): void {
    this.bytes += bytes;
    this.shared?.add(bytes);
  }

  private give(bytes: number): void {
    if (bytes === 0) return;
    this.bytes -= bytes;
    this.shared?.add(-bytes);
  }

  /**
   * What holds back a request of `cost` (or, `reserve`, a body of that many bytes: the
   * request it becomes starts without another check): this flow's own limits, the
   * service's budget, or nothing. Alone on its flow, any request fits the flow.
   */
  private blockedBy(cost: number, reserve: boolean): 'none' | 'own' | 'service' {
    const idle = this.requests === 0 && this.bytes === 0;
    const roomy = this.requests < this.limits.maxRequests && this.bytes + cost <= this.limits.maxBytes;
    if (!(reserve ? idle : this.requests === 0) && !roomy) return 'own';
    if (this.shared !== undefined && !this.shared.fits(cost, idle, this.wakeFn)) return 'service';
    return 'none';
  }

  /** Joins (or keeps its place in) the service's waiting list when the service holds it back; leaves it otherwise. */
  private waitOn(blocked: 'none' | 'own' | 'service'): void {
    if (blocked === 'service') this.shared?.wait(this.wakeFn);
    else this.shared?.cancel(this.wakeFn);
  }

  private updatePause(): void {
    if (this.closed) return;
    // A reserved body is read to its end whatever else holds: it is budgeted already.
    if (this.receiving > 0) {
      this.setPaused(false);
      return;
    }
    const backedUp = this.socket.writableLength > this.socket.writableHighWaterMark;
    const waiting = this.size > 0 || this.pendingReserve !== undefined;
    this.setPaused(waiting || backedUp || this.requests >= this.limits.maxRequests || this.bytes >= this.limits.maxBytes);
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
