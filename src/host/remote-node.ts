// RemoteNode: one memstrata node a host borrows memory from, with the policy that tells a
// slow node from a lost one, and the clean-up when a lost node comes back.
//
//   state        what it means                                         binds  I/O on its regions
//   ok           answering                                             yes    served
//   suspect      a request timed out or the connection dropped; the    no     retried
//                request is retried within the budget
//   lost         retries ran out, the connection stayed down past the  no     MS_HOST_NODE_LOST
//                grace period, or the node no longer has the session
//   reclaiming   reachable again; freeing every region the host held   no     MS_HOST_NODE_LOST
//                there before the loss
//
//   ok --timeout | disconnect--> suspect --answer | session resumed--> ok
//   ok, suspect --retries exhausted | down past grace | session gone--> lost
//   lost --probe answers | session resumed | new session--> reclaiming --all freed--> ok
//   reclaiming --network failure--> lost (the probe goes on)
//
// Invariants:
//   - every region the host holds on the node is in `bound` until a FREE of it succeeded
//     or the node said it does not hold it (VIOLATION: its lease ran out, or it restarted);
//     so once the node is back, reclaiming leaves nothing of the host's bound there;
//   - each loss starts a new generation; a region belongs to the generation it was bound
//     in and is never read or written once that generation has ended, even after the node
//     is back: its contents were declared lost, and it has been freed;
//   - only idempotent requests are retried (READ, WRITE, FREE, CAPACITY, KEEPALIVE); a
//     BIND is never repeated;
//   - while the connection is down and within the grace period, a request waits for it
//     instead of spending its retries; the grace period (or the end of the session's
//     lease, whichever comes first) bounds that wait;
//   - once the hierarchy is closing (`shutdown`), nothing is retried or waited for: a
//     request gets one attempt, so closing costs a stalled node one request timeout, not
//     its retry budget; what a FREE does not reach, the node frees when the lease ends.
//
// Known limits: a BIND that times out may have bound a region the host never learns of;
// the node frees it when the host's session ends (close, then the node's lease). A WRITE
// repeated after a timeout carries the same bytes to the same place, so applying it twice
// is harmless; the late original could overtake a later write to the same bytes only if
// the node reordered two writes of one connection to one region.

import type { CapacityEntry, Region, RmemClientEvents } from '../client/rmem-client.js';
import { NetworkError, isMemstrataError, type MemstrataError } from '../errors.js';
import type { Piece } from './tiers.js';

export type NodeState = 'ok' | 'suspect' | 'lost' | 'reclaiming';

/**
 * How the host tells a slow node from a lost one. A request that times out (after the
 * rmem `timeoutMs`) or whose connection drops is sent again after `backoffMs`, doubled
 * for each further attempt, up to `retries` times; when the last attempt fails too, the
 * node is lost. While the connection is down the requests wait for it to come back; if it
 * stays down for `graceMs`, the node is lost. A lost node is tried every `probeMs`; once
 * it answers, the host frees every region it held there and uses the node again.
 */
export interface NodeLossPolicy {
  /** Attempts after the first for a request that timed out or lost its connection; default 3. */
  retries: number;
  /** Wait before the first retry, ms, doubled for each next one; default 100. */
  backoffMs: number;
  /** How long the connection may stay down before the node is lost, ms; default 10000. */
  graceMs: number;
  /** How often a lost node is tried again, ms; default 1000. */
  probeMs: number;
}

/** How long close() waits for a node to close its side of the connection. */
const CLOSE_WAIT_MS = 1000;

export const DEFAULT_NODE_LOSS: Readonly<NodeLossPolicy> = { retries: 3, backoffMs: 100, graceMs: 10_000, probeMs: 1000 };

/**
 * The part of RmemClient a RemoteNode uses. RmemClient is one; a test puts a fake or a
 * wrapper that delays or fails chosen calls here.
 */
export interface RmemSession {
  readonly connected: boolean;
  capacity(): Promise<CapacityEntry[]>;
  bind(size: number, where: { medium: 'dram' | 'flash' }): Promise<Region>;
  readInto(region: Region, offset: number, target: Uint8Array): Promise<number>;
  write(region: Region, offset: number, data: Uint8Array): Promise<void>;
  free(region: Region): Promise<void>;
  keepalive(): Promise<void>;
  close(): Promise<void>;
  on<K extends keyof RmemClientEvents>(event: K, listener: (...args: RmemClientEvents[K]) => void): unknown;
  off<K extends keyof RmemClientEvents>(event: K, listener: (...args: RmemClientEvents[K]) => void): unknown;
}

/** A change of a node's state; the discovery table shows the state. */
export interface NodeTransition {
  node: string;
  from: NodeState;
  to: NodeState;
  reason: string;
}

export interface RemoteNodeOptions {
  name: string;
  /** host:port, for messages. */
  address: string;
  session: RmemSession;
  /** Opens a new session, when the old one gave up and the node is to be tried again. */
  connect: () => Promise<RmemSession>;
  policy: NodeLossPolicy;
  notify: (transition: NodeTransition) => void;
}

export class RemoteNode {
  readonly name: string;
  readonly address: string;
  private session: RmemSession;
  private readonly connect: () => Promise<RmemSession>;
  private readonly policy: NodeLossPolicy;
  private readonly notify: (transition: NodeTransition) => void;
  private current: NodeState;
  private generation: number;
  /** Why each generation ended, by generation. */
  private readonly endings: string[];
  private readonly bound: Set<Region>;
  private grace: NodeJS.Timeout | undefined;
  /** Requests waiting for the connection to come back (or the node to be lost). */
  private waiters: (() => void)[];
  /** The session gave up reconnecting: a new one is needed to reach the node. */
  private stale: boolean;
  private probing: boolean;
  /** The hierarchy is closing: one attempt per request, no waiting for the connection. */
  private closing: boolean;
  private closed: boolean;
  private readonly handlers: { disconnected: () => void; reconnected: () => void; sessionLost: () => void };

  constructor(options: RemoteNodeOptions) {
    this.name = options.name;
    this.address = options.address;
    this.session = options.session;
    this.connect = options.connect;
    this.policy = options.policy;
    this.notify = options.notify;
    this.current = 'ok';
    this.generation = 0;
    this.endings = [];
    this.bound = new Set();
    this.grace = undefined;
    this.waiters = [];
    this.stale = false;
    this.probing = false;
    this.closing = false;
    this.closed = false;
    this.handlers = {
      disconnected: () => {
        this.onDisconnected();
      },
      reconnected: () => {
        this.onReconnected();
      },
      sessionLost: () => {
        this.onSessionLost();
      },
    };
    this.attach(this.session);
  }

  get state(): NodeState {
    return this.current;
  }

  /** Per medium capacity, with retries. */
  capacity(): Promise<CapacityEntry[]> {
    return this.call('CAPACITY', (s) => s.capacity(), this.generation);
  }

  /**
   * Binds a region and returns it as a piece. A BIND is never retried (it is not
   * idempotent): a timeout makes the node suspect and starts a keepalive that settles it.
   */
  async bind(size: number, medium: 'dram' | 'flash'): Promise<Piece> {
    const generation = this.generation;
    this.assertAlive(generation);
    let region: Region;
    try {
      region = await this.session.bind(size, { medium });
    } catch (error) {
      if (transient(error)) {
        this.suspect(`BIND: ${error.message}`);
        this.call('KEEPALIVE', (s) => s.keepalive(), generation).catch(() => undefined);
      }
      throw error;
    }
    this.bound.add(region);
    this.answered();
    if (generation !== this.generation) {
      // Lost while the bind ran: the region is nobody's memory. Free it with the others
      // when the node is back, or now if it is back already.
      this.release(region).catch(() => undefined);
      this.assertAlive(generation);
    }
    return this.piece(medium, region, generation);
  }

  /** Why memory of `generation` is gone, or undefined while it is there. */
  failure(generation: number): MemstrataError | undefined {
    if (this.closed) return nodeLost(this, 'the hierarchy memory is closed');
    if (generation === this.generation && (this.current === 'ok' || this.current === 'suspect')) return undefined;
    return nodeLost(this, this.endings[generation] ?? this.endings.at(-1) ?? 'lost');
  }

  /**
   * Runs an idempotent request on memory of `generation`, retrying a timeout or a
   * dropped connection with backoff (see NodeLossPolicy). Throws MS_HOST_NODE_LOST once
   * the node is lost, before or during the retries; other errors pass through.
   */
  async call<T>(what: string, fn: (session: RmemSession) => Promise<T>, generation: number): Promise<T> {
    for (let failures = 0; ; ) {
      // Connected (the common case): no wait, so a request costs no extra turn.
      if (this.session.connected) this.assertAlive(generation);
      else await this.usable(generation);
      try {
        const result = await fn(this.session);
        this.answered();
        return result;
      } catch (error) {
        // Lost meanwhile: whatever the node answered, this memory is gone.
        this.assertAlive(generation);
        if (!transient(error) || this.closing) throw error;
        failures++;
        if (failures > this.policy.retries) {
          this.lose(`${what} got no answer in ${failures} attempts (last: ${error.message})`);
          this.assertAlive(generation);
          throw error; // not reached: the node is lost now
        }
        this.suspect(`${what}: ${error.message}; retry ${failures} of ${this.policy.retries}`);
        await sleep(this.policy.backoffMs * 2 ** (failures - 1), true);
        if (this.closing) throw error; // closing began during the backoff
      }
    }
  }

  /** Frees a region now, or leaves it to the reclaim when the node is lost. */
  async release(region: Region): Promise<void> {
    if (!this.bound.has(region) || this.current === 'lost' || this.current === 'reclaiming') return;
    try {
      await this.call('FREE', (s) => s.free(region), this.generation);
    } catch (error) {
      if (isMemstrataError(error) && error.code === 'MS_HOST_NODE_LOST') return; // the reclaim frees it
      if (!(isMemstrataError(error) && error.code === 'MS_RMEM_VIOLATION')) throw error;
      // VIOLATION: the node holds no such region (an earlier attempt freed it).
    }
    this.bound.delete(region);
  }

  /**
   * The hierarchy is closing: from now on a request gets one attempt, and one that needs
   * the connection while it is down fails at once instead of waiting for it.
   */
  shutdown(): void {
    this.closing = true;
    this.wake();
  }

  /** Stops probing and closes the session; the node frees what is left after its lease. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.stopGrace();
    this.wake();
    this.detach(this.session);
    // RmemClient.close waits for the node to close its side too, which a stopped node never
    // does: the wait is bounded, and the socket goes once the node wakes or its host resets it.
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.session.close().catch(() => undefined), new Promise<void>((resolve) => (timer = setTimeout(resolve, CLOSE_WAIT_MS)))]);
    clearTimeout(timer);
  }

  // ---- internals ----

  private piece(medium: 'dram' | 'flash', region: Region, generation: number): Piece {
    return {
      device: this.name,
      medium,
      length: region.size,
      physical: region.ranges.map((r) => ({ start: r.start, length: r.length })),
      read: (offset, target) => this.call('READ', (s) => s.readInto(region, offset, target), generation).then(ignore),
      write: (offset, data) => this.call('WRITE', (s) => s.write(region, offset, data), generation),
      release: () => this.release(region),
      failure: () => this.failure(generation),
    };
  }

  private assertAlive(generation: number): void {
    const failure = this.failure(generation);
    if (failure !== undefined) throw failure;
  }

  /** Waits while the connection is down; throws once memory of `generation` is gone. */
  private async usable(generation: number): Promise<void> {
    this.assertAlive(generation);
    while (!this.session.connected) {
      if (this.closing) throw new NetworkError('MS_RMEM_DISCONNECTED', `node ${this.name} (${this.address}): the connection is down and the hierarchy memory is closing`);
      await new Promise<void>((resolve) => this.waiters.push(resolve));
      this.assertAlive(generation);
    }
  }

  private wake(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }

  private transition(to: NodeState, reason: string): void {
    const from = this.current;
    if (from === to) return;
    this.current = to;
    this.notify({ node: this.name, from, to, reason });
  }

  private answered(): void {
    if (this.current === 'suspect' && this.session.connected) this.transition('ok', 'answered');
  }

  private suspect(why: string): void {
    if (this.current === 'ok') this.transition('suspect', why);
  }

  /** The cluster says the node is gone (its lease ended): lost, whatever its connection says. */
  expire(why: string): void {
    this.lose(why);
  }

  /**
   * The node came back at another address: whatever it held of this host is gone, and
   * the next session is opened by `connect`, which knows the new address.
   */
  moved(why: string): void {
    this.lose(why);
    this.stale = true;
  }

  private lose(why: string): void {
    if (this.closed || this.current === 'lost') return;
    this.stopGrace();
    if (this.current !== 'reclaiming') {
      this.endings[this.generation] = why;
      this.generation++;
    }
    this.transition('lost', why);
    this.wake();
    void this.probe();
  }

  private onDisconnected(): void {
    if (this.closed || this.current === 'lost' || this.current === 'reclaiming') return;
    this.suspect('connection dropped; reconnecting');
    if (this.grace !== undefined) return;
    this.grace = setTimeout(() => {
      this.grace = undefined;
      if (!this.session.connected) this.lose(`connection down for more than ${this.policy.graceMs} ms`);
    }, this.policy.graceMs);
  }

  private onReconnected(): void {
    if (this.closed) return;
    this.stopGrace();
    if (this.current === 'suspect') this.transition('ok', 'session resumed');
    this.wake();
    if (this.current === 'lost') void this.reclaim('session resumed');
  }

  private onSessionLost(): void {
    if (this.closed) return;
    this.lose("the node no longer holds this host's session; its regions there are gone");
    if (!this.session.connected) this.stale = true;
    this.wake();
    if (this.session.connected) void this.reclaim('new session');
  }

  private stopGrace(): void {
    if (this.grace !== undefined) clearTimeout(this.grace);
    this.grace = undefined;
  }

  /** While lost: tries the node every probeMs and reclaims once it answers. */
  private async probe(): Promise<void> {
    if (this.probing) return;
    this.probing = true;
    try {
      while (this.current === 'lost' && !this.closed) {
        await sleep(this.policy.probeMs, false);
        if (this.current !== 'lost' || this.closed) return;
        try {
          if (this.stale) await this.renew();
          else if (this.session.connected) await this.session.keepalive();
          else continue; // the session is still resuming; its events decide
        } catch {
          continue;
        }
        await this.reclaim('the node answers again');
      }
    } finally {
      this.probing = false;
    }
  }

  /** Replaces a session that gave up with a new one. */
  private async renew(): Promise<void> {
    const session = await this.connect();
    if (this.closed) {
      await session.close();
      return;
    }
    const old = this.session;
    this.detach(old);
    this.session = session;
    this.stale = false;
    this.attach(session);
    await old.close().catch(() => undefined);
  }

  /** Frees every region the host held on the node before the loss, then takes it back into use. */
  private async reclaim(why: string): Promise<void> {
    if (this.current !== 'lost' || this.closed) return;
    this.transition('reclaiming', `${why}; freeing ${this.bound.size} regions held before the loss`);
    let freed = 0;
    let gone = 0;
    // Until none is left: a BIND that was in flight at the loss may still add its region.
    for (let region = first(this.bound); region !== undefined; region = first(this.bound)) {
      try {
        await this.session.free(region);
        freed++;
      } catch (error) {
        if (!(isMemstrataError(error) && error.code === 'MS_RMEM_VIOLATION')) {
          this.lose(`reclaim interrupted: ${error instanceof Error ? error.message : String(error)}`);
          return;
        }
        gone++; // the node freed it already (its lease ran out, or it restarted)
      }
      this.bound.delete(region);
    }
    if (this.closed || this.state !== 'reclaiming') return;
    this.transition('ok', `back: ${freed} regions freed, ${gone} were gone already`);
  }

  private attach(session: RmemSession): void {
    session.on('disconnected', this.handlers.disconnected);
    session.on('reconnected', this.handlers.reconnected);
    session.on('sessionLost', this.handlers.sessionLost);
  }

  private detach(session: RmemSession): void {
    session.off('disconnected', this.handlers.disconnected);
    session.off('reconnected', this.handlers.reconnected);
    session.off('sessionLost', this.handlers.sessionLost);
  }
}

/** A timeout or a dropped connection: the request may be sent again. */
function transient(error: unknown): error is MemstrataError {
  return isMemstrataError(error) && (error.code === 'MS_RMEM_TIMEOUT' || error.code === 'MS_RMEM_DISCONNECTED');
}

export function nodeLost(node: { name: string; address: string }, why: string): NetworkError {
  return new NetworkError('MS_HOST_NODE_LOST', `node ${node.name} (${node.address}) is lost: ${why}`, { details: { node: node.name, address: node.address, reason: why } });
}

function first<T>(set: ReadonlySet<T>): T | undefined {
  for (const value of set) return value;
  return undefined;
}

/** A wait; `hold` keeps the process alive for it (a caller awaits it), otherwise it runs in the background. */
function sleep(ms: number, hold: boolean): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    if (!hold) timer.unref();
  });
}

/** Drops a value: a request that resolves with one (a byte count) as one that resolves with none. */
function ignore(): void {}
