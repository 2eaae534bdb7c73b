// Starts `memstrata node start` as a child process on ephemeral loopback ports in a
// temporary directory, waits for its admin API, and cleans up after the test.

import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readdir, readlink, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

export const CLI = new URL('../../src/cli/main.js', import.meta.url).pathname;
/** Preloaded into each node started here: it stops once its test process is gone. */
const EXIT_WITH_PARENT = new URL('./exit-with-parent.js', import.meta.url).pathname;

/** Small media so tests stay light; every test may override. */
export const SMALL_MEDIA = ['--dram-size', '64MiB', '--flash-size', '128MiB', '--set', 'volumes.defaultSize=64MiB'];

export interface NodeProcess {
  proc: ChildProcess;
  /** Admin API base URL. */
  url: string;
  /** The rmem service's address. */
  rmem: { host: string; port: number };
  /** The NBD service's address. */
  nbd: { host: string; port: number };
  /** The mirror service's address. */
  mirror: { host: string; port: number };
  dir: string;
  /** JSON log lines seen so far. */
  logs: Record<string, unknown>[];
  /** Sends a signal and resolves with the exit code (or the signal name). */
  stop(signal?: NodeJS.Signals): Promise<number | string>;
}

/** A temporary directory removed when the test ends. */
/** Whether process `pid` ('self': this one) has `path` open, from its /proc/<pid>/fd links. */
export async function holdsOpen(pid: number | 'self', path: string): Promise<boolean> {
  const fds = await readdir(`/proc/${pid}/fd`);
  const targets = await Promise.all(fds.map((fd) => readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')));
  return targets.includes(path);
}

/** Whether a process with this pid exists (signal 0). */
export function alive(pid: number | null | undefined): boolean {
  if (pid === null || pid === undefined) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Nodes running now, by the directory they run in: a temporary directory waits for them. */
const running = new Map<string, Set<Promise<unknown>>>();

/**
 * A temporary directory, removed after the test. Hooks run in the order they were added,
 * so this one comes before the hook that stops a node started in the directory later:
 * the removal waits (up to a minute) for every node running in it to exit, so it never
 * races a node still writing there (which made `rm` fail with ENOTEMPTY).
 */
export async function tempDir(t: { after(fn: () => Promise<void>): void }, prefix = 'memstrata-test-'): Promise<string> {
  const path = await mkdtemp(join(tmpdir(), prefix));
  t.after(async () => {
    const nodes = [...running.entries()].filter(([dir]) => dir === path || dir.startsWith(`${path}/`)).flatMap(([, exits]) => [...exits]);
    const idle = Promise.race([Promise.all(nodes), new Promise((r) => setTimeout(r, 60_000).unref())]);
    // Not awaited: the hooks that stop those nodes come after this one. The pending
    // removal keeps the test file's process alive until it is done.
    void idle.then(() => rm(path, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 })).catch(() => undefined);
    await Promise.resolve();
  });
  return path;
}

export interface StartOptions {
  cwd: string;
  args?: readonly string[];
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
  /** Pass SMALL_MEDIA as flags (default true); flags beat a config file, so turn off to test one. */
  small?: boolean;
}

/** Starts a node and resolves once its admin API listens; rejects with its output if it exits first. */
export function startNode(options: StartOptions): Promise<NodeProcess> {
  const args = [CLI, 'node', 'start', '--admin-listen', '127.0.0.1:0', '--rmem-listen', '127.0.0.1:0', '--nbd-listen', '127.0.0.1:0', '--mirror-listen', '127.0.0.1:0', '--log-format', 'json', ...(options.small === false ? [] : SMALL_MEDIA), ...(options.args ?? [])];
  const proc = spawn(process.execPath, ['--import', EXIT_WITH_PARENT, ...args], {
    cwd: options.cwd,
    env: { ...process.env, ...options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const logs: Record<string, unknown>[] = [];
  let rmem = { host: '127.0.0.1', port: 0 };
  let nbd = { host: '127.0.0.1', port: 0 };
  let mirror = { host: '127.0.0.1', port: 0 };
  let stderr = '';
  proc.stderr?.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<number | string>((resolve) => proc.once('exit', (code, signal) => resolve(code ?? signal ?? -1)));
  const cwd = options.cwd;
  const exits = running.get(cwd) ?? new Set();
  running.set(cwd, exits);
  exits.add(exited);
  void exited.then(() => {
    exits.delete(exited);
    if (exits.size === 0) running.delete(cwd);
  });

  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`node did not start within ${options.timeoutMs ?? 15000} ms; stderr: ${stderr}`));
    }, options.timeoutMs ?? 15000);
    const lines = createInterface({ input: proc.stdout as NodeJS.ReadableStream });
    lines.on('line', (line) => {
      let entry: Record<string, unknown>;
      try {
        entry = JSON.parse(line) as Record<string, unknown>;
      } catch {
        return;
      }
      logs.push(entry);
      if (entry.msg === 'rmem service listening' && typeof entry.address === 'string') rmem = hostPort(entry.address);
      if (entry.msg === 'NBD service listening' && typeof entry.address === 'string') nbd = hostPort(entry.address);
      if (entry.msg === 'mirror service listening' && typeof entry.address === 'string') mirror = hostPort(entry.address);
      if (entry.msg === 'admin API listening' && typeof entry.url === 'string') {
        clearTimeout(timer);
        resolve({
          proc,
          url: entry.url,
          rmem,
          nbd,
          mirror,
          dir: options.cwd,
          logs,
          stop: (signal = 'SIGTERM') => {
            if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
            return exited;
          },
        });
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`node exited with ${code} before listening; stderr: ${stderr}; stdout: ${JSON.stringify(logs)}`));
    });
  });
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the CLI to completion. */
export function runCli(args: readonly string[], options: { cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, [CLI, ...args], {
      cwd: options.cwd,
      env: { ...process.env, ...options.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    proc.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    proc.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`memstrata ${args.join(' ')} did not finish; stdout: ${stdout}; stderr: ${stderr}`));
    }, options.timeoutMs ?? 15000);
    proc.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

function hostPort(address: string): { host: string; port: number } {
  const at = address.lastIndexOf(':');
  return { host: address.slice(0, at), port: Number(address.slice(at + 1)) };
}

/** A loopback port that was free a moment ago, for two nodes that must name each other before either starts. */
export async function freePort(): Promise<number> {
  const { createServer } = await import('node:net');
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (typeof address !== 'object' || address === null) throw new Error('no port');
  return address.port;
}
