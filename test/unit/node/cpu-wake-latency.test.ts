import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { endianness, tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { CpuWakeLatency } from '../../../src/node/cpu-wake-latency.js';
import { emptyNodeMetrics } from '../../support/metrics-sources.js';
import { holdsOpen } from '../../support/node-process.js';

// A regular file stands in for /dev/cpu_dma_latency (the character-device check is off
// for it): what the request writes lands in it and reads back, as the kernel's combined
// bound does; a directory stands in for sysfs's cpuidle.

function logger(): { log: pino.Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  return { log: pino({ level: 'info' }, { write: (line: string) => lines.push(JSON.parse(line) as Record<string, unknown>) }), lines };
}

/** memstrata_cpu_wake_latency_held's lines on /metrics over this request. */
async function heldMetric(request: CpuWakeLatency): Promise<string[]> {
  const text = await emptyNodeMetrics({ cpuWakeLatency: () => request.info() }).registry.metrics();
  return text.split('\n').filter((l) => l.startsWith('memstrata_cpu_wake_latency_held'));
}

async function standIn(t: { after(fn: () => Promise<void>): void }): Promise<{ dir: string; device: string; cpuidleDir: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-cpu-latency-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const device = join(dir, 'cpu_dma_latency');
  await writeFile(device, '');
  const cpuidleDir = join(dir, 'cpuidle');
  await mkdir(cpuidleDir);
  await writeFile(join(cpuidleDir, 'current_driver'), 'haltpoll\n');
  await writeFile(join(cpuidleDir, 'current_governor_ro'), 'haltpoll\n');
  return { dir, device, cpuidleDir };
}

test('node.cpuWakeLatency: the bound is written as a native 32-bit integer and its descriptor kept open until release; a second hold or release does nothing', async (t) => {
  const { device, cpuidleDir } = await standIn(t);
  const { log } = logger();
  const request = new CpuWakeLatency(25, { device, cpuidleDir, requireCharacterDevice: false });
  assert.deepEqual(request.info(), { requestedUs: 25, held: false, failure: null, cpuidle: null });
  await request.hold(log);
  await request.hold(log);
  const written = await readFile(device);
  assert.equal(written.length, 4, 'one 32-bit value, written once');
  assert.equal(endianness() === 'LE' ? written.readInt32LE(0) : written.readInt32BE(0), 25);
  assert.deepEqual(request.info(), { requestedUs: 25, held: true, failure: null, cpuidle: 'haltpoll, governor haltpoll' });
  assert.ok(await holdsOpen('self', device), 'the request lasts while the descriptor is open');
  assert.deepEqual(await heldMetric(request), ['memstrata_cpu_wake_latency_held{bound_us="25"} 1']);
  await request.release();
  await request.release();
  assert.equal(await holdsOpen('self', device), false, 'release withdraws it');
  assert.equal(request.info().held, false);
  assert.deepEqual(await heldMetric(request), ['memstrata_cpu_wake_latency_held{bound_us="25"} 0']);
});

test('node.cpuWakeLatency off: nothing is opened or written', async (t) => {
  const { device, cpuidleDir } = await standIn(t);
  const request = new CpuWakeLatency(undefined, { device, cpuidleDir, requireCharacterDevice: false });
  await request.hold(logger().log);
  assert.equal((await stat(device)).size, 0);
  assert.deepEqual(request.info(), { requestedUs: null, held: false, failure: null, cpuidle: null });
  assert.deepEqual(await heldMetric(request), [], 'no series while the setting is off');
});

test('node.cpuWakeLatency where the request cannot be made: a coded warning, the reason in info(), no throw, and nothing created or left open', async (t) => {
  const { dir, device, cpuidleDir } = await standIn(t);
  const cases: [string, CpuWakeLatency, RegExp][] = [
    // A missing device is never created (a container's /dev is often a writable tmpfs without it).
    ['missing', new CpuWakeLatency(0, { device: join(dir, 'absent'), cpuidleDir, requireCharacterDevice: false }), /absent: ENOENT/],
    // A regular file where the device should be is not the kernel's.
    ['a regular file', new CpuWakeLatency(0, { device, cpuidleDir }), /not a character device/],
  ];
  for (const [what, request, reason] of cases) {
    const { log, lines } = logger();
    await request.hold(log);
    const info = request.info();
    assert.equal(info.held, false, what);
    assert.match(info.failure ?? '', reason, what);
    const warning = lines.find((l) => l.code === 'MS_CPU_LATENCY_UNAVAILABLE');
    assert.ok(warning !== undefined, `${what}: a warning with its code`);
    assert.equal(warning.level, 40);
    assert.deepEqual(await heldMetric(request), ['memstrata_cpu_wake_latency_held{bound_us="0"} 0'], `${what}: the metric says it is not held`);
    await request.release();
  }
  await assert.rejects(stat(join(dir, 'absent')), { code: 'ENOENT' }, 'a missing device is not created');
  assert.equal((await stat(device)).size, 0, 'nothing written to a file that is not the device');
  assert.equal(await holdsOpen('self', device), false);
});

test('node.cpuWakeLatency whose bound does not read back (a kernel that ignored it) is not reported held', async (t) => {
  const { cpuidleDir } = await standIn(t);
  // /dev/null takes the write and reads back nothing.
  const request = new CpuWakeLatency(0, { device: '/dev/null', cpuidleDir });
  const { log, lines } = logger();
  await request.hold(log);
  assert.equal(request.info().held, false);
  assert.match(request.info().failure ?? '', /reads nothing/);
  assert.ok(lines.some((l) => l.code === 'MS_CPU_LATENCY_UNAVAILABLE'));
});
