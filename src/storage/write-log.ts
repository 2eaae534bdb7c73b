// NVRAM as the write log of a volume ("map journal data to storage space", EMC
// US 8,990,520): a volume configured with an NVRAM device journals every write there.
//
//   WRITE     cache write, then a journal record (target = volume, offset; payload = data);
//             acknowledged once the record is in the device with its journal write queued,
//             not synced (for a mirrored device in sync, its send to the partner under way):
//             NBD promises durability at FLUSH and FUA only, so a commit of several
//             writes and a FLUSH costs one sync, not one per write. Like a write still
//             in the cache of a volume without a log, it may be lost if the node dies
//             before the next FLUSH; replay then applies the records the file holds,
//             which are the first ones in order. Where the cache holds the lines in DRAM
//             and the device can append without waiting, both happen in the turn the
//             WRITE arrived and it is answered then (writeNow)
//   FUA       the same, acknowledged once the record is durable under the device's
//             policy (synced, or held by the partner): one journal append, group-committed,
//             instead of a destage and an fdatasync of the data store
//   ZEROES    the zeroing reaches the data store at once, so its zero record (payload =
//             the length) is synced before it is acknowledged, as a FUA write's
//   write-ahead  a record is made durable before the cache writes the data it describes
//             back to the store (Volume.logBarrier, called by the destage): a replay never
//             puts an older record over newer data. Without the cache (cache.enabled
//             false), data reaches the store at once, and every write's record is synced.
//             Known limits: a write the cache sends straight to the store because its DRAM
//             level has no slot at all reaches the store before its record, and so may a
//             write that finds the journal full (the checkpoint it waits for writes it
//             back before its record can be appended) or one on its way when a write-back
//             begins that has not taken its record number by then (guard); a crash before
//             the next FLUSH may then replay an older record over it (NBD allows that for
//             a write not flushed)
//   FLUSH     one commit of the device (device.commit): an fdatasync of the journal file
//             that covers every record acknowledged before, shared with every FLUSH and
//             FUA that comes while it runs; for a `mirrored` device in sync, no sync: it
//             waits until the partner holds every record acknowledged before (a round trip
//             to the partner's memory, mostly over by then, since each record was sent at
//             its WRITE)
//   checkpoint when the journal is half full (or when full): note the last acknowledged
//             sequence number, flush the volume's cache to its data store, trim the
//             journal up to the noted number
//   replay    at start, before the volume is served: apply every record in order to the
//             data store, sync it, trim. A `mirrored` device back from a crash may lack
//             records only its partner held: the volume stays `recovering` (not served,
//             not resized, not removed) until the mirror partner has given them back,
//             then is replayed (recover)
//
// A record is appended only after its data is in the cache, so whatever the checkpoint
// trims has been written back by the cache flush that precedes the trim. WRITEs and
// zeroings of a volume that overlap go through the cache and the log one after the other,
// in the order they arrived (ordered): the records of overlapping requests then follow the
// order in which the cache took their bytes, so a replay after a FLUSH gives what reads
// gave before it. (A WRITE over several lines releases each line as it is done; without
// this, a later WRITE to a line done first could take its record number first.)
// A WRITE larger than a record (MAX_PAYLOAD) is journaled as several, appended one after
// the other: an append goes to a mirror partner as one frame, which holds no more than
// one record of the largest size.
//
// Policies: `local` (a FLUSH costs one fdatasync of the journal), `mirrored` (a FLUSH
// or FUA returns once the partner node holds the records in memory: durability on two
// nodes at the cost of a round trip per commit; with the partner down, under `degrade`,
// a FLUSH syncs the journal here instead) and `mirrored+local` (both, every record
// synced before its WRITE is acknowledged). Not `volatile` (a FLUSH would not
// survive a crash), and not a replica (it belongs to the partner node).
//
// A device that is a write log belongs to the node (`claim`): only a primary of this
// node may be one; rmem clients are refused on every request, and the
// claim opens the device with a newer epoch, which fences their handles and waits for
// their appends in flight, then trims every record, so nothing written before the claim
// (by a client, or for a removed volume of the same name) is ever replayed.

import { MisuseError, RuntimeError, asError, isMemstrataError } from '../errors.js';
import type { Logger } from '../logger.js';
import type { Extent } from '../protocol/nbd/codec.js';
import type { DeviceManager } from '../nvram/device-manager.js';
import type { NvramDevice } from '../nvram/device.js';
import { MAX_PAYLOAD, RECORD_FLAG, decodeOne } from '../protocol/journal/record.js';
import { isMirrored } from '../protocol/journal/policy.js';
import type { CacheViews, VolumeIo } from './volume-io.js';
import type { Volume } from './volume-manager.js';

/** A record a WRITE or zeroing appends. */
interface Entry {
  payload: Buffer;
  target: { volume: string; offset: number };
  flags?: number;
}

/** A WRITE or zeroing through a log on its way, from its cache write to its record. */
interface Span {
  start: number;
  end: number;
  /** Settles (never rejects) once it is over, acknowledged or failed. */
  done: Promise<void>;
}

export class WriteLogIo implements VolumeIo {
  private readonly inner: VolumeIo;
  /** Per volume (by name), the WRITEs and zeroings through its log on their way. */
  private readonly spans: Map<string, Set<Span>>;
  private readonly nvram: DeviceManager;
  private readonly log: Logger;
  private readonly checkpoints: Map<string, Promise<void>>;
  /** Devices that are write logs, and their volumes. */
  private readonly claims: Map<string, string>;
  /** Replays waiting for a mirrored write log to recover (recover), and the node's stop. */
  private readonly recoveries: Set<Promise<void>>;
  private readonly stopping: AbortController;

  constructor(inner: VolumeIo, nvram: DeviceManager, log: Logger) {
    this.inner = inner;
    this.nvram = nvram;
    this.log = log;
    this.checkpoints = new Map();
    this.spans = new Map();
    this.claims = new Map();
    this.recoveries = new Set();
    this.stopping = new AbortController();
  }

  /** The volume whose write log `device` is, if it is one. */
  owner(device: string): string | undefined {
    return this.claims.get(device);
  }

  /**
   * Makes `device` the write log of the new volume `volume`, or refuses it
   * (MS_VOLUME_INVALID) when its policy cannot keep the promise or it logs another volume.
   */
  async claim(volume: string, name: string): Promise<void> {
    const device = this.nvram.get(name);
    if (device.policy === 'volatile') {
      throw new MisuseError('MS_VOLUME_INVALID', `NVRAM device ${name} is volatile and cannot be a write log: a FLUSH through it would not survive a crash; use a local, mirrored or mirrored+local device`, { details: { device: name } });
    }
    if (device.role === 'replica') {
      throw new MisuseError('MS_VOLUME_INVALID', `NVRAM device ${name} is a mirror replica and cannot be a write log here: it belongs to the partner node, whose primary takes its records; use a local or mirrored device of this node`, { details: { device: name } });
    }
    const other = this.claims.get(name);
    if (other !== undefined) throw new MisuseError('MS_VOLUME_INVALID', `NVRAM device ${name} is already the write log of volume ${other}`, { details: { device: name, volume: other } });
    this.claims.set(name, volume);
    try {
      await device.fence();
      const last = device.lastSeq;
      if (last > device.trimPoint) await device.trim(device.epoch, last);
      // The partner's replica learns it belongs to the node, so no client of the partner
      // may take it over (and demote this device under the volume). Until it has, that
      // could happen: a mirrored write log waits for the resync that tells it.
      device.refreshReplica();
      if (isMirrored(device.policy)) {
        await device.commit(); // waits for the resync under way
        if (device.info().mirror !== 'in-sync') {
          throw new RuntimeError('MS_NVRAM_PARTNER_DOWN', `NVRAM device ${name} is not in sync with its mirror partner (${device.info().mirror ?? 'no partner'}): a mirrored write log needs the partner to hold its replica as the node's own first; try again once the partner is up`, { details: { device: name } });
        }
      }
    } catch (error) {
      this.claims.delete(name);
      device.refreshReplica();
      throw error;
    }
  }

  release(device: string): void {
    this.claims.delete(device);
    this.nvram.find(device)?.refreshReplica();
  }

  read(volume: Volume, offset: number, target: Buffer): Promise<void> {
    return this.inner.read(volume, offset, target);
  }

  readViews(volume: Volume, offset: number, length: number): CacheViews | undefined {
    return this.inner.readViews?.(volume, offset, length);
  }

  readNow(volume: Volume, offset: number, target: Buffer): boolean {
    return this.inner.readNow?.(volume, offset, target) ?? false;
  }

  /**
   * A plain WRITE stored in this turn: into the cache (its writeNow), then its record
   * appended to the device in the same turn (NvramDevice.appendNow), with the promise of
   * `write` without FUA. Only where both can be done now: the device is asked first, and
   * nothing in between waits, so the append cannot be refused after the cache took the
   * data. Without a write-back cache that honours the barrier the record must be synced:
   * never here.
   */
  writeNow(volume: Volume, offset: number, data: Buffer): boolean {
    const device = this.device(volume);
    if (device === undefined) return this.inner.writeNow?.(volume, offset, data) ?? false;
    if (this.inner.writeNow === undefined || this.inner.writeAhead !== true || this.overlaps(volume, offset, data.length)) return false;
    const entries = [{ payload: data, target: { volume: volume.name, offset } }];
    if (!device.canAppendNow(device.epoch, entries)) return false;
    this.guard(volume, device);
    if (!this.inner.writeNow(volume, offset, data)) return false;
    // Refused only where writing the device's memory failed (the device repairs): write()
    // stores the same bytes again and appends their record.
    if (device.appendNow(device.epoch, entries) === undefined) return false;
    this.checkpointIfHalfFull(volume, device);
    return true;
  }

  async write(volume: Volume, offset: number, data: Buffer, fua: boolean): Promise<void> {
    const device = this.device(volume);
    if (device === undefined) return this.inner.write(volume, offset, data, fua);
    this.guard(volume, device);
    const entries: Entry[] = [];
    for (let at = 0; at === 0 || at < data.length; at += MAX_PAYLOAD) {
      entries.push({ payload: data.subarray(at, at + MAX_PAYLOAD), target: { volume: volume.name, offset: offset + at } });
    }
    await this.ordered(volume, offset, data.length, async () => {
      await this.inner.write(volume, offset, data, false);
      // Without a write-back cache that honours the barrier, the data is in the store now:
      // its record must be durable before the WRITE is acknowledged.
      await this.journal(volume, device, entries, fua || this.inner.writeAhead !== true);
    });
  }

  async flush(volume: Volume): Promise<void> {
    const device = this.device(volume);
    if (device === undefined) return this.inner.flush(volume);
    // A fenced volume answers every FLUSH with its failure, as without a log (volume-store.ts).
    volume.checkWritable();
    await device.commit();
  }

  async zero(volume: Volume, offset: number, length: number, options: { fua: boolean; allocate: boolean }): Promise<void> {
    const device = this.device(volume);
    if (device === undefined) return this.inner.zero(volume, offset, length, options);
    const payload = Buffer.alloc(8);
    payload.writeBigUInt64BE(BigInt(length), 0);
    await this.ordered(volume, offset, length, async () => {
      await this.inner.zero(volume, offset, length, { fua: false, allocate: options.allocate });
      // A zeroing reaches the data store at once, ahead of its record: the record is synced
      // before the zeroing is acknowledged, so no older record can be replayed over it.
      await this.journal(volume, device, [{ payload, target: { volume: volume.name, offset }, flags: RECORD_FLAG.ZERO }], true);
    });
  }

  prefetch(volume: Volume, offset: number, length: number): Promise<void> {
    return this.inner.prefetch(volume, offset, length);
  }

  blockStatus(volume: Volume, offset: number, length: number): Extent[] {
    return this.inner.blockStatus(volume, offset, length);
  }

  /**
   * At start, before anything is served: replays the volume's write log. A `mirrored`
   * device back from a crash is `recovering` (its file may lack records only the partner
   * holds): the volume is then `recovering` too, not served, and is replayed in the
   * background once the partner has given back what it holds (mirroring.ts); `stop` ends
   * that wait.
   */
  async recover(volume: Volume): Promise<void> {
    const device = this.device(volume);
    if (device === undefined) return;
    this.claims.set(device.name, volume.name);
    if (device.role === 'replica') {
      // The partner holds the device with a newer epoch (it was taken over): what this
      // node has is a copy of someone else's records, never to be replayed into the volume.
      volume.recovering = { why: `its write log ${device.name} is now a replica of the mirror partner's device, which was taken over there; this node's copy is not replayed. The volume can only be removed`, removable: true };
      this.log.error({ volume: volume.name, device: device.name }, 'the write log device is a replica of the mirror partner; the volume is not served');
      return;
    }
    if (!device.recovering) {
      await this.replay(volume);
      return;
    }
    volume.recovering = { why: `its write log, mirrored NVRAM device ${device.name}, waits for the mirror partner to give back the records this node may have lost in a crash (if the partner is gone for good: memstrata nvram accept-local ${device.name})` };
    this.log.warn({ volume: volume.name, device: device.name }, 'volume recovering: its mirrored write log waits for the mirror partner; the volume is not served until the log is replayed (memstrata nvram accept-local ends the wait if the partner is gone for good)');
    const run = (async () => {
      try {
        await this.whenPrimary(device, this.stopping.signal);
        await this.replay(volume);
        volume.recovering = undefined;
        this.log.info({ volume: volume.name, device: device.name }, 'volume recovered from its mirrored write log and served again');
      } catch (error) {
        if (this.stopping.signal.aborted) return;
        volume.recovering = { why: `the replay of its write log ${device.name} failed (${(error as Error).message}); restart the node to try again` };
        this.log.error({ volume: volume.name, device: device.name, err: error }, 'write log replay failed; the volume stays recovering and is not served');
      }
    })();
    this.recoveries.add(run);
    void run.finally(() => this.recoveries.delete(run));
  }

  /** Ends the waits of volumes still recovering (node stop), and waits for replays under way. */
  async stop(): Promise<void> {
    this.stopping.abort(new RuntimeError('MS_SHUTTING_DOWN', 'the node is stopping'));
    await Promise.allSettled([...this.recoveries]);
  }

  /** Resolves once `device` is a primary that is not recovering; a demoted one (its partner took it over) never is. */
  private async whenPrimary(device: NvramDevice, signal: AbortSignal): Promise<void> {
    await device.whenRecovered(signal);
    if (device.role === 'primary' && !device.recovering) return;
    if (device.role === 'replica') {
      this.log.error({ device: device.name }, 'the write log device became a replica of the mirror partner; its volume stays recovering');
      await new Promise<never>((_, reject) => {
        const abort = (): void => { reject(asError(signal.reason)); };
        if (signal.aborted) abort();
        else signal.addEventListener('abort', abort, { once: true });
      });
    }
    await this.whenPrimary(device, signal);
  }

  /** Applies a volume's journaled writes to its data store after a restart, then trims. Returns how many. */
  async replay(volume: Volume): Promise<number> {
    const device = this.device(volume);
    if (device === undefined) return 0;
    if (volume.writeLog !== undefined) this.claims.set(volume.writeLog, volume.name);
    let applied = 0;
    let last = 0;
    for (let from = 0; ; ) {
      const page = await device.read(from, 4096);
      if (page.length === 0) break;
      for (const buf of page) {
        const record = decodeOne(buf);
        last = record.seq;
        if (record.target?.volume !== volume.name) continue;
        const zero = (record.flags & RECORD_FLAG.ZERO) !== 0;
        const offset = record.target.offset;
        const length = zero ? Number(record.payload.readBigUInt64BE(0)) : record.payload.length;
        // A resize checkpoints the log first, so a record past the end is one the volume
        // no longer has room for (its metadata or file changed under it): what lies
        // inside is replayed, the rest is reported and dropped.
        const inside = Math.max(0, Math.min(length, volume.size - offset));
        if (inside < length) {
          this.log.warn({ volume: volume.name, device: device.name, seq: record.seq, offset, length, size: volume.size }, 'write log record reaches past the end of the volume; the part outside is skipped');
        }
        if (inside === 0) continue;
        if (zero) await volume.store.zeroRange(offset, inside);
        else await volume.store.write(offset, record.payload.subarray(0, inside));
        applied++;
      }
      from = last + 1;
    }
    await volume.store.sync();
    if (last > 0) await device.trim(device.epoch, last);
    if (applied > 0) this.log.info({ volume: volume.name, device: device.name, records: applied }, 'write log replayed into the volume');
    return applied;
  }

  /**
   * Writes the volume's cached data back and trims its log up to what was acknowledged
   * before: after this, no record older than now can be replayed. Used before a resize.
   */
  async checkpointNow(volume: Volume): Promise<void> {
    const device = this.device(volume);
    if (device === undefined) return;
    await this.checkpoint(volume, device); // one already running covers less: run a fresh one
    await this.checkpoint(volume, device);
  }

  /** Trims the volume's whole log without writing anything back: the volume is being removed. */
  async discard(volume: Volume): Promise<void> {
    const device = this.device(volume);
    if (device?.role === 'replica') return; // the partner's records: not this node's to trim
    const last = device?.info().lastSeq ?? 0;
    if (device !== undefined && last > 0) await device.trim(device.epoch, last);
  }

  /**
   * Write-ahead: the cache commits the log before it writes a range of the volume back
   * (called with the line's lock held). A WRITE's bytes are in the cache before its record
   * is appended: where a WRITE or zeroing over the range is on its way, the barrier first
   * waits one turn of the loop, so that one whose cache write has ended takes its record
   * number (the steps from its cache write to that run in microtasks while the device is
   * ready; not so for a WRITE whose other lines are still being stored, or a device
   * resyncing or repairing: guarantees.md lists these limits); then it waits for the
   * records acknowledged or on their way (a FUA write's being synced) and syncs them.
   */
  private guard(volume: Volume, device: NvramDevice): void {
    volume.logBarrier ??= async (offset, length) => {
      if (this.overlaps(volume, offset, length)) await new Promise((resolve) => setImmediate(resolve));
      if (device.uncommittedBytes > 0 || device.appending) await device.commit();
    };
  }

  private device(volume: Volume): NvramDevice | undefined {
    return volume.writeLog === undefined ? undefined : this.nvram.get(volume.writeLog);
  }

  /**
   * Runs a WRITE or zeroing of [offset, offset + length) once every one of the volume's
   * that arrived before it and overlaps it is over (see the top of this file).
   */
  private async ordered(volume: Volume, offset: number, length: number, run: () => Promise<void>): Promise<void> {
    const before = this.overlapping(volume, offset, length);
    let spans = this.spans.get(volume.name);
    if (spans === undefined) {
      spans = new Set();
      this.spans.set(volume.name, spans);
    }
    let over = (): void => undefined;
    const span: Span = { start: offset, end: offset + length, done: new Promise<void>((resolve) => { over = resolve; }) };
    spans.add(span);
    try {
      if (before.length > 0) await Promise.all(before);
      await run();
    } finally {
      spans.delete(span);
      if (spans.size === 0) this.spans.delete(volume.name);
      over();
    }
  }

  /** What the WRITEs and zeroings of the volume on their way that overlap the range wait on. */
  private overlapping(volume: Volume, offset: number, length: number): Promise<void>[] {
    const found: Promise<void>[] = [];
    for (const s of this.spans.get(volume.name) ?? []) if (crosses(s, offset, length)) found.push(s.done);
    return found;
  }

  /** Whether a WRITE or zeroing of the volume over the range is on its way (no allocation: writeNow's path). */
  private overlaps(volume: Volume, offset: number, length: number): boolean {
    const spans = this.spans.get(volume.name);
    if (spans === undefined) return false;
    for (const s of spans) if (crosses(s, offset, length)) return true;
    return false;
  }

  private async journal(volume: Volume, device: NvramDevice, entries: readonly Entry[], durable: boolean): Promise<void> {
    // One append per record: a WRITE larger than a record gives several, and each goes to
    // a mirror partner as a frame of its own (a frame holds one record of the largest size).
    for (const entry of entries) {
      if (!(await this.appendEntry(volume, device, entry, durable))) break;
    }
    this.checkpointIfHalfFull(volume, device);
  }

  /**
   * Appends one record, through checkpoints while the journal is full. False: it could
   * never fit, and the volume's data was written back instead, the rest of its WRITE
   * included (the cache holds all of it by then).
   */
  private async appendEntry(volume: Volume, device: NvramDevice, entry: Entry, durable: boolean): Promise<boolean> {
    // Every acknowledged write must be in the journal: a write made durable some other
    // way could be overwritten at replay by an older record for the same blocks.
    for (let attempt = 0; ; attempt++) {
      try {
        await device.append(device.epoch, [entry], { sync: durable });
        return true;
      } catch (error) {
        if (!isMemstrataError(error) || error.code !== 'MS_NVRAM_FULL') throw error;
        if (attempt >= 2) {
          // Larger than the journal can ever hold: write everything back, trim the journal
          // up to what was acknowledged before the flush began (a write acknowledged during
          // it may have missed it, and keeps its record), and rely on the data store.
          const upTo = device.info().lastSeq ?? 0;
          await this.inner.flush(volume);
          if (upTo > 0) await device.trim(device.epoch, upTo);
          return false;
        }
        // Full: wait for a checkpoint already running, then run a fresh one, and retry.
        await this.checkpoint(volume, device);
        await this.checkpoint(volume, device);
      }
    }
  }

  /** Starts a checkpoint in the background once the journal is half full. */
  private checkpointIfHalfFull(volume: Volume, device: NvramDevice): void {
    if (device.usedBytes * 2 <= device.size) return;
    void this.checkpoint(volume, device).catch((error: unknown) => {
      this.log.error({ volume: volume.name, err: error }, 'write log checkpoint failed');
    });
  }

  /** Flushes the volume's cache and trims the journal up to what was acknowledged before. One at a time per volume. */
  private checkpoint(volume: Volume, device: NvramDevice): Promise<void> {
    const running = this.checkpoints.get(volume.name);
    if (running !== undefined) return running;
    const upTo = device.info().lastSeq ?? 0;
    const run = (async () => {
      try {
        await this.inner.flush(volume);
        if (upTo > 0) await device.trim(device.epoch, upTo);
      } finally {
        this.checkpoints.delete(volume.name);
      }
    })();
    this.checkpoints.set(volume.name, run);
    return run;
  }
}

/** Whether a span and a range share a byte (an empty one counts as its first byte). */
function crosses(span: Span, offset: number, length: number): boolean {
  return span.start < offset + Math.max(length, 1) && offset < Math.max(span.end, span.start + 1);
}
