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

import { constants } from 'node:fs';
import { access, mkdir, readFile, readdir, rmdir, stat, writeFile } from 'node:fs/promises';
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

/**
 * The node's guests' cgroups in one hierarchy version. Nothing is created until `open`:
 * a node with no guests leaves no directory behind, even when it is killed.
 */
export interface CgroupHost {
  readonly mode: CgroupMode;
  /** Where, for logs and `guest list`. */
  readonly where: string;
  /** Whether memory limits are the kernel's (else the supervisor watches memory). */
  readonly memory: boolean;
  /** Whether cores are a cpuset (else the guest is pinned with sched_setaffinity). */
  readonly cpuset: boolean;
  /**
   * Creates the node's cgroups (kept if they exist, as after a node that was killed) and
   * caps all guests together at `cpu` cores (null: no cap). Guests' cgroups left from
   * before lose their own CPU quota first (each gets it again when it boots), since v1
   * refuses a parent quota below a child's.
   */
  open(cpu: number | null, periodUs: number): Promise<void>;
  /** Whether the node's cgroups exist now (left by a node that was killed, or open). */
  exists(): Promise<boolean>;
  /** The guests' cgroups found under the node's: names (without the g- prefix). */
  children(): Promise<string[]>;
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
  const base = join(own, `memstrata-${nodeId}`);
  const memory = wanted.includes('memory');
  const cpuset = wanted.includes('cpuset');
  // Checked without making anything: a node killed before its first guest leaves nothing.
  await access(join(own, 'cgroup.subtree_control'), constants.W_OK);
  const enabled = (await readValue(join(own, 'cgroup.subtree_control'))).split(' ');
  // The root cgroup has no cgroup.type; any other with processes cannot enable controllers for children.
  const root = !(await access(join(own, 'cgroup.type')).then(() => true, () => false));
  if (!enabled.includes('cpu') && !root && (await readValue(join(own, 'cgroup.procs'))).trim() !== '') {
    throw new Error(`${own} holds processes and does not delegate the cpu controller (cgroup v2 enables controllers only for cgroups without processes); run the node in a delegated cgroup of its own`);
  }
  return {
    mode: 'cgroup2',
    where: base,
    memory,
    cpuset,
    async open(cpu, periodUs) {
      const enabled = (await readValue(join(own, 'cgroup.subtree_control'))).split(' ');
      const missing = wanted.filter((c) => !enabled.includes(c));
      // EBUSY where the node's cgroup holds processes and is not the root: v2 lets only leaves hold them.
      if (missing.length > 0) await writeValue(join(own, 'cgroup.subtree_control'), missing.map((c) => `+${c}`).join(' '));
      await mkdir(base, { recursive: true });
      await writeValue(join(base, 'cgroup.subtree_control'), wanted.map((c) => `+${c}`).join(' '));
      // v2 lets a child's cpu.max be above its parent's (the parent's still binds).
      await writeValue(join(base, 'cpu.max'), cpuMax(cpu, periodUs));
    },
    exists: () => isDir(base),
    children: () => guestChildren(base),
    guest: (name) => v2Guest(join(base, guestCgroupName(name)), memory, cpuset),
    remove: async () => { await removeDir(base); },
  };
}

/** The g-* directories under a node's cgroup. */
async function guestChildren(base: string): Promise<string[]> {
  try {
    return (await readdir(base, { withFileTypes: true })).filter((e) => e.isDirectory() && e.name.startsWith('g-')).map((e) => e.name.slice(2));
  } catch {
    return [];
  }
}

function cpuMax(cpu: number | null, periodUs: number): string {
  return `${cpu === null ? 'max' : Math.max(1000, Math.round(cpu * periodUs))} ${periodUs}`;
}

function v2Guest(dir: string, memory: boolean, cpuset: boolean): GuestCgroup {
  const apply = async (limits: GuestLimits, periodUs: number): Promise<void> => {
    await writeValue(join(dir, 'cpu.max'), cpuMax(limits.cpu, periodUs));
    if (memory) await writeValue(join(dir, 'memory.max'), limits.memory === null ? 'max' : String(limits.memory));
    // An empty cpuset.cpus in v2 means "the parent's"; a write of nothing is no write(2) at all.
    if (cpuset) await writeValue(join(dir, 'cpuset.cpus'), limits.cpus === null ? '\n' : cpuList(limits.cpus));
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

/** The v1 host under the node's own cgroup in each hierarchy; needs at least cpu, uses the others where they are writable. */
export function openCgroupV1(own: CgroupLayout['v1'], nodeId: string): Promise<CgroupHost> {
  const cpuDir = own.cpu;
  if (cpuDir === undefined) return Promise.reject(new Error('no cgroup v1 cpu hierarchy is mounted'));
  const bases: Partial<Record<V1Controller, string>> = {};
  for (const c of V1_CONTROLLERS) {
    const dir = own[c];
    if (dir !== undefined) bases[c] = join(dir, `memstrata-${nodeId}`);
  }
  const cpuBase = join(cpuDir, `memstrata-${nodeId}`);
  // Checked without making anything: a node killed before its first guest leaves nothing.
  const writable = Promise.all([access(cpuDir, constants.W_OK), access(join(cpuDir, 'cpu.cfs_quota_us'), constants.R_OK)]);
  const host: CgroupHost = {
    mode: 'cgroup1',
    where: cpuBase,
    memory: bases.memory !== undefined,
    cpuset: bases.cpuset !== undefined,
    async open(cpu, periodUs) {
      for (const c of V1_CONTROLLERS) {
        const base = bases[c];
        const dir = own[c];
        if (base === undefined || dir === undefined) continue;
        try {
          await mkdir(base, { recursive: true });
          if (c === 'cpuset') {
            // A v1 cpuset takes no process until it has CPUs and memory nodes of its own.
            await writeValue(join(base, 'cpuset.cpus'), await readValue(join(dir, 'cpuset.cpus')));
            await writeValue(join(base, 'cpuset.mems'), await readValue(join(dir, 'cpuset.mems')));
          }
        } catch (error) {
          // cpu is needed; the others are used where they can be.
          if (c === 'cpu') throw error;
          await removeDir(base);
          bases[c] = undefined;
        }
      }
      (host as { memory: boolean }).memory = bases.memory !== undefined;
      (host as { cpuset: boolean }).cpuset = bases.cpuset !== undefined;
      for (const child of await guestChildren(cpuBase)) await writeValue(join(cpuBase, guestCgroupName(child), 'cpu.cfs_quota_us'), '-1').catch(() => undefined);
      await setCfs(cpuBase, cpu, periodUs);
    },
    exists: () => isDir(cpuBase),
    children: () => guestChildren(cpuBase),
    guest: (name) => v1Guest(Object.fromEntries(Object.entries(bases).filter(([, base]) => base !== undefined).map(([c, base]) => [c, join(base, guestCgroupName(name))])), bases.cpuset),
    remove: async () => { await Promise.all(Object.values(bases).filter((b) => b !== undefined).map(removeDir)); },
  };
  return writable.then(() => host);
}

async function isDir(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isDirectory();
  } catch {
    return false;
  }
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
