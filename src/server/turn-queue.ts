// Turns of the event loop for CPU-bound steps: one step per loop iteration, oldest first.
//
//   wait() -> [FIFO of waiters] --setImmediate--> one waiter resolved --setImmediate--> next
//
// A step that does storage work which may complete without I/O (zeroing chunks that are
// zero already, walking a BLOCK_STATUS range) would otherwise run back to back with every
// other such step in one macrotask, chained by promise resolutions, and the sockets of
// other clients would not be polled until all were done. Each waiter here is resolved in
// its own check phase, with the next setImmediate queued only then, so a poll phase runs
// between any two steps.
//
// Invariant: at most one waiter is resolved per event-loop iteration; wait() always
// resolves asynchronously.

export class TurnQueue {
  /** Waiters from `head` on, oldest first; the array is compacted when it is half used. */
  private waiters: (() => void)[];
  private head: number;
  private scheduled: boolean;
  private readonly runFn: () => void;

  constructor() {
    this.waiters = [];
    this.head = 0;
    this.scheduled = false;
    this.runFn = () => {
      this.run();
    };
  }

  /** Steps waiting for their turn. */
  get waiting(): number {
    return this.waiters.length - this.head;
  }

  /** Resolves at a later event-loop iteration, when no step that asked before is still waiting. */
  wait(): Promise<void> {
    return new Promise<void>((resolve) => {
      this.waiters.push(resolve);
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(this.runFn);
      }
    });
  }

  private run(): void {
    const next = this.waiters[this.head];
    this.waiters[this.head] = noop;
    this.head++;
    if (this.head * 2 >= this.waiters.length) {
      this.waiters = this.waiters.slice(this.head);
      this.head = 0;
    }
    // Queued only now, so it runs in the next iteration's check phase, after a poll.
    if (this.waiting > 0) setImmediate(this.runFn);
    else this.scheduled = false;
    next?.();
  }
}

function noop(): void {
  // a waiter already resolved
}
