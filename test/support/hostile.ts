// Helpers for hostile-client tests: the node's resident memory, its metrics, and a
// well-behaved client that checks it is still served correctly.

import { readFile } from 'node:fs/promises';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { RmemClient, type Region } from '../../src/client/rmem-client.js';
import type { NodeProcess } from './node-process.js';

/** Resident set size of the node process, from /proc/<pid>/status. */
export async function rssBytes(n: NodeProcess): Promise<number> {
  const status = await readFile(`/proc/${n.proc.pid ?? 0}/status`, 'utf8');
  const match = /^VmRSS:\s+(\d+) kB$/m.exec(status);
  assert.ok(match !== null, 'VmRSS in /proc/<pid>/status');
  return Number(match[1]) * 1024;
}

/** The value of one sample on /metrics, such as `memstrata_rmem_connections` or `name{label="x"}`; 0 when absent. */
export async function metric(n: NodeProcess, sample: string): Promise<number> {
  const text = await (await fetch(`${n.url}/metrics`)).text();
  for (const line of text.split('\n')) {
    if (line.startsWith(`${sample} `)) return Number(line.slice(sample.length + 1));
  }
  return 0;
}

export interface WellBehaved {
  client: RmemClient;
  /** Writes a fresh pattern to its region and reads it back; fails if the node does not serve it correctly. */
  check(): Promise<void>;
}

/** A client with one region that it writes and reads back, as a tenant who does nothing wrong. */
export async function wellBehaved(t: { after(fn: () => Promise<unknown>): void }, n: NodeProcess, serverId: string): Promise<WellBehaved> {
  const client = await RmemClient.connect({ ...n.rmem, serverId, timeoutMs: 20_000 });
  t.after(() => client.close());
  const region: Region = await client.bind(256 * 1024, { medium: 'dram' });
  let round = 0;
  return {
    client,
    async check() {
      const data = randomBytes(64 * 1024);
      const offset = (round++ % 4) * 64 * 1024;
      await client.write(region, offset, data);
      assert.ok((await client.read(region, offset, data.length)).equals(data), 'the well-behaved client reads back what it wrote');
    },
  };
}
