// What the kernel says of processes, read from /proc: the CPU time and resident memory of
// a process group, for guests the node cannot put in a cgroup (the signal fallback) and
// for figures where no cgroup counts them.
//
// /proc/<pid>/stat (proc(5)): "pid (comm) state ppid pgrp ... utime stime cutime cstime
// ... rss ...". comm may hold spaces and parentheses, so fields are counted from the LAST
// ')'. Times are in clock ticks (USER_HZ), rss in pages.
//
// A group's CPU time is the sum over its live members of utime+stime+cutime+cstime: a
// member that exits and is reaped by another member moves its time into that member's
// cutime, so the sum goes on; one reaped outside the group (reparented to init) takes its
// time with it. Callers keep their own running total and add only increases (groupUsage).

import { execFileSync } from 'node:child_process';
import { readFile, readdir } from 'node:fs/promises';

export interface ProcSample {
  pid: number;
  pgrp: number;
  state: string;
  /** utime + stime + cutime + cstime, in clock ticks. */
  ticks: number;
  rssPages: number;
}

/** One /proc/<pid>/stat line; undefined when it is not one. */
export function parseProcStat(text: string): ProcSample | undefined {
  const close = text.lastIndexOf(')');
  const open = text.indexOf('(');
  if (open <= 0 || close < open) return undefined;
  const pid = Number(text.slice(0, open).trim());
  // Fields after comm, numbered from 3 (state) as in proc(5).
  const f = text.slice(close + 1).trim().split(/\s+/);
  const field = (n: number): number => Number(f[n - 3]);
  const sample = { pid, pgrp: field(5), state: f[0] ?? '?', ticks: field(14) + field(15) + field(16) + field(17), rssPages: field(24) };
  return Number.isInteger(sample.pid) && Number.isFinite(sample.ticks) && Number.isFinite(sample.rssPages) && Number.isInteger(sample.pgrp) ? sample : undefined;
}

/** Every process's sample; processes that vanish while being read are skipped. */
export async function scanProcesses(procDir = '/proc'): Promise<ProcSample[]> {
  const pids = (await readdir(procDir)).filter((name) => /^\d+$/.test(name));
  const samples = await Promise.all(pids.map(async (pid) => {
    try {
      return parseProcStat(await readFile(`${procDir}/${pid}/stat`, 'utf8'));
    } catch {
      return undefined;
    }
  }));
  return samples.filter((s): s is ProcSample => s !== undefined);
}

/**
 * The processes of a guest's tree still in its process group: the leader and its
 * descendants, found through /proc/<pid>/task/<tid>/children (cheap: a few files per
 * process, however many processes the machine runs). A process reparented away from the
 * tree (a daemon whose parent exited) is not found; scanProcesses finds it. Undefined
 * where the kernel has no children files (CONFIG_PROC_CHILDREN).
 */
export async function treeMembers(leader: number, pgid: number, procDir = '/proc'): Promise<ProcSample[] | undefined> {
  const members: ProcSample[] = [];
  const queue = [leader];
  const seen = new Set<number>();
  for (let pid = queue.pop(); pid !== undefined; pid = queue.pop()) {
    if (seen.has(pid)) continue;
    seen.add(pid);
    let sample: ProcSample | undefined;
    let tasks: string[];
    try {
      sample = parseProcStat(await readFile(`${procDir}/${pid}/stat`, 'utf8'));
      tasks = await readdir(`${procDir}/${pid}/task`);
    } catch {
      continue; // gone
    }
    if (sample === undefined || sample.pgrp !== pgid) continue;
    members.push(sample);
    for (const tid of tasks) {
      let children: string;
      try {
        children = await readFile(`${procDir}/${pid}/task/${tid}/children`, 'utf8');
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'ENOENT' && pid === leader && tid === String(leader)) return undefined;
        continue;
      }
      for (const child of children.split(' ')) if (child.trim() !== '') queue.push(Number(child));
    }
  }
  return members;
}

/**
 * Memory the processes use, counting each page once: the sum of their proportional set
 * sizes (Pss in /proc/<pid>/smaps_rollup, where a page shared by n processes counts 1/n
 * in each), so copy-on-write children do not count the parent's memory again. Falls back
 * to RSS for a process without smaps_rollup (kernels before 4.14).
 */
export async function memoryBytes(members: readonly ProcSample[], procDir = '/proc'): Promise<number> {
  const sizes = await Promise.all(members.map(async (s) => {
    try {
      const m = /^Pss:\s+(\d+) kB/m.exec(await readFile(`${procDir}/${s.pid}/smaps_rollup`, 'utf8'));
      if (m !== null) return Number(m[1]) * 1024;
    } catch {
      // gone, or no smaps_rollup
    }
    return s.rssPages * systemUnits().pageSize;
  }));
  return sizes.reduce((a, b) => a + b, 0);
}

/** Groups samples by process group. */
export function byGroup(samples: readonly ProcSample[]): Map<number, ProcSample[]> {
  const groups = new Map<number, ProcSample[]>();
  for (const s of samples) {
    const list = groups.get(s.pgrp);
    if (list === undefined) groups.set(s.pgrp, [s]);
    else list.push(s);
  }
  return groups;
}

export interface SystemUnits {
  /** USER_HZ: clock ticks per second in /proc times. */
  ticksPerSecond: number;
  pageSize: number;
}

let units: SystemUnits | undefined;

/** USER_HZ and the page size, asked of getconf once; 100 and 4096 (Linux on x86 and arm64) if it cannot answer. */
export function systemUnits(): SystemUnits {
  units ??= {
    ticksPerSecond: getconf('CLK_TCK') ?? 100,
    pageSize: getconf('PAGESIZE') ?? 4096,
  };
  return units;
}

function getconf(name: string): number | undefined {
  try {
    const n = Number(execFileSync('getconf', [name], { encoding: 'utf8', timeout: 2000 }).trim());
    return Number.isInteger(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
}

/**
 * A process group's CPU time as a running total that never goes back: each reading adds
 * only what the group's sum grew by since the last one.
 */
export class GroupCpu {
  private last: number;
  private total: number;

  constructor() {
    this.last = -1;
    this.total = 0;
  }

  /** Feeds the group's members (possibly none); returns the total in seconds. */
  update(members: readonly ProcSample[] | undefined): number {
    const { ticksPerSecond } = systemUnits();
    const now = (members ?? []).reduce((sum, s) => sum + s.ticks, 0);
    if (this.last >= 0 && now > this.last) this.total += now - this.last;
    else if (this.last < 0) this.total = now;
    this.last = now;
    return this.total / ticksPerSecond;
  }
}

