// Fakes for the host library's narrow interfaces, in the manner of nbdkit's `delay` and
// `error` filters: a RangeStore whose calls take effect only when fast-check's scheduler
// lets them and can fail, and an in-memory rmem node whose sessions can time out, drop
// their connection, lose the session, or answer again.

import { EventEmitter } from 'node:events';
import type fc from 'fast-check';
import type { CapacityEntry, Region, RmemClientEvents } from '../../src/client/rmem-client.js';
import { MisuseError, NetworkError, RuntimeError } from '../../src/errors.js';
import type { RmemSession } from '../../src/host/remote-node.js';
import type { RangeStore } from '../../src/host/tiers.js';

/**
 * Bytes in memory; each read and write takes effect when the scheduler releases it, and
 * the calls numbered in `failing` (counting reads and writes from 0) fail instead with an
 * injected EIO. Zeroing never fails.
 */
export class ScheduledStore implements RangeStore {
  readonly bytes: Buffer;
  private calls: number;

  constructor(
    private readonly s: fc.Scheduler,
    size: number,
    private readonly label: string,
    private failing: ReadonlySet<number> = new Set(),
  ) {
    this.bytes = Buffer.alloc(size);
    this.calls = 0;
  }

  /** No more injected failures (for the checks after a run). */
  heal(): void {
    this.failing = new Set();
  }

  async read(at: number, target: Buffer): Promise<void> {
    const n = this.calls++;
    await this.s.schedule(Promise.resolve(), `${this.label} read ${at}+${target.length}`);
    if (this.failing.has(n)) throw new Error(`${this.label}: injected EIO on read ${n}`);
    this.bytes.copy(target, 0, at, at + target.length);
  }

  async write(at: number, data: Buffer): Promise<void> {
    const n = this.calls++;
    const copy = Buffer.from(data); // what the caller handed over, as a device would take it
    await this.s.schedule(Promise.resolve(), `${this.label} write ${at}+${data.length}`);
    if (this.failing.has(n)) throw new Error(`${this.label}: injected EIO on write ${n}`);
    copy.copy(this.bytes, at);
  }

  async zero(at: number, length: number): Promise<void> {
    await this.s.schedule(Promise.resolve(), `${this.label} zero ${at}+${length}`);
    this.bytes.fill(0, at, at + length);
  }
}

interface FakeRegion {
  region: Region;
  data: Buffer;
}

/**
 * A memstrata node in memory. `mode` decides how it answers: `up` serves; `silent`
 * answers nothing (every request times out, with no effect on the node), like a stalled
 * or partitioned node. With a scheduler, every request waits for it before it takes effect.
 * `stall()` holds every request until `resume()`, as a stopped process does until its
 * client's timeout (pair it with `silent` for the timeout).
 */
export class FakeNode {
  readonly regions: Map<number, FakeRegion>;
  mode: 'up' | 'silent';
  /** Requests served, by operation. */
  readonly served: Map<string, number>;
  /** Requests sent, answered or not, by operation. */
  readonly attempts: Map<string, number>;
  /** Requests held by `stall()`, waiting for `resume()`. */
  private held: (() => void)[] | undefined;
  /** The next this many requests time out with no effect, whatever the mode. */
  timeouts: number;
  private nextId: number;

  constructor(
    readonly capacityBytes: number,
    readonly s?: fc.Scheduler,
  ) {
    this.regions = new Map();
    this.mode = 'up';
    this.served = new Map();
    this.attempts = new Map();
    this.held = undefined;
    this.timeouts = 0;
    this.nextId = 1;
  }

  get used(): number {
    let sum = 0;
    for (const r of this.regions.values()) sum += r.region.size;
    return sum;
  }

  /** A connected session, as RmemClient.connect gives one. */
  session(): FakeSession {
    return new FakeSession(this);
  }

  /** Holds every request from now on until `resume()`. */
  stall(): void {
    this.held ??= [];
  }

  /** Lets the held requests go on (and answer as `mode` says). */
  resume(): void {
    const held = this.held ?? [];
    this.held = undefined;
    for (const go of held) go();
  }

  /** Requests held now. */
  get holding(): number {
    return this.held?.length ?? 0;
  }

  /** @internal Resolves when the node lets a request go on. */
  gate(): Promise<void> {
    const held = this.held;
    if (held === undefined) return Promise.resolve();
    return new Promise((resolve) => held.push(resolve));
  }

  /** Forgets every region, as a node that restarted would. */
  restart(): void {
    this.regions.clear();
  }

  /** @internal */
  bind(size: number): Region {
    if (this.used + size > this.capacityBytes) throw new RuntimeError('MS_RMEM_NO_CAPACITY', `BIND: ${size} bytes do not fit`);
    const regionId = this.nextId++;
    const region: Region = { regionId, key: BigInt(regionId) * 7919n, size, ranges: [{ medium: 'dram', start: regionId * 0x100000, length: size }] };
    this.regions.set(regionId, { region, data: Buffer.alloc(size) });
    return region;
  }

  /** @internal */
  lookup(region: Region, op: string): FakeRegion {
    const held = this.regions.get(region.regionId);
    if (held === undefined || held.region.key !== region.key) throw new MisuseError('MS_RMEM_VIOLATION', `${op}: region ${region.regionId} is not allocated to this server with that key`);
    return held;
  }

  /** @internal */
  count(op: string): void {
    this.served.set(op, (this.served.get(op) ?? 0) + 1);
  }
}

export class FakeSession extends EventEmitter<RmemClientEvents> implements RmemSession {
  connected: boolean;

  constructor(private readonly node: FakeNode) {
    super();
    this.connected = true;
  }

  capacity(): Promise<CapacityEntry[]> {
    return this.op('CAPACITY', () => {
      const { capacityBytes, used } = this.node;
      return [{ medium: 'dram', total: capacityBytes, partition: capacityBytes, available: capacityBytes - used, growable: 0, used }];
    });
  }

  bind(size: number): Promise<Region> {
    return this.op('BIND', () => this.node.bind(size));
  }

  readInto(region: Region, offset: number, target: Uint8Array): Promise<number> {
    return this.op('READ', () => {
      const held = this.node.lookup(region, 'READ');
      held.data.copy(target, 0, offset, offset + target.length);
      return target.length;
    });
  }

  write(region: Region, offset: number, data: Uint8Array): Promise<void> {
    const copy = Buffer.from(data);
    return this.op('WRITE', () => {
      copy.copy(this.node.lookup(region, 'WRITE').data, offset);
    });
  }

  free(region: Region): Promise<void> {
    return this.op('FREE', () => {
      this.node.lookup(region, 'FREE');
      this.node.regions.delete(region.regionId);
    });
  }

  keepalive(): Promise<void> {
    return this.op('KEEPALIVE', () => undefined);
  }

  close(): Promise<void> {
    this.connected = false;
    return Promise.resolve();
  }

  /** The connection drops; the client starts reconnecting. */
  drop(): void {
    this.connected = false;
    this.emit('disconnected', undefined);
  }

  /** The client resumed its session within the lease. */
  resume(): void {
    this.connected = true;
    this.emit('reconnected');
  }

  /** The client reconnected but the node no longer had the session (resumed=false). */
  renewed(): void {
    this.connected = true;
    this.emit('sessionLost');
  }

  /** The client gave up reconnecting (its lease ran out) and is closed. */
  gaveUp(): void {
    this.connected = false;
    this.emit('sessionLost');
  }

  private async op<T>(name: string, fn: () => T): Promise<T> {
    this.node.attempts.set(name, (this.node.attempts.get(name) ?? 0) + 1);
    if (this.node.s !== undefined) await this.node.s.schedule(Promise.resolve(), `node ${name}`);
    else await Promise.resolve();
    await this.node.gate();
    if (!this.connected) throw new NetworkError('MS_RMEM_DISCONNECTED', `${name}: connection lost (fake)`);
    if (this.node.timeouts > 0) {
      this.node.timeouts--;
      throw new NetworkError('MS_RMEM_TIMEOUT', `${name}: no reply (fake, transient)`);
    }
    if (this.node.mode === 'silent') throw new NetworkError('MS_RMEM_TIMEOUT', `${name}: no reply (fake)`);
    this.node.count(name);
    return fn();
  }
}
