// A real etcd (Debian's etcd-server) for cluster tests: one member on ephemeral loopback
// ports with a temporary data directory, stopped when the test ends. Without the binary
// the test skips with a reason, or fails under MEMSTRATA_REQUIRE_INTEROP=1.

import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { get as httpsGet } from 'node:https';
import { freePort } from './node-process.js';
import type { TestCerts } from './certs.js';
import { REQUIRE_INTEROP, have } from './tools.js';

export interface EtcdProcess {
  /** The client URL, such as http://127.0.0.1:40123. */
  url: string;
  proc: ChildProcess;
  /** Stops it with a signal and resolves once it has exited. */
  stop(signal?: NodeJS.Signals): Promise<void>;
  /** Starts it again on the same ports and data directory (after stop). */
  restart(): Promise<void>;
  /** SIGSTOP / SIGCONT: etcd frozen, its sockets open. */
  pause(): void;
  resume(): void;
}

/** A skip reason when etcd is not installed; throws instead under MEMSTRATA_REQUIRE_INTEROP=1. */
export function missingEtcd(): string | undefined {
  if (have('etcd')) return undefined;
  const reason = 'needs etcd (Debian: etcd-server)';
  if (REQUIRE_INTEROP) throw new Error(`MEMSTRATA_REQUIRE_INTEROP=1 but ${reason}`);
  console.log(`# skipped: ${reason}`);
  return reason;
}

/**
 * Starts a one-member etcd; `t.after` stops it and removes its directory. With `tls`,
 * clients reach it over https with the server certificate, and must present a
 * certificate the CA signed (--client-cert-auth).
 */
export async function startEtcd(t: { after(fn: () => Promise<void>): void }, tls?: TestCerts): Promise<EtcdProcess> {
  const dir = await mkdtemp(join(tmpdir(), 'memstrata-etcd-'));
  const clientPort = await freePort();
  const peerPort = await freePort();
  const url = `${tls === undefined ? 'http' : 'https'}://127.0.0.1:${clientPort}`;
  const peer = `http://127.0.0.1:${peerPort}`;
  const args = [
    '--name', 'test', '--data-dir', join(dir, 'data'),
    '--listen-client-urls', url, '--advertise-client-urls', url,
    '--listen-peer-urls', peer, '--initial-advertise-peer-urls', peer,
    '--initial-cluster', `test=${peer}`, '--initial-cluster-state', 'new',
    '--log-level', 'error', '--logger', 'zap',
    ...(tls === undefined ? [] : ['--cert-file', tls.cert, '--key-file', tls.key, '--trusted-ca-file', tls.ca, '--client-cert-auth']),
  ];
  const health = tls === undefined ? undefined : { ca: await readFile(tls.ca), cert: await readFile(join(tls.dir, 'client-cert.pem')), key: await readFile(join(tls.dir, 'client-key.pem')) };
  let proc: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();
  let output = '';

  const launch = async (): Promise<void> => {
    const child = spawn('etcd', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    proc = child;
    child.stderr?.on('data', (chunk: Buffer) => {
      output = (output + chunk.toString()).slice(-4000);
    });
    exited = new Promise((resolve) => child.once('exit', () => resolve()));
    const deadline = Date.now() + 15_000;
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`etcd exited before it was healthy: ${output}`);
      try {
        if (await healthy(url, health)) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new Error(`etcd did not become healthy within 15 s: ${output}`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  };

  const stop = async (signal: NodeJS.Signals = 'SIGTERM'): Promise<void> => {
    const child = proc;
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGCONT');
    child.kill(signal);
    await exited;
  };

  await launch();
  t.after(async () => {
    await stop('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  });
  return {
    url,
    get proc() {
      if (proc === undefined) throw new Error('etcd was never started');
      return proc;
    },
    stop,
    restart: launch,
    pause: () => proc?.kill('SIGSTOP'),
    resume: () => proc?.kill('SIGCONT'),
  };
}

/** etcd's /health, over http or (with certificates) https. */
async function healthy(url: string, tls: { ca: Buffer; cert: Buffer; key: Buffer } | undefined): Promise<boolean> {
  if (tls === undefined) {
    const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) });
    return ((await res.json()) as { health?: string }).health === 'true';
  }
  const body = await new Promise<string>((resolve, reject) => {
    const req = httpsGet(`${url}/health`, { ...tls, timeout: 1000 }, (res) => {
      let text = '';
      res.on('data', (c: Buffer) => (text += c.toString()));
      res.on('end', () => resolve(text));
    });
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error('timeout')));
  });
  return (JSON.parse(body) as { health?: string }).health === 'true';
}
