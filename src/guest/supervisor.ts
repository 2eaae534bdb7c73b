// The guest supervisor (DESIGN 4.6, issue 12): programs the node boots as child processes
// and keeps running. This is the first part of issue 12: lifecycle only. CPU shares,
// cores, memory limits, cut-through devices and the CLI/API come next.
//
//   guests/<name>.json   the definition (guest-meta.ts), validated on load
//   guests/<name>/       the guest's working directory; log and log.1 hold its output
//
// A guest runs in its own process group (spawned detached), so stop and reset reach its
// whole tree: SIGTERM to the group, SIGKILL after the grace period, and SIGKILL again to
// the group once the leader is gone, for children that outlived it.
//
// States: booting (spawned, or waiting out a restart backoff), running, stopped (asked
// to, or exited 0 with no restart due), failed (could not be started, or exited non-zero
// with no restart due). Restart policies: never, on-failure (exit code not 0, or killed by
// a signal it was not sent by the supervisor), always; the backoff doubles from 100 ms
// to 10 s and starts over once a run lasted 10 s. A guest whose command cannot be run
// (ENOENT, EACCES) fails at once and is not restarted until started again.
//
// Output goes to a bounded log: once `log` passes logBytes it becomes `log.1` (replacing
// the older one), so a guest keeps at most twice logBytes on disk; while the disk is
// behind, the guest's output is not read (it blocks), so it costs the node no memory.

import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, renameSync, type WriteStream } from 'node:fs';
import { mkdir, readFile, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { MisuseError, RuntimeError, toMemstrataError } from '../errors.js';
import type { MetaFs } from '../fs/meta-file.js';
import type { Logger } from '../logger.js';
import type { DamagedJson, GuestInfoJson } from '../protocol/admin/api.js';
import { GUEST_NAME_FORM, GUEST_NAME_PATTERN, RESTART_POLICIES, readGuestMeta, writeGuestMeta, type GuestDefinition, type RestartPolicy } from './guest-meta.js';

export type GuestState = GuestInfoJson['state'];

/** What the supervisor says of a guest (the admin API's shape). */
export type GuestInfo = GuestInfoJson;

export interface SupervisorOptions {
  dataDir: string;
  log: Logger;
  /** Between SIGTERM and SIGKILL when a guest is stopped; default 5 s. */
  graceMs?: number;
  /** A guest's log becomes log.1 past this size; default 1 MiB. */
  logBytes?: number;
  fs?: MetaFs;
}

const BACKOFF_MIN_MS = 100;
const BACKOFF_MAX_MS = 10_000;

class Guest {
  definition: GuestDefinition;
  state: GuestState;
  child: ChildProcess | undefined;
  exited: Promise<void> | undefined;
  /** Set while the supervisor is taking the guest down: its exit is not a failure. */
  halting: boolean;
  restarts: number;
  resets: number;
  backoffMs: number;
  startedAt: number;
  timer: NodeJS.Timeout | undefined;
  lastExit: GuestInfo['lastExit'];
  error: string | null;
  out: WriteStream | undefined;
  outBytes: number;

  constructor(definition: GuestDefinition) {
    this.definition = definition;
    this.state = 'stopped';
    this.child = undefined;
    this.exited = undefined;
    this.halting = false;
    this.restarts = 0;
    this.resets = 0;
    this.backoffMs = BACKOFF_MIN_MS;
    this.startedAt = 0;
    this.timer = undefined;
    this.lastExit = null;
    this.error = null;
    this.out = undefined;
    this.outBytes = 0;
  }

  info(): GuestInfo {
    const { name, command, restart } = this.definition;
    return { name, state: this.state, pid: this.child?.pid ?? null, command, restart, restarts: this.restarts, resets: this.resets, lastExit: this.lastExit, error: this.error };
  }
}

export class GuestSupervisor {
  readonly dir: string;
  private readonly options: SupervisorOptions;
  private readonly guests: Map<string, Guest>;
  private readonly damagedGuests: Map<string, DamagedJson>;
  private closing: boolean;

  constructor(options: SupervisorOptions) {
    this.options = options;
    this.dir = join(options.dataDir, 'guests');
    this.guests = new Map();
    this.damagedGuests = new Map();
    this.closing = false;
  }

  /** Loads every definition; boots the guests that were running. A bad definition is listed, not loaded. */
  async open(): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    for (const file of (await readdir(this.dir)).filter((f) => f.endsWith('.json')).sort()) {
      const name = file.slice(0, -'.json'.length);
      try {
        const guest = new Guest(await readGuestMeta(this.dir, name, this.options.fs));
        this.guests.set(name, guest);
        if (guest.definition.running) await this.boot(guest);
      } catch (error) {
        const coded = toMemstrataError(error);
        this.damagedGuests.set(name, { name, file: join(this.dir, file), error: coded.toJSON() });
        this.options.log.error({ guest: name, code: coded.code, err: error }, `guest ${name} could not be loaded: ${coded.message}; its files stay as they are`);
      }
    }
  }

  list(): GuestInfo[] {
    return [...this.guests.values()].map((g) => g.info()).sort((a, b) => a.name.localeCompare(b.name));
  }

  damaged(): DamagedJson[] {
    return [...this.damagedGuests.values()];
  }

  info(name: string): GuestInfo {
    return this.get(name).info();
  }

  /** Defines a guest and, unless `start` is false, boots it. */
  async create(request: { name: string; command: readonly string[]; env?: Record<string, string>; restart?: RestartPolicy }, start = true): Promise<GuestInfo> {
    const { name, command } = request;
    if (!GUEST_NAME_PATTERN.test(name)) throw new MisuseError('MS_GUEST_INVALID', `invalid guest name ${JSON.stringify(name.slice(0, 80))}: expected ${GUEST_NAME_FORM}`, { details: { name } });
    if (command.length === 0 || command.some((arg) => arg.length === 0)) throw new MisuseError('MS_GUEST_INVALID', `guest ${name}: expected a command and its arguments, none of them empty`, { details: { name } });
    const restart = request.restart ?? 'on-failure';
    if (!RESTART_POLICIES.includes(restart)) throw new MisuseError('MS_GUEST_INVALID', `guest ${name}: restart policy ${JSON.stringify(restart)} is not one of ${RESTART_POLICIES.join(', ')}`, { details: { name } });
    for (const key of Object.keys(request.env ?? {})) {
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) throw new MisuseError('MS_GUEST_INVALID', `guest ${name}: ${JSON.stringify(key)} is not an environment variable name`, { details: { name } });
    }
    if (this.guests.has(name) || this.damagedGuests.has(name)) throw new MisuseError('MS_GUEST_EXISTS', `a guest named ${name} already exists`, { details: { name } });
    const definition: GuestDefinition = { name, command: [...command], env: { ...request.env }, restart, running: start, createdAt: new Date().toISOString() };
    await writeGuestMeta(this.dir, definition, this.options.fs);
    const guest = new Guest(definition);
    this.guests.set(name, guest);
    if (start) await this.boot(guest);
    return guest.info();
  }

  /** Boots a stopped or failed guest, and keeps it running across node restarts. */
  async start(name: string): Promise<GuestInfo> {
    const guest = this.get(name);
    await this.setRunning(guest, true);
    if (guest.state === 'stopped' || guest.state === 'failed') {
      guest.backoffMs = BACKOFF_MIN_MS;
      await this.boot(guest);
    }
    return guest.info();
  }

  /** Stops the guest's whole process tree (SIGTERM, then SIGKILL after the grace period). */
  async stop(name: string): Promise<GuestInfo> {
    const guest = this.get(name);
    await this.setRunning(guest, false);
    await this.halt(guest, this.options.graceMs ?? 5000);
    return guest.info();
  }

  /** Kills the guest's tree at once and boots it again; nothing else is touched. */
  async reset(name: string): Promise<GuestInfo> {
    const guest = this.get(name);
    await this.halt(guest, 0);
    guest.resets++;
    guest.backoffMs = BACKOFF_MIN_MS;
    await this.boot(guest);
    return guest.info();
  }

  /** The last `maxBytes` of the guest's output (log.1, then log). */
  async logs(name: string, maxBytes: number): Promise<string> {
    this.get(name);
    const dir = join(this.dir, name);
    const parts = await Promise.all(['log.1', 'log'].map((f) => readFile(join(dir, f)).catch(() => Buffer.alloc(0))));
    const all = Buffer.concat(parts);
    return all.subarray(Math.max(0, all.length - maxBytes)).toString('utf8');
  }

  /** Removes a stopped guest's definition, working directory and log. */
  async remove(name: string): Promise<void> {
    const guest = this.get(name);
    if (guest.state === 'running' || guest.state === 'booting') throw new RuntimeError('MS_GUEST_BUSY', `guest ${name} is ${guest.state}; stop it first`, { details: { name } });
    this.guests.delete(name);
    guest.out?.end();
    guest.out = undefined;
    await rm(join(this.dir, `${name}.json`), { force: true });
    await rm(join(this.dir, name), { recursive: true, force: true });
  }

  /** Node shutdown: every guest's tree stopped; their definitions say whether they boot at the next start. */
  async close(): Promise<void> {
    this.closing = true;
    await Promise.all([...this.guests.values()].map((g) => this.halt(g, this.options.graceMs ?? 5000)));
    for (const guest of this.guests.values()) guest.out?.end();
  }

  private get(name: string): Guest {
    const guest = this.guests.get(name);
    if (guest === undefined) throw new MisuseError('MS_GUEST_NOT_FOUND', `no guest named ${JSON.stringify(name.slice(0, 80))}`, { details: { name } });
    return guest;
  }

  private async setRunning(guest: Guest, running: boolean): Promise<void> {
    if (guest.definition.running === running) return;
    guest.definition.running = running;
    await writeGuestMeta(this.dir, guest.definition, this.options.fs);
  }

  private async boot(guest: Guest): Promise<void> {
    if (this.closing) return;
    clearTimeout(guest.timer);
    guest.timer = undefined;
    const { name, command, env } = guest.definition;
    const cwd = join(this.dir, name);
    await mkdir(cwd, { recursive: true });
    guest.state = 'booting';
    guest.error = null;
    guest.halting = false;
    const [file = '', ...args] = command;
    const child = spawn(file, args, {
      cwd,
      detached: true, // its own process group: stop and reset reach the whole tree
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: process.env.HOME ?? cwd, ...env, MEMSTRATA_GUEST: name },
    });
    guest.child = child;
    guest.startedAt = Date.now();
    this.logTo(guest, child);
    guest.exited = new Promise<void>((resolve) => {
      child.once('error', (error: NodeJS.ErrnoException) => {
        // Spawning failed (no such command, not executable): no exit follows.
        if (child.pid !== undefined) return;
        guest.child = undefined;
        guest.state = 'failed';
        guest.error = `cannot run ${file}: ${error.message}`;
        this.options.log.error({ guest: name, err: error }, `guest ${name} cannot be started: ${guest.error}`);
        resolve();
      });
      child.once('spawn', () => {
        if (guest.child === child && guest.state === 'booting') guest.state = 'running';
        this.options.log.info({ guest: name, pid: child.pid }, `guest ${name} running`);
      });
      child.once('exit', (code, signal) => {
        guest.lastExit = { code, signal };
        // Children that outlived the leader go with it.
        killGroup(child.pid, 'SIGKILL');
        if (guest.child === child) guest.child = undefined;
        this.exited(guest, code, signal);
        resolve();
      });
    });
  }

  private exited(guest: Guest, code: number | null, signal: NodeJS.Signals | null): void {
    const { name, restart } = guest.definition;
    if (guest.halting || this.closing) {
      guest.state = 'stopped';
      return;
    }
    const failed = code !== 0;
    const again = restart === 'always' || (restart === 'on-failure' && failed);
    this.options.log[failed ? 'warn' : 'info']({ guest: name, code, signal, restart: again }, `guest ${name} exited${again ? '; restarting' : ''}`);
    if (!again) {
      guest.state = failed ? 'failed' : 'stopped';
      return;
    }
    // A run that lasted starts the backoff over; quick exits double it.
    if (Date.now() - guest.startedAt >= BACKOFF_MAX_MS) guest.backoffMs = BACKOFF_MIN_MS;
    const wait = guest.backoffMs;
    guest.backoffMs = Math.min(guest.backoffMs * 2, BACKOFF_MAX_MS);
    guest.state = 'booting';
    guest.restarts++;
    guest.timer = setTimeout(() => {
      guest.timer = undefined;
      if (guest.state === 'booting' && guest.child === undefined && !guest.halting) {
        this.boot(guest).catch((error: unknown) => {
          guest.state = 'failed';
          guest.error = String(error);
        });
      }
    }, wait);
    guest.timer.unref();
  }

  /** Takes the guest's tree down: SIGTERM, then SIGKILL after graceMs (at once when 0). */
  private async halt(guest: Guest, graceMs: number): Promise<void> {
    clearTimeout(guest.timer);
    guest.timer = undefined;
    guest.halting = true;
    const child = guest.child;
    if (child?.pid === undefined || guest.exited === undefined) {
      if (guest.state !== 'failed') guest.state = 'stopped';
      return;
    }
    killGroup(child.pid, graceMs > 0 ? 'SIGTERM' : 'SIGKILL');
    let timer: NodeJS.Timeout | undefined;
    if (graceMs > 0) timer = setTimeout(() => { killGroup(child.pid, 'SIGKILL'); }, graceMs);
    await guest.exited;
    clearTimeout(timer);
    guest.state = 'stopped';
  }

  private logTo(guest: Guest, child: ChildProcess): void {
    const limit = this.options.logBytes ?? 1024 * 1024;
    const path = join(this.dir, guest.definition.name, 'log');
    guest.out ??= createWriteStream(path, { flags: 'a' });
    const write = (chunk: Buffer): void => {
      if (guest.outBytes > 0 && guest.outBytes + chunk.length > limit) {
        // Rotate: log -> log.1 (the older one goes); writes still queued on the old stream
        // land in log.1 (they go by descriptor), and a fresh log goes on.
        try {
          renameSync(path, `${path}.1`);
        } catch {
          // Not created yet: nothing to keep.
        }
        guest.out?.end();
        guest.out = createWriteStream(path, { flags: 'w' });
        guest.outBytes = 0;
      }
      guest.outBytes += chunk.length;
      const out = guest.out;
      if (out !== undefined && !out.write(chunk)) {
        // The disk is behind: stop reading the guest's output until it catches up, so a
        // guest that floods its output costs the node no memory (the guest then blocks).
        child.stdout?.pause();
        child.stderr?.pause();
        out.once('drain', () => {
          child.stdout?.resume();
          child.stderr?.resume();
        });
      }
    };
    child.stdout?.on('data', write);
    child.stderr?.on('data', write);
  }
}

function killGroup(pid: number | undefined, signal: NodeJS.Signals): void {
  if (pid === undefined) return;
  try {
    process.kill(-pid, signal);
  } catch {
    // The group is gone.
  }
}
