// Real peers for interop tests (Debian packages). A missing tool skips the test with a
// printed reason, unless MEMSTRATA_REQUIRE_INTEROP=1 (set by .ci/run), where it fails.

import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';

export const REQUIRE_INTEROP = process.env.MEMSTRATA_REQUIRE_INTEROP === '1';

export function have(command: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${command}`]).status === 0;
}

/** Returns a skip reason for missing tools, or throws when interop is required. */
export function missing(...commands: string[]): string | undefined {
  const absent = commands.filter((c) => !have(c));
  if (absent.length === 0) return undefined;
  const reason = `needs ${absent.join(', ')} (Debian: libnbd-bin, python3-libnbd, qemu-utils, fio, nbdkit, qemu-system-x86, busybox-static)`;
  if (REQUIRE_INTEROP) throw new Error(`MEMSTRATA_REQUIRE_INTEROP=1 but ${reason}`);
  console.log(`# skipped: ${reason}`);
  return reason;
}

export interface ToolResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a tool to completion with a time limit. */
export function run(command: string, args: readonly string[], options: { input?: string; timeoutMs?: number; cwd?: string } = {}): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const proc = spawn(command, args, { cwd: options.cwd, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    proc.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    proc.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`${command} ${args.join(' ')} did not finish in time; stderr: ${stderr}`));
    }, options.timeoutMs ?? 60_000);
    proc.once('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    proc.stdin.end(options.input ?? '');
  });
}

/**
 * nbdsh is `python3 -m nbd`; run it with Debian's python3, whose nbd module it needs,
 * even where another python3 (pyenv, say) comes first on PATH.
 */
export function nbdsh(args: readonly string[], options: { input?: string; timeoutMs?: number } = {}): Promise<ToolResult> {
  const python = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
  return run(python, ['-m', 'nbd', ...args], options);
}
