// IoGate: the requests in flight on one segment, counted so that freeing the segment can
// wait for them before its memory is zeroed and handed to the next owner.
//
// Invariants:
//   - after `close()` no I/O enters: `enter()` answers false from then on;
//   - `close()` resolves once every I/O that entered before it has left, and not before;
//   - `enter()` and `leave()` are synchronous, so a caller that found the segment live
//     and enters in the same tick is never refused (free removes the segment from the
//     address space and closes its gate in one tick too).
//
// Without it, a read still in flight on a local flash or swap range could return the
// bytes of the next owner, and a late write could land in the next owner's range.

export class IoGate {
  private inFlight: number;
  private shut: boolean;
  private drained: Promise<void> | undefined;
  private wake: () => void;

  constructor() {
    this.inFlight = 0;
    this.shut = false;
    this.drained = undefined;
    this.wake = () => undefined;
  }

  /** I/O in flight now. */
  get busy(): number {
    return this.inFlight;
  }

  get closed(): boolean {
    return this.shut;
  }

  /** Counts one I/O in; false once the gate is closed (the I/O must not start). */
  enter(): boolean {
    if (this.shut) return false;
    this.inFlight++;
    return true;
  }

  /** Counts one I/O out; the last one out after `close()` resolves it. */
  leave(): void {
    this.inFlight--;
    if (this.inFlight === 0 && this.shut) this.wake();
  }

  /** Refuses new I/O and resolves when the I/O already in has left. Idempotent. */
  close(): Promise<void> {
    if (this.drained !== undefined) return this.drained;
    this.shut = true;
    this.drained = this.inFlight === 0 ? Promise.resolve() : new Promise<void>((resolve) => (this.wake = resolve));
    return this.drained;
  }
}
