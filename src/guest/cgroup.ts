// Control groups for guests: where the kernel enforces a guest's CPU share, cores and
// memory limit, counts its CPU time, throttling and memory, and knows every process it
// started (no process leaves a cgroup by changing its process group).
//
//   <node's own cgroup>/memstrata-<nodeId>/       the node's guests together; its CPU
//                                                  quota is (cores - guests.reserveCpu)
//   <node's own cgroup>/memstrata-<nodeId>/g-<guest>/   one guest
//
// The node's own cgroup is read from /proc/self/cgroup for each hierarchy, so a node that
// runs in a delegated cgroup (a container, a systemd unit) nests its guests inside it.
//
// cgroup v2 (one hierarchy): cpu.max "QUOTA PERIOD", memory.max, cpuset.cpus; figures from
// cpu.stat (usage_usec, throttled_usec) and memory.current. The node's cgroup must be able
// to delegate the cpu controller (cgroup.subtree_control); where it cannot (a cgroup with
// processes in it that is not the root), v2 is not used.
// cgroup v1 (a hierarchy per controller, as on the development machines):
// cpu.cfs_quota_us/cpu.cfs_period_us, memory.limit_in_bytes, cpuset.cpus (with cpuset.mems
// copied from the parent, which a v1 cpuset needs before it takes a process); figures from
// cpuacct.usage, cpu.stat throttled_time and memory.usage_in_bytes.
//
// A guest joins its cgroups before its command runs: it is spawned through /bin/sh, which
// writes its own pid to each cgroup.procs and then execs the command (joinScript), so no
// child it forks can start outside.

import { mkdir, readFile, rmdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

export type CgroupMode = 'cgroup2' | 'cgroup1';
const V1_CONTROLLERS = ['cpu', 'cpuacct', 'memory', 'cpuset'] as const;
type V1Controller = (typeof V1_CONTROLLERS)[number];

export interface GuestLimits {
  /** A fraction of one core, or null for no limit of its own. */
  cpu: number | null;
  /** The CPUs it may run on, or null for all. */
  cpus: number[] | null;
  /** Bytes, or null for none. */
  memory: number | null;
}

export interface CgroupUsage {
  /** null where no hierarchy counts CPU time (v1 without cpuacct). */
  cpuSeconds: number | null;
  throttledSeconds: number;
  memoryBytes: number;
}

/** Where this process's cgroups are (mountinfo + /proc/self/cgroup). */
export interface CgroupLayout {
  /** The node's own v2 cgroup directory, if a v2 hierarchy is mounted. */
  v2: string | undefined;
  /** The node's own v1 cgroup directory per controller that is mounted. */
  v1: Partial<Record<V1Controller, string>>;
}

/** Reads the mount table and the node's own cgroup paths. `proc` is /proc (tests give another). */
export async function readCgroupLayout(proc = '/proc'): Promise<CgroupLayout> {
  const [mountinfo, own] = await Promise.all([readFile(join(proc, 'self/mountinfo'), 'utf8'), readFile(join(proc, 'self/cgroup'), 'utf8')]);
  return parseCgroupLayout(mountinfo, own);
}

export function parseCgroupLayout(mountinfo: string, ownCgroups: string): CgroupLayout {
  // /proc/self/cgroup: "ID:CONTROLLERS:PATH"; v2 is "0::PATH".
  const ownV1 = new Map<string, string>();
  let ownV2: string | undefined;
  for (const line of ownCgroups.split('\n')) {
    const m = /^(\d+):([^:]*):(.*)$/.exec(line);
    if (m === null) continue;
    const [, , controllers = '', path = '/'] = m;
    if (controllers === '') ownV2 = path;
    else for (const c of controllers.split(',')) ownV1.set(c, path);
  }
  const layout: CgroupLayout = { v2: undefined, v1: {} };
  // mountinfo: "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS"
  for (const line of mountinfo.split('\n')) {
    const [left = '', right = ''] = line.split(' - ');
    const fields = left.split(' ');
    const [fstype = '', , superOptions = ''] = right.split(' ');
    const root = unescapeMount(fields[3] ?? '/');
    const mountpoint = unescapeMount(fields[4] ?? '');
    if (fstype === 'cgroup2' && ownV2 !== undefined) {
      layout.v2 ??= within(mountpoint, root, ownV2);
    } else if (fstype === 'cgroup') {
      for (const option of superOptions.split(',')) {
        const c = V1_CONTROLLERS.find((name) => name === option);
        const path = c === undefined ? undefined : ownV1.get(c);
        if (c !== undefined && path !== undefined && layout.v1[c] === undefined) layout.v1[c] = within(mountpoint, root, path);
      }
    }
  }
  return layout;
}

function unescapeMount(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

/** The directory of cgroup `path` in a hierarchy mounted at `mountpoint` whose root is `root`. */
function within(mountpoint: string, root: string, path: string): string {
  const relative = root !== '/' && path.startsWith(root) ? path.slice(root.length) : path;
  return join(mountpoint, relative);
}

export function guestCgroupName(name: string): string {
  return `g-${name}`;
}

/** The node's guests' cgroups in one hierarchy version. */
export interface CgroupHost {
  readonly mode: CgroupMode;
  /** Where, for logs and `guest list`. */
  readonly where: string;
  /** Whether memory limits are the kernel's (else the supervisor watches RSS). */
  readonly memory: boolean;
  /** Whether cores are a cpuset (else the guest is pinned with sched_setaffinity). */
  readonly cpuset: boolean;
  /** Sets the CPU all guests together may use (cores; null for no cap). */
  setTotal(cpu: number | null, periodUs: number): Promise<void>;
  guest(name: string): GuestCgroup;
  /** Removes the node's cgroups once its guests' are gone (kept where some are left). */
  remove(): Promise<void>;
}

export interface GuestCgroup {
  /** Creates the cgroup (kept if it exists) and writes the limits. */
  prepare(limits: GuestLimits, periodUs: number): Promise<void>;
  apply(limits: GuestLimits, periodUs: number): Promise<void>;
  /** The cgroup.procs files the guest's first process joins before it execs. */
  joinFiles(): string[];
  procs(): Promise<number[]>;
  usage(): Promise<CgroupUsage>;
  /** Removes the cgroup once it is empty; false if processes are left in it. */
  remove(): Promise<boolean>;
}

async function writeValue(path: string, value: string): Promise<void> {
  await writeFile(path, value);
}

async function readValue(path: string): Promise<string> {
  return (await readFile(path, 'utf8')).trim();
}

async function readNumber(path: string): Promise<number> {
  const n = Number(await readValue(path));
  return Number.isFinite(n) ? n : 0;
}

/** "key value" lines (cpu.stat). */
async function readKeyed(path: string): Promise<Map<string, number>> {
  const map = new Map<string, number>();
  for (const line of (await readValue(path)).split('\n')) {
    const [key, value] = line.split(' ');
    if (key !== undefined && value !== undefined) map.set(key, Number(value));
  }
  return map;
}

async function readProcs(dir: string): Promise<number[]> {
  try {
    return (await readValue(join(dir, 'cgroup.procs'))).split('\n').filter((l) => l !== '').map(Number);
  } catch {
    return [];
  }
}

async function removeDir(dir: string): Promise<boolean> {
  try {
    await rmdir(dir);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'ENOENT';
  }
}

function cpuList(cpus: readonly number[]): string {
  return cpus.join(',');
}

// ---- cgroup v2 ----

/** The v2 host under the node's own cgroup; throws (with the reason) where it cannot be used. */
export async function openCgroupV2(own: string, nodeId: string): Promise<CgroupHost> {
  const available = (await readValue(join(own, 'cgroup.controllers'))).split(' ');
  if (!available.includes('cpu')) throw new Error(`the cpu controller is not available in ${own} (cgroup.controllers: ${available.join(' ') || 'none'})`);
  const wanted = ['cpu', 'memory', 'cpuset'].filter((c) => available.includes(c));
  const enabled = (await readValue(join(own, 'cgroup.subtree_control'))).split(' ');
  const missing = wanted.filter((c) => !enabled.includes(c));
  // EBUSY where the node's cgroup holds processes and is not the root: v2 lets only leaves hold them.
  if (missing.length > 0) await writeValue(join(own, 'cgroup.subtree_control'), missing.map((c) => `+${c}`).join(' '));
  const base = join(own, `memstrata-${nodeId}`);
  await mkdir(base, { recursive: true });
  await writeValue(join(base, 'cgroup.subtree_control'), wanted.map((c) => `+${c}`).join(' '));
  const memory = wanted.includes('memory');
  const cpuset = wanted.includes('cpuset');
  return {
    mode: 'cgroup2',
    where: base,
    memory,
    cpuset,
    setTotal: (cpu, periodUs) => writeValue(join(base, 'cpu.max'), cpuMax(cpu, periodUs)),
    guest: (name) => v2Guest(join(base, guestCgroupName(name)), memory, cpuset),
    remove: async () => { await removeDir(base); },
  };
}

function cpuMax(cpu: number | null, periodUs: number): string {
  return `${cpu === null ? 'max' : Math.max(1000, Math.round(cpu * periodUs))} ${periodUs}`;
}

function v2Guest(dir: string, memory: boolean, cpuset: boolean): GuestCgroup {
  const apply = async (limits: GuestLimits, periodUs: number): Promise<void> => {
    await writeValue(join(dir, 'cpu.max'), cpuMax(limits.cpu, periodUs));
    if (memory) await writeValue(join(dir, 'memory.max'), limits.memory === null ? 'max' : String(limits.memory));
    // An empty cpuset.cpus in v2 means "the parent's".
    if (cpuset) await writeValue(join(dir, 'cpuset.cpus'), limits.cpus === null ? '' : cpuList(limits.cpus));
  };
  return {
    async prepare(limits, periodUs) {
      await mkdir(dir, { recursive: true });
      await apply(limits, periodUs);
    },
    apply,
    joinFiles: () => [join(dir, 'cgroup.procs')],
    procs: () => readProcs(dir),
    async usage() {
      const stat = await readKeyed(join(dir, 'cpu.stat'));
      return {
        cpuSeconds: (stat.get('usage_usec') ?? 0) / 1e6,
        throttledSeconds: (stat.get('throttled_usec') ?? 0) / 1e6,
        memoryBytes: memory ? await readNumber(join(dir, 'memory.current')) : 0,
      };
    },
    remove: () => removeDir(dir),
  };
}

// ---- cgroup v1 ----

/** The v1 host under the node's own cgroup in each hierarchy; needs at least cpu. */
export async function openCgroupV1(own: CgroupLayout['v1'], nodeId: string): Promise<CgroupHost> {
  if (own.cpu === undefined) throw new Error('no cgroup v1 cpu hierarchy is mounted');
  const bases: Partial<Record<V1Controller, string>> = {};
  for (const c of V1_CONTROLLERS) {
    const dir = own[c];
    if (dir === undefined) continue;
    const base = join(dir, `memstrata-${nodeId}`);
    try {
      await mkdir(base, { recursive: true });
      if (c === 'cpuset') {
        // A v1 cpuset takes no process until it has CPUs and memory nodes of its own.
        await writeValue(join(base, 'cpuset.cpus'), await readValue(join(dir, 'cpuset.cpus')));
        await writeValue(join(base, 'cpuset.mems'), await readValue(join(dir, 'cpuset.mems')));
      }
      bases[c] = base;
    } catch (error) {
      // cpu is needed; the others are used where they can be.
      if (c === 'cpu') throw error;
    }
  }
  const cpuBase = bases.cpu;
  if (cpuBase === undefined) throw new Error('no cgroup v1 cpu hierarchy');
  return {
    mode: 'cgroup1',
    where: cpuBase,
    memory: bases.memory !== undefined,
    cpuset: bases.cpuset !== undefined,
    setTotal: (cpu, periodUs) => setCfs(cpuBase, cpu, periodUs),
    guest: (name) => v1Guest(Object.fromEntries(Object.entries(bases).map(([c, base]) => [c, join(base, guestCgroupName(name))])), bases.cpuset),
    remove: async () => { await Promise.all(Object.values(bases).map(removeDir)); },
  };
}

async function setCfs(dir: string, cpu: number | null, periodUs: number): Promise<void> {
  // Unlimited first, so a new period never meets an old quota the kernel would refuse.
  await writeValue(join(dir, 'cpu.cfs_quota_us'), '-1');
  await writeValue(join(dir, 'cpu.cfs_period_us'), String(periodUs));
  if (cpu !== null) await writeValue(join(dir, 'cpu.cfs_quota_us'), String(Math.max(1000, Math.round(cpu * periodUs))));
}

function v1Guest(dirs: Partial<Record<V1Controller, string>>, cpusetBase: string | undefined): GuestCgroup {
  const unique = [...new Set(Object.values(dirs))];
  const apply = async (limits: GuestLimits, periodUs: number): Promise<void> => {
    if (dirs.cpu !== undefined) await setCfs(dirs.cpu, limits.cpu, periodUs);
    if (dirs.memory !== undefined) await writeValue(join(dirs.memory, 'memory.limit_in_bytes'), limits.memory === null ? '-1' : String(limits.memory));
    if (dirs.cpuset !== undefined && cpusetBase !== undefined) {
      await writeValue(join(dirs.cpuset, 'cpuset.cpus'), limits.cpus === null ? await readValue(join(cpusetBase, 'cpuset.cpus')) : cpuList(limits.cpus));
    }
  };
  return {
    async prepare(limits, periodUs) {
      for (const dir of unique) await mkdir(dir, { recursive: true });
      if (dirs.cpuset !== undefined && cpusetBase !== undefined) {
        await writeValue(join(dirs.cpuset, 'cpuset.mems'), await readValue(join(cpusetBase, 'cpuset.mems')));
      }
      await apply(limits, periodUs);
    },
    apply,
    joinFiles: () => unique.map((dir) => join(dir, 'cgroup.procs')),
    async procs() {
      const all = await Promise.all(unique.map(readProcs));
      return [...new Set(all.flat())];
    },
    async usage() {
      const [cpuNs, stat, memory] = await Promise.all([
        dirs.cpuacct === undefined ? null : readNumber(join(dirs.cpuacct, 'cpuacct.usage')),
        dirs.cpu === undefined ? new Map<string, number>() : readKeyed(join(dirs.cpu, 'cpu.stat')),
        dirs.memory === undefined ? 0 : readNumber(join(dirs.memory, 'memory.usage_in_bytes')),
      ]);
      return { cpuSeconds: cpuNs === null ? null : cpuNs / 1e9, throttledSeconds: (stat.get('throttled_time') ?? 0) / 1e9, memoryBytes: memory };
    },
    async remove() {
      const results = await Promise.all(unique.map(removeDir));
      return results.every(Boolean);
    },
  };
}

/**
 * The shell program a guest is spawned through: it writes its own pid into each
 * cgroup.procs given, then execs the rest of its arguments. Used as
 * `sh -c JOIN_SCRIPT memstrata-guest N FILE... COMMAND ARGS...`.
 */
export const JOIN_SCRIPT = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || { echo "memstrata: cannot join cgroup $1" >&2; exit 125; }; shift; n=$((n - 1)); done; exec "$@"';
