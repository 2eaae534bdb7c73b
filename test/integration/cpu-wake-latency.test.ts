// node.cpuWakeLatency (src/node/cpu-wake-latency.ts) on a real node: asked for, the node
// holds /dev/cpu_dma_latency open with the bound written for as long as it runs, the
// kernel's aggregate bound is then at most that, and `memstrata status` and /v1/node say
// so; the node still serves, and it stops on SIGTERM with exit 0. Where the device cannot
// be written (not root, no such device), the node starts all the same and says why the
// request is not held. memstrata_cpu_wake_latency_held says the same. The defaults hold
// nothing and show no series.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { constants } from 'node:fs';
import { access, readFile, stat } from 'node:fs/promises';
import { endianness } from 'node:os';
import { NbdClient } from '../../src/client/nbd-client.js';
import { CPU_LATENCY_DEVICE } from '../../src/node/cpu-wake-latency.js';
import type { NodeInfo } from '../../src/protocol/admin/api.js';
import { holdsOpen, runCli, startNode, tempDir } from '../support/node-process.js';

async function writable(path: string): Promise<boolean> {
  return access(path, constants.W_OK).then(
    () => true,
    () => false,
  );
}

test('node.cpuWakeLatency: the node holds the CPU latency request while it runs, says so, serves, and stops on SIGTERM', async (t) => {
  const node = await startNode({ cwd: await tempDir(t), args: ['--cpu-wake-latency', '0'] });
  t.after(() => node.stop('SIGKILL'));
  const pid = node.proc.pid ?? 0;
  const info = (await (await fetch(`${node.url}/v1/node`)).json()) as NodeInfo;
  const status = await runCli(['status', '--admin', node.url]);
  assert.equal(status.code, 0, status.stderr);
  const metrics = await (await fetch(`${node.url}/metrics`)).text();
  const held = /^memstrata_cpu_wake_latency_held\{bound_us="0"\} (\d)$/m.exec(metrics)?.[1];
  assert.equal(held, info.cpuWakeLatency?.held === true ? '1' : '0', 'the metric says what /v1/node says');
  if (await writable(CPU_LATENCY_DEVICE)) {
    assert.equal(info.cpuWakeLatency?.held, true, JSON.stringify(info.cpuWakeLatency));
    assert.equal(info.cpuWakeLatency?.requestedUs, 0);
    assert.ok((await stat(CPU_LATENCY_DEVICE)).isCharacterDevice(), 'the kernel\'s device, not a file left in its place');
    assert.ok(await holdsOpen(pid, CPU_LATENCY_DEVICE), `the node keeps ${CPU_LATENCY_DEVICE} open`);
    const current = await readFile(CPU_LATENCY_DEVICE);
    assert.equal(endianness() === 'LE' ? current.readInt32LE(0) : current.readInt32BE(0), 0, 'the kernel\'s bound is the node\'s while it runs');
    assert.match(status.stdout, /cpu wake-up +a CPU latency request of 0 us is held on \/dev\/cpu_dma_latency while the node runs/);
  } else {
    t.diagnostic(`${CPU_LATENCY_DEVICE} is not writable here: checking the node runs without the request and says why`);
    assert.equal(info.cpuWakeLatency?.held, false);
    assert.match(info.cpuWakeLatency?.failure ?? '', /cpu_dma_latency/);
    assert.ok(node.logs.some((l) => l.code === 'MS_CPU_LATENCY_UNAVAILABLE'), 'a coded warning in the log');
    assert.match(status.stdout, /cpu wake-up +0 us asked, NOT held: /);
  }
  const nbd = await NbdClient.connect({ host: node.nbd.host, port: node.nbd.port, export: 'default' });
  await nbd.write(0, Buffer.alloc(4096, 7));
  assert.ok((await nbd.read(0, 4096)).equals(Buffer.alloc(4096, 7)));
  await nbd.close();
  assert.equal(await node.stop('SIGTERM'), 0);
});

test('node.cpuWakeLatency off (the default): no request is made, and status says none was asked', async (t) => {
  const node = await startNode({ cwd: await tempDir(t), args: [] });
  t.after(() => node.stop('SIGKILL'));
  const info = (await (await fetch(`${node.url}/v1/node`)).json()) as NodeInfo;
  assert.deepEqual(info.cpuWakeLatency, { requestedUs: null, held: false, failure: null, cpuidle: null });
  assert.equal(await holdsOpen(node.proc.pid ?? 0, CPU_LATENCY_DEVICE), false);
  assert.doesNotMatch(await (await fetch(`${node.url}/metrics`)).text(), /^memstrata_cpu_wake_latency_held\{/m, 'no series while the setting is off');
  const status = await runCli(['status', '--admin', node.url]);
  assert.match(status.stdout, /cpu wake-up +no bound asked \(node\.cpuWakeLatency off\)/);
});
