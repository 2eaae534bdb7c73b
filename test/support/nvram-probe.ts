// Polling a real node's admin API in tests: an NVRAM device's state, and waiting for a condition.

import assert from 'node:assert/strict';
import type { DeviceInfo } from '../../src/protocol/admin/api.js';
import type { NodeProcess } from './node-process.js';

/** The node's NVRAM device `name`, as `GET /v1/nvram` shows it. */
export async function nvramDevice(n: NodeProcess, name: string): Promise<DeviceInfo | undefined> {
  const list = (await (await fetch(`${n.url}/v1/nvram`)).json()) as { devices: DeviceInfo[] };
  return list.devices.find((d) => d.name === name);
}

/** Polls until `check` holds; fails with the last state seen (a hang, not a slow machine). */
export async function until<T>(what: string, probe: () => Promise<T>, check: (v: T) => boolean, ms = 20_000): Promise<T> {
  const deadline = Date.now() + ms;
  let last: T = await probe();
  while (!check(last)) {
    if (Date.now() > deadline) assert.fail(`${what}: still ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 50));
    last = await probe();
  }
  return last;
}
