// The signal fallback for a guest's CPU share, where no cgroup is writable: the guest's
// process group is stopped (SIGSTOP) and continued (SIGCONT) so that, measured from the
// kernel's own accounting of every process in the group (/proc/<pid>/stat), it uses its
// share of a core over time, as cpulimit does.
//
// One cycle per period P: the group runs for a slice, its CPU time is read, and what it
// used beyond its share since the last reading (the debt) is paid for by stopping it for
// debt / share. The slice is sized from the rate the group was seen to burn CPU while it
// ran (a multi-threaded guest burns several cores' worth), so that run + stop is about P:
//
//   slice = P * share / rate        stop = debt / share
//
// Credit a guest did not use is kept for one period at most, so an idle guest cannot save
// up a burst. Readings are in clock ticks (10 ms), but the debt is computed from running
// totals, so rounding does not accumulate. The group is read by walking the tree from its
// leader (proc-stat.ts treeMembers), which costs a few file reads per process per cycle.
// Known limits: a process that leaves the group (setsid) or the tree (a daemon whose
// parent exited) is not counted, though SIGSTOP still reaches it while it is in the
// group; and a node killed while the group is stopped leaves it stopped.

import { GroupCpu, scanProcesses, treeMembers } from './proc-stat.js';

const MIN_SLICE_MS = 2;
const MAX_STOP_MS = 5000;

export class DutyCycle {
  /** Seconds the group spent stopped. */
  throttledSeconds: number;
  private share: number;
  private periodMs: number;
  private readonly pgid: number;
  private readonly cpu: GroupCpu;
  private rate: number;
  private debt: number;
  private lastCpu: number;
  private lastAt: number;
  /** Whether the group is stopped by this cycle now. */
  stopped: boolean;
  private running: boolean;
  private timer: NodeJS.Timeout | undefined;
  private wake: (() => void) | undefined;

  constructor(pgid: number, share: number, periodMs: number) {
    this.pgid = pgid;
    this.share = share;
    this.periodMs = periodMs;
    this.cpu = new GroupCpu();
    this.rate = 1;
    this.debt = 0;
    this.lastCpu = 0;
    this.lastAt = 0;
    this.stopped = false;
    this.running = false;
    this.throttledSeconds = 0;
    this.timer = undefined;
    this.wake = undefined;
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    void this.loop();
  }

  set(share: number, periodMs: number): void {
    this.share = share;
    this.periodMs = periodMs;
  }

  /** Ends the cycle and leaves the group running (continued). */
  stop(): void {
    this.running = false;
    clearTimeout(this.timer);
    this.wake?.();
    this.signal('SIGCONT');
  }

  private async loop(): Promise<void> {
    this.lastCpu = await this.read();
    this.lastAt = performance.now();
    while (this.running) {
      const slice = Math.min(this.periodMs, Math.max(MIN_SLICE_MS, (this.periodMs * this.share) / Math.max(this.rate, this.share)));
      const sliceStart = performance.now();
      await this.sleep(slice);
      if (!this.running) return;
      const now = performance.now();
      const cpu = await this.read();
      if (!this.running) return;
      const used = cpu - this.lastCpu;
      const elapsed = (now - this.lastAt) / 1000;
      const ran = (now - sliceStart) / 1000;
      if (ran > 0) this.rate = 0.5 * this.rate + 0.5 * Math.max(used / ran, 0.01);
      this.lastCpu = cpu;
      this.lastAt = now;
      this.debt = Math.max(this.debt + used - this.share * elapsed, (-this.share * this.periodMs) / 1000);
      if (this.debt <= 0) continue;
      const pause = Math.min(MAX_STOP_MS, (this.debt / this.share) * 1000);
      this.signal('SIGSTOP');
      this.stopped = true;
      const stoppedAt = performance.now();
      await this.sleep(pause);
      this.throttledSeconds += (performance.now() - stoppedAt) / 1000;
      if (!this.running) return;
      this.signal('SIGCONT');
      this.stopped = false;
    }
  }

  private async read(): Promise<number> {
    // The tree from the leader: a few files per process, not all of /proc every period.
    const members = (await treeMembers(this.pgid, this.pgid)) ?? (await scanProcesses()).filter((s) => s.pgrp === this.pgid);
    return this.cpu.update(members);
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      this.wake = resolve;
      this.timer = setTimeout(resolve, ms);
    });
  }

  private signal(signal: 'SIGSTOP' | 'SIGCONT'): void {
    try {
      process.kill(-this.pgid, signal);
    } catch {
      // The group is gone.
    }
  }
}
