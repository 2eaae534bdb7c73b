// Bytes in flight across every connection of one service: the bound that one client
// with many connections cannot get around, where each connection's RequestFlow bounds
// only itself.
//
//   flow A ──take/give──┐
//   flow B ──take/give──┼── ServiceBudget (held <= maxBytes, + reserves)
//   flow C ──wait───────┘     FIFO of flows whose next request does not fit
//
// Invariants:
//   - `held` is the sum of the costs that flows have taken and not yet given back;
//   - a cost is admitted when it fits under `maxBytes`, or when nothing is held at all
//     (one request larger than the whole budget still runs, alone), or when the asking
//     connection has nothing in flight and the cost is at most `reserveBytes`: so a
//     well-behaved connection can always make progress with one modest request, even
//     while others (perhaps one client's many connections that never read their replies)
//     hold the whole budget. Hence held <= maxBytes + connections * reserveBytes, and a
//     single request beyond maxBytes only while it is the only one;
//   - flows blocked by this budget are woken in the order they started waiting, and the
//     first one still blocked stops the wake-up, so a large request is not starved by
//     smaller ones behind it.
//
// The waiting list is an array scanned on wake-up; it holds at most one entry per
// connection and is empty unless the service is at its budget.

export interface ServiceLimits {
  /** Bytes all connections together may hold in requests and unwritten replies. */
  maxBytes: number;
  /** What an idle connection may take beyond maxBytes for one request. */
  reserveBytes: number;
}

/** A flow blocked by the service budget; RequestFlow implements it. */
export interface BudgetWaiter {
  /** Dispatches what the budget now allows; true when its next request is still blocked by this budget. */
  retry(): boolean;
}

export class ServiceBudget {
  readonly limits: ServiceLimits;
  private held: number;
  private readonly waiting: BudgetWaiter[];
  private waking: boolean;

  constructor(limits: ServiceLimits) {
    this.limits = limits;
    this.held = 0;
    this.waiting = [];
    this.waking = false;
  }

  /** Bytes held now by all connections. */
  get bytes(): number {
    return this.held;
  }

  /** Connections waiting for room. */
  get waiters(): number {
    return this.waiting.length;
  }

  /** Whether `cost` may be taken now by a connection that has `idle` (nothing in flight). */
  admits(cost: number, idle: boolean): boolean {
    return this.held === 0 || this.held + cost <= this.limits.maxBytes || (idle && cost <= this.limits.reserveBytes);
  }

  take(cost: number): void {
    this.held += cost;
  }

  /** Gives bytes back and lets waiting flows go, in the order they came. */
  give(cost: number): void {
    this.held -= cost;
    this.wake();
  }

  /** Registers a blocked flow; a flow already waiting keeps its place. */
  wait(waiter: BudgetWaiter): void {
    if (!this.waiting.includes(waiter)) this.waiting.push(waiter);
  }

  /** A flow that no longer waits (its connection closed). */
  leave(waiter: BudgetWaiter): void {
    const at = this.waiting.indexOf(waiter);
    if (at >= 0) this.waiting.splice(at, 1);
  }

  private wake(): void {
    // A flow woken here may finish a request at once and give bytes back; the loop below
    // sees them, so a nested wake-up has nothing to add.
    if (this.waking) return;
    this.waking = true;
    try {
      for (let w = this.waiting[0]; w !== undefined; w = this.waiting[0]) {
        this.waiting.shift();
        if (!w.retry()) continue;
        // Still blocked: it keeps the head of the line (retry() may have queued it again).
        this.leave(w);
        this.waiting.unshift(w);
        break;
      }
    } finally {
      this.waking = false;
    }
  }
}
