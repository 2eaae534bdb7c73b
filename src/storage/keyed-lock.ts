// Per-key mutual exclusion for async work: cache lines, data-store chunks.
//
//   key -> tail of a promise chain; run(key, fn) appends fn and returns its result
//
// Holders of one key run one at a time, in the order they asked; keys are independent.
// A key's entry is dropped once its chain is idle, so the map holds only keys in use.
// A failing holder passes the lock on like a succeeding one.
//
// Nothing may wait for a second key while holding one unless every caller takes keys
// in the same order; callers document their order.

export class KeyedLock<K> {
  private readonly tails: Map<K, Promise<void>>;

  constructor() {
    this.tails = new Map();
  }

  /** Runs `fn` once every earlier holder of `key` is done; resolves or rejects with it. */
  run<T>(key: K, fn: () => Promise<T>): Promise<T> {
    const previous = this.tails.get(key) ?? Promise.resolve();
    const result = previous.then(fn);
    const tail = result.then(
      () => undefined,
      () => undefined,
    );
    this.tails.set(key, tail);
    void tail.then(() => {
      if (this.tails.get(key) === tail) this.tails.delete(key);
    });
    return result;
  }

  /** True while some holder runs or waits for `key`. */
  held(key: K): boolean {
    return this.tails.has(key);
  }

  /** Keys with a holder now (tests and diagnostics). */
  get size(): number {
    return this.tails.size;
  }
}
