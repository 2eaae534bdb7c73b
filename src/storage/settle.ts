// Waiting for every piece of a request before reporting on it.
//
// Promise.all rejects at the first failure while sibling pieces still read into or write
// from the request's buffer; a caller that then reuses the buffer (a pooled NBD payload)
// would hand bytes in flight to another request. settleAll reports only once nothing
// touches the buffer any more.

/** Waits for every promise to settle, then rejects with the first failure, if any. */
export async function settleAll(promises: readonly Promise<unknown>[]): Promise<void> {
  if (promises.length === 1) {
    await promises[0];
    return;
  }
  const results = await Promise.allSettled(promises);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}
