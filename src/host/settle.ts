// Waiting for sibling I/O before reporting a failure. `Promise.all` rejects on the first
// failure while its siblings still run; a request that then gives back its page locks,
// or leaves its segment's IoGate, would let a free hand the memory on while those
// siblings still read or write it. Every fan-out of I/O in the host library goes
// through settleAll instead.

/** Waits for every promise to settle, then throws the first failure, if any. */
export async function settleAll(work: readonly Promise<unknown>[]): Promise<void> {
  const results = await Promise.allSettled(work);
  for (const result of results) {
    if (result.status === 'rejected') throw result.reason;
  }
}
