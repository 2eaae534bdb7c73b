// The writers index of an NVRAM device (multipath retries, issue 12): per writer id, the
// highest number taken and the answers of its last WRITER_WINDOW numbers, so that a
// retried append is answered instead of appended twice.
//
//   writer id -> { last, ring of WRITER_WINDOW slots (slot = number mod window):
//                  number | seq | timestamp | crc32 of the payload,
//                  in flight: number -> answer promise, crc,
//                  failed: numbers whose append failed (may be appended again) }
//
// Memory is fixed: a writer takes about 28 KiB, a device at most MAX_WRITERS of them
// (least recently used out), and the failed set keeps only numbers inside the window.
// A retry must carry the same payload (crc32): a writer that reuses a number for
// something else (an id kept across a restart without its numbers) is refused, not
// silently answered with the old record.

import { crc32 } from 'node:zlib';

/** Per writer, how many recent numbers' answers are kept for retries. */
export const WRITER_WINDOW = 1024;
/** Writers remembered per device. */
export const MAX_WRITERS = 64;

export interface Answer {
  seq: number;
  timestamp: number;
}

export type Lookup =
  | { kind: 'new' }
  | { kind: 'known'; answer: Promise<Answer> }
  | { kind: 'too-old'; last: number }
  | { kind: 'mismatch' };

class Writer {
  last: number;
  readonly numbers: Float64Array;
  readonly seqs: Float64Array;
  readonly stamps: Float64Array;
  readonly crcs: Uint32Array;
  readonly inflight: Map<number, { answer: Promise<Answer>; crc: number }>;
  readonly failed: Set<number>;

  constructor() {
    this.last = 0;
    this.numbers = new Float64Array(WRITER_WINDOW);
    this.seqs = new Float64Array(WRITER_WINDOW);
    this.stamps = new Float64Array(WRITER_WINDOW);
    this.crcs = new Uint32Array(WRITER_WINDOW);
    this.inflight = new Map();
    this.failed = new Set();
  }

  settle(n: number, answer: Answer, crc: number): void {
    const slot = n % WRITER_WINDOW;
    this.numbers[slot] = n;
    this.seqs[slot] = answer.seq;
    this.stamps[slot] = answer.timestamp;
    this.crcs[slot] = crc;
    this.last = Math.max(this.last, n);
  }

  fail(n: number): void {
    this.failed.add(n);
    // Only numbers the window still covers are worth keeping.
    for (const old of this.failed) if (old <= this.last - WRITER_WINDOW) this.failed.delete(old);
  }
}

export function payloadCrc(payload: Uint8Array): number {
  return crc32(payload);
}

export class WritersIndex {
  private readonly writers: Map<string, Writer>;

  constructor() {
    this.writers = new Map();
  }

  clear(): void {
    this.writers.clear();
  }

  /** What the index holds now: writers, numbers in flight, failed numbers kept. */
  stats(): { writers: number; inflight: number; failed: number } {
    let inflight = 0;
    let failed = 0;
    for (const w of this.writers.values()) {
      inflight += w.inflight.size;
      failed += w.failed.size;
    }
    return { writers: this.writers.size, inflight, failed };
  }

  /** What the device does with writer `id`'s number `n` carrying a payload with `crc`. */
  lookup(id: string, n: number, crc: number): Lookup {
    const w = this.writers.get(id);
    if (w === undefined) return { kind: 'new' };
    const flying = w.inflight.get(n);
    if (flying !== undefined) return flying.crc === crc ? { kind: 'known', answer: flying.answer } : { kind: 'mismatch' };
    const slot = n % WRITER_WINDOW;
    if (w.numbers[slot] === n) {
      if (w.crcs[slot] !== crc) return { kind: 'mismatch' };
      return { kind: 'known', answer: Promise.resolve({ seq: w.seqs[slot] ?? 0, timestamp: w.stamps[slot] ?? 0 }) };
    }
    if (n <= w.last && !w.failed.has(n)) return { kind: 'too-old', last: w.last };
    return { kind: 'new' };
  }

  /** Number `n` is being appended now: retries wait for `answer`; a failure lets it be appended again. */
  taking(id: string, n: number, crc: number, answer: Promise<Answer>): void {
    const w = this.writer(id);
    w.failed.delete(n);
    w.inflight.set(n, { answer, crc });
    w.last = Math.max(w.last, n);
    answer.then(
      (a) => {
        w.inflight.delete(n);
        w.settle(n, a, crc);
      },
      () => {
        w.inflight.delete(n);
        w.fail(n);
      },
    );
  }

  /** A record found on the device (after a restart, or replicated): its number is taken. */
  known(id: string, n: number, answer: Answer, crc: number): void {
    this.writer(id).settle(n, answer, crc);
  }

  private writer(id: string): Writer {
    let w = this.writers.get(id);
    if (w === undefined) {
      w = new Writer();
      if (this.writers.size >= MAX_WRITERS) this.writers.delete(this.writers.keys().next().value ?? '');
    } else {
      this.writers.delete(id); // most recently used last
    }
    this.writers.set(id, w);
    return w;
  }
}
