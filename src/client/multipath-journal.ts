// A journal client with several paths to one NVRAM device (issue 12, DESIGN 4.6): the
// seed's "NVRAM reached by multipath, more than one path, channelled to different nodes".
//
//   paths, in order of preference:
//     unix:/data/guests/kv/rmem.sock    the guest's cut-through socket     (primary node)
//     tcp:10.0.0.1:10810                the node's rmem port               (primary node)
//     tcp:10.0.0.2:10810  partner       the mirror partner, for failover: 'promote'
//
//   states: active (appends go there), standby (not in use; tried in order when the
//   active one fails), failed (its last use or connect failed; tried again when no other
//   path works, and in the background every probeMs)
//
// Every append carries this client's writer id and the next numbers of its own sequence
// (JAPPENDW). When the active path fails (a lost connection, a request timeout, a node that
// cannot be reached), the client opens the journal on the next path that works and sends
// again, in order, every append not yet acknowledged; the device answers a number it already
// took with the first answer instead of appending it again (device.ts, writers), so across
// any failover every acknowledged record is there exactly once and in order.
//
// Failover to the partner (opt-in, failover: 'promote'): when no path to the primary node
// works, the client opens the device on a partner path with its epoch + 1, which promotes
// the replica there and fences the old primary (mirror failover, docs/mirror-protocol.md).
// The replica holds every record the primary acknowledged (mirrored policies acknowledge
// once the partner has it), with their writer numbers, so the re-sent appends it already
// has are answered, not appended.
//
// Bounded: a path is given up after `timeoutMs` without an answer; failover tries paths
// until `failoverTimeoutMs` has passed, then fails every pending append with
// MS_NVRAM_NO_PATH. Device errors (full, fenced, invalid) are the caller's, not a reason
// to fail over.

import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { MemstrataError, MisuseError, NetworkError, isMemstrataError } from '../errors.js';
import type { JournalInfo } from '../protocol/rmem/codec.js';
import type { JournalRecord } from '../protocol/journal/record.js';
import { RmemClient, type Journal } from './rmem-client.js';

/** One way to the device: a Unix socket (a guest's rmem.sock) or a node's rmem TCP port. */
export type JournalPath = { path: string; partner?: boolean; name?: string } | { host: string; port: number; partner?: boolean; name?: string };

export type PathState = 'active' | 'standby' | 'failed';

/** A path as `paths()` reports it, like `multipath -ll`. */
export interface PathStatus {
  name: string;
  address: string;
  /** A path to the mirror partner (used by failover: 'promote'). */
  partner: boolean;
  state: PathState;
  /** Why it failed last, if it did. */
  error: string | null;
  /** Failovers away from it. */
  failures: number;
}

export interface MultipathJournalOptions {
  device: string;
  /** In order of preference; at least one. */
  paths: readonly JournalPath[];
  /** The rmem server id the sessions use (each path opens its own session). */
  serverId: string;
  token?: string;
  /** The epoch to open the device with; a higher one fences writers with a lower. */
  epoch: number;
  /** 'promote': when no path to the primary works, take the device over on a partner path. Default 'paths' (never promote). */
  failover?: 'paths' | 'promote';
  /**
   * This writer's id (16 hex digits); default random. A writer that restarts may keep its
   * id only with its numbers (firstWriterSeq past the last it used): a number appended
   * again with another payload is refused (MS_NVRAM_INVALID).
   */
  writerId?: string;
  /** The writer number of the first append; default 1. */
  firstWriterSeq?: number;
  /** A request without an answer for this long fails its path; default 2000 ms. */
  timeoutMs?: number;
  /** How long a failover may try paths before pending appends fail; default 10000 ms. */
  failoverTimeoutMs?: number;
  /** How often failed paths are tried again in the background; default 1000 ms. */
  probeMs?: number;
  /**
   * Records sent and not yet acknowledged, at most (default 512); more wait here. Kept
   * below the number of answers a device remembers per writer (1024), so whatever a
   * failover re-sends is still answered, never refused as too old.
   */
  maxOutstanding?: number;
}

export interface MultipathJournalEvents {
  /** The active path changed (after a failure, or at open). */
  path: [status: PathStatus];
  /** The device was taken over on a partner path with a newer epoch. */
  promoted: [epoch: number, status: PathStatus];
}

interface Pending {
  entries: { payload: Buffer; target?: { volume: string; offset: number } }[];
  firstSeq: number;
  resolve(appended: { seq: number; timestamp: number }[]): void;
  reject(error: Error): void;
  sent: boolean;
}

interface Path {
  status: PathStatus;
  spec: JournalPath;
  client: RmemClient | undefined;
  journal: Journal | undefined;
}

/** Connecting a path failed (unreachable, HELLO refused): try the next path. */
class PathError extends Error {
  constructor(cause: unknown) {
    super(cause instanceof Error ? cause.message : String(cause), { cause });
  }
}

/** A network failure (the path's), as opposed to the device's answer. */
function pathFailure(error: unknown): boolean {
  return isMemstrataError(error) ? error.category === 'network' : true;
}

export class MultipathJournal extends EventEmitter<MultipathJournalEvents> {
  readonly device: string;
  readonly writerId: string;
  private epochValue: number;
  private readonly options: MultipathJournalOptions;
  private readonly pathList: Path[];
  private active: Path | undefined;
  private nextWriterSeq: number;
  private readonly pending: Pending[];
  private failing: Promise<void> | undefined;
  private closed: boolean;
  private probeTimer: NodeJS.Timeout | undefined;

  private constructor(options: MultipathJournalOptions) {
    super();
    this.options = options;
    this.device = options.device;
    this.writerId = options.writerId ?? randomBytes(8).toString('hex');
    this.epochValue = options.epoch;
    this.pathList = options.paths.map((spec, i) => ({
      spec,
      status: { name: spec.name ?? `path${i}`, address: 'path' in spec ? `unix:${spec.path}` : `tcp:${spec.host}:${spec.port}`, partner: spec.partner === true, state: 'standby', error: null, failures: 0 },
      client: undefined,
      journal: undefined,
    }));
    this.active = undefined;
    this.nextWriterSeq = options.firstWriterSeq ?? 1;
    this.pending = [];
    this.failing = undefined;
    this.closed = false;
    this.probeTimer = undefined;
  }

  /**
   * Opens the device on the first path that works (the primary's; a partner's only with
   * failover: 'promote' and no primary path working).
   */
  static async open(options: MultipathJournalOptions): Promise<MultipathJournal> {
    if (options.paths.length === 0) throw new NetworkError('MS_NVRAM_NO_PATH', `no path to NVRAM device ${options.device} was given`);
    const journal = new MultipathJournal(options);
    await journal.failover(undefined);
    journal.probeTimer = setInterval(() => { void journal.probe(); }, options.probeMs ?? 1000);
    journal.probeTimer.unref();
    return journal;
  }

  /**
   * The paths a guest's environment lists (`MEMSTRATA_NVRAM_PATHS`: `unix:PATH` and
   * `tcp:HOST:PORT`, comma-separated, in order of preference).
   */
  static pathsFromEnv(value: string | undefined): JournalPath[] {
    return (value ?? '').split(',').filter((p) => p !== '').map((entry, i) => {
      if (entry.startsWith('unix:')) return { name: `path${i}`, path: entry.slice('unix:'.length) };
      const m = /^tcp:(.+):(\d+)$/.exec(entry);
      if (m === null) throw new MisuseError('MS_CONFIG_INVALID', `NVRAM path ${JSON.stringify(entry)}: expected unix:PATH or tcp:HOST:PORT`);
      return { name: `path${i}`, host: (m[1] ?? '').replace(/^\[|\]$/g, ''), port: Number(m[2]) };
    });
  }

  get epoch(): number {
    return this.epochValue;
  }

  /** Every path and its state, in order of preference. */
  paths(): PathStatus[] {
    return this.pathList.map((p) => ({ ...p.status }));
  }

  /** The device as last opened (size, used, first and last sequence numbers, policy). */
  get info(): JournalInfo | undefined {
    return this.active?.journal?.info;
  }

  /**
   * Appends records; resolves with their sequence numbers once the device acknowledged
   * them, through whichever path that took. Appends resolve in the order they were made.
   */
  append(entries: readonly { payload: Uint8Array; target?: { volume: string; offset: number } }[]): Promise<{ seq: number; timestamp: number }[]> {
    if (this.closed) return Promise.reject(new NetworkError('MS_NVRAM_NO_PATH', `the multipath journal for ${this.device} is closed`));
    if (entries.length === 0) return Promise.resolve([]);
    return new Promise((resolve, reject) => {
      // After a failover gave up, the next append tries the paths again.
      if (this.active === undefined && this.failing === undefined) void this.failover(undefined);
      const item: Pending = {
        entries: entries.map((e) => ({ payload: Buffer.from(e.payload), ...(e.target === undefined ? {} : { target: e.target }) })),
        firstSeq: this.nextWriterSeq,
        resolve,
        reject,
        sent: false,
      };
      this.nextWriterSeq += entries.length;
      this.pending.push(item);
      if (this.failing === undefined) this.pump();
    });
  }

  /** Sends, in order, the pending appends that fit under maxOutstanding (one at least). */
  private pump(): void {
    const cap = this.options.maxOutstanding ?? 512;
    let outstanding = 0;
    for (const item of this.pending) {
      if (item.sent) {
        outstanding += item.entries.length;
        continue;
      }
      if (outstanding > 0 && outstanding + item.entries.length > cap) return;
      if (this.active === undefined) {
        if (this.failing === undefined && !this.closed) void this.failover(undefined);
        return;
      }
      this.send(item);
      outstanding += item.entries.length;
    }
  }

  /** Reads acknowledged records from `fromSeq` on, through the active path. */
  read(fromSeq: number, maxRecords?: number, maxBytes?: number): Promise<JournalRecord[]> {
    return this.onActive((client, journal) => client.journalRead(journal, fromSeq, maxRecords, maxBytes));
  }

  /** Trims the journal up to `upToSeq`, through the active path. */
  trim(upToSeq: number): Promise<void> {
    return this.onActive((client, journal) => client.journalTrim(journal, upToSeq));
  }

  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.probeTimer);
    for (const item of this.pending.splice(0)) item.reject(new NetworkError('MS_NVRAM_NO_PATH', `the multipath journal for ${this.device} was closed with the append pending`));
    await Promise.all(this.pathList.map((p) => p.client?.close().catch(() => undefined) ?? Promise.resolve()));
  }

  private async onActive<T>(fn: (client: RmemClient, journal: Journal) => Promise<T>): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      if (this.active === undefined && this.failing === undefined && !this.closed) void this.failover(undefined);
      if (this.failing !== undefined) await this.failing;
      const path = this.active;
      if (path?.client === undefined || path.journal === undefined) throw new NetworkError('MS_NVRAM_NO_PATH', `no working path to NVRAM device ${this.device}`);
      try {
        return await fn(path.client, path.journal);
      } catch (error) {
        if (!pathFailure(error) || this.closed || attempt >= this.pathList.length) throw error;
        // Only the active path fails over; one that was replaced meanwhile just waits for it.
        if (this.active === path) await this.failover(path, error);
      }
    }
  }

  private send(item: Pending): void {
    const path = this.active;
    if (path?.client === undefined || path.journal === undefined) {
      // Sent by the failover that finds a path (started here if none is under way).
      if (this.failing === undefined && !this.closed) void this.failover(undefined);
      return;
    }
    item.sent = true;
    path.client.journalAppend(path.journal, item.entries, { id: this.writerId, firstSeq: item.firstSeq }).then(
      (appended) => {
        const at = this.pending.indexOf(item);
        if (at < 0) return;
        this.pending.splice(at, 1);
        item.resolve(appended);
        if (this.failing === undefined) this.pump();
      },
      (error: unknown) => {
        if (this.pending.indexOf(item) < 0) return;
        if (pathFailure(error) && !this.closed) {
          // Everything not acknowledged goes again on the next path, this one included.
          if (this.active === path) void this.failover(path, error);
          return;
        }
        this.pending.splice(this.pending.indexOf(item), 1);
        item.reject(error instanceof Error ? error : new Error(String(error)));
        if (this.failing === undefined) this.pump();
      },
    );
  }

  /** Moves to the next path that works and re-sends what is pending; one failover at a time. */
  private failover(from: Path | undefined, error?: unknown): Promise<void> {
    if (from !== undefined) {
      from.status.state = 'failed';
      from.status.failures++;
      from.status.error = error instanceof Error ? error.message : String(error);
      const client = from.client;
      from.client = undefined;
      from.journal = undefined;
      void client?.close().catch(() => undefined);
      if (this.active === from) this.active = undefined;
    }
    this.failing ??= this.findPath().finally(() => { this.failing = undefined; });
    return this.failing;
  }

  private async findPath(): Promise<void> {
    const deadline = Date.now() + (this.options.failoverTimeoutMs ?? 10_000);
    let lastError: unknown;
    while (!this.closed) {
      const primary = this.pathList.filter((p) => !p.status.partner);
      const partner = this.options.failover === 'promote' ? this.pathList.filter((p) => p.status.partner) : [];
      // Standby paths first, then failed ones again; the partner only once no primary path works.
      const order = [...primary.filter((p) => p.status.state !== 'failed'), ...primary.filter((p) => p.status.state === 'failed')];
      for (const path of [...order, ...partner]) {
        if (Date.now() > deadline || this.closed) break;
        try {
          await this.openOn(path);
          if (this.closed) {
            // Closed while this path was being opened: nothing may stay open behind close().
            const client = path.client;
            path.client = undefined;
            path.journal = undefined;
            await client?.close().catch(() => undefined);
            return;
          }
          this.active = path;
          path.status.state = 'active';
          path.status.error = null;
          this.emit('path', { ...path.status });
          // Everything not acknowledged, in order, on the new path (within maxOutstanding).
          for (const item of this.pending) item.sent = false;
          this.pump();
          return;
        } catch (error) {
          lastError = error;
          path.status.state = 'failed';
          path.status.error = error instanceof Error ? error.message : String(error);
          // The device's own refusal when opened (fenced, not found) is final; a path that
          // cannot be connected (refused, a HELLO refused: no token on that path), a replica or
          // a device still recovering on that node is a reason to try the next path.
          const retryable = error instanceof PathError || pathFailure(error) || (isMemstrataError(error) && (error.code === 'MS_NVRAM_REPLICA' || error.code === 'MS_NVRAM_RECOVERING'));
          if (!retryable) {
            this.failAll(error);
            return;
          }
        }
      }
      if (Date.now() > deadline) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    const reason = lastError instanceof Error ? lastError.message : 'closed';
    this.failAll(new NetworkError('MS_NVRAM_NO_PATH', `no path to NVRAM device ${this.device} worked within ${this.options.failoverTimeoutMs ?? 10_000} ms (last: ${reason})`));
  }

  private failAll(error: unknown): void {
    const failure = error instanceof MemstrataError ? error : new NetworkError('MS_NVRAM_NO_PATH', String(error));
    for (const item of this.pending.splice(0)) item.reject(failure);
  }

  /** Connects a path and opens the journal: with the epoch, or on a partner with epoch + 1 (promotion). */
  private async openOn(path: Path): Promise<void> {
    const spec = path.spec;
    const timeoutMs = this.options.timeoutMs ?? 2000;
    const where = 'path' in spec ? { path: spec.path } : { host: spec.host, port: spec.port };
    // A server id of its own per connection (within the 64 bytes allowed): the session of a
    // stalled connection the node still holds must not refuse the next one's HELLO.
    const serverId = `${this.options.serverId.slice(0, 55)}.${randomBytes(4).toString('hex')}`;
    const client = await RmemClient.connect({
      ...where,
      serverId,
      ...(this.options.token === undefined ? {} : { token: this.options.token }),
      timeoutMs,
      connectTimeoutMs: timeoutMs,
      reconnect: false,
      keepalive: true,
    }).catch((error: unknown) => {
      throw new PathError(error);
    });
    try {
      const promote = path.status.partner;
      const epoch = promote ? this.epochValue + 1 : this.epochValue;
      const journal = await client.journalOpen(this.device, epoch);
      path.client = client;
      path.journal = journal;
      if (promote) {
        this.epochValue = epoch;
        this.emit('promoted', epoch, { ...path.status });
        // Its other paths are the new primary's now: partner paths stay partner paths in
        // the report, and a second promotion would need another partner.
      }
    } catch (error) {
      await client.close().catch(() => undefined);
      throw error;
    }
  }

  /** Failed paths are tried again in the background; one that connects is standby again. */
  private async probe(): Promise<void> {
    if (this.closed || this.failing !== undefined) return;
    for (const path of this.pathList) {
      if (path.status.state !== 'failed' || path.status.partner) continue;
      const spec = path.spec;
      try {
        const client = await RmemClient.connect({
          ...('path' in spec ? { path: spec.path } : { host: spec.host, port: spec.port }),
          serverId: `${this.options.serverId.slice(0, 55)}.${randomBytes(4).toString('hex')}`,
          ...(this.options.token === undefined ? {} : { token: this.options.token }),
          connectTimeoutMs: this.options.timeoutMs ?? 2000,
          reconnect: false,
          keepalive: false,
        });
        await client.close();
        if (path.status.state === 'failed') path.status.state = 'standby';
      } catch {
        // Still failed.
      }
    }
  }
}
