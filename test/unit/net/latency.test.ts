// The latency histograms behind /metrics and `memstrata status`: each observation lands
// in the first bucket whose bound it does not pass, the cumulative counts are what
// Prometheus expects, and the quantiles are the bounds where the share is reached.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { emptyNodeMetrics } from '../../support/metrics-sources.js';
import { formatDuration } from '../../../src/cli/program.js';
import { LATENCY_BOUNDS, LatencyHistogram, latencySummary, quantileOf } from '../../../src/net/latency.js';

test('latency histogram: cumulative counts per bound, +Inf, sum and quantiles match the observations, for any observations', () => {
  fc.assert(
    fc.property(
      fc.array(fc.oneof(fc.double({ min: 0, max: 20, noNaN: true }), fc.constantFrom(...LATENCY_BOUNDS)), { maxLength: 200 }),
      fc.double({ min: 0.01, max: 1, noNaN: true }),
      (values, q) => {
        const h = new LatencyHistogram();
        for (const v of values) h.record('READ', v);
        const [s] = h.snapshot();
        if (values.length === 0) {
          assert.equal(s, undefined);
          return;
        }
        assert.ok(s !== undefined);
        LATENCY_BOUNDS.forEach((bound, i) => assert.equal(s.cumulative[i], values.filter((v) => v <= bound).length, `le=${bound}`));
        assert.equal(s.cumulative.at(-1), values.length, '+Inf is every observation');
        assert.equal(s.count, values.length);
        assert.ok(Math.abs(s.sum - values.reduce((a, b) => a + b, 0)) < 1e-9);
        // The q-quantile is the least bound at or under which at least q of the values fall.
        const sorted = [...values].sort((a, b) => a - b);
        const need = Math.ceil(q * values.length - 1e-9);
        const expected = LATENCY_BOUNDS.find((bound) => sorted.filter((v) => v <= bound).length >= need) ?? Infinity;
        assert.equal(quantileOf(s, q), expected);
      },
    ),
  );
});

test('latency histogram: series per key, sorted; forget drops one; the summary gives count, mean and bucket bounds (null past 10 s)', () => {
  const h = new LatencyHistogram();
  for (let i = 0; i < 98; i++) h.record('WRITE', 0.00003);
  h.record('WRITE', 0.002);
  h.record('WRITE', 30);
  h.record('FLUSH', 0.0001);
  assert.deepEqual(h.snapshot().map((s) => s.key), ['FLUSH', 'WRITE']);
  const write = h.snapshot().find((s) => s.key === 'WRITE');
  assert.ok(write !== undefined);
  assert.deepEqual(latencySummary(write), { key: 'WRITE', count: 100, meanSeconds: (98 * 0.00003 + 0.002 + 30) / 100, p50Seconds: 0.00005, p99Seconds: 0.0025 });
  h.record('WRITE', 30);
  assert.equal(latencySummary(h.snapshot().find((s) => s.key === 'WRITE') ?? write).p99Seconds, null, 'p99 past the last bound');
  h.forget('WRITE');
  assert.deepEqual(h.snapshot().map((s) => s.key), ['FLUSH']);
});

test('durations in status: the unit is chosen after rounding', () => {
  assert.deepEqual(
    [0.000012, 0.0009994, 0.0009996, 0.0015, 0.0099996, 0.025, 0.99996, 2].map(formatDuration),
    ['12us', '999us', '1.00ms', '1.50ms', '10.0ms', '25.0ms', '1.0s', '2.0s'],
  );
});

test('/metrics renders a service\'s histogram as Prometheus expects, and resetting the registry leaves the services\' figures alone', async () => {
  const syncs = new LatencyHistogram();
  syncs.record('wl', 0.0002);
  syncs.record('wl', 0.003);
  const metrics = emptyNodeMetrics({ journalSyncs: () => syncs.snapshot() });
  const text = await metrics.registry.metrics();
  assert.match(text, /^# TYPE memstrata_nvram_journal_sync_seconds histogram$/m);
  assert.match(text, /^memstrata_nvram_journal_sync_seconds_bucket\{device="wl",le="0\.00025"\} 1$/m);
  assert.match(text, /^memstrata_nvram_journal_sync_seconds_bucket\{device="wl",le="\+Inf"\} 2$/m);
  assert.match(text, /^memstrata_nvram_journal_sync_seconds_count\{device="wl"\} 2$/m);
  metrics.registry.resetMetrics();
  assert.match(await metrics.registry.metrics(), /^memstrata_nvram_journal_sync_seconds_count\{device="wl"\} 2$/m);
});
