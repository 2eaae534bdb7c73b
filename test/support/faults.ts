// Fault injection for the storage interfaces, in the manner of nbdkit's `error` and
// `delay` filters: wrappers that implement the same interface as what they wrap and,
// per a plan, fail chosen calls (EIO, ENOSPC, a short write), or hold them until a gate
// opens (a delay, a hang, or fast-check's scheduler deciding the order).
//
//   faultyFiles(plan)         a data-file opener for DataStore: read, write, datasync, truncate
//   FaultyMedium(inner, plan) a Medium: read, write, zero
//   PowerCut                  a data-file opener that knows what a power cut would keep
//   faultyJournal(plan)       a JournalSink wrapper: write, datasync (and writeSync, if asked)
//
// Ops are named `<prefix>.<call>` (e.g. `store.write`, `store.datasync`, `dram.read`);
// a rule matches by name and by the call's number (1-based, counted per name).

import { open } from 'node:fs/promises';
import type { MediumName } from '../../src/kinds.js';
import type { Medium, MediumCapabilities } from '../../src/memory/medium.js';
import type { StoreFile, StoreFileOpener } from '../../src/storage/data-store.js';
import { encodeFileHeader, parseJournal, type JournalSink } from '../../src/nvram/journal-file.js';
import { RECORD_FLAG, encodeRecord, type JournalRecord } from '../../src/protocol/journal/record.js';

export type FaultKind = 'EIO' | 'ENOSPC' | 'short';

export interface FaultRule {
  op: string;
  /** First call (1-based) that fails; default: the next one. */
  from?: number;
  /** How many calls fail from there; default 1; Infinity: until healed. */
  count?: number;
  fault: FaultKind;
}

export class FaultPlan {
  private rules: { op: string; from: number; to: number; fault: FaultKind }[];
  private readonly calls: Map<string, number>;
  /** Calls that were failed, and how many of each op. */
  injected: number;
  private readonly injectedOps: Map<string, number>;
  /** Every call awaits this first, if set: a delay, a hang, or a scheduler's decision. */
  gate: ((op: string) => Promise<void> | undefined) | undefined;

  constructor() {
    this.rules = [];
    this.calls = new Map();
    this.injected = 0;
    this.injectedOps = new Map();
    this.gate = undefined;
  }

  /** Fails calls of `op` per the rule. `from` counts from calls made so far. */
  fail(rule: FaultRule): this {
    const made = this.calls.get(rule.op) ?? 0;
    const from = made + (rule.from ?? 1);
    this.rules.push({ op: rule.op, from, to: from + (rule.count ?? 1) - 1, fault: rule.fault });
    return this;
  }

  /** Removes every rule: calls succeed from now on. */
  heal(): void {
    this.rules = [];
  }

  /** Counts a call of `op` and says whether and how it fails. */
  next(op: string): FaultKind | undefined {
    const n = (this.calls.get(op) ?? 0) + 1;
    this.calls.set(op, n);
    const rule = this.rules.find((r) => r.op === op && n >= r.from && n <= r.to);
    if (rule === undefined) return undefined;
    this.injected++;
    this.injectedOps.set(op, (this.injectedOps.get(op) ?? 0) + 1);
    return rule.fault;
  }

  count(op: string): number {
    return this.calls.get(op) ?? 0;
  }

  /** Calls of `op` that were failed. */
  injectedInto(op: string): number {
    return this.injectedOps.get(op) ?? 0;
  }

  async enter(op: string): Promise<FaultKind | undefined> {
    const gate = this.gate?.(op);
    if (gate !== undefined) await gate;
    return this.next(op);
  }
}

export function errnoError(code: 'EIO' | 'ENOSPC', op: string): NodeJS.ErrnoException {
  const error: NodeJS.ErrnoException = new Error(`${code}: injected fault in ${op}`);
  error.code = code;
  error.errno = code === 'EIO' ? -5 : -28;
  error.syscall = op;
  return error;
}

/**
 * An opener for DataStore whose files fail per the plan. A short write writes the first
 * half of what it was asked and then fails with EIO, as a torn write would.
 */
export function faultyFiles(plan: FaultPlan, prefix = 'store'): StoreFileOpener {
  return async (path, flags, mode) => {
    const inner = await open(path, flags, mode);
    const file: StoreFile = {
      read: (async (buffer: Uint8Array, offset?: number | null, length?: number | null, position?: number | null) => {
        const fault = await plan.enter(`${prefix}.read`);
        if (fault !== undefined) throw errnoError('EIO', 'pread');
        return inner.read(buffer, offset ?? 0, length ?? buffer.length - (offset ?? 0), position);
      }) as StoreFile['read'],
      async truncate(length?: number) {
        const fault = await plan.enter(`${prefix}.truncate`);
        if (fault !== undefined) throw errnoError('EIO', 'ftruncate');
        return inner.truncate(length);
      },
      close: inner.close.bind(inner),
      async datasync() {
        const fault = await plan.enter(`${prefix}.datasync`);
        if (fault !== undefined) throw errnoError(fault === 'ENOSPC' ? 'ENOSPC' : 'EIO', 'fdatasync');
        return inner.datasync();
      },
      write: (async (buffer: Uint8Array, offset?: number | null, length?: number | null, position?: number | null) => {
        const fault = await plan.enter(`${prefix}.write`);
        const off = offset ?? 0;
        const len = length ?? buffer.length - off;
        if (fault === 'short') {
          const half = Math.floor(len / 2);
          if (half > 0) await inner.write(buffer, off, half, position);
          throw errnoError('EIO', 'pwrite');
        }
        if (fault !== undefined) throw errnoError(fault, 'pwrite');
        return inner.write(buffer, off, len, position);
      }) as StoreFile['write'],
    };
    return file;
  };
}

/**
 * Wraps a journal file's sink (JournalFile's `wrap` argument) so that its calls fail or
 * wait per the plan: ops `<prefix>.write` and `<prefix>.datasync`. A
 * short write writes the first half and fails with ENOSPC, as a disk that filled up.
 * With `writeSync`, the wrapper also offers the sink's write in the caller's turn, op
 * `<prefix>.writeSync`: its faults apply, and the gate is called (a crash image may be
 * taken there) but cannot hold it.
 */
export function faultyJournal(plan: FaultPlan, prefix = 'journal', options: { writeSync?: boolean } = {}): (sink: JournalSink) => JournalSink {
  return (sink) => {
    const wrapped: JournalSink = {
      async write(buf, position) {
        const fault = await plan.enter(`${prefix}.write`);
        if (fault === 'short') {
          const half = Math.floor(buf.length / 2);
          if (half > 0) await sink.write(buf.subarray(0, half), position);
          throw errnoError('ENOSPC', 'pwrite');
        }
        if (fault !== undefined) throw errnoError(fault, 'pwrite');
        return sink.write(buf, position);
      },
      async datasync() {
        const fault = await plan.enter(`${prefix}.datasync`);
        if (fault !== undefined) throw errnoError(fault === 'ENOSPC' ? 'ENOSPC' : 'EIO', 'fdatasync');
        return sink.datasync();
      },
      close: () => sink.close(),
    };
    const now = sink.writeSync;
    if (options.writeSync === true && now !== undefined) {
      wrapped.writeSync = (buf, position) => {
        const op = `${prefix}.writeSync`;
        if (plan.gate?.(op) !== undefined) throw new Error(`${op} cannot wait for a gate`);
        const fault = plan.next(op);
        if (fault === 'short') {
          const half = Math.floor(buf.length / 2);
          if (half > 0) now.call(sink, buf.subarray(0, half), position);
          throw errnoError('ENOSPC', 'pwrite');
        }
        if (fault !== undefined) throw errnoError(fault, 'pwrite');
        now.call(sink, buf, position);
      };
    }
    return wrapped;
  };
}

/** A medium whose calls fail or wait per the plan (ops `<name>.read`, `<name>.write`, `<name>.zero`). */
export class FaultyMedium implements Medium {
  readonly name: MediumName;
  readonly capacity: number;
  readonly extentSize: number;
  readonly capabilities: MediumCapabilities;
  private readonly inner: Medium;
  private readonly plan: FaultPlan;

  constructor(inner: Medium, plan: FaultPlan) {
    this.inner = inner;
    this.plan = plan;
    this.name = inner.name;
    this.capacity = inner.capacity;
    this.extentSize = inner.extentSize;
    this.capabilities = inner.capabilities;
  }

  open(): Promise<void> {
    return this.inner.open();
  }

  async read(offset: number, target: Uint8Array): Promise<void> {
    const fault = await this.plan.enter(`${this.name}.read`);
    if (fault !== undefined) throw errnoError('EIO', `${this.name} read`);
    return this.inner.read(offset, target);
  }

  async write(offset: number, source: Uint8Array): Promise<void> {
    const fault = await this.plan.enter(`${this.name}.write`);
    if (fault === 'short') {
      await this.inner.write(offset, source.subarray(0, Math.floor(source.length / 2)));
      throw errnoError('EIO', `${this.name} write`);
    }
    if (fault !== undefined) throw errnoError(fault, `${this.name} write`);
    return this.inner.write(offset, source);
  }

  async zero(offset: number, length: number): Promise<void> {
    const fault = await this.plan.enter(`${this.name}.zero`);
    if (fault !== undefined) throw errnoError('EIO', `${this.name} zero`);
    return this.inner.zero(offset, length);
  }

  sync(): Promise<void> {
    return this.inner.sync();
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  resident(): Promise<number> {
    return this.inner.resident();
  }
}

/**
 * A data-file opener that keeps, beside the real file, the image a power cut would leave:
 * a write becomes durable only through an fdatasync called after the write completed (what
 * POSIX promises, no more). `hold` makes the next fdatasync wait after it has taken what
 * it covers, so writes can land while it runs.
 */
export class PowerCut {
  readonly durable: Buffer;
  private pending: { position: number; bytes: Buffer }[];
  private held: Promise<void> | undefined;

  constructor(size: number) {
    this.durable = Buffer.alloc(size);
    this.pending = [];
    this.held = undefined;
  }

  /** The next fdatasync waits, after taking what it covers, until the returned function is called. */
  hold(): () => void {
    let release: () => void = () => undefined;
    this.held = new Promise<void>((resolve) => (release = resolve));
    return () => {
      this.held = undefined;
      release();
    };
  }

  readonly opener: StoreFileOpener = async (path, flags, mode) => {
    const inner = await open(path, flags, mode);
    const file: StoreFile = {
      read: inner.read.bind(inner),
      truncate: inner.truncate.bind(inner),
      close: inner.close.bind(inner),
      datasync: async () => {
        const covered = this.pending;
        this.pending = [];
        const held = this.held;
        await inner.datasync();
        if (held !== undefined) await held;
        for (const w of covered) w.bytes.copy(this.durable, w.position);
      },
      write: (async (buffer: Uint8Array, offset?: number | null, length?: number | null, position?: number | null) => {
        const off = offset ?? 0;
        const result = await inner.write(buffer, off, length ?? buffer.length - off, position);
        this.pending.push({ position: position ?? 0, bytes: Buffer.from(buffer.subarray(off, off + result.bytesWritten)) });
        return result;
      }) as StoreFile['write'],
    };
    return file;
  };
}

/**
 * A journal file image as a power cut may leave it: the records of `image` for which
 * `keep` holds, after the epoch and trim point its pointer stands for. Written as a
 * version 1 file, which a node reads and rewrites as version 2 at start.
 */
export function journalKeeping(image: Buffer, keep: (record: JournalRecord, index: number, records: readonly JournalRecord[]) => boolean): Buffer {
  const { records, base } = parseJournal(image);
  const marker = (flags: number, value: number): Buffer => {
    const payload = Buffer.alloc(8);
    payload.writeBigUInt64BE(BigInt(value));
    return encodeRecord({ seq: 0, timestamp: 0, epoch: base.epoch, flags, target: undefined, payload });
  };
  return Buffer.concat([encodeFileHeader(0, 0), marker(RECORD_FLAG.EPOCH, base.epoch), marker(RECORD_FLAG.TRIM, base.trimmedTo), ...records.filter(keep).map((r) => encodeRecord(r))]);
}
