// A counting semaphore: at most `slots` holders at once, the others wait, oldest first.
// acquire() always resolves asynchronously (a free slot is taken at once, but handed over
// through a resolved promise), release() hands a freed slot straight to the oldest waiter.

export class Semaphore {
  readonly slots: number;
  private held: number;
  private waiters: (() => void)[];
  private head: number;

  constructor(slots: number) {
    this.slots = slots;
    this.held = 0;
    this.waiters = [];
    this.head = 0;
  }

  /** Slots held now. */
  get active(): number {
    return this.held;
  }

  /** Holders waiting for a slot. */
  get waiting(): number {
    return this.waiters.length - this.head;
  }

  acquire(): Promise<void> {
    if (this.held < this.slots) {
      this.held++;
      return Promise.resolve();
    }
    return new Promise<void>((resolve) => {
      this.waiters.push(resolve);
    });
  }

  /** Gives a slot back; the oldest waiter, if any, takes it. */
  release(): void {
    const next = this.waiters[this.head];
    if (next === undefined) {
      this.held--;
      return;
    }
    this.waiters[this.head] = noop;
    this.head++;
    if (this.head * 2 >= this.waiters.length) {
      this.waiters = this.waiters.slice(this.head);
      this.head = 0;
    }
    next();
  }
}

function noop(): void {
  // a waiter already resolved
}
