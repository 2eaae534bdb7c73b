// Waiting for every piece of a request before reporting on it.
//
// Promise.all rejects at the first failure while sibling pieces still read into or write
// from the request's buffer or memory; a caller that then reuses the buffer (a pooled NBD
// payload), gives back its locks, or lets a free hand the memory on, would expose bytes
// still in flight. settleAll reports only once nothing touches them any more. Used by
// every fan-out of I/O: the storage cache's line pieces, the host library's tiers.
//
// InFlight counts operations under way so that something can wait until none is left: a
// journal file's close (raw descriptor I/O that a FileHandle does not track), a data
// store's resize (a write landing after a shrink's truncate would grow the file again).

/** Waits for every promise to settle, then rejects with the first failure, if any. */
export async function settleAll(promises: readonly Promise<unknown>[]): Promise<void> {
  if (promises.length === 1) {
    await promises[0];
    return;
  }
  const results = await Promise.allSettled(promises);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}

/** Operations under way, and a wait until none is. */
export class InFlight {
  private count = 0;
  private idle: (() => void)[] = [];

  /** Counts `op` until it settles; returns it. */
  track<T>(op: Promise<T>): Promise<T> {
    this.count++;
    return op.finally(() => {
      this.count--;
      if (this.count === 0) for (const wake of this.idle.splice(0)) wake();
    });
  }

  /** Resolves once no tracked operation is under way (at once if none is). */
  settled(): Promise<void> {
    return this.count === 0 ? Promise.resolve() : new Promise((resolve) => this.idle.push(resolve));
  }
}
