// Nodes of one cluster on a test's etcd, for the tests of mirror partners chosen by the
// cluster: start a member, make a mirrored device, list the members a node sees, and read
// a device's ownership record from etcd.

import assert from 'node:assert/strict';
import { openEtcd } from '../../src/client/etcd.js';
import type { ClusterJson } from '../../src/protocol/admin/api.js';
import type { EtcdProcess } from './etcd.js';
import { startNode, tempDir, type NodeProcess } from './node-process.js';

type Ctx = { after(fn: () => unknown): void };

/** The lease of these clusters: short, so that failovers and replacements come quickly. */
export const LEASE_S = 2;

/** A device's ownership record in etcd (src/cluster/ownership.ts). */
export interface Ownership {
  term: number;
  primary: string;
  replica: string | null;
  inSync: boolean;
}

/**
 * A node of cluster `cluster`, with its id and zone, no mirror.partner (the cluster chooses),
 * a mirror timeout of 500 ms and `dram` of DRAM; `extra` flags after those. Killed (and
 * woken first, if stopped) when the test ends.
 */
export async function clusterMember(t: Ctx, etcd: EtcdProcess, options: { cluster: string; id: string; zone: string; dram?: string; dir?: string; extra?: readonly string[] }): Promise<NodeProcess> {
  const node = await startNode({
    cwd: options.dir ?? (await tempDir(t)),
    args: [
      '--node-id', options.id, '--etcd', etcd.url, '--zone', options.zone, '--set', `cluster.lease=${LEASE_S}s`, '--set', `cluster.name=${options.cluster}`,
      '--set', 'mirror.timeout=500ms', '--dram-size', options.dram ?? '128MiB', ...(options.extra ?? []),
    ],
  });
  t.after(async () => {
    node.proc.kill('SIGCONT');
    await node.stop('SIGKILL');
  });
  return node;
}

/** Makes a `mirrored` NVRAM device on `node`. */
export async function createMirrored(node: NodeProcess, name: string, size: string): Promise<void> {
  const response = await fetch(`${node.url}/v1/nvram`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name, size, policy: 'mirrored' }) });
  assert.equal(response.status, 201, await response.text());
}

/** The ids of the members `node` sees, sorted. */
export async function memberIds(node: NodeProcess): Promise<string[]> {
  return ((await (await fetch(`${node.url}/v1/cluster`)).json()) as ClusterJson).members.map((m) => m.id).sort();
}

/** Reads a device's ownership record of `cluster` from etcd; undefined while there is none. */
export function ownershipReader(t: Ctx, etcd: EtcdProcess, cluster: string): (device: string) => Promise<Ownership | undefined> {
  const client = openEtcd({ endpoints: [etcd.url] });
  t.after(() => client.close());
  return async (device) => {
    const text = await client.get(`/memstrata/${cluster}/nvram/${device}`).string();
    return text === null ? undefined : (JSON.parse(text) as Ownership);
  };
}
