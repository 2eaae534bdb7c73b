// node.cpuWakeLatency: a Linux PM QoS request that bounds how long an idle CPU may take to
// wake, held while the node runs.
//
// At low queue depth a request's round trip is mostly wake-ups: the node's thread sleeps
// in epoll_wait, its CPU goes idle, and the next request has to wake it (and the reply
// has to wake the client's). On a virtual machine whose idle CPUs halt, each wake-up is a
// trip through the hypervisor; on bare metal, a deep C-state's exit. The kernel's CPU
// latency QoS (Documentation/power/pm_qos_interface.rst) lets a process ask for a bound:
// open /dev/cpu_dma_latency, write the bound in microseconds as a 32-bit integer, and keep
// the descriptor open; the cpuidle governor then picks only idle states that wake within
// it (0: the polling state, where an idle CPU spins in the kernel's idle loop, and a
// wake-up from another CPU costs neither an interrupt nor a halt's exit). Closing the descriptor, or the process ending however it
// ends, withdraws the request.
//
// The request only limits which idle states the cpuidle governor may choose: with no
// cpuidle driver it does nothing, and where the halt state advertises an exit latency of
// 1 us (haltpoll, ACPI C1 in most VMs) only a bound of 0 keeps a vCPU from halting. So the
// node reports the request as held, with the machine's cpuidle driver and governor, and
// never promises a wake-up time.
//
// Unlike node.busyPoll (net/busy-poll.ts), which keeps the node's own event loop polling,
// it takes no CPU time from a runnable process inside the machine: an idle CPU polling in
// the kernel runs whatever becomes runnable at once. Its costs are outside the scheduler's
// view: idle CPUs that never rest (power and turbo headroom on bare metal, an SMT
// sibling's share, the host's CPU time in a VM), and it is machine-wide: every process on
// the machine, the node's peers and clients included, wakes faster while it is held.

import { open, readFile, type FileHandle } from 'node:fs/promises';
import { endianness } from 'node:os';
import type { Logger } from './logger.js';

/** The kernel's CPU latency QoS device. */
export const CPU_LATENCY_DEVICE = '/dev/cpu_dma_latency';
/** The largest bound node.cpuWakeLatency takes (1 s; the kernel takes up to 2^31 - 1 us). */
export const CPU_WAKE_LATENCY_MAX_US = 1_000_000;

export interface CpuWakeLatencyInfo {
  /** The bound asked for in microseconds; null when the setting is off. */
  requestedUs: number | null;
  /** True while the request is held. */
  held: boolean;
  /** Why it is not held although asked for (the device is missing, not writable, refused the value). */
  failure: string | null;
  /** The machine's cpuidle driver and governor, which decide what the request does; null when off or unreadable. */
  cpuidle: string | null;
}

/** Where the request is made, and what checks it (a test's stand-in is a regular file). */
export interface CpuWakeLatencyOptions {
  device?: string;
  /** Refuse anything but a character device (default true): never a file left where the device should be. */
  requireCharacterDevice?: boolean;
  /** The sysfs directory of cpuidle (default /sys/devices/system/cpu/cpuidle). */
  cpuidleDir?: string;
}

export class CpuWakeLatency {
  private readonly requestedUs: number | undefined;
  private readonly device: string;
  private readonly requireCharacterDevice: boolean;
  private readonly cpuidleDir: string;
  private handle: FileHandle | undefined;
  private failure: string | null;
  private cpuidle: string | null;

  /** `requestedUs` undefined: the setting is off, and hold() does nothing. */
  constructor(requestedUs: number | undefined, options: CpuWakeLatencyOptions = {}) {
    this.requestedUs = requestedUs;
    this.device = options.device ?? CPU_LATENCY_DEVICE;
    this.requireCharacterDevice = options.requireCharacterDevice ?? true;
    this.cpuidleDir = options.cpuidleDir ?? '/sys/devices/system/cpu/cpuidle';
    this.handle = undefined;
    this.failure = null;
    this.cpuidle = null;
  }

  /**
   * Opens the device (never creating it), writes the bound, and reads back the kernel's
   * combined bound, which must be at most ours. A machine that cannot take the request
   * (no such device, no write access, a kernel that ignores it) does not stop the node:
   * the reason is logged as a warning and shown by info(), and the node runs as with the
   * setting off.
   */
  async hold(log: Logger): Promise<void> {
    if (this.requestedUs === undefined || this.handle !== undefined) return;
    const us = this.requestedUs;
    this.cpuidle = await this.readCpuidle();
    let handle: FileHandle | undefined;
    try {
      handle = await open(this.device, 'r+');
      if (this.requireCharacterDevice && !(await handle.stat()).isCharacterDevice()) throw new Error('not a character device');
      const value = Buffer.alloc(4);
      writeS32(value, us);
      const { bytesWritten } = await handle.write(value, 0, 4, null);
      if (bytesWritten !== 4) throw new Error(`wrote ${bytesWritten} of 4 bytes`);
      const { bytesRead } = await handle.read(value, 0, 4, 0);
      const combined = bytesRead === 4 ? readS32(value) : undefined;
      if (combined === undefined || combined > us) throw new Error(`the kernel's bound reads ${combined ?? 'nothing'} after the request`);
      this.handle = handle;
      this.failure = null;
      log.info({ device: this.device, us, cpuidle: this.cpuidle }, 'holding a CPU latency request (node.cpuWakeLatency)');
      if (!cpuidleDriven(this.cpuidle)) {
        log.warn({ code: 'MS_CPU_LATENCY_NO_EFFECT', cpuidle: this.cpuidle }, 'node.cpuWakeLatency: no cpuidle driver, so the request changes nothing here');
      }
    } catch (error) {
      await handle?.close().catch(() => undefined);
      this.failure = `${this.device}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`;
      log.warn({ code: 'MS_CPU_LATENCY_UNAVAILABLE', device: this.device, us, err: error }, 'node.cpuWakeLatency is set but the CPU latency request could not be made; running without it');
    }
  }

  /** Withdraws the request (closes the device). Safe to call more than once. */
  async release(): Promise<void> {
    const handle = this.handle;
    this.handle = undefined;
    await handle?.close().catch(() => undefined);
  }

  info(): CpuWakeLatencyInfo {
    return { requestedUs: this.requestedUs ?? null, held: this.handle !== undefined, failure: this.failure, cpuidle: this.cpuidle };
  }

  /** "driver, governor name", or null when sysfs does not say. */
  private async readCpuidle(): Promise<string | null> {
    const read = (name: string) => readFile(`${this.cpuidleDir}/${name}`, 'utf8').then((v) => v.trim(), () => undefined);
    const driver = await read('current_driver');
    if (driver === undefined) return null;
    const governor = (await read('current_governor_ro')) ?? (await read('current_governor'));
    return governor === undefined ? driver : `${driver}, governor ${governor}`;
  }
}

function writeS32(buf: Buffer, value: number): void {
  if (endianness() === 'LE') buf.writeInt32LE(value);
  else buf.writeInt32BE(value);
}

function readS32(buf: Buffer): number {
  return endianness() === 'LE' ? buf.readInt32LE(0) : buf.readInt32BE(0);
}

/** Whether a cpuidle driver picks idle states here (info().cpuidle names one), so that a bound can change them. */
export function cpuidleDriven(cpuidle: string | null): boolean {
  return cpuidle !== null && !cpuidle.startsWith('none');
}
