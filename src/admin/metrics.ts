// Prometheus metrics for the admin API's /metrics. Gauges are read from the tables at
// scrape time, so nothing on an I/O path pays for them; counters are bumped by the
// control plane (resizes) only. The latency histograms are kept by the services
// themselves (net/latency.ts: a few array writes per request) and rendered here.

import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import { LATENCY_BOUNDS, type LatencySnapshot } from '../net/latency.js';
import { KINDS } from '../kinds.js';
import type { Medium } from '../memory/medium.js';
import type { KindUsage, PartitionTable } from '../memory/partition-table.js';
import type { AllocationTable } from '../memory/allocation-table.js';
import { VERSION } from '../version.js';
import type { RmemService } from '../server/rmem-service.js';
import type { NbdService } from '../server/nbd-service.js';
import type { VolumeManager } from '../storage/volume-manager.js';
import type { CacheStats } from '../storage/cache/storage-cache.js';
import type { DeviceInfo } from '../nvram/device.js';
import type { MirroringInfo } from '../nvram/mirroring.js';
import type { AdminStats } from './admin-server.js';
import type { ServiceLoad } from '../net/service-load.js';
import type { ClusterSelfJson, GuestInfoJson } from '../protocol/admin/api.js';

export interface MetricsSources {
  nodeId: string;
  partition: PartitionTable;
  allocation: AllocationTable;
  media: readonly Medium[];
  rmem(): RmemService | undefined;
  nbd(): NbdService | undefined;
  volumes: VolumeManager;
  cache(): CacheStats | undefined;
  nvram(): DeviceInfo[];
  mirror(): MirroringInfo | undefined;
  admin?(): AdminStats | undefined;
  /** Journals kept aside per NVRAM device name, removed devices included. */
  divergedJournals?(): ReadonlyMap<string, number>;
  /** Volumes and NVRAM devices not loaded at start. */
  damaged?(): { volumes: number; nvram: number; orphans: number };
  /** The mirror service's connections and budget; absent before it listens. */
  mirrorLoad?(): ServiceLoad | undefined;
  /** Every guest and its figures (read once a second by the supervisor). */
  guests?(): GuestInfoJson[];
  /** This node's cluster membership; undefined for a node on its own. */
  cluster?(): ClusterSelfJson | undefined;
  /** How long each NVRAM journal batch's write and sync took, per device. */
  journalSyncs?(): LatencySnapshot[];
  /** node.busyPoll: its window (us, 0: off) and the seconds the event loop spent in polling mode. */
  busyPoll?(): { windowUs: number; seconds: number };
  /** node.cpuWakeLatency: the bound asked for (undefined: off) and whether the kernel holds it. */
  cpuWakeLatency?(): { requestedUs: number | null; held: boolean };
}

/**
 * A Prometheus histogram whose buckets a service keeps (LatencyHistogram). prom-client
 * renders any registered object whose `get()` gives a name, help, type and values (its
 * typings want one of its own classes, hence the cast).
 */
function latencyHistogram(registry: Registry, name: string, help: string, label: string, read: () => LatencySnapshot[]): void {
  const les = [...LATENCY_BOUNDS.map(String), '+Inf'];
  type Value = { metricName: string; labels: Record<string, string>; value: number };
  const get = (): Promise<{ name: string; help: string; type: string; aggregator: string; values: Value[] }> => {
    const values: Value[] = [];
    for (const s of read()) {
      s.cumulative.forEach((value, i) => values.push({ metricName: `${name}_bucket`, labels: { [label]: s.key, le: les[i] ?? '+Inf' }, value }));
      values.push({ metricName: `${name}_sum`, labels: { [label]: s.key }, value: s.sum });
      values.push({ metricName: `${name}_count`, labels: { [label]: s.key }, value: s.count });
    }
    return Promise.resolve({ name, help, type: 'histogram', aggregator: 'sum', values });
  };
  // reset: the services own the figures (Registry.resetMetrics calls it on every metric).
  registry.registerMetric({ name, help, type: 'histogram', aggregator: 'sum', get, reset: () => undefined } as unknown as Parameters<Registry['registerMetric']>[0]);
}

const GUEST_STATES = ['stopped', 'booting', 'running', 'failed'] as const;

export class NodeMetrics {
  readonly registry: Registry;
  readonly resizes: Counter<'medium' | 'kind' | 'result'>;

  constructor(sources: MetricsSources) {
    const registry = new Registry();
    this.registry = registry;
    collectDefaultMetrics({ register: registry });

    new Gauge({
      name: 'memstrata_node_info',
      help: 'Constant 1, labelled with the node id and version.',
      labelNames: ['node', 'version'],
      registers: [registry],
      collect() {
        this.set({ node: sources.nodeId, version: VERSION }, 1);
      },
    });
    const perKind = (name: string, help: string, pick: (usage: KindUsage) => number): void => {
      new Gauge({
        name,
        help,
        labelNames: ['medium', 'kind'],
        registers: [registry],
        collect() {
          for (const usage of sources.partition.usage()) {
            for (const kind of KINDS) this.set({ medium: usage.medium, kind }, pick(usage.kinds[kind]));
          }
        },
      });
    };
    perKind('memstrata_memory_bytes', 'Bytes of each medium in each partition kind (patent FIG. 12).', (u) => u.bytes);
    perKind('memstrata_memory_idle_bytes', 'Bytes of each partition kind that no owner holds.', (u) => u.idleBytes);
    new Gauge({
      name: 'memstrata_medium_capacity_bytes',
      help: 'Configured capacity of each medium.',
      labelNames: ['medium'],
      registers: [registry],
      collect() {
        for (const medium of sources.media) this.set({ medium: medium.name }, medium.capacity);
      },
    });
    new Gauge({
      name: 'memstrata_medium_resident_bytes',
      help: 'Backing storage each medium holds now: DRAM buffers, or flash file blocks on disk.',
      labelNames: ['medium'],
      registers: [registry],
      async collect() {
        for (const medium of sources.media) this.set({ medium: medium.name }, await medium.resident());
      },
    });
    new Gauge({
      name: 'memstrata_server_memory_bytes',
      help: 'Bytes allocated to servers (patent FIG. 13), per medium.',
      labelNames: ['medium'],
      registers: [registry],
      collect() {
        this.reset();
        const totals = new Map<string, number>();
        for (const row of sources.allocation.rows()) totals.set(row.medium, (totals.get(row.medium) ?? 0) + row.length);
        for (const medium of sources.media) this.set({ medium: medium.name }, totals.get(medium.name) ?? 0);
      },
    });
    new Gauge({
      name: 'memstrata_server_memory_kept_aside_bytes',
      help: 'Bytes of server memory whose zeroing failed when a region was freed or a session ended: handed to no one until a later session end zeroes them, per medium.',
      labelNames: ['medium'],
      registers: [registry],
      collect() {
        this.reset();
        const totals = new Map<string, number>();
        for (const k of sources.rmem()?.memory.keptAside() ?? []) totals.set(k.medium, (totals.get(k.medium) ?? 0) + k.length);
        for (const medium of sources.media) this.set({ medium: medium.name }, totals.get(medium.name) ?? 0);
      },
    });
    new Gauge({
      name: 'memstrata_servers',
      help: 'Servers holding memory on this node.',
      registers: [registry],
      collect() {
        this.set(sources.allocation.servers().length);
      },
    });
    latencyHistogram(registry, 'memstrata_nbd_request_seconds', 'NBD requests by command: from the request header to its reply handed to the kernel (budget waits and payloads included).', 'command', () => sources.nbd()?.stats.latency.snapshot() ?? []);
    latencyHistogram(registry, 'memstrata_rmem_request_seconds', 'rmem requests by operation: from the request header to its reply handed to the kernel (budget waits and bodies included).', 'op', () => sources.rmem()?.stats.latency.snapshot() ?? []);
    latencyHistogram(registry, 'memstrata_nvram_journal_sync_seconds', 'NVRAM journal batches written and synced, by device: the disk\'s sync latency as the node sees it.', 'device', () => sources.journalSyncs?.() ?? []);
    new Counter({
      name: 'memstrata_rmem_requests_total',
      help: 'rmem requests received, by operation.',
      labelNames: ['op'],
      registers: [registry],
      collect() {
        this.reset();
        for (const [op, n] of Object.entries(sources.rmem()?.stats.requests ?? {})) this.inc({ op }, n);
      },
    });
    new Counter({
      name: 'memstrata_rmem_errors_total',
      help: 'rmem requests answered with an error, by operation.',
      labelNames: ['op'],
      registers: [registry],
      collect() {
        this.reset();
        for (const [op, n] of Object.entries(sources.rmem()?.stats.errors ?? {})) this.inc({ op }, n);
      },
    });
    new Counter({
      name: 'memstrata_rmem_bytes_total',
      help: 'Bytes served by rmem READ/READV (read) and stored by WRITE/WRITEV (written).',
      labelNames: ['direction'],
      registers: [registry],
      collect() {
        this.reset();
        const stats = sources.rmem()?.stats;
        this.inc({ direction: 'read' }, stats?.bytesRead ?? 0);
        this.inc({ direction: 'written' }, stats?.bytesWritten ?? 0);
      },
    });
    new Counter({
      name: 'memstrata_rmem_protocol_errors_total',
      help: 'rmem connections closed because their stream lost its framing.',
      registers: [registry],
      collect() {
        this.reset();
        this.inc(sources.rmem()?.stats.protocolErrors ?? 0);
      },
    });
    new Gauge({
      name: 'memstrata_rmem_sessions',
      help: 'rmem sessions, by state (a disconnected one keeps its regions for the lease).',
      labelNames: ['state'],
      registers: [registry],
      collect() {
        const sessions = sources.rmem()?.sessionsInfo() ?? [];
        this.set({ state: 'connected' }, sessions.filter((s) => s.state === 'connected').length);
        this.set({ state: 'disconnected' }, sessions.filter((s) => s.state === 'disconnected').length);
      },
    });
    new Counter({
      name: 'memstrata_nbd_commands_total',
      help: 'NBD commands received, by command.',
      labelNames: ['command'],
      registers: [registry],
      collect() {
        this.reset();
        for (const [command, n] of Object.entries(sources.nbd()?.stats.commands ?? {})) this.inc({ command }, n);
      },
    });
    new Counter({
      name: 'memstrata_nbd_errors_total',
      help: 'NBD commands answered with an error, by command.',
      labelNames: ['command'],
      registers: [registry],
      collect() {
        this.reset();
        for (const [command, n] of Object.entries(sources.nbd()?.stats.errors ?? {})) this.inc({ command }, n);
      },
    });
    new Counter({
      name: 'memstrata_nbd_bytes_total',
      help: 'Bytes read and written by NBD clients.',
      labelNames: ['direction'],
      registers: [registry],
      collect() {
        this.reset();
        const stats = sources.nbd()?.stats;
        this.inc({ direction: 'read' }, stats?.bytesRead ?? 0);
        this.inc({ direction: 'written' }, stats?.bytesWritten ?? 0);
      },
    });
    new Gauge({
      name: 'memstrata_nbd_connections',
      help: 'Open NBD connections.',
      registers: [registry],
      collect() {
        this.set(sources.nbd()?.connectionCount ?? 0);
      },
    });
    new Gauge({
      name: 'memstrata_nbd_paused_connections',
      help: 'NBD connections not being read now: over their budget, or their client not reading replies.',
      registers: [registry],
      collect() {
        this.set(sources.nbd()?.flowStats.pausedNow ?? 0);
      },
    });
    new Counter({
      name: 'memstrata_nbd_pauses_total',
      help: 'Times an NBD connection stopped being read because it was over its budget.',
      registers: [registry],
      collect() {
        this.reset();
        this.inc(sources.nbd()?.flowStats.pauses ?? 0);
      },
    });
    new Gauge({
      name: 'memstrata_nbd_inflight_bytes',
      help: 'Bytes held by NBD requests in flight (payloads and replies not yet handed to the kernel), all connections.',
      registers: [registry],
      collect() {
        this.set(sources.nbd()?.budget.bytes ?? 0);
      },
    });
    new Counter({
      name: 'memstrata_nbd_refused_connections_total',
      help: 'NBD connections closed at once because nbd.maxConnections were open.',
      registers: [registry],
      collect() {
        this.reset();
        this.inc(sources.nbd()?.gate.stats.refused ?? 0);
      },
    });
    new Counter({
      name: 'memstrata_nbd_handshake_timeouts_total',
      help: 'NBD connections closed because their handshake did not finish within nbd.handshakeTimeout.',
      registers: [registry],
      collect() {
        this.reset();
        this.inc(sources.nbd()?.gate.stats.handshakeTimeouts ?? 0);
      },
    });
    new Gauge({
      name: 'memstrata_volume_size_bytes',
      help: 'Size of each volume.',
      labelNames: ['volume'],
      registers: [registry],
      collect() {
        this.reset();
        for (const v of sources.volumes.list()) this.set({ volume: v.name }, v.size);
      },
    });
    new Gauge({
      name: 'memstrata_volume_fenced',
      help: '1 while a volume is fenced: a sync failed, so it is read-only until the node restarts.',
      labelNames: ['volume'],
      registers: [registry],
      collect() {
        this.reset();
        for (const v of sources.volumes.list()) this.set({ volume: v.name }, v.failure === undefined ? 0 : 1);
      },
    });
    new Gauge({
      name: 'memstrata_volume_recovering',
      help: '1 while a volume is not served because its mirrored write log waits for the mirror partner after a crash (or its replay failed).',
      labelNames: ['volume'],
      registers: [registry],
      collect() {
        this.reset();
        for (const v of sources.volumes.list()) this.set({ volume: v.name }, v.recovering === undefined ? 0 : 1);
      },
    });
    /** Counters read at scrape time from a source that may be absent (no cache, no mirroring). */
    const counterOf =
      <T>(read: () => T | undefined) =>
      (name: string, help: string, pick: (value: T) => number): void => {
        new Counter({
          name,
          help,
          registers: [registry],
          collect() {
            this.reset();
            const value = read();
            if (value !== undefined) this.inc(pick(value));
          },
        });
      };
    const cacheCounter = counterOf(() => sources.cache());
    cacheCounter('memstrata_cache_hits_total', 'Cache line lookups that found every sector they needed.', (s) => s.hits);
    cacheCounter('memstrata_cache_flash_hits_total', 'Cache hits served by the flash level without moving the line to DRAM.', (s) => s.flashHits);
    cacheCounter('memstrata_cache_flash_reads_now_total', 'Flash hits read on the event loop in the tick their request arrived, since the page cache held them.', (s) => s.flashReadsNow);
    cacheCounter('memstrata_cache_view_reads_total', 'Reads answered from the DRAM level\'s own memory, sent without a copy (large NBD READs).', (s) => s.viewReads);
    cacheCounter('memstrata_cache_writes_now_total', 'Writes stored in the tick they arrived: every line in DRAM, nobody holding it.', (s) => s.writesNow);
    cacheCounter('memstrata_cache_misses_total', 'Cache line lookups that had to stage sectors from the data store.', (s) => s.misses);
    cacheCounter('memstrata_cache_staged_bytes_total', 'Bytes read from data stores into the cache.', (s) => s.stagedBytes);
    cacheCounter('memstrata_cache_destaged_bytes_total', 'Dirty bytes written back to data stores.', (s) => s.destagedBytes);
    cacheCounter('memstrata_cache_write_back_failures_total', 'Write-backs to a data store that failed; the data stayed dirty and FLUSH reports the error.', (s) => s.writeBackFailures);
    cacheCounter('memstrata_cache_evictions_total', 'Lines evicted from a cache level.', (s) => s.evictions);
    cacheCounter('memstrata_cache_promotions_total', 'Lines moved from the flash level back to DRAM.', (s) => s.promotions);
    cacheCounter('memstrata_cache_demotions_total', 'Clean lines moved from DRAM to the flash level.', (s) => s.demotions);
    new Gauge({
      name: 'memstrata_cache_pinned_slots',
      help: 'DRAM cache slots held by replies still being sent from them; none is reused meanwhile.',
      registers: [registry],
      collect() {
        this.set(sources.cache()?.pinnedSlots ?? 0);
      },
    });
    new Gauge({
      name: 'memstrata_cache_dirty_bytes',
      help: 'Bytes in the cache not yet written back.',
      registers: [registry],
      collect() {
        this.set(sources.cache()?.dirtyBytes ?? 0);
      },
    });
    new Gauge({
      name: 'memstrata_cache_lines',
      help: 'Lines held by each cache level, against its slots.',
      labelNames: ['level', 'what'],
      registers: [registry],
      collect() {
        const stats = sources.cache();
        for (const level of ['dram', 'flash'] as const) {
          this.set({ level, what: 'used' }, stats?.lines[level] ?? 0);
          this.set({ level, what: 'slots' }, stats?.slots[level] ?? 0);
        }
      },
    });
    // Per NVRAM device, one value per `what`; a device without them (no journal file) is left out.
    const perDevice = (name: string, help: string, values: (d: DeviceInfo) => Record<string, number> | undefined): void => {
      new Gauge({
        name,
        help,
        labelNames: ['device', 'what'],
        registers: [registry],
        collect() {
          this.reset();
          for (const d of sources.nvram()) {
            for (const [what, value] of Object.entries(values(d) ?? {})) this.set({ device: d.name, what }, value);
          }
        },
      });
    };
    perDevice('memstrata_nvram_used_bytes', 'Bytes of records each NVRAM device holds, against its size.', (d) => ({ used: d.used, size: d.size }));
    perDevice('memstrata_nvram_journal_bytes', 'Each NVRAM journal file\'s ring (what=ring) and the part of it a restart reads, from its pointer to its head (what=span).', (d) =>
      d.journal === null ? undefined : { ring: d.journal.ringBytes, span: d.journal.spanBytes },
    );
    perDevice(
      'memstrata_nvram_journal_events',
      'Per NVRAM journal file, since it was opened (at start, or when a replica became primary): durable batch writes (what=syncs), moves of its pointer over trimmed records (what=pointer_moves), rewrites into a new ring (what=rewrites).',
      (d) => (d.journal === null ? undefined : { syncs: d.journal.syncs, pointer_moves: d.journal.pointerMoves, rewrites: d.journal.rewrites }),
    );
    new Gauge({
      name: 'memstrata_nvram_last_seq',
      help: 'Last acknowledged sequence number of each NVRAM device.',
      labelNames: ['device'],
      registers: [registry],
      collect() {
        this.reset();
        for (const d of sources.nvram()) this.set({ device: d.name }, d.lastSeq ?? 0);
      },
    });
    new Gauge({
      name: 'memstrata_nvram_state',
      help: 'Constant 1 per NVRAM device, labelled with its policy, role, state and mirror mode (in-sync, syncing, degraded, refusing, or none).',
      labelNames: ['device', 'policy', 'role', 'state', 'mirror'],
      registers: [registry],
      collect() {
        this.reset();
        for (const d of sources.nvram()) this.set({ device: d.name, policy: d.policy, role: d.role, state: d.state, mirror: d.mirror ?? 'none' }, 1);
      },
    });
    new Gauge({
      name: 'memstrata_nvram_diverged_journals',
      help: 'Journals of an NVRAM device this node kept aside when its mirror partner\'s copy replaced them; they may hold records acknowledged here that the partner never had.',
      labelNames: ['device'],
      registers: [registry],
      collect() {
        this.reset();
        for (const [device, count] of sources.divergedJournals?.() ?? []) this.set({ device }, count);
      },
    });
    new Gauge({
      name: 'memstrata_nvram_degraded',
      help: 'Mirrored NVRAM primaries whose partner does not hold their records now (degraded or refusing).',
      registers: [registry],
      collect() {
        this.set(sources.nvram().filter((d) => d.mirror === 'degraded' || d.mirror === 'refusing').length);
      },
    });
    new Gauge({
      name: 'memstrata_mirror_link_up',
      help: '1 while the mirror link to a partner is up, 0 while it is down, per partner (its node id, or its address before it answered); absent without a partner.',
      labelNames: ['partner'],
      registers: [registry],
      collect() {
        this.reset();
        for (const link of sources.mirror()?.links ?? []) this.set({ partner: link.node ?? link.address }, link.up ? 1 : 0);
      },
    });
    const mirrorCounter = counterOf(() => sources.mirror());
    mirrorCounter('memstrata_mirror_degradations_total', 'Times a mirrored device lost its partner and degraded or began refusing.', (m) => m.degradations);
    mirrorCounter('memstrata_mirror_resyncs_total', 'Replicas brought up to date on the partner.', (m) => m.resyncs);
    mirrorCounter('memstrata_mirror_records_total', 'Records the partner acknowledged holding.', (m) => m.mirroredRecords);
    const pollCounter = counterOf(() => sources.busyPoll?.());
    pollCounter('memstrata_busy_poll_seconds_total', 'Seconds the event loop spent in busy polling (node.busyPoll), from the first chunk of input or reply of a stretch to one window after its last, serving requests included: an upper bound on the CPU time polling cost.', (p) => p.seconds);
    new Gauge({
      name: 'memstrata_cpu_wake_latency_held',
      help: '1 while the node holds its CPU latency request (node.cpuWakeLatency), 0 when it is set but could not be made (MS_CPU_LATENCY_UNAVAILABLE); absent when the setting is off.',
      labelNames: ['bound_us'],
      registers: [registry],
      collect() {
        this.reset();
        const wake = sources.cpuWakeLatency?.();
        if (wake !== undefined && wake.requestedUs !== null) this.set({ bound_us: String(wake.requestedUs) }, wake.held ? 1 : 0);
      },
    });
    const adminCounter = counterOf(() => sources.admin?.());
    adminCounter('memstrata_admin_auth_failures_total', 'Admin API requests refused for a missing or wrong token (MS_ADMIN_UNAUTHORIZED).', (a) => a.authFailures);
    adminCounter('memstrata_admin_request_timeouts_total', 'Admin API connections closed because headers or body came too slowly (MS_ADMIN_REQUEST_TIMEOUT).', (a) => a.requestTimeouts);
    new Counter({
      name: 'memstrata_admin_connections_refused_total',
      help: 'Admin API connections closed at once: the service had admin.maxConnections open (limit=service) or the address had admin.maxConnectionsPerClient (limit=client).',
      labelNames: ['limit'],
      registers: [registry],
      collect() {
        this.reset();
        const stats = sources.admin?.();
        this.inc({ limit: 'service' }, stats?.refusedMaxConnections ?? 0);
        this.inc({ limit: 'client' }, stats?.refusedPerClient ?? 0);
      },
    });
    new Gauge({
      name: 'memstrata_metadata_damaged',
      help: 'Volumes (what=volume) and NVRAM devices (what=nvram) found on disk but not loaded at start (MS_META_INVALID and the like); they are not served.',
      labelNames: ['what'],
      registers: [registry],
      collect() {
        const damaged = sources.damaged?.();
        this.set({ what: 'volume' }, damaged?.volumes ?? 0);
        this.set({ what: 'nvram' }, damaged?.nvram ?? 0);
      },
    });
    new Gauge({
      name: 'memstrata_volume_orphan_files',
      help: 'Volume data files found without their metadata (a create or removal cut short) and moved aside to <file>.orphan-<time>; they stay until removed by hand.',
      registers: [registry],
      collect() {
        this.set(sources.damaged?.().orphans ?? 0);
      },
    });
    new Gauge({
      name: 'memstrata_admin_connections',
      help: 'Admin API connections open now.',
      registers: [registry],
      collect() {
        this.set(sources.admin?.()?.connections ?? 0);
      },
    });
    // Bounded resources of the rmem and mirror services: connections, pauses, bytes in flight.
    const loads: [string, () => ServiceLoad | undefined][] = [['rmem', () => sources.rmem()?.load()], ['mirror', () => sources.mirrorLoad?.()]];
    for (const [service, load] of loads) {
      const gauge = (name: string, help: string, pick: (l: ServiceLoad) => number): void => {
        new Gauge({ name: `memstrata_${service}_${name}`, help, registers: [registry], collect() { const l = load(); this.set(l === undefined ? 0 : pick(l)); } });
      };
      gauge('connections', `Open ${service} connections.`, (l) => l.connections);
      gauge('paused_connections', `${service} connections not being read now (over their budget, the service at its cap, or replies not read).`, (l) => l.paused);
      gauge('inflight_bytes', `Bytes held by ${service} requests in flight (bodies and replies not yet written), all connections together.`, (l) => l.bytesInFlight);
      const counter = counterOf(load);
      counter(`memstrata_${service}_pauses_total`, `Times a ${service} connection stopped being read for backpressure.`, (l) => l.pauses);
      counter(`memstrata_${service}_refused_connections_total`, `${service} connections closed on arrival because the service had its maximum open.`, (l) => l.refused);
      counter(`memstrata_${service}_refused_per_client_total`, `${service} connections closed on arrival because their remote address had ${service}.maxConnectionsPerClient open.`, (l) => l.refusedPerClient);
      counter(`memstrata_${service}_stalled_connections_total`, service === 'rmem'
        ? 'rmem connections closed by the node as lost: no frame read from them for a lease (rmem.lease), and not waiting for the service budget.'
        : 'mirror connections closed by the node because a frame they began, or the replies they were sent, did not move for mirror.stallTimeout.', (l) => l.stalled);
      counter(`memstrata_${service}_handshake_timeouts_total`, `${service} connections closed because their HELLO did not succeed in time.`, (l) => l.handshakeTimeouts);
    }
    // Guests, labelled by guest (issue 12).
    const perGuest = (kind: 'counter' | 'gauge', name: string, help: string, pick: (g: GuestInfoJson) => number | null): void => {
      if (kind === 'counter') {
        new Counter({ name, help, labelNames: ['guest'], registers: [registry], collect() { this.reset(); for (const g of sources.guests?.() ?? []) this.inc({ guest: g.name }, pick(g) ?? 0); } });
      } else {
        new Gauge({ name, help, labelNames: ['guest'], registers: [registry], collect() { this.reset(); for (const g of sources.guests?.() ?? []) { const v = pick(g); if (v !== null) this.set({ guest: g.name }, v); } } });
      }
    };
    perGuest('counter', 'memstrata_guest_cpu_seconds_total', 'CPU time the guest\'s processes used, all its runs.', (g) => g.cpuSeconds);
    perGuest('counter', 'memstrata_guest_throttled_seconds_total', 'Time the guest was held back from running by its CPU share (cgroup throttling, or stopped by the duty cycle).', (g) => g.throttledSeconds);
    perGuest('counter', 'memstrata_guest_restarts_total', 'Times the guest was booted again by its restart policy.', (g) => g.restarts);
    perGuest('gauge', 'memstrata_guest_cpu_share', 'The guest\'s CPU share in cores (absent: no share of its own).', (g) => g.cpu);
    perGuest('gauge', 'memstrata_guest_memory_bytes', 'Memory the guest\'s processes use (its cgroup\'s charge, or the sum of their RSS).', (g) => g.memoryBytes);
    new Gauge({
      name: 'memstrata_guest_state',
      help: 'The guest\'s state: 1 for the state it is in, 0 for the others.',
      labelNames: ['guest', 'state'],
      registers: [registry],
      collect() {
        this.reset();
        for (const g of sources.guests?.() ?? []) for (const state of GUEST_STATES) this.set({ guest: g.name, state }, g.state === state ? 1 : 0);
      },
    });
    // Cluster membership (issue 14); absent for a node on its own.
    new Gauge({
      name: 'memstrata_cluster_member',
      help: 'Whether this node is a member of its cluster now: 1 for the membership state it is in (joining, member, conflict, left), 0 for the others. Absent for a node without cluster.etcd.',
      labelNames: ['cluster', 'state'],
      registers: [registry],
      collect() {
        this.reset();
        const self = sources.cluster?.();
        if (self !== undefined) for (const state of ['joining', 'member', 'conflict', 'left'] as const) this.set({ cluster: self.cluster, state }, self.state === state ? 1 : 0);
      },
    });
    new Gauge({
      name: 'memstrata_cluster_lease_remaining_seconds',
      help: 'How long this node certainly still holds its etcd lease, by its own clock (0: not held).',
      labelNames: ['cluster'],
      registers: [registry],
      collect() {
        this.reset();
        const self = sources.cluster?.();
        if (self !== undefined) this.set({ cluster: self.cluster }, self.leaseRemainingMs / 1000);
      },
    });
    this.resizes = new Counter({
      name: 'memstrata_partition_resizes_total',
      help: 'Partition resizes asked for, by outcome (ok, or the error code).',
      labelNames: ['medium', 'kind', 'result'],
      registers: [registry],
    });
  }
}
