// Whether synchronous file I/O is fast enough to make on the event loop: a read the OS
// page cache answers, or a write it absorbs, costs a few microseconds there, where a trip
// through libuv's thread pool costs the loop 15 us or so of wake-ups and callbacks and
// the request the same again in latency. One that reaches the device (a read of a page
// not cached, a write the kernel throttles while it writes dirty pages back, a disk that
// hangs) would stall every client for the device's latency. The gauge weighs how long
// such calls held the loop beyond what the page cache takes, and declines them while
// that is more than a small share of the time, trying one again now and then.
// FlashMedium.readSync and JournalFile's writes in the appender's turn each keep one.
// The names and figures below speak of reads; a write is weighed the same way.

import { performance } from 'node:perf_hooks';

/** A synchronous read's budget in microseconds: this much, plus one per SYNC_BYTES_PER_US bytes of its length. */
const SYNC_BASE_US = 30;
/** The copy rate of a read the page cache answers is several GB/s; a device's is less. */
const SYNC_BYTES_PER_US = 4096;
/** The window (ms) over which synchronous reads are weighed: what they took decays by e in this time. */
const SYNC_WINDOW_MS = 1000;
/**
 * The rules, each on the time synchronous reads took beyond their budgets (the excess),
 * as shares of the window. Reads are declined while any rule holds, and made again once
 * none holds at twice its threshold:
 *   - the excess is more than 0.5% of the time and more than a quarter of the reads'
 *     budgets together (reads that reach a device, at any rate that shows);
 *   - the excess of reads each more than SYNC_LONG_MS over budget is more than 1% of the
 *     time (a preemption or an interrupt holds a read up a few milliseconds at most; a
 *     device stall, longer);
 *   - the excess is more than 20% of the time, whatever the budgets.
 */
const SYNC_SLOW_SHARE = 0.005;
const SYNC_SLOW_RATIO = 0.25;
const SYNC_LONG_MS = 6;
const SYNC_LONG_SHARE = 0.01;
const SYNC_MAX_SHARE = 0.2;
/**
 * While synchronous reads are declined, one is tried again this long after the last one
 * ended, or nine times as long as that one took if longer: probes never hold the event
 * loop more than a tenth of the time, however slow the device. A read through the thread
 * pool that comes back within SYNC_FAST_POOL_MS brings the next probe to within
 * SYNC_PROBE_SOON_MS, so a device slow for seconds once is not waited out nine times.
 */
const SYNC_PROBE_MS = 10;
const SYNC_FAST_POOL_MS = 1;
const SYNC_PROBE_SOON_MS = 1000;
/** Reads or writes longer than this always go through the thread pool (rmem reads reach 16 MiB). */
export const SYNC_IO_MAX = 256 * 1024;

/**
 * Whether synchronous reads are fast enough to make on the event loop. What a read
 * costs the other clients is the time it holds the loop beyond what a read the page
 * cache answers takes (its budget). The gauge keeps that excess, the part of it from
 * reads held up long, and the budgets of the reads made, all decaying over about a
 * second, and declines reads by the rules at SYNC_SLOW_SHARE: all reads at 80 us, one in
 * six at 20 ms, one in a thousand at 20 ms, or a 200 ms stall among 50,000 fast reads a
 * second turn it on; a fast read the scheduler preempts, or one a network interrupt
 * lands in, now and then, does not. While declining, a probe now and then
 * (SYNC_PROBE_MS) adds what it takes; once reads are fast again, the excess decays and
 * they are made again.
 */
export class SyncIoGauge {
  /** Time (ms) synchronous reads took beyond their budgets, that of reads held up long, and their budgets (ms), decayed to `at`. */
  private excess: number;
  private longExcess: number;
  private budgets: number;
  private at: number;
  private declining: boolean;
  private nextProbe: number;
  /** Synchronous calls made, and calls declined, since the gauge was made. */
  made: number;
  declined: number;

  constructor(private readonly clock: () => number = () => performance.now()) {
    this.excess = 0;
    this.longExcess = 0;
    this.budgets = 0;
    this.at = 0;
    this.declining = false;
    this.nextProbe = 0;
    this.made = 0;
    this.declined = 0;
  }

  /** The clock (ms) when a read of `length` bytes may be made now, or undefined: decline it. */
  begin(length: number): number | undefined {
    if (length > SYNC_IO_MAX) {
      this.declined++;
      return undefined;
    }
    const now = this.clock();
    if (this.declining && now < this.nextProbe) {
      this.declined++;
      return undefined;
    }
    return now;
  }

  /** A read of `length` bytes that began at `start` (ms) is done. */
  end(start: number, length: number): void {
    this.made++;
    const now = this.clock();
    const budget = (SYNC_BASE_US + length / SYNC_BYTES_PER_US) / 1000;
    // performance.now() is monotonic and finite; a clock that is not must not grow what decays.
    const elapsed = now - this.at;
    const decay = elapsed > 0 ? Math.exp(-elapsed / SYNC_WINDOW_MS) : 1;
    const took = now - start;
    const over = took - budget > 0 ? took - budget : 0;
    this.excess = this.excess * decay + over;
    this.longExcess = this.longExcess * decay + (over > SYNC_LONG_MS ? over : 0);
    this.budgets = this.budgets * decay + budget;
    if (!Number.isFinite(this.excess + this.longExcess + this.budgets)) {
      this.excess = 0;
      this.longExcess = 0;
      this.budgets = 0;
    }
    if (Number.isFinite(now)) this.at = now;
    const pressure = Math.max(
      Math.min(this.excess / (SYNC_SLOW_SHARE * SYNC_WINDOW_MS), this.excess / (SYNC_SLOW_RATIO * this.budgets)),
      this.longExcess / (SYNC_LONG_SHARE * SYNC_WINDOW_MS),
      this.excess / (SYNC_MAX_SHARE * SYNC_WINDOW_MS),
    );
    if (pressure > 1) this.declining = true;
    else if (pressure < 0.5) this.declining = false;
    if (this.declining) this.nextProbe = Number.isFinite(now) && took >= 0 ? now + Math.max(SYNC_PROBE_MS, 9 * took) : 0;
  }

  /** A read through the thread pool took `ms`: one that came back fast brings the next probe near. */
  pooled(ms: number): void {
    if (!this.declining || !(ms < SYNC_FAST_POOL_MS)) return;
    const soon = this.clock() + SYNC_PROBE_SOON_MS;
    if (soon < this.nextProbe) this.nextProbe = soon;
  }

  /** True while synchronous reads are declined (they have been slow). */
  get slow(): boolean {
    return this.declining;
  }
}
