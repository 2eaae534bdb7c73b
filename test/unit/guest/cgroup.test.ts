// cgroup layouts and what the node writes into a cgroup v2 hierarchy. The development
// machines' kernel has no v2 cpu controller, so v2 is exercised here against a directory
// laid out as cgroupfs is (the files the kernel would hold), checking the values written
// and read: the node's cgroup delegating controllers, the guests' cgroup with the total
// quota, a guest's cpu.max, memory.max and cpuset.cpus (reset with a newline, since a
// write of nothing is no write at all), and its figures from cpu.stat and memory.current.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { JOIN_SCRIPT, openCgroupV2, parseCgroupLayout } from '../../../src/guest/cgroup.js';

test('the node\'s own cgroups are found from mountinfo and /proc/self/cgroup, v1 and v2', () => {
  const mountinfo = [
    '32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu',
    '33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct',
    '35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory',
    '41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw',
  ].join('\n');
  const own = ['4:memory:/process_api/abc', '2:cpuacct:/', '1:cpu:/', '0::/'].join('\n');
  assert.deepEqual(parseCgroupLayout(mountinfo, own), {
    v2: '/sys/fs/cgroup/unified/',
    v1: { cpu: '/sys/fs/cgroup/cpu/', cpuacct: '/sys/fs/cgroup/cpuacct/', memory: '/sys/fs/cgroup/memory/process_api/abc' },
  });
  // A v2-only machine, the node in a systemd service, and co-mounted cpu,cpuacct elsewhere.
  const v2only = parseCgroupLayout('30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate', '0::/system.slice/memstrata.service');
  assert.deepEqual(v2only, { v2: '/sys/fs/cgroup/system.slice/memstrata.service', v1: {} });
  const comounted = parseCgroupLayout('40 31 0:40 / /cg/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct', '3:cpu,cpuacct:/node');
  assert.deepEqual(comounted.v1, { cpu: '/cg/cpu,cpuacct/node', cpuacct: '/cg/cpu,cpuacct/node' });
  // A container whose cgroup namespace root is the node's own cgroup.
  const inContainer = parseCgroupLayout('50 40 0:50 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw', '0::/docker/abc');
  assert.equal(inContainer.v2, '/sys/fs/cgroup');
});

test('cgroup v2: controllers delegated, the guests\' total and a guest\'s limits written; figures read', async (t) => {
  const own = await mkdtemp(join(tmpdir(), 'memstrata-cgv2-'));
  t.after(() => rm(own, { recursive: true, force: true }));
  await writeFile(join(own, 'cgroup.controllers'), 'cpuset cpu io memory pids\n');
  await writeFile(join(own, 'cgroup.subtree_control'), '\n');
  const host = await openCgroupV2(own, 'n1-abcd');
  assert.equal(host.mode, 'cgroup2');
  assert.ok(host.memory && host.cpuset);
  await host.open(1.5, 100_000);
  assert.equal(await readFile(join(own, 'cgroup.subtree_control'), 'utf8'), '+cpu +memory +cpuset');
  const base = join(own, 'memstrata-n1-abcd');
  assert.equal(await readFile(join(base, 'cgroup.subtree_control'), 'utf8'), '+cpu +memory +cpuset');
  assert.equal(await readFile(join(base, 'cpu.max'), 'utf8'), '150000 100000');

  const guest = host.guest('kv');
  await guest.prepare({ cpu: 0.25, cpus: [1], memory: 64 * 1024 * 1024 }, 100_000);
  const dir = join(base, 'g-kv');
  assert.equal(await readFile(join(dir, 'cpu.max'), 'utf8'), '25000 100000');
  assert.equal(await readFile(join(dir, 'memory.max'), 'utf8'), String(64 * 1024 * 1024));
  assert.equal(await readFile(join(dir, 'cpuset.cpus'), 'utf8'), '1');
  await guest.apply({ cpu: null, cpus: null, memory: null }, 100_000);
  assert.equal(await readFile(join(dir, 'cpu.max'), 'utf8'), 'max 100000');
  assert.equal(await readFile(join(dir, 'memory.max'), 'utf8'), 'max');
  assert.equal(await readFile(join(dir, 'cpuset.cpus'), 'utf8'), '\n', 'the parent\'s CPUs again: a newline, which is a write');
  assert.deepEqual(guest.joinFiles(), [join(dir, 'cgroup.procs')]);

  await writeFile(join(dir, 'cpu.stat'), 'usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 10\nnr_throttled 4\nthrottled_usec 750000\n');
  await writeFile(join(dir, 'memory.current'), '1048576\n');
  await writeFile(join(dir, 'cgroup.procs'), '101\n102\n');
  assert.deepEqual(await guest.usage(), { cpuSeconds: 2.5, throttledSeconds: 0.75, memoryBytes: 1048576 });
  assert.deepEqual(await guest.procs(), [101, 102]);
  assert.deepEqual(await host.children(), ['kv']);
});

test('cgroup v2 without the cpu controller is refused with the reason', async (t) => {
  const own = await mkdtemp(join(tmpdir(), 'memstrata-cgv2-'));
  t.after(() => rm(own, { recursive: true, force: true }));
  await mkdir(own, { recursive: true });
  await writeFile(join(own, 'cgroup.controllers'), 'hugetlb\n');
  await assert.rejects(openCgroupV2(own, 'n1'), /cpu controller is not available/);
});

test('the join script writes its own pid to each cgroup.procs, then execs the command with its arguments as given', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-join-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const { spawnSync } = await import('node:child_process');
  const [a, b] = [join(dir, 'a.procs'), join(dir, 'b.procs')];
  const run = spawnSync('/bin/sh', ['-c', JOIN_SCRIPT, 'memstrata-guest', '2', a, b, 'sh', '-c', 'echo "$$ $1"', 'arg0', 'with space'], { encoding: 'utf8' });
  assert.equal(run.status, 0, run.stderr);
  const [pid, arg] = run.stdout.trim().split(' ', 2);
  assert.equal((await readFile(a, 'utf8')).trim(), pid, 'the process that ran the command is the one that joined');
  assert.equal((await readFile(b, 'utf8')).trim(), pid);
  assert.equal(arg, 'with');
  assert.equal(run.stdout.trim(), `${pid} with space`);
  // A cgroup that cannot be joined stops it before the command runs (exit 125).
  const refused = spawnSync('/bin/sh', ['-c', JOIN_SCRIPT, 'memstrata-guest', '1', join(dir, 'missing', 'cgroup.procs'), 'touch', join(dir, 'ran')], { encoding: 'utf8' });
  assert.equal(refused.status, 125);
  await assert.rejects(readFile(join(dir, 'ran')));
});
