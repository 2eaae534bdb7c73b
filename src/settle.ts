// Waiting for every piece of a request before reporting on it.
//
// Promise.all rejects at the first failure while sibling pieces still read into or write
// from the request's buffer or memory; a caller that then reuses the buffer (a pooled NBD
// payload), gives back its locks, or lets a free hand the memory on, would expose bytes
// still in flight. settleAll reports only once nothing touches them any more. Used by
// every fan-out of I/O: the storage cache's line pieces, the host library's tiers.

/** Waits for every promise to settle, then rejects with the first failure, if any. */
export async function settleAll(promises: readonly Promise<unknown>[]): Promise<void> {
  if (promises.length === 1) {
    await promises[0];
    return;
  }
  const results = await Promise.allSettled(promises);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}
