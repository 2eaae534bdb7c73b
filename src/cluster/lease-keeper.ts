// A node's etcd lease, kept alive in the background, with a local, conservative view of
// how long it still holds.
//
//   granted at t0 for TTL          held until t0 + TTL
//   renewal sent at t, answered    held until t + TTL      (etcd counts from when it got
//                                                           the renewal, which is after t)
//   no answer by "held until"      lost (`lost` fires); renewals go on: etcd may still
//                                  hold it (it restores leases with a fresh TTL when it
//                                  comes back), and a renewal it answers resumes it
//                                  (`granted` fires again with the same id)
//   etcd answers TTL 0             gone: a new lease is granted, `granted` fires with it
//
// Every time is taken on the monotonic clock when the request is sent, never when its
// answer arrives, so a slow answer can only shorten the view, never stretch it. The
// member record and, later, device ownership hang off this lease: what the node may
// still claim is what `remainingMs()` says, with no round trip.

import { EventEmitter } from 'node:events';
import { performance } from 'node:perf_hooks';
import type { Logger } from '../logger.js';
import { etcdProblem } from '../client/etcd.js';

/** The three lease calls, so a test can put a fake etcd behind the keeper. */
export interface LeaseApi {
  grant(ttlSeconds: number): Promise<{ id: string; ttlSeconds: number }>;
  /** Renews; resolves with the TTL etcd restarted, 0 when the lease is gone. */
  keepAlive(id: string): Promise<number>;
  revoke(id: string): Promise<void>;
}

export interface LeaseKeeperEvents {
  /** A lease was granted (the first, or a new one after a loss). */
  granted: [id: string];
  /** The lease is no longer held. */
  lost: [id: string, reason: string];
}

export interface LeaseKeeperOptions {
  api: LeaseApi;
  ttlMs: number;
  log: Logger;
  /** Milliseconds, monotonic; tests pass their own clock. */
  now?: () => number;
  /** Waits between calls; tests pass one that moves their clock. */
  sleep?: (ms: number) => Promise<void>;
}

export class LeaseKeeper extends EventEmitter<LeaseKeeperEvents> {
  private readonly api: LeaseApi;
  private readonly ttlMs: number;
  private readonly log: Logger;
  private readonly now: () => number;
  private readonly pause: ((ms: number) => Promise<void>) | undefined;
  private leaseId: string | undefined;
  private heldUntil: number;
  /** `lost` fired for leaseId, and no renewal has resumed it since. */
  private lapsed: boolean;
  private closed: boolean;
  private timer: NodeJS.Timeout | undefined;
  private wakeLoop: (() => void) | undefined;
  private loop: Promise<void> | undefined;
  private lastProblem: string | undefined;

  constructor(options: LeaseKeeperOptions) {
    super();
    this.api = options.api;
    this.ttlMs = options.ttlMs;
    this.log = options.log;
    this.now = options.now ?? (() => performance.now());
    this.pause = options.sleep;
    this.leaseId = undefined;
    this.heldUntil = 0;
    this.lapsed = false;
    this.closed = false;
    this.timer = undefined;
    this.wakeLoop = undefined;
    this.loop = undefined;
    this.lastProblem = undefined;
  }

  /** The lease held now, or undefined. */
  get id(): string | undefined {
    return this.remainingMs() > 0 ? this.leaseId : undefined;
  }

  /** How long the lease is certainly held for, by this node's clock; 0 when it is not. */
  remainingMs(): number {
    if (this.leaseId === undefined || this.lapsed) return 0;
    return Math.max(0, this.heldUntil - this.now());
  }

  /** Why the last grant or renewal failed, while it keeps failing. */
  get problem(): string | undefined {
    return this.lastProblem;
  }

  /** Starts the background loop: grant, then renew every quarter of the TTL. */
  start(): void {
    this.loop ??= this.run();
  }

  /** Stops renewing; `revoke` also ends the lease in etcd at once (a clean leave). */
  async close(options: { revoke: boolean }): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.wake();
    await this.loop;
    const id = this.leaseId;
    this.leaseId = undefined;
    // A lapsed lease may still be in etcd: revoking it takes the record down at once.
    if (options.revoke && id !== undefined) await this.api.revoke(id);
  }

  private async run(): Promise<void> {
    const every = Math.max(250, Math.floor(this.ttlMs / 4));
    while (!this.closed) {
      if (this.leaseId !== undefined && !this.lapsed && this.remainingMs() === 0) this.lapse('not renewed within its TTL');
      if (this.leaseId === undefined) {
        const sentAt = this.now();
        try {
          const { id, ttlSeconds } = await this.api.grant(Math.round(this.ttlMs / 1000));
          if (this.closed) {
            await this.api.revoke(id).catch(() => undefined);
            return;
          }
          this.leaseId = id;
          this.lapsed = false;
          this.heldUntil = sentAt + ttlSeconds * 1000;
          this.solved('lease granted', { lease: id, ttlSeconds });
          this.emit('granted', id);
        } catch (error) {
          this.failed('cannot get an etcd lease', error);
        }
      } else {
        const id = this.leaseId;
        const sentAt = this.now();
        try {
          const ttlSeconds = await this.api.keepAlive(id);
          if (this.leaseId === id) {
            if (ttlSeconds <= 0) {
              this.lapse('etcd says it expired');
              this.leaseId = undefined;
            } else {
              this.heldUntil = Math.max(this.heldUntil, sentAt + ttlSeconds * 1000);
              this.solved('lease renewed again', { lease: id });
              if (this.lapsed && this.heldUntil > this.now()) {
                this.lapsed = false;
                this.log.info({ lease: id }, 'etcd lease resumed: etcd still held it');
                this.emit('granted', id);
              }
            }
          }
        } catch (error) {
          this.failed('cannot renew the etcd lease', error);
        }
      }
      const wait = this.leaseId === undefined || this.lapsed ? Math.min(every, 1000) : Math.min(every, Math.max(50, this.remainingMs()));
      await this.sleep(wait);
    }
  }

  /** The lease is no longer held (by the clock, or etcd said so): `lost`, once. */
  private lapse(reason: string): void {
    const id = this.leaseId;
    if (id === undefined || this.lapsed) return;
    this.lapsed = true;
    this.heldUntil = 0;
    this.log.warn({ lease: id, reason }, 'etcd lease lost');
    this.emit('lost', id, reason);
  }

  private failed(what: string, error: unknown): void {
    const problem = `${what}: ${etcdProblem(error)}`;
    if (problem !== this.lastProblem) this.log.warn({ lease: this.leaseId, remainingMs: Math.round(this.remainingMs()) }, problem);
    this.lastProblem = problem;
  }

  private solved(message: string, fields: Record<string, unknown>): void {
    if (this.lastProblem !== undefined) this.log.info(fields, message);
    this.lastProblem = undefined;
  }

  private sleep(ms: number): Promise<void> {
    if (this.closed) return Promise.resolve();
    if (this.pause !== undefined) return this.pause(ms);
    return new Promise((resolve) => {
      this.wakeLoop = resolve;
      this.timer = setTimeout(() => { this.wake(); }, ms);
    });
  }

  private wake(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    const wake = this.wakeLoop;
    this.wakeLoop = undefined;
    wake?.();
  }
}
