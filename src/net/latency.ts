// Latency histograms for the request paths (NBD commands, rmem operations, journal
// syncs): fixed buckets, one series per key, recorded with a few array writes so the
// I/O path pays next to nothing; the admin API turns them into Prometheus histograms
// (admin/metrics.ts) and `memstrata status` into quantiles.

import type { LatencyJson } from '../protocol/admin/api.js';

/** Bucket upper bounds in seconds, from 10 us to 10 s; a last bucket takes the rest. */
export const LATENCY_BOUNDS: readonly number[] = [
  0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
];

interface Series {
  /** counts[i]: observations in (LATENCY_BOUNDS[i - 1], LATENCY_BOUNDS[i]]; the last one past every bound. */
  counts: Float64Array;
  sum: number;
  count: number;
}

export interface LatencySnapshot {
  key: string;
  /** Cumulative counts, one per bound of LATENCY_BOUNDS (Prometheus `le`), then +Inf (= count). */
  cumulative: number[];
  sum: number;
  count: number;
}

export class LatencyHistogram {
  private readonly series: Map<string, Series>;

  constructor() {
    this.series = new Map();
  }

  /** One observation of `seconds` under `key`. */
  record(key: string, seconds: number): void {
    let s = this.series.get(key);
    if (s === undefined) {
      s = { counts: new Float64Array(LATENCY_BOUNDS.length + 1), sum: 0, count: 0 };
      this.series.set(key, s);
    }
    let i = 0;
    while (i < LATENCY_BOUNDS.length && seconds > (LATENCY_BOUNDS[i] ?? Infinity)) i++;
    s.counts[i] = (s.counts[i] ?? 0) + 1;
    s.sum += seconds;
    s.count++;
  }

  /** Drops the series of `key` (a device removed). */
  forget(key: string): void {
    this.series.delete(key);
  }

  /** Records the time since `startMs` (performance.now()). */
  since(key: string, startMs: number): void {
    this.record(key, (performance.now() - startMs) / 1000);
  }

  snapshot(): LatencySnapshot[] {
    return [...this.series.entries()]
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([key, s]) => {
        const cumulative: number[] = [];
        let running = 0;
        for (let i = 0; i < LATENCY_BOUNDS.length; i++) {
          running += s.counts[i] ?? 0;
          cumulative.push(running);
        }
        cumulative.push(s.count);
        return { key, cumulative, sum: s.sum, count: s.count };
      });
  }
}

/** A snapshot as the admin API gives it: count, mean and two quantiles. */
export function latencySummary(snapshot: LatencySnapshot): LatencyJson {
  const bound = (q: number): number | null => {
    const v = quantileOf(snapshot, q);
    return v === undefined || !Number.isFinite(v) ? null : v;
  };
  return { key: snapshot.key, count: snapshot.count, meanSeconds: snapshot.count === 0 ? 0 : snapshot.sum / snapshot.count, p50Seconds: bound(0.5), p99Seconds: bound(0.99) };
}

/**
 * The bucket bound under which a `q` share of the observations fall (0 < q <= 1): an
 * upper estimate, as fine as the buckets; Infinity past the last bound, undefined when
 * there is nothing.
 */
export function quantileOf(snapshot: LatencySnapshot, q: number): number | undefined {
  if (snapshot.count === 0) return undefined;
  const rank = q * snapshot.count;
  for (let i = 0; i < LATENCY_BOUNDS.length; i++) if ((snapshot.cumulative[i] ?? 0) >= rank) return LATENCY_BOUNDS[i];
  return Infinity;
}
