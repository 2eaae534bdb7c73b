// The guest supervisor (DESIGN 4.6, issue 12): programs the node boots as child processes,
// keeps running, holds to a share of the node's CPU, a set of cores and a memory limit,
// and serves through cut-through sockets of their own (docs/guests.md).
//
//   guests/<name>.json   the definition (guest-meta.ts), validated on load
//   guests/<name>/       the guest's directory: log, log.1, nbd.sock, rmem.sock; its
//                        working directory, or (--user) home/ below it, its own
//
// A guest runs in its own process group (spawned detached), so stop and reset reach its
// whole tree: SIGTERM to the group, SIGKILL after the grace period, and SIGKILL again to
// the group (and to what is left in its cgroup) once the leader is gone.
//
// States: booting (spawned, or waiting out a restart backoff), running, stopped (asked
// to, or exited 0 with no restart due), failed (could not be started, or exited non-zero
// with no restart due). Restart policies: never, on-failure (exit code not 0, or killed by
// a signal it was not sent by the supervisor), always; the backoff doubles from 100 ms
// to 10 s and starts over once a run lasted 10 s. A guest whose command cannot be run
// (ENOENT, EACCES) fails at once and is not restarted until started again. Operations on
// one guest (start, stop, reset, set, attach, detach, remove, its restarts and its own
// NVRAM allocations) run one at a time, in order (`serial`).
//
// Limits (cgroup.ts, duty-cycle.ts): the enforcement is chosen once at open, the first of
// cgroup v2, cgroup v1 and the signal fallback that works (or the one guests.enforcement
// names). Every guest gets a cgroup where there is one; the node's guests together are
// capped at (cores - guests.reserveCpu), and the shares of the live guests may not add up
// to more than that either (MS_GUEST_CPU_BUDGET). Without a cgroup: the CPU share is a
// SIGSTOP/SIGCONT duty cycle, cores are pinned with taskset, and the memory limit is
// watched: a guest whose tree's Pss passes it is killed and left `failed` (not
// restarted), as the kernel's OOM killer would in a cgroup. Figures (CPU time, CPU used
// over the last second, throttled time, memory) are read every second.
//
// Output goes to a bounded log: once `log` passes logBytes it becomes `log.1` (replacing
// the older one), so a guest keeps at most twice logBytes on disk; while the disk is
// behind, the guest's output is not read (it blocks), so it costs the node no memory.

import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, constants, createWriteStream, fstatSync, openSync, renameSync, type WriteStream } from 'node:fs';
import { access, chmod, lchown, mkdir, open, readFile, readdir, rm, stat } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { delimiter, isAbsolute, join } from 'node:path';
import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import { MisuseError, RuntimeError, toMemstrataError } from '../errors.js';
import type { MetaFs } from '../fs/meta-file.js';
import type { Logger } from '../logger.js';
import type { DamagedJson, GuestInfoJson } from '../protocol/admin/api.js';
import { GUEST_NAME_FORM, GUEST_NAME_PATTERN, RESTART_POLICIES, readGuestMeta, writeGuestMeta, type GuestDefinition, type RestartPolicy } from './guest-meta.js';
import { JOIN_SCRIPT, openCgroupV1, openCgroupV2, readCgroupLayout, type CgroupHost, type GuestCgroup, type GuestLimits } from './cgroup.js';
import { DutyCycle } from './duty-cycle.js';
import type { ScopedListener } from '../net/listen.js';
import type { ExportCatalog } from '../server/nbd-connection.js';
import type { RmemScope } from '../server/rmem-connection.js';
import type { Volume } from '../storage/volume-manager.js';
import type { Policy } from '../protocol/journal/policy.js';
import { GroupCpu, byGroup, memoryBytes, scanProcesses, treeMembers, type ProcSample } from './proc-stat.js';

const execFileAsync = promisify(execFile);

export const ENFORCEMENTS = ['auto', 'cgroup2', 'cgroup1', 'signal'] as const;
export type EnforcementSetting = (typeof ENFORCEMENTS)[number];
export type Enforcement = GuestInfoJson['enforcement'];

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
  /** The node's id: its guests' cgroups are memstrata-<id>. Asked at open. */
  nodeId?: () => string;
  /** How CPU and memory limits are enforced; default auto (cgroup v2, v1, then signals). */
  enforcement?: EnforcementSetting;
  /** Cores the node keeps for itself; default 0.5. */
  reserveCpu?: number;
  /** The CPU period in milliseconds (cgroup quota period, duty cycle); default 100. */
  periodMs?: number;
  /** Cores of the machine; default os.availableParallelism(). */
  cpus?: number;
  /** Cut-through devices; without it guests get no sockets and nothing can be attached. */
  cutThrough?: CutThroughHost;
  /** Connections each of a guest's sockets admits at once; default 32. */
  maxSocketConnections?: number;
}

export type DeviceKind = 'volume' | 'nvram';

/**
 * What the node gives the supervisor for guests' cut-through devices (issue 12): its NBD
 * and rmem services listening on a guest's Unix sockets, scoped to what is attached.
 */
export interface CutThroughHost {
  /** Throws the coded not-found (or invalid) error unless `name` exists and may be attached. */
  check(kind: DeviceKind, name: string): void;
  findVolume(name: string): Volume | undefined;
  listenNbd(path: string, catalog: ExportCatalog, client: string, maxConnections: number): Promise<ScopedListener>;
  listenRmem(path: string, scope: RmemScope, maxConnections: number): Promise<ScopedListener>;
  /** Creates an NVRAM device (a guest's own); resolves with the size it takes. */
  createNvram(name: string, size: number, policy: Policy): Promise<number>;
  removeNvram(name: string): Promise<void>;
  /** A device's size, or undefined when there is none of that name. */
  nvramSize(name: string): number | undefined;
  /** The guest's processes are gone: the sessions they held on its rmem socket end now. */
  guestEnded(name: string): void;
  /** The node's own TCP addresses, for MEMSTRATA_NVRAM_PATHS. */
  tcp(): { nbd: string; rmem: string };
}

/** Volumes, and NVRAM devices, a guest may have attached (what its definition file holds). */
const MAX_ATTACHED = 256;

/** Unix socket paths are limited to 108 bytes with the terminating NUL (sockaddr_un). */
const MAX_SOCKET_PATH = 107;

/** A change of limits: undefined keeps the current value, null removes the limit. */
export interface LimitChange {
  cpu?: number | null;
  cores?: number | null;
  memory?: number | null;
}

const STATS_INTERVAL_MS = 1000;
/** How often the memory of guests without a memory cgroup is checked against their limit. */
const MEMORY_WATCH_MS = 200;

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
  cgroup: GuestCgroup | undefined;
  duty: DutyCycle | undefined;
  /** CPU time of this run by /proc accounting, and of the runs before it. */
  runCpu: GroupCpu;
  cpuBefore: number;
  throttledBefore: number;
  cpuSeconds: number;
  throttledSeconds: number;
  memoryBytes: number;
  cpuUsed: number | null;
  sampledAt: number;
  /** Set when the memory watchdog killed it: it stays failed. */
  overMemory: string | null;
  /** Its cut-through sockets, open from its first boot until it is removed or the node stops. */
  nbdSocket: ScopedListener | undefined;
  rmemSocket: ScopedListener | undefined;
  /** The devices its rmem socket serves; follows attach and detach. */
  readonly devices: Set<string>;
  /** Operations on the guest (start, stop, reset, set, attach, detach, remove, restarts) run one at a time, in order. */
  queue: Promise<unknown>;
  /** Streams following its log: ended when it is removed or the node stops. */
  readonly followers: Set<Readable>;

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
    this.cgroup = undefined;
    this.duty = undefined;
    this.runCpu = new GroupCpu();
    this.cpuBefore = 0;
    this.throttledBefore = 0;
    this.cpuSeconds = 0;
    this.throttledSeconds = 0;
    this.memoryBytes = 0;
    this.cpuUsed = null;
    this.sampledAt = 0;
    this.overMemory = null;
    this.nbdSocket = undefined;
    this.rmemSocket = undefined;
    this.devices = new Set(definition.nvram);
    this.queue = Promise.resolve();
    this.followers = new Set();
  }

  /** Running or about to (booting, or waiting out a restart backoff): it holds its CPU share. */
  get live(): boolean {
    return this.state === 'running' || this.state === 'booting';
  }

  info(enforcement: Enforcement, nvramOwned = 0): GuestInfo {
    const { name, command, restart, cpu, cores, memory } = this.definition;
    const live = this.child !== undefined;
    return {
      name, state: this.state, pid: this.child?.pid ?? null, command, restart, restarts: this.restarts, resets: this.resets, lastExit: this.lastExit, error: this.error,
      cpu, cores, memoryLimit: memory, enforcement,
      cpuUsed: live ? this.cpuUsed : null,
      cpuSeconds: this.cpuSeconds,
      throttledSeconds: this.throttledSeconds,
      memoryBytes: live ? this.memoryBytes : 0,
      volumes: [...this.definition.volumes],
      nvram: [...this.definition.nvram],
      user: this.definition.user,
      nvramQuota: this.definition.nvramQuota,
      nvramOwned,
      sockets: this.nbdSocket === undefined || this.rmemSocket === undefined ? null : {
        nbd: this.nbdSocket.path,
        rmem: this.rmemSocket.path,
        nbdConnections: this.nbdSocket.connections(),
        rmemConnections: this.rmemSocket.connections(),
      },
    };
  }
}

export class GuestSupervisor {
  readonly dir: string;
  private readonly options: SupervisorOptions;
  private readonly guests: Map<string, Guest>;
  private readonly damagedGuests: Map<string, DamagedJson>;
  private closing: boolean;
  /** Where the kernel enforces limits; undefined for the signal fallback. */
  private cgroups: CgroupHost | undefined;
  /** Whether the node's cgroups exist now (made at the first boot, removed with the last guest). */
  private cgroupsOpen: boolean;
  private memoryTimer: NodeJS.Timeout | undefined;
  private taskset: string | undefined;
  private setpriv: string | undefined;
  private statsTimer: NodeJS.Timeout | undefined;
  /** Volumes and devices being removed or claimed (exclusive): not to be attached meanwhile. */
  private readonly held: Set<string>;
  private sampling: boolean;
  readonly cpus: number;
  readonly reserveCpu: number;
  readonly periodMs: number;
  private readonly maxSocketConnections: number;

  constructor(options: SupervisorOptions) {
    this.options = options;
    this.dir = join(options.dataDir, 'guests');
    this.guests = new Map();
    this.damagedGuests = new Map();
    this.closing = false;
    this.cgroups = undefined;
    this.cgroupsOpen = false;
    this.memoryTimer = undefined;
    this.taskset = undefined;
    this.setpriv = undefined;
    this.statsTimer = undefined;
    this.held = new Set();
    this.sampling = false;
    this.cpus = options.cpus ?? availableParallelism();
    this.reserveCpu = options.reserveCpu ?? 0.5;
    this.periodMs = options.periodMs ?? 100;
    this.maxSocketConnections = options.maxSocketConnections ?? 32;
  }

  /** How limits are enforced on this node: cgroup2, cgroup1 or signal. */
  get mode(): 'cgroup2' | 'cgroup1' | 'signal' {
    return this.cgroups?.mode ?? 'signal';
  }

  /** Cores guests together may have: the machine's less the node's reserve. */
  get cpuBudget(): number {
    return Math.max(0, this.cpus - this.reserveCpu);
  }

  /** Loads every definition; boots the guests that were running. A bad definition is listed, not loaded. */
  async open(): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    await this.openEnforcement();
    const taskset = await findCommand('taskset', process.env.PATH);
    this.taskset = typeof taskset === 'string' ? taskset : undefined;
    const setpriv = await findCommand('setpriv', process.env.PATH);
    this.setpriv = typeof setpriv === 'string' ? setpriv : undefined;
    for (const file of (await readdir(this.dir)).filter((f) => f.endsWith('.json')).sort()) {
      const name = file.slice(0, -'.json'.length);
      try {
        const guest = new Guest(await readGuestMeta(this.dir, name, this.options.fs));
        this.guests.set(name, guest);
      } catch (error) {
        const coded = toMemstrataError(error);
        this.damagedGuests.set(name, { name, file: join(this.dir, file), error: coded.toJSON() });
        this.options.log.error({ guest: name, code: coded.code, err: error }, `guest ${name} could not be loaded: ${coded.message}; its files stay as they are`);
      }
    }
    await this.cleanLeftovers();
    for (const guest of this.guests.values()) {
      if (!guest.definition.running) continue;
      try {
        // guests.reserveCpu may have grown since it ran: what no longer fits stays down, saying why.
        this.checkBudget(guest.definition.name, guest.definition.cpu);
      } catch (error) {
        guest.state = 'failed';
        guest.error = (error as Error).message;
        this.options.log.error({ guest: guest.definition.name }, `guest ${guest.definition.name} not started: ${guest.error}`);
        continue;
      }
      // A guest that cannot boot is failed, with the reason; it never keeps the node from starting.
      await this.serial(guest, () => this.boot(guest)).catch((error: unknown) => {
        guest.state = 'failed';
        guest.error = error instanceof Error ? error.message : String(error);
        this.options.log.error({ guest: guest.definition.name, err: error }, `guest ${guest.definition.name} cannot be started: ${guest.error}`);
      });
    }
    this.statsTimer = setInterval(() => { void this.sample(); }, STATS_INTERVAL_MS);
    this.statsTimer.unref();
    this.memoryTimer = setInterval(() => { void this.watchMemory(); }, MEMORY_WATCH_MS);
    this.memoryTimer.unref();
  }

  list(): GuestInfo[] {
    return [...this.guests.values()].map((g) => this.describe(g)).sort((a, b) => a.name.localeCompare(b.name));
  }

  damaged(): DamagedJson[] {
    return [...this.damagedGuests.values()];
  }

  info(name: string): GuestInfo {
    return this.describe(this.get(name));
  }

  /** Defines a guest and, unless `start` is false, boots it. */
  async create(request: { name: string; command: readonly string[]; env?: Record<string, string>; restart?: RestartPolicy; volumes?: readonly string[]; nvram?: readonly string[]; nvramQuota?: number | null; user?: string | null } & LimitChange, start = true): Promise<GuestInfo> {
    const { name, command } = request;
    if (!GUEST_NAME_PATTERN.test(name)) throw new MisuseError('MS_GUEST_INVALID', `invalid guest name ${JSON.stringify(name.slice(0, 80))}: expected ${GUEST_NAME_FORM}`, { details: { name } });
    if (command.length === 0 || command.some((arg) => arg.length === 0)) throw new MisuseError('MS_GUEST_INVALID', `guest ${name}: expected a command and its arguments, none of them empty`, { details: { name } });
    // What the definition file may hold (guest-meta.ts), so a guest defined is one that loads.
    if (command.length > 1024 || command.some((arg) => arg.length > 4096 || arg.includes('\0'))) throw new MisuseError('MS_GUEST_INVALID', `guest ${name}: at most 1024 arguments of at most 4096 characters, without NUL`, { details: { name } });
    for (const [key, value] of Object.entries(request.env ?? {})) {
      if (value.length > 65536 || value.includes('\0')) throw new MisuseError('MS_GUEST_INVALID', `guest ${name}: environment variable ${key}: at most 65536 characters, without NUL`, { details: { name } });
    }
    if ((request.volumes?.length ?? 0) > MAX_ATTACHED || (request.nvram?.length ?? 0) > MAX_ATTACHED) throw new MisuseError('MS_GUEST_INVALID', `guest ${name}: at most ${MAX_ATTACHED} volumes and ${MAX_ATTACHED} NVRAM devices`, { details: { name } });
    const restart = request.restart ?? 'on-failure';
    if (!RESTART_POLICIES.includes(restart)) throw new MisuseError('MS_GUEST_INVALID', `guest ${name}: restart policy ${JSON.stringify(restart)} is not one of ${RESTART_POLICIES.join(', ')}`, { details: { name } });
    for (const key of Object.keys(request.env ?? {})) {
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) throw new MisuseError('MS_GUEST_INVALID', `guest ${name}: ${JSON.stringify(key)} is not an environment variable name`, { details: { name } });
    }
    const user = request.user ?? null;
    if (user !== null) await this.account(name, user);
    // From here to the guest's registration nothing awaits: a create or attach running at
    // the same time sees its name, share and devices taken (or takes them first).
    if (this.guests.has(name) || this.damagedGuests.has(name)) throw new MisuseError('MS_GUEST_EXISTS', `a guest named ${name} already exists`, { details: { name } });
    const limits = this.checkLimits(name, { cpu: null, cores: null, memory: null }, request);
    if (start) this.checkBudget(name, limits.cpu);
    const volumes = [...new Set(request.volumes ?? [])];
    const nvram = [...new Set(request.nvram ?? [])];
    for (const volume of volumes) this.checkAttach(name, 'volume', volume);
    for (const device of nvram) this.checkAttach(name, 'nvram', device);
    this.checkSocketPath(name);
    const nvramQuota = request.nvramQuota ?? null;
    if (nvramQuota !== null && (!Number.isSafeInteger(nvramQuota) || nvramQuota < 0)) throw new MisuseError('MS_GUEST_INVALID', `guest ${name}: NVRAM quota ${String(nvramQuota)} is not a number of bytes`, { details: { name } });
    const definition: GuestDefinition = { name, command: [...command], env: { ...request.env }, restart, running: start, createdAt: new Date().toISOString(), ...limits, volumes, nvram, nvramQuota, ownNvram: [], user };
    const guest = new Guest(definition);
    // Starting: live at once, so its share counts for a create racing it.
    if (start) guest.state = 'booting';
    this.guests.set(name, guest);
    // In its queue from the start: a stop or set that arrives while it is saved waits.
    await this.serial(guest, async () => {
      try {
        await writeGuestMeta(this.dir, definition, this.options.fs);
      } catch (error) {
        this.guests.delete(name);
        throw error;
      }
      if (start) await this.boot(guest);
    });
    return this.describe(guest);
  }

  /** Changes a guest's CPU share, cores or memory limit, while it runs too. */
  async set(name: string, change: LimitChange): Promise<GuestInfo> {
    const guest = this.get(name);
    return this.serial(guest, async () => {
      const limits = this.checkLimits(name, guest.definition, change);
      if (guest.live) this.checkBudget(name, limits.cpu);
      const before = { cpu: guest.definition.cpu, cores: guest.definition.cores, memory: guest.definition.memory };
      const pid = guest.child?.pid;
      // The new share counts for other guests' budget checks from here (no await before);
      // enforced and persisted together, or neither: on a failure the old limits go back.
      Object.assign(guest.definition, limits);
      try {
        if (pid !== undefined) await this.enforce(guest, limits, pid);
        await writeGuestMeta(this.dir, guest.definition, this.options.fs);
      } catch (error) {
        Object.assign(guest.definition, before);
        if (pid !== undefined) await this.enforce(guest, before, pid).catch(() => undefined);
        throw error;
      }
      this.options.log.info({ guest: name, ...limits }, `guest ${name} limits set`);
      return this.describe(guest);
    });
  }

  /** Attaches a volume or NVRAM device: its cut-through sockets serve it from now on, while it runs too. */
  async attach(name: string, kind: DeviceKind, device: string): Promise<GuestInfo> {
    const guest = this.get(name);
    return this.serial(guest, () => this.attachNow(guest, kind, device));
  }

  private async attachNow(guest: Guest, kind: DeviceKind, device: string): Promise<GuestInfo> {
    const { name } = guest.definition;
    const list = kind === 'volume' ? guest.definition.volumes : guest.definition.nvram;
    if (!list.includes(device)) {
      if (list.length >= MAX_ATTACHED) throw new MisuseError('MS_GUEST_INVALID', `guest ${name} has ${MAX_ATTACHED} ${kind === 'volume' ? 'volumes' : 'NVRAM devices'}, the most a guest may have`, { details: { name } });
      this.checkAttach(name, kind, device);
      list.push(device);
      if (kind === 'nvram') guest.devices.add(device);
      try {
        await writeGuestMeta(this.dir, guest.definition, this.options.fs);
      } catch (error) {
        list.splice(list.indexOf(device), 1);
        guest.devices.delete(device);
        throw error;
      }
      this.options.log.info({ guest: name, [kind]: device }, `${kind === 'volume' ? 'volume' : 'NVRAM device'} ${device} attached to guest ${name}`);
    }
    return this.describe(guest);
  }

  /**
   * Detaches a volume or NVRAM device. A volume the guest has an NBD connection to is
   * refused (MS_VOLUME_BUSY), as removing a volume with clients is; journals the guest
   * has open on a device fail with not-found from then on.
   */
  async detach(name: string, kind: DeviceKind, device: string): Promise<GuestInfo> {
    const guest = this.get(name);
    return this.serial(guest, () => this.detachNow(guest, kind, device));
  }

  private async detachNow(guest: Guest, kind: DeviceKind, device: string): Promise<GuestInfo> {
    const { name } = guest.definition;
    const list = kind === 'volume' ? guest.definition.volumes : guest.definition.nvram;
    const at = list.indexOf(device);
    if (at < 0) throw new MisuseError(kind === 'volume' ? 'MS_VOLUME_NOT_FOUND' : 'MS_NVRAM_NOT_FOUND', `guest ${name} has no ${kind === 'volume' ? 'volume' : 'NVRAM device'} named ${JSON.stringify(device)} attached`, { details: { name, [kind]: device } });
    if (kind === 'volume' && guest.nbdSocket?.holding().includes(device) === true) {
      throw new RuntimeError('MS_VOLUME_BUSY', `guest ${name} has an NBD connection to volume ${device}; close it or stop the guest first`, { details: { name, volume: device } });
    }
    list.splice(at, 1);
    // Detached, a device the guest allocated is no longer its own: it may not remove it,
    // and it no longer counts against its quota.
    const owned = kind === 'nvram' ? guest.definition.ownNvram.indexOf(device) : -1;
    if (owned >= 0) guest.definition.ownNvram.splice(owned, 1);
    if (kind === 'nvram') guest.devices.delete(device);
    try {
      await writeGuestMeta(this.dir, guest.definition, this.options.fs);
    } catch (error) {
      list.splice(at, 0, device);
      if (owned >= 0) guest.definition.ownNvram.splice(owned, 0, device);
      if (kind === 'nvram') guest.devices.add(device);
      throw error;
    }
    this.options.log.info({ guest: name, [kind]: device }, `${kind === 'volume' ? 'volume' : 'NVRAM device'} ${device} detached from guest ${name}`);
    return this.describe(guest);
  }

  /**
   * Runs `fn` (the removal of a volume or device, or its claim as a write log) with the
   * name held: refused with MS_GUEST_ATTACHED if a guest has it, and no guest can attach
   * it until `fn` is done. The check and the hold are one synchronous step, as attach's
   * check and take are, so neither can slip between the other's.
   */
  async exclusive<T>(kind: DeviceKind, device: string, what: string, fn: () => Promise<T>): Promise<T> {
    const holder = this.holder(kind, device);
    if (holder !== undefined) {
      throw new RuntimeError('MS_GUEST_ATTACHED', `${kind === 'volume' ? 'volume' : 'NVRAM device'} ${device} is attached to guest ${holder} and cannot be ${what}; detach it first (memstrata guest detach ${holder} --${kind} ${device})`, { details: { [kind]: device, guest: holder } });
    }
    const key = `${kind}:${device}`;
    if (this.held.has(key)) {
      throw new RuntimeError('MS_GUEST_ATTACH_BUSY', `${kind === 'volume' ? 'volume' : 'NVRAM device'} ${device} is being removed, claimed or allocated; try again`, { details: { [kind]: device } });
    }
    this.held.add(key);
    try {
      return await fn();
    } finally {
      this.held.delete(key);
    }
  }

  /** The guest a volume or NVRAM device is attached to, if any (such a one may not be removed). */
  holder(kind: DeviceKind, device: string): string | undefined {
    for (const guest of this.guests.values()) {
      if ((kind === 'volume' ? guest.definition.volumes : guest.definition.nvram).includes(device)) return guest.definition.name;
    }
    return undefined;
  }

  /** Boots a stopped or failed guest, and keeps it running across node restarts. */
  async start(name: string): Promise<GuestInfo> {
    const guest = this.get(name);
    return this.serial(guest, async () => {
      if (!guest.live) {
        this.checkBudget(name, guest.definition.cpu);
        // Live from here (no await before): a start of another guest counts this share.
        const was = guest.state;
        guest.state = 'booting';
        try {
          await this.setRunning(guest, true);
        } catch (error) {
          guest.state = was;
          throw error;
        }
        guest.backoffMs = BACKOFF_MIN_MS;
        await this.boot(guest);
      } else {
        await this.setRunning(guest, true);
      }
      return this.describe(guest);
    });
  }

  /** Stops the guest's whole process tree (SIGTERM, then SIGKILL after the grace period). */
  async stop(name: string): Promise<GuestInfo> {
    const guest = this.get(name);
    return this.serial(guest, async () => {
      await this.setRunning(guest, false);
      await this.halt(guest, this.options.graceMs ?? 5000);
      return this.describe(guest);
    });
  }

  /** Kills the guest's tree at once and boots it again; nothing else is touched. */
  async reset(name: string): Promise<GuestInfo> {
    const guest = this.get(name);
    return this.serial(guest, async () => {
      // A guest that was not running starts by its reset: its share must fit, as for start,
      // and counts from here (no await before).
      if (!guest.live) {
        this.checkBudget(name, guest.definition.cpu);
        guest.state = 'booting';
      }
      await this.setRunning(guest, true);
      await this.halt(guest, 0);
      guest.resets++;
      guest.backoffMs = BACKOFF_MIN_MS;
      await this.boot(guest);
      return this.describe(guest);
    });
  }

  /** The last `maxBytes` of the guest's output (log.1, then log). */
  async logs(name: string, maxBytes: number): Promise<string> {
    this.get(name);
    const dir = join(this.dir, name);
    const parts = await Promise.all(['log.1', 'log'].map((f) => readFile(join(dir, f)).catch(() => Buffer.alloc(0))));
    const all = Buffer.concat(parts);
    return all.subarray(Math.max(0, all.length - maxBytes)).toString('utf8');
  }

  /**
   * The guest's output as it is written: the last `backlog` bytes of its log, then what
   * follows, read every 250 ms (through a rotation: the rest of the old file from log.1,
   * then the new log), until the stream is destroyed or the guest removed. A reader that
   * does not keep up is not read for: at most one 1 MiB piece waits in the stream.
   */
  followLogs(name: string, backlog = 64 * 1024): Readable {
    const guest = this.get(name);
    const dir = join(this.dir, name);
    let position = -1;
    let ino = -1;
    let busy = false;
    let wanted = true;
    const readFrom = async (path: string, from: number, to: number): Promise<Buffer> => {
      const handle = await open(path, 'r');
      try {
        const length = Math.min(to - from, 1024 * 1024);
        const buffer = Buffer.alloc(length);
        const { bytesRead } = await handle.read(buffer, 0, length, from);
        return buffer.subarray(0, bytesRead);
      } finally {
        await handle.close();
      }
    };
    const poll = async (): Promise<void> => {
      if (busy || !wanted || stream.destroyed) return;
      busy = true;
      try {
        if (!this.guests.has(name)) {
          stream.push(null);
          return;
        }
        const current = await stat(join(dir, 'log')).catch(() => undefined);
        if (current === undefined) return;
        if (position < 0) {
          position = Math.max(0, current.size - backlog);
          ino = current.ino;
        } else if (current.ino !== ino) {
          // Rotated: what the old file got after the last read is in log.1 now.
          const old = await stat(join(dir, 'log.1')).catch(() => undefined);
          if (old?.ino === ino && old.size > position) wanted = stream.push(await readFrom(join(dir, 'log.1'), position, old.size));
          position = 0;
          ino = current.ino;
        }
        if (current.size > position) {
          const chunk = await readFrom(join(dir, 'log'), position, current.size);
          position += chunk.length;
          if (chunk.length > 0) wanted = stream.push(chunk) && wanted;
        }
      } catch (error) {
        stream.destroy(error instanceof Error ? error : new Error(String(error)));
      } finally {
        busy = false;
      }
    };
    const timer = setInterval(() => { void poll(); }, 250);
    const stream = new Readable({
      read: () => {
        wanted = true;
      },
      destroy: (error, callback) => {
        clearInterval(timer);
        guest.followers.delete(stream);
        callback(error);
      },
    });
    stream.once('end', () => {
      clearInterval(timer);
      guest.followers.delete(stream);
    });
    guest.followers.add(stream);
    void poll();
    return stream;
  }

  /** Removes a stopped guest's definition, working directory and log. */
  async remove(name: string): Promise<void> {
    const guest = this.get(name);
    await this.serial(guest, async () => {
      if (guest.live) throw new RuntimeError('MS_GUEST_BUSY', `guest ${name} is ${guest.state}; stop it first`, { details: { name } });
      if (this.guests.get(name) !== guest) return;
      this.guests.delete(name);
      guest.out?.end();
      guest.out = undefined;
      await rm(join(this.dir, `${name}.json`), { force: true });
      await rm(join(this.dir, name), { recursive: true, force: true });
      if (this.cgroups !== undefined && this.cgroupsOpen) {
        await this.cgroups.guest(name).remove();
        if (this.guests.size === 0) await this.closeCgroups();
      }
    });
    // Outside the guest's queue: closing drains its connections, and a request on them
    // (a JCREATE) waits in that queue; it finds the guest gone and is refused.
    await this.closeSockets(guest);
    for (const follower of guest.followers) follower.push(null);
  }

  /** Node shutdown: every guest's tree stopped; their definitions say whether they boot at the next start. */
  async close(): Promise<void> {
    this.closing = true;
    clearInterval(this.statsTimer);
    clearInterval(this.memoryTimer);
    // In each guest's queue, so an operation under way finishes first (boot refuses once closing).
    await Promise.all([...this.guests.values()].map((g) => this.serial(g, () => this.halt(g, this.options.graceMs ?? 5000)).catch(() => undefined)));
    for (const guest of this.guests.values()) {
      guest.out?.end();
      // A follower would keep its response, and so the admin server, open.
      for (const follower of guest.followers) follower.push(null);
      await this.closeSockets(guest);
    }
    await this.closeCgroups();
  }

  /** Runs `fn` after every operation queued on the guest before it. */
  private serial<T>(guest: Guest, fn: () => Promise<T>): Promise<T> {
    const run = guest.queue.then(fn, fn);
    guest.queue = run.catch(() => undefined);
    return run;
  }

  /** The node's cgroups exist from the first boot of a guest. */
  private async openCgroups(): Promise<void> {
    if (this.cgroups === undefined || this.cgroupsOpen) return;
    await this.cgroups.open(this.cpuBudget, this.periodMs * 1000);
    this.cgroupsOpen = true;
  }

  /** Removes every guest's cgroup and the node's (those with processes left stay). */
  private async closeCgroups(): Promise<void> {
    if (this.cgroups === undefined || !this.cgroupsOpen) return;
    for (const name of await this.cgroups.children()) await this.cgroups.guest(name).remove();
    await this.cgroups.remove();
    this.cgroupsOpen = false;
  }

  /**
   * After a node was killed: processes left in its guests' cgroups are killed (each guest
   * boots again from scratch), and cgroups of guests that no longer exist are removed.
   */
  private async cleanLeftovers(): Promise<void> {
    if (this.cgroups === undefined || !this.cgroupsOpen) return;
    for (const name of await this.cgroups.children()) {
      const cgroup = this.cgroups.guest(name);
      const pids = await cgroup.procs();
      if (pids.length > 0) this.options.log.warn({ guest: name, pids }, `guest ${name}: killing ${pids.length} process(es) left from before the node restarted`);
      await emptyCgroup(cgroup);
      if (!this.guests.has(name)) await cgroup.remove();
    }
    if (this.guests.size === 0) {
      await this.closeCgroups();
      return;
    }
    // Kept for the guests: the total and the guests' quotas set again (the reserve may
    // have changed; v1 refuses a parent quota below a child's, open clears those first).
    await this.cgroups.open(this.cpuBudget, this.periodMs * 1000).catch((error: unknown) => {
      this.cgroupsOpen = false;
      this.options.log.warn({ err: error }, 'guests: the cgroups a killed node left could not be set again; the first guest to boot will try');
    });
  }

  private describe(guest: Guest): GuestInfo {
    const { cpu, cores, memory } = guest.definition;
    const enforcement: Enforcement = this.cgroups !== undefined ? this.cgroups.mode : cpu !== null || cores !== null || memory !== null ? 'signal' : 'none';
    return guest.info(enforcement, this.nvramOwned(guest));
  }

  private checkAttach(name: string, kind: DeviceKind, device: string): void {
    const host = this.options.cutThrough;
    if (host === undefined) throw new MisuseError('MS_GUEST_INVALID', `guest ${name}: this node serves no cut-through devices`, { details: { name } });
    if (this.held.has(`${kind}:${device}`)) {
      throw new RuntimeError('MS_GUEST_ATTACH_BUSY', `${kind === 'volume' ? 'volume' : 'NVRAM device'} ${device} is being removed or claimed as a write log and cannot be attached now`, { details: { name, [kind]: device } });
    }
    host.check(kind, device);
    const holder = this.holder(kind, device);
    if (holder !== undefined && holder !== name) {
      throw new RuntimeError('MS_GUEST_ATTACHED', `${kind === 'volume' ? 'volume' : 'NVRAM device'} ${device} is attached to guest ${holder}; detach it there first`, { details: { name, [kind]: device, guest: holder } });
    }
  }

  private checkSocketPath(name: string): void {
    const longest = Buffer.byteLength(join(this.dir, name, 'rmem.sock'));
    if (longest > MAX_SOCKET_PATH) {
      throw new MisuseError('MS_GUEST_INVALID', `guest ${name}: its cut-through socket ${join(this.dir, name, 'rmem.sock')} would be ${longest} bytes long, more than the ${MAX_SOCKET_PATH} a Unix socket path may have; use a shorter name or data directory`, { details: { name } });
    }
  }

  /** Opens the guest's cut-through sockets (once; they stay open across its restarts). */
  private async openSockets(guest: Guest, dir: string): Promise<void> {
    const host = this.options.cutThrough;
    if (host === undefined) return;
    const { name } = guest.definition;
    if (guest.nbdSocket === undefined) {
      const catalog: ExportCatalog = {
        list: () => guest.definition.volumes.map((v) => host.findVolume(v)).filter((v): v is Volume => v !== undefined),
        find: (wanted) => {
          const volumes = guest.definition.volumes;
          // The empty export name selects the guest's volume when it has exactly one.
          const volume = wanted === '' && volumes.length === 1 ? volumes[0] : wanted;
          return volume !== undefined && volume !== '' && volumes.includes(volume) ? host.findVolume(volume) : undefined;
        },
      };
      guest.nbdSocket = await host.listenNbd(join(dir, 'nbd.sock'), catalog, `guest:${name}`, this.maxSocketConnections);
    }
    guest.rmemSocket ??= await host.listenRmem(join(dir, 'rmem.sock'), {
      client: `guest:${name}`,
      serverPrefix: `guest:${name}/`,
      devices: () => guest.devices,
      createDevice: (device, size, policy) => this.serial(guest, () => this.createOwnDevice(guest, device, size, policy)),
      removeDevice: (device) => this.serial(guest, () => this.removeOwnDevice(guest, device)),
    }, this.maxSocketConnections);
  }

  /**
   * The account a guest runs as: its uid, gid and home (getent passwd). Another user than
   * the node's own needs a node running as root, and setpriv (util-linux) to become it.
   */
  private async account(name: string, user: string): Promise<{ uid: number; gid: number; home: string }> {
    const invalid = (why: string): MisuseError => new MisuseError('MS_GUEST_INVALID', `guest ${name}: cannot run as user ${JSON.stringify(user)}: ${why}`, { details: { name, user } });
    let entry: string;
    try {
      entry = (await execFileAsync('getent', ['passwd', user], { timeout: 5000 })).stdout.trim();
    } catch {
      throw invalid('no such user');
    }
    const [, , uid = '', gid = '', , home = '/'] = entry.split(':');
    const account = { uid: Number(uid), gid: Number(gid), home };
    if (!Number.isInteger(account.uid) || !Number.isInteger(account.gid)) throw invalid('its passwd entry cannot be read');
    if (account.uid !== process.getuid?.()) {
      if (process.getuid?.() !== 0) throw invalid('only a node running as root can run a guest as another user');
      if (this.setpriv === undefined) throw invalid('setpriv (util-linux) is not installed');
    }
    return account;
  }

  /** What the guest's own devices take (their sizes as created, whole extents). */
  private nvramOwned(guest: Guest): number {
    const host = this.options.cutThrough;
    return host === undefined ? 0 : guest.definition.ownNvram.reduce((sum, d) => sum + (host.nvramSize(d) ?? 0), 0);
  }

  /**
   * JCREATE from the guest's socket: a device of its own, attached to it, within its
   * quota. Made first and removed again if its size (rounded up to whole extents) does
   * not fit, so the quota holds for the size the device really takes.
   */
  private async createOwnDevice(guest: Guest, device: string, size: number, policy: Policy): Promise<void> {
    const host = this.options.cutThrough;
    const { name, nvramQuota } = guest.definition;
    if (host === undefined || this.guests.get(name) !== guest) throw new MisuseError('MS_RMEM_UNSUPPORTED', `guest ${name} is removed or this node serves no cut-through devices`);
    if (guest.definition.nvram.length >= MAX_ATTACHED) throw new RuntimeError('MS_GUEST_NVRAM_QUOTA', `guest ${name} has ${MAX_ATTACHED} NVRAM devices, the most a guest may have`, { details: { name } });
    const quotaError = (wanted: number): RuntimeError => new RuntimeError('MS_GUEST_NVRAM_QUOTA', `guest ${name}: a ${wanted}-byte NVRAM device would bring its own devices to ${this.nvramOwned(guest) + wanted} bytes, more than its quota of ${nvramQuota ?? 0}`, { details: { name, device, quota: nvramQuota ?? 0 } });
    if (host.nvramSize(device) !== undefined) throw new MisuseError('MS_NVRAM_EXISTS', `an NVRAM device named ${device} already exists`, { details: { name: device } });
    if (nvramQuota === null || this.nvramOwned(guest) + size > nvramQuota) throw quotaError(size);
    // Held from its creation to its attachment here, so no other guest can attach it between.
    await this.exclusive('nvram', device, 'allocated', () => this.allocate(guest, device, size, policy, quotaError));
  }

  private async allocate(guest: Guest, device: string, size: number, policy: Policy, quotaError: (wanted: number) => RuntimeError): Promise<void> {
    const host = this.options.cutThrough;
    const { name, nvramQuota } = guest.definition;
    if (host === undefined || nvramQuota === null) return;
    const created = await host.createNvram(device, size, policy);
    if (this.nvramOwned(guest) + created > nvramQuota) {
      await host.removeNvram(device).catch(() => undefined);
      throw quotaError(created);
    }
    guest.definition.nvram.push(device);
    guest.definition.ownNvram.push(device);
    guest.devices.add(device);
    try {
      await writeGuestMeta(this.dir, guest.definition, this.options.fs);
    } catch (error) {
      guest.definition.nvram.splice(guest.definition.nvram.indexOf(device), 1);
      guest.definition.ownNvram.splice(guest.definition.ownNvram.indexOf(device), 1);
      guest.devices.delete(device);
      await host.removeNvram(device).catch(() => undefined);
      throw error;
    }
    this.options.log.info({ guest: name, device, size: created, policy }, `guest ${name} allocated NVRAM device ${device}`);
  }

  /** JREMOVE from the guest's socket: one of the devices it allocated itself goes. */
  private async removeOwnDevice(guest: Guest, device: string): Promise<void> {
    const host = this.options.cutThrough;
    const { name } = guest.definition;
    if (host === undefined || this.guests.get(name) !== guest || !guest.definition.ownNvram.includes(device) || !guest.devices.has(device)) throw new MisuseError('MS_NVRAM_NOT_FOUND', `no NVRAM device named "${device}"`, { details: { name: device } });
    await host.removeNvram(device);
    guest.definition.nvram = guest.definition.nvram.filter((d) => d !== device);
    guest.definition.ownNvram = guest.definition.ownNvram.filter((d) => d !== device);
    guest.devices.delete(device);
    await writeGuestMeta(this.dir, guest.definition, this.options.fs);
    this.options.log.info({ guest: name, device }, `guest ${name} removed its NVRAM device ${device}`);
  }

  private async closeSockets(guest: Guest): Promise<void> {
    const sockets = [guest.nbdSocket, guest.rmemSocket];
    guest.nbdSocket = undefined;
    guest.rmemSocket = undefined;
    await Promise.all(sockets.map((s) => s?.close() ?? Promise.resolve()));
  }

  /** What a guest's environment says of its cut-through devices. */
  private deviceEnv(guest: Guest): Record<string, string> {
    const host = this.options.cutThrough;
    if (host === undefined || guest.nbdSocket === undefined || guest.rmemSocket === undefined) return {};
    const tcp = host.tcp();
    return {
      MEMSTRATA_CTD_SOCKET: guest.nbdSocket.path,
      MEMSTRATA_CTD_VOLUMES: guest.definition.volumes.join(','),
      MEMSTRATA_NVRAM_SOCKET: guest.rmemSocket.path,
      MEMSTRATA_NVRAM_DEVICES: guest.definition.nvram.join(','),
      MEMSTRATA_NVRAM_PATHS: [`unix:${guest.rmemSocket.path}`, `tcp:${tcp.rmem}`].join(','),
      MEMSTRATA_NBD_TCP: tcp.nbd,
    };
  }

  /** Validates a change of limits against the machine; returns the limits it makes. */
  private checkLimits(name: string, current: Pick<GuestDefinition, 'cpu' | 'cores' | 'memory'>, change: LimitChange): Pick<GuestDefinition, 'cpu' | 'cores' | 'memory'> {
    const limits = {
      cpu: change.cpu === undefined ? current.cpu : change.cpu,
      cores: change.cores === undefined ? current.cores : change.cores,
      memory: change.memory === undefined ? current.memory : change.memory,
    };
    const invalid = (message: string): MisuseError => new MisuseError('MS_GUEST_INVALID', `guest ${name}: ${message}`, { details: { name } });
    const { cpu, cores, memory } = limits;
    if (cpu !== null && (typeof cpu !== 'number' || !Number.isFinite(cpu) || cpu < 0.01 || cpu > this.cpus)) {
      throw invalid(`CPU share ${String(cpu)} is not a fraction of a core from 0.01 to ${this.cpus} (this machine's cores)`);
    }
    if (cores !== null && (!Number.isInteger(cores) || cores < 1 || cores >= this.cpus)) {
      throw invalid(this.cpus === 1 ? 'cores cannot be set on a machine with one core' : `cores ${String(cores)} is not a whole number from 1 to ${this.cpus - 1} (fewer than this machine's ${this.cpus})`);
    }
    if (cpu !== null && cpu * this.periodMs < 1) {
      throw invalid(`CPU share ${cpu} is less than 1 ms in each ${this.periodMs} ms period (guests.period), the least the kernel schedules; the smallest share here is ${round3(1 / this.periodMs)}`);
    }
    if (cpu !== null && cores !== null && cpu > cores) throw invalid(`CPU share ${cpu} is more than its ${cores} core${cores === 1 ? '' : 's'} can give`);
    if (memory !== null && (!Number.isSafeInteger(memory) || memory < 1024 * 1024)) throw invalid(`memory limit ${String(memory)} is not a whole number of bytes of at least 1 MiB`);
    if (cores !== null && this.cgroups?.cpuset !== true && this.taskset === undefined) {
      throw invalid('cores cannot be enforced here: no cpuset cgroup is writable and taskset (util-linux) is not installed');
    }
    return limits;
  }

  /** The shares of the guests that are to run may not pass the node's budget. */
  private checkBudget(name: string, cpu: number | null): void {
    if (cpu === null) return;
    const holders = [...this.guests.values()].filter((g) => g.definition.name !== name && g.live && g.definition.cpu !== null);
    const others = holders.reduce((sum, g) => sum + (g.definition.cpu ?? 0), 0);
    // Rounded to a thousandth of a core, so 0.1 + 0.2 fits in 0.3.
    if (Math.round((others + cpu) * 1000) > Math.round(this.cpuBudget * 1000)) {
      const held = holders.map((g) => `${g.definition.name} ${g.definition.cpu ?? 0}`).join(', ');
      throw new MisuseError('MS_GUEST_CPU_BUDGET', `guest ${name}: a CPU share of ${cpu} would bring the running guests' shares to ${round3(others + cpu)} cores, more than the ${round3(this.cpuBudget)} left after guests.reserveCpu (${this.reserveCpu}) of this machine's ${this.cpus}${held === '' ? '' : ` (held: ${held})`}`, {
        details: { name, cpu, others: round3(others), budget: round3(this.cpuBudget) },
      });
    }
  }

  private limitsOf(definition: Pick<GuestDefinition, 'cpu' | 'cores' | 'memory'>): GuestLimits {
    return { cpu: definition.cpu, cpus: coreList(definition.cores, this.cpus), memory: definition.memory };
  }

  /** Applies limits to a running guest. */
  private async enforce(guest: Guest, definition: Pick<GuestDefinition, 'cpu' | 'cores' | 'memory'>, pid: number): Promise<void> {
    const limits = this.limitsOf(definition);
    try {
      if (guest.cgroup !== undefined) await guest.cgroup.apply(limits, this.periodMs * 1000);
      if (this.cgroups?.cpuset !== true && this.taskset !== undefined) {
        const pids = guest.cgroup !== undefined ? await guest.cgroup.procs() : groupMembers(await scanProcesses(), pid).map((s) => s.pid);
        const list = (limits.cpus ?? allCores(this.cpus)).join(',');
        await Promise.all(pids.map((p) => execFileAsync(this.taskset ?? 'taskset', ['-a', '-p', '-c', list, String(p)]).catch(() => undefined)));
      }
    } catch (error) {
      throw new RuntimeError('MS_GUEST_LIMIT_FAILED', `guest ${guest.definition.name}: the kernel refused its limits: ${(error as Error).message}`, { cause: error, details: { name: guest.definition.name } });
    }
    // The guest may have exited (and booted again) while the kernel was being told.
    if (guest.child?.pid !== pid) return;
    if (guest.cgroup === undefined) {
      if (limits.cpu === null) {
        guest.duty?.stop();
        if (guest.duty !== undefined) guest.throttledBefore += guest.duty.throttledSeconds;
        guest.duty = undefined;
      } else if (guest.duty === undefined) {
        guest.duty = new DutyCycle(pid, limits.cpu, this.periodMs);
        guest.duty.start();
      } else {
        guest.duty.set(limits.cpu, this.periodMs);
      }
    }
  }

  private async openEnforcement(): Promise<void> {
    const wanted = this.options.enforcement ?? 'auto';
    // Named by node id and data directory: stable across restarts (so leftovers are found),
    // distinct for two nodes on one machine.
    const nodeId = `${this.options.nodeId?.() ?? 'node'}-${createHash('sha256').update(this.options.dataDir).digest('hex').slice(0, 8)}`;
    const reasons: string[] = [];
    if (wanted !== 'signal') {
      const layout = await readCgroupLayout().catch(() => ({ v2: undefined, v1: {} }));
      const attempts: ['cgroup2' | 'cgroup1', () => Promise<CgroupHost>][] = [
        ['cgroup2', () => (layout.v2 === undefined ? Promise.reject(new Error('no cgroup v2 hierarchy is mounted')) : openCgroupV2(layout.v2, nodeId))],
        ['cgroup1', () => openCgroupV1(layout.v1, nodeId)],
      ];
      for (const [mode, open] of attempts) {
        if (wanted !== 'auto' && wanted !== mode) continue;
        try {
          const host = await open();
          this.cgroups = host;
          // Made at the first boot; there now only if a node that was killed left them.
          this.cgroupsOpen = await host.exists();
          this.options.log.info({ enforcement: mode, where: host.where, memory: host.memory, cpuset: host.cpuset, budget: this.cpuBudget }, `guests: limits enforced by ${mode} under ${host.where}`);
          return;
        } catch (error) {
          reasons.push(`${mode}: ${(error as Error).message}`);
        }
      }
      if (wanted !== 'auto') {
        throw new MisuseError('MS_CONFIG_INVALID', `invalid configuration: guests.enforcement is ${wanted}, which this machine cannot give (${reasons.join('; ')})`, { details: { field: 'guests.enforcement' } });
      }
    }
    this.options.log[wanted === 'signal' ? 'info' : 'warn']({ enforcement: 'signal', reasons }, `guests: limits enforced by signals (SIGSTOP/SIGCONT duty cycle, RSS watch)${reasons.length > 0 ? `; no cgroup: ${reasons.join('; ')}` : ''}`);
  }

  /**
   * Where no memory cgroup holds a guest: its tree's memory (Pss) is checked against its
   * limit five times a second; past it, the group is killed and the guest left failed.
   */
  private async watchMemory(): Promise<void> {
    if (this.closing || this.cgroups?.memory === true) return;
    for (const guest of this.guests.values()) {
      const pid = guest.child?.pid;
      const limit = guest.definition.memory;
      if (pid === undefined || limit === null || guest.overMemory !== null) continue;
      const members = (await treeMembers(pid, pid)) ?? (await scanProcesses()).filter((s) => s.pgrp === pid);
      const used = await memoryBytes(members);
      if (used <= limit || guest.child?.pid !== pid) continue;
      guest.memoryBytes = used;
      guest.overMemory = `killed: its processes used ${used} bytes of memory, more than its limit of ${limit}`;
      this.options.log.error({ guest: guest.definition.name, memory: used, limit }, `guest ${guest.definition.name} ${guest.overMemory}`);
      killGroup(pid, 'SIGKILL');
      guest.duty?.stop();
    }
  }

  /** Reads every running guest's figures; stops a guest past its memory limit where no cgroup does. */
  private async sample(): Promise<void> {
    if (this.sampling || this.closing) return;
    this.sampling = true;
    try {
      const running = [...this.guests.values()].filter((g) => g.child?.pid !== undefined);
      if (running.length === 0) return;
      const needProc = this.cgroups === undefined || !this.cgroups.memory || running.some((g) => g.cgroup === undefined);
      const groups = needProc || this.cgroups?.mode === 'cgroup1' ? byGroup(await scanProcesses()) : new Map<number, ProcSample[]>();
      const now = performance.now();
      for (const guest of running) {
        const pid = guest.child?.pid;
        if (pid === undefined) continue;
        const members = groups.get(pid);
        const procCpu = guest.cpuBefore + guest.runCpu.update(members);
        let cpuSeconds = procCpu;
        let throttled = guest.throttledBefore + (guest.duty?.throttledSeconds ?? 0);
        let memory = guest.memoryBytes;
        if (guest.cgroup !== undefined) {
          const usage = await guest.cgroup.usage().catch(() => undefined);
          if (usage !== undefined) {
            cpuSeconds = usage.cpuSeconds ?? procCpu;
            throttled = usage.throttledSeconds;
            if (this.cgroups?.memory === true) memory = usage.memoryBytes;
          }
        }
        if (guest.sampledAt > 0) guest.cpuUsed = Math.max(0, (cpuSeconds - guest.cpuSeconds) / ((now - guest.sampledAt) / 1000));
        guest.sampledAt = now;
        guest.cpuSeconds = Math.max(guest.cpuSeconds, cpuSeconds);
        guest.throttledSeconds = Math.max(guest.throttledSeconds, throttled);
        guest.memoryBytes = this.cgroups?.memory === true ? memory : await memoryBytes(members ?? []);
      }
    } finally {
      this.sampling = false;
    }
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
    // Booting from here, before any await: its share counts for other guests' checks.
    guest.state = 'booting';
    // Private: its sockets are in it.
    await mkdir(cwd, { recursive: true, mode: 0o700 });
    guest.error = null;
    guest.halting = false;
    guest.overMemory = null;
    try {
      await this.openSockets(guest, cwd);
    } catch (error) {
      guest.state = 'failed';
      guest.error = `cannot open its cut-through sockets: ${(error as Error).message}`;
      this.options.log.error({ guest: name, err: error }, `guest ${name} cannot be started: ${guest.error}`);
      return;
    }
    // Another user: its directory and sockets become its own, its home and name in the environment.
    let account: { uid: number; gid: number; home: string } | undefined;
    const user = guest.definition.user;
    let workdir = cwd;
    if (user !== null) {
      try {
        account = await this.account(name, user);
        // The guest's directory stays the node's (mode 0711: reachable, not writable), so the
        // node's own files there (log, sockets) are never the guest's to replace with a link
        // or a FIFO; the guest works in home/, which is its own. Nothing here follows links.
        await chmod(cwd, 0o711);
        workdir = join(cwd, 'home');
        await mkdir(workdir, { recursive: true, mode: 0o700 });
        await lchown(workdir, account.uid, account.gid);
        for (const socket of [guest.nbdSocket, guest.rmemSocket]) if (socket !== undefined) await lchown(socket.path, account.uid, account.gid);
        if (account.uid !== process.getuid?.() && this.setpriv !== undefined && guest.rmemSocket !== undefined) {
          // Its sockets are reached by absolute path: every directory above must let it through.
          await execFileAsync(this.setpriv, [`--reuid=${account.uid}`, `--regid=${account.gid}`, '--init-groups', '--', 'test', '-w', guest.rmemSocket.path], { timeout: 5000 }).catch(() => {
            throw new Error(`user ${user} cannot reach ${guest.rmemSocket?.path ?? 'its sockets'}: every directory above the data directory's guests/ must be traversable by it (chmod o+x)`);
          });
        }
      } catch (error) {
        guest.state = 'failed';
        guest.error = (error as Error).message;
        this.options.log.error({ guest: name, err: error }, `guest ${name} cannot be started: ${guest.error}`);
        return;
      }
    }
    const who = user === null || account === undefined ? {} : { HOME: account.home, USER: user, LOGNAME: user };
    const guestEnv = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: process.env.HOME ?? cwd, ...who, ...env, ...this.deviceEnv(guest), MEMSTRATA_GUEST: name };
    const [file = '', ...args] = command;
    // Through a wrapper (sh, taskset) the command's own ENOENT would be an exit code:
    // looked up first, so a command that does not exist still fails at once.
    const found = await findCommand(file, guestEnv.PATH, workdir);
    if (typeof found !== 'string') {
      guest.state = 'failed';
      guest.error = `cannot run ${file}: ${found.error}`;
      this.options.log.error({ guest: name }, `guest ${name} cannot be started: ${guest.error}`);
      return;
    }
    const limits = this.limitsOf(guest.definition);
    let argv = [file, ...args];
    // Last before the command: the wrappers before it (cgroup join, taskset) need the node's rights.
    if (account !== undefined && account.uid !== process.getuid?.() && this.setpriv !== undefined) {
      argv = [this.setpriv, `--reuid=${account.uid}`, `--regid=${account.gid}`, '--init-groups', '--', ...argv];
    }
    if (limits.cpus !== null && this.cgroups?.cpuset !== true && this.taskset !== undefined) argv = [this.taskset, '-c', limits.cpus.join(','), ...argv];
    if (this.cgroups !== undefined) {
      try {
        await this.openCgroups();
        guest.cgroup = this.cgroups.guest(name);
        await guest.cgroup.prepare(limits, this.periodMs * 1000);
      } catch (error) {
        guest.state = 'failed';
        guest.error = `cannot set up its cgroup: ${(error as Error).message}`;
        this.options.log.error({ guest: name, err: error }, `guest ${name} cannot be started: ${guest.error}`);
        return;
      }
      const files = guest.cgroup?.joinFiles() ?? [];
      argv = ['/bin/sh', '-c', JOIN_SCRIPT, 'memstrata-guest', String(files.length), ...files, ...argv];
    }
    const [program = '', ...programArgs] = argv;
    let child: ChildProcess;
    try {
      child = spawn(program, programArgs, {
        cwd: workdir,
        detached: true, // its own process group: stop and reset reach the whole tree
        stdio: ['ignore', 'pipe', 'pipe'],
        env: guestEnv,
      });
    } catch (error) {
      // Refused before any process exists (an argument the kernel cannot take).
      guest.state = 'failed';
      guest.error = `cannot run ${file}: ${(error as Error).message}`;
      this.options.log.error({ guest: name, err: error }, `guest ${name} cannot be started: ${guest.error}`);
      return;
    }
    guest.child = child;
    guest.startedAt = Date.now();
    guest.runCpu = new GroupCpu();
    guest.sampledAt = 0;
    guest.cpuUsed = null;
    guest.duty?.stop();
    guest.duty = undefined;
    if (child.pid !== undefined && guest.cgroup === undefined && limits.cpu !== null) {
      guest.duty = new DutyCycle(child.pid, limits.cpu, this.periodMs);
      guest.duty.start();
    }
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
        // Children that outlived the leader go with it (and, in a cgroup, those that left its group).
        killGroup(child.pid, 'SIGKILL');
        void guest.cgroup?.procs().then((pids) => { for (const pid of pids) killPid(pid, 'SIGKILL'); });
        if (guest.duty !== undefined) {
          guest.duty.stop();
          guest.throttledBefore += guest.duty.throttledSeconds;
          guest.duty = undefined;
        }
        guest.cpuBefore = guest.cpuSeconds;
        // Its rmem sessions die with it, so the next boot can open the same server ids.
        this.options.cutThrough?.guestEnded(name);
        // The cgroup's counter outlives the run: read it once more for what the last second used.
        const cgroup = guest.cgroup;
        if (cgroup !== undefined) {
          void cgroup.usage().then((usage) => {
            if (usage.cpuSeconds !== null) guest.cpuSeconds = Math.max(guest.cpuSeconds, usage.cpuSeconds);
            guest.throttledSeconds = Math.max(guest.throttledSeconds, usage.throttledSeconds);
            guest.cpuBefore = guest.cpuSeconds;
          }, () => undefined);
        }
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
    if (guest.overMemory !== null) {
      // Stopped for good, as if asked to: it does not boot again at the next node start either.
      guest.state = 'failed';
      guest.error = guest.overMemory;
      void this.setRunning(guest, false).catch(() => undefined);
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
      void this.serial(guest, async () => {
        if (guest.state === 'booting' && guest.child === undefined && !guest.halting) await this.boot(guest);
      }).catch((error: unknown) => {
        guest.state = 'failed';
        guest.error = String(error);
      });
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
    // A group the duty cycle stopped must run to take its SIGTERM.
    guest.duty?.stop();
    if (graceMs > 0) killGroup(child.pid, 'SIGCONT');
    let timer: NodeJS.Timeout | undefined;
    if (graceMs > 0) timer = setTimeout(() => { killGroup(child.pid, 'SIGKILL'); }, graceMs);
    await guest.exited;
    clearTimeout(timer);
    await emptyCgroup(guest.cgroup);
    guest.state = 'stopped';
  }

  private logTo(guest: Guest, child: ChildProcess): void {
    const limit = this.options.logBytes ?? 1024 * 1024;
    const path = join(this.dir, guest.definition.name, 'log');
    // Never through a link: a guest that put one where its log goes gets no log, not a
    // write by the node somewhere else.
    const open = (append: boolean): WriteStream | undefined => {
      const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_NOFOLLOW | constants.O_NONBLOCK | (append ? constants.O_APPEND : constants.O_TRUNC);
      let fd: number;
      try {
        // O_NONBLOCK: a FIFO put there does not hold the open (nor a thread of the pool).
        fd = openSync(path, flags, 0o644);
        if (!fstatSync(fd).isFile()) {
          closeSync(fd);
          throw new Error('not a regular file');
        }
      } catch (error) {
        this.options.log.warn({ guest: guest.definition.name, err: error }, `guest ${guest.definition.name}: its log cannot be opened; its output is dropped`);
        return undefined;
      }
      const stream = createWriteStream('', { fd });
      stream.on('error', (error) => {
        this.options.log.warn({ guest: guest.definition.name, err: error }, `guest ${guest.definition.name}: its log cannot be written; its output is dropped`);
        if (guest.out === stream) guest.out = undefined;
        child.stdout?.resume();
        child.stderr?.resume();
      });
      return stream;
    };
    guest.out ??= open(true);
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
        guest.out = open(false);
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

function killPid(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // Gone.
  }
}

/** Kills what is left in a guest's cgroup (processes that left its group) and waits, up to 2 s, for it to empty. */
async function emptyCgroup(cgroup: GuestCgroup | undefined): Promise<void> {
  if (cgroup === undefined) return;
  const deadline = Date.now() + 2000;
  for (;;) {
    const pids = await cgroup.procs();
    if (pids.length === 0 || Date.now() > deadline) return;
    for (const pid of pids) killPid(pid, 'SIGKILL');
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

function groupMembers(samples: readonly ProcSample[], pgid: number): ProcSample[] {
  return samples.filter((s) => s.pgrp === pgid);
}

function round3(n: number): number {
  return Math.round(n * 1000) / 1000;
}

function allCores(cpus: number): number[] {
  return Array.from({ length: cpus }, (_, i) => i);
}

/** A guest's N cores: the machine's last N, so CPU 0, where much of the system's own work lands, is the last any guest gets. */
export function coreList(cores: number | null, cpus: number): number[] | null {
  return cores === null ? null : allCores(cpus).slice(cpus - cores);
}

/** Finds an executable as execvp would: a path with a slash as it is (from cwd), else on PATH; or says why there is none. */
async function findCommand(file: string, path: string | undefined, cwd = process.cwd()): Promise<string | { error: string }> {
  const candidates = file.includes('/') ? [isAbsolute(file) ? file : join(cwd, file)] : (path ?? '').split(delimiter).filter((d) => d !== '').map((d) => join(d, file));
  let why = `ENOENT, no such file${file.includes('/') ? '' : ' on PATH'}`;
  for (const candidate of candidates) {
    try {
      const info = await stat(candidate);
      if (info.isDirectory()) {
        why = `EACCES, ${candidate} is a directory`;
        continue;
      }
      await access(candidate, constants.X_OK);
      return candidate;
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === 'EACCES') why = `EACCES, ${candidate} is not executable`;
    }
  }
  return { error: why };
}

function killGroup(pid: number | undefined, signal: NodeJS.Signals): void {
  if (pid === undefined) return;
  try {
    process.kill(-pid, signal);
  } catch {
    // The group is gone.
  }
}
