// A small benchmark harness: runs a case for a fixed time after a warm-up, records each
// operation's latency in an HDR histogram, and prints one table per comparison with the
// ratio of every case to the baseline measured in the same run.
//
// Rounds: on a machine whose figures move by 10-30% from one minute to the next, one
// pair of runs can put a ratio on either side of a target. Benches that compare against
// a target run their cases in rounds, the baseline and the cases in turn each round
// (BENCH_ROUNDS, default 3), and report the median of the per-round ratios: each ratio
// compares runs minutes apart at most, and the median drops the odd round out.

import hdr from 'hdr-histogram-js';
import pino from 'pino';
import { CPU_LATENCY_DEVICE, CpuWakeLatency, cpuidleDriven } from '../../src/node/cpu-wake-latency.js';

export interface CaseResult {
  name: string;
  ops: number;
  seconds: number;
  p50us: number;
  p99us: number;
  bytesPerOp: number;
}

export interface BenchCase {
  name: string;
  bytesPerOp: number;
  /** One operation; resolves when it is done. */
  run(i: number): Promise<void> | void;
}

/**
 * Runs a case with `depth` operations in flight at all times (depth workers, each
 * issuing its next operation when the previous one completes).
 */
export async function measure(c: BenchCase, options: { warmupMs?: number; durationMs?: number; depth?: number } = {}): Promise<CaseResult> {
  const depth = options.depth ?? 1;
  if (depth > 1) return measureConcurrent(c, depth, options);
  const warmupMs = options.warmupMs ?? 300;
  const durationMs = options.durationMs ?? Number(process.env.BENCH_MS ?? 2000);
  let i = 0;
  const warmEnd = performance.now() + warmupMs;
  while (performance.now() < warmEnd) await c.run(i++);
  const histogram = hdr.build({ lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: 3 });
  const start = performance.now();
  const end = start + durationMs;
  let ops = 0;
  let now = start;
  while (now < end) {
    const t0 = process.hrtime.bigint();
    await c.run(i++);
    histogram.recordValue(Number(process.hrtime.bigint() - t0));
    ops++;
    if ((ops & 63) === 0) now = performance.now();
  }
  const seconds = (performance.now() - start) / 1000;
  return finish(c, histogram, ops, seconds);
}

async function measureConcurrent(c: BenchCase, depth: number, options: { warmupMs?: number; durationMs?: number }): Promise<CaseResult> {
  const warmupMs = options.warmupMs ?? 300;
  const durationMs = options.durationMs ?? Number(process.env.BENCH_MS ?? 2000);
  const histogram = hdr.build({ lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: 3 });
  let i = 0;
  let ops = 0;
  let recording = false;
  let running = true;
  const worker = async (): Promise<void> => {
    let n = 0;
    while (running) {
      // An operation that completes without I/O never leaves the microtask queue; let the
      // timers that end the warm-up and the run fire.
      if ((++n & 255) === 0) await new Promise((resolve) => setImmediate(resolve));
      const t0 = process.hrtime.bigint();
      await c.run(i++);
      if (recording) {
        histogram.recordValue(Number(process.hrtime.bigint() - t0));
        ops++;
      }
    }
  };
  const workers = Array.from({ length: depth }, () => worker());
  await new Promise((resolve) => setTimeout(resolve, warmupMs));
  recording = true;
  const start = performance.now();
  await new Promise((resolve) => setTimeout(resolve, durationMs));
  recording = false;
  const seconds = (performance.now() - start) / 1000;
  running = false;
  await Promise.all(workers);
  return finish(c, histogram, ops, seconds);
}

function finish(c: BenchCase, histogram: ReturnType<typeof hdr.build>, ops: number, seconds: number): CaseResult {
  const result = {
    name: c.name,
    ops,
    seconds,
    p50us: histogram.getValueAtPercentile(50) / 1000,
    p99us: histogram.getValueAtPercentile(99) / 1000,
    bytesPerOp: c.bytesPerOp,
  };
  histogram.destroy();
  return result;
}

/**
 * The node settings a bench run's tables depend on, for its first line: busy polling
 * (node.busyPoll) and the CPU wake-up bound (node.cpuWakeLatency) change every latency
 * at low queue depth (docs/BENCHMARKS.md, "Busy polling", "CPU wake-up latency"), and the
 * nodes a bench starts take them from MEMSTRATA_NODE_BUSY_POLL and
 * MEMSTRATA_NODE_CPU_WAKE_LATENCY.
 */
export function nodeSettings(): string {
  const poll = process.env.MEMSTRATA_NODE_BUSY_POLL;
  const wake = process.env.MEMSTRATA_NODE_CPU_WAKE_LATENCY;
  const polling = `node.busyPoll ${poll === undefined || poll.trim() === '' || poll.trim() === '0' ? '0 (off; MEMSTRATA_NODE_BUSY_POLL=100us turns it on)' : poll}`;
  // Held by a node, the bound is the whole machine's: the baselines run under it too.
  const waking = wake === undefined || wake.trim() === '' || wake.trim() === 'off' ? '' : `, node.cpuWakeLatency ${wake} (machine-wide while a node runs: baselines included)`;
  return `memstrata nodes: ${polling}${waking}`;
}

let announced = false;

/** Prints nodeSettings() before a run's first table. */
function announce(): void {
  if (announced) return;
  announced = true;
  console.log(nodeSettings());
}

/** Rounds a bench runs its cases in (BENCH_ROUNDS, default 3). */
export function benchRounds(): number {
  const rounds = Math.floor(Number(process.env.BENCH_ROUNDS ?? 3));
  return Number.isFinite(rounds) && rounds >= 1 ? rounds : 3;
}

/** The median (the mean of the middle two for an even count; 0 for none). */
export function median(xs: readonly number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  if (sorted.length === 0) return 0;
  return sorted.length % 2 === 1 ? (sorted[mid] ?? 0) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
}

/**
 * Prints the cases of several rounds (each round the same cases in the same order, the
 * baseline first): the medians of ops/s, p50 and p99, the median of the per-round ratios
 * of ops/s and p50 to that round's baseline, and every round's ops/s ratio.
 */
export function reportRounds(title: string, rounds: readonly (readonly CaseResult[])[]): void {
  announce();
  const first = rounds[0];
  if (first === undefined || first.length === 0) return;
  const rows = first.map((c, i) => {
    const runs = rounds.map((round) => round[i]).filter((r): r is CaseResult => r !== undefined);
    const rate = (r: CaseResult): number => r.ops / r.seconds;
    const ratios = rounds.map((round) => {
      const [base, r] = [round[0], round[i]];
      return base === undefined || r === undefined ? 0 : rate(r) / rate(base);
    });
    const p50Ratios = rounds.map((round) => {
      const [base, r] = [round[0], round[i]];
      return base === undefined || r === undefined || base.p50us === 0 ? 0 : r.p50us / base.p50us;
    });
    const ops = median(runs.map(rate));
    return [
      c.name,
      Math.round(ops).toLocaleString('en-US'),
      ((ops * c.bytesPerOp) / 1e6).toFixed(1),
      median(runs.map((r) => r.p50us)).toFixed(2),
      median(runs.map((r) => r.p99us)).toFixed(2),
      median(ratios).toFixed(2) + 'x',
      median(p50Ratios).toFixed(2) + 'x',
      ratios.map((x) => x.toFixed(2)).join(' / '),
    ];
  });
  const headers = ['case', 'ops/s', 'MB/s', 'p50 us', 'p99 us', 'ops vs base', 'p50 vs base', 'ops vs base, each round'];
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join('  ');
  console.log(`\n${title}, ${rounds.length} round${rounds.length === 1 ? '' : 's'} (medians; ratios are the median of each round's)\n${line(headers)}\n${rows.map(line).join('\n')}`);
}

/** Prints results with ratios of ops/s and p50 to the first (the baseline). */
export function report(title: string, results: readonly CaseResult[]): void {
  announce();
  const base = results[0];
  if (base === undefined) return;
  const baseRate = base.ops / base.seconds;
  const rows = results.map((r) => {
    const rate = r.ops / r.seconds;
    return [
      r.name,
      Math.round(rate).toLocaleString('en-US'),
      ((rate * r.bytesPerOp) / 1e6).toFixed(1),
      r.p50us.toFixed(2),
      r.p99us.toFixed(2),
      (rate / baseRate).toFixed(2) + 'x',
      (r.p50us / base.p50us).toFixed(2) + 'x',
    ];
  });
  const headers = ['case', 'ops/s', 'MB/s', 'p50 us', 'p99 us', 'ops vs base', 'p50 vs base'];
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join('  ');
  console.log(`\n${title}\n${line(headers)}\n${rows.map(line).join('\n')}`);
}

/**
 * Runs `fn` with the CPU wake-up bound held at 0 (/dev/cpu_dma_latency: no idle CPU
 * halts, for every process on the machine alike; docs/BENCHMARKS.md, CPU wake-up
 * latency), so that what is left of a QD1 comparison is the request paths. Returns why
 * it was skipped (the device cannot be written, or no cpuidle driver makes it matter),
 * or undefined once `fn` has run.
 */
export async function withCpuWakeBound(fn: (label: string) => Promise<void> | void): Promise<string | undefined> {
  const bound = new CpuWakeLatency(0);
  await bound.hold(pino({ level: 'silent' }));
  try {
    const info = bound.info();
    if (!info.held) return `not held: ${info.failure ?? 'unknown'}`;
    if (!cpuidleDriven(info.cpuidle)) return `no cpuidle driver here (${info.cpuidle ?? 'sysfs does not say'}), so the bound changes nothing`;
    await fn(`the CPU wake-up bound held at 0 us (${CPU_LATENCY_DEVICE}, for the baseline and memstrata alike)`);
    return undefined;
  } finally {
    await bound.release();
  }
}
