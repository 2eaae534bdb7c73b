// Shapes of the admin API's JSON, shared by the server, the CLI and AdminClient: the
// spec of the admin protocol. Versioned by the `/v1` prefix: fields may be added, never
// renamed or removed within v1. The subsystems report in these shapes (they import them
// from here), so the client's public types never reach into server internals.

import type { ErrorCode } from '../../errors.js';
import type { Kind, MediumName, UsedKind } from '../../kinds.js';
import type { Policy, Role } from '../journal/policy.js';
import type { MemberRecord } from '../cluster/member.js';

// ---- what the subsystems report ----

export interface CacheStats {
  hits: number;
  /** Hits served by the flash level where the line lives (counted in hits too). */
  flashHits: number;
  /**
   * Of flashHits, those read on the event loop in the tick the request arrived (the OS
   * page cache held the bytes); the others went through libuv's thread pool.
   */
  flashReadsNow: number;
  /** READs answered from the DRAM level's memory, sent without a copy (large NBD READs). */
  viewReads: number;
  /** Writes stored in the tick they arrived, every line in DRAM and nobody holding it (StorageCache.writeNow). */
  writesNow: number;
  misses: number;
  stagedBytes: number;
  destagedBytes: number;
  /** Write-backs to a data store that failed; their data stayed dirty in the cache. */
  writeBackFailures: number;
  evictions: number;
  promotions: number;
  demotions: number;
  dirtyBytes: number;
  lines: { dram: number; flash: number };
  slots: { dram: number; flash: number };
  /** DRAM slots held by replies still being sent from them (viewReads); not reused meanwhile. */
  pinnedSlots: number;
}

export interface VolumeInfo {
  name: string;
  size: number;
  readOnly: boolean;
  createdAt: string;
  connections: number;
  /** The NVRAM device that is this volume's write log, if any. */
  writeLog: string | null;
  /**
   * `fenced`: a sync failed, so the volume is read-only until the node restarts (`failure`
   * says why). `recovering`: its mirrored write log waits for the mirror partner after a
   * crash, or is being replayed; not served until it is `ready` (`failure` says what it
   * waits for, or why the replay failed).
   */
  state: 'ready' | 'fenced' | 'recovering';
  failure: string | null;
}

/**
 * How a mirrored primary's appends are protected right now:
 *   in-sync   sent to the partner, acknowledged once it holds them
 *   syncing   the partner is being brought up to date; appends wait
 *   degraded  no partner; acknowledged once the journal file is synced
 *   refusing  no partner, and the node is configured to refuse rather than degrade
 */
export type MirrorMode = 'in-sync' | 'syncing' | 'degraded' | 'refusing';

export interface DeviceInfo {
  name: string;
  size: number;
  used: number;
  policy: Policy;
  medium: string;
  epoch: number;
  /** First live sequence number, or null when the journal is empty. */
  firstSeq: number | null;
  /** Last acknowledged sequence number, or null before the first append. */
  lastSeq: number | null;
  records: number;
  /** `recovering`: after a crash, until the partner confirms what it holds (mirrored). */
  state: 'ready' | 'recovering' | 'closed' | 'failed';
  role: Role;
  /** How appends are protected now; null for devices that are not mirrored, and for replicas. */
  mirror: MirrorMode | null;
  /** The device's journal file (format version 2, a ring); null for a device without one. */
  journal: JournalFileInfo | null;
  /**
   * Journals of this node kept aside when the partner's copy replaced them
   * (nvram/<name>.diverged-*): they may hold records acknowledged here that the partner
   * never had. Set by the device list.
   */
  diverged?: number;
}

export interface JournalFileInfo {
  /** Bytes of the ring. */
  ringBytes: number;
  /** Bytes of ring from the pointer to the head: what a restart reads. */
  spanBytes: number;
  /** Group-committed writes made durable (fdatasync, or a write through O_DSYNC). */
  syncs: number;
  /** Times the pointer moved on over trimmed records. */
  pointerMoves: number;
  /** Times the file was rewritten into a new ring (too full of records not trimmed). */
  rewrites: number;
}

export type OnPartnerDown = 'degrade' | 'refuse';

export interface MirrorLinkInfo {
  node: string | null;
  address: string;
  up: boolean;
  devices: string[];
}

export interface MirroringInfo {
  /** The partner set by hand (mirror.partner), its node id once it answered, and its link; null and 'none' without one. */
  partner: string | null;
  partnerNode: string | null;
  link: 'up' | 'down' | 'none';
  /** The cluster chooses each device's partner (cluster.etcd set, mirror.partner not). */
  chosen: boolean;
  /** Every link to a partner: the node, its mirror service, whether it is up, and the primaries whose replica is there. */
  links: MirrorLinkInfo[];
  onPartnerDown: OnPartnerDown;
  /** Times a mirrored device lost its partner and degraded or began refusing. */
  degradations: number;
  /** Resyncs that completed. */
  resyncs: number;
  /** Records the partner acknowledged. */
  mirroredRecords: number;
}

export interface SessionInfo {
  serverId: string;
  sessionId: string;
  state: 'connected' | 'disconnected';
  remote: string | undefined;
  since: string;
  /** While disconnected: milliseconds until the regions are freed. */
  expiresInMs: number | undefined;
}

export interface KindUsage {
  bytes: number;
  /** Bytes in this kind that no owner holds. */
  idleBytes: number;
  min: number;
  max: number;
}

export interface MediumUsage {
  medium: MediumName;
  capacity: number;
  extentSize: number;
  kinds: Record<Kind, KindUsage>;
}

export interface ResizeResult {
  medium: MediumName;
  kind: UsedKind;
  fromBytes: number;
  toBytes: number;
  /** Bytes taken from (negative: given to) each other kind. */
  moved: Partial<Record<Kind, number>>;
  /** Bytes owners handed back when asked. */
  reclaimedBytes: number;
}

export interface ServerSummary {
  serverId: string;
  regions: number;
  bytes: Partial<Record<MediumName, number>>;
}

export interface MediumInfo {
  name: MediumName;
  capacity: number;
  extentSize: number;
  persistent: boolean;
  residentBytes: number;
  path?: string;
}

/** This node's own view of its cluster membership. */
export interface ClusterSelfJson {
  cluster: string;
  endpoints: string[];
  /** `joining` (no lease or record yet), `member`, `conflict` (its id is held by another lease), `left`. */
  state: 'joining' | 'member' | 'conflict' | 'left';
  lease: string | null;
  /** How long this node certainly still holds its lease, by its own clock. */
  leaseRemainingMs: number;
  leaseTtlMs: number;
  /** Why the node is not a member now. */
  problem: string | null;
}

/** A member of the cluster, as its record in etcd says, with its lease's time left. */
export interface ClusterMemberJson extends MemberRecord {
  /** Seconds left on its lease, as etcd says; null when etcd would not say. */
  leaseSeconds: number | null;
  /** The node that answered. */
  self: boolean;
}

/** A mirrored NVRAM device somewhere in the cluster, as its node reports it. */
export interface ClusterDeviceJson {
  device: string;
  node: string;
  role: string;
  epoch: number;
  state: string;
  policy: string;
  partner: string | null;
}

/** A mirrored NVRAM device's ownership in etcd, as this node sees it. */
export interface DeviceOwnershipJson {
  device: string;
  /** Raised by every takeover; null before the device has a record. */
  term: number | null;
  primary: string | null;
  replica: string | null;
  /** The replica holds every acknowledged record (it may take over). */
  inSync: boolean | null;
  /** This node's claim stands under the lease it holds now (it may acknowledge). */
  held: boolean;
}

/** GET /v1/cluster. */
export interface ClusterJson {
  /** This node's mirrored devices and who owns them in etcd. */
  ownership: DeviceOwnershipJson[];
  /** False for a node on its own (no cluster.etcd). */
  enabled: boolean;
  node: string;
  self: ClusterSelfJson | null;
  members: ClusterMemberJson[];
  devices: ClusterDeviceJson[];
  /** Member records that could not be read (skipped). */
  unreadable: string[];
  /** Why the members could not be listed (etcd unreachable); null when they were. */
  problem: string | null;
}

export interface NodeInfo {
  id: string;
  version: string;
  pid: number;
  startedAt: string;
  uptimeSeconds: number;
  dataDir: string;
  listen: { admin: string; rmem: string; nbd: string; mirror: string };
  media: MediumInfo[];
  usage: MediumUsage[];
  /** Storage cache counters, or null when the cache is disabled. */
  cache: CacheStats | null;
  nvram: DeviceInfo[];
  /** The mirror link to the partner node. */
  mirror: MirroringInfo;
  /** Volumes and NVRAM devices found on disk but not loaded at start. */
  damaged: { volumes: DamagedJson[]; nvram: DamagedJson[] };
  /** Volume data files without metadata, moved aside (never removed); see VolumesJson. */
  orphans: OrphanJson[];
  guests: {
    /** How guests' limits are enforced on this node. */
    enforcement: 'cgroup2' | 'cgroup1' | 'signal';
    /** The machine's cores, what the node keeps, and what guests' shares may add up to. */
    cpus: number;
    reserveCpu: number;
    budget: number;
    periodMs: number;
    list: GuestInfoJson[];
  };
  /** Request latencies since the node started (the same figures as /metrics' histograms). */
  latency: { nbd: LatencyJson[]; rmem: LatencyJson[]; journalSync: LatencyJson[] };
  /** node.busyPoll: the window in microseconds (0: off) and the seconds the event loop has spent in polling mode (serving included). */
  busyPoll?: { windowUs: number; seconds: number };
  /** node.cpuWakeLatency: the bound asked for (null: off), whether it is held, why not, and the machine's cpuidle driver and governor. */
  cpuWakeLatency?: { requestedUs: number | null; held: boolean; failure: string | null; cpuidle: string | null };
}

/**
 * One series of a latency histogram: NBD command, rmem operation or NVRAM device. The
 * quantiles are the histogram's bucket bounds (an upper estimate); null past 10 s.
 */
export interface LatencyJson {
  key: string;
  count: number;
  meanSeconds: number;
  p50Seconds: number | null;
  p99Seconds: number | null;
}

/**
 * A volume or NVRAM device whose files are on disk but that was not loaded at start
 * (metadata that fails validation, a data file that cannot be opened). It is not served,
 * its files are left untouched, and its name is refused to create and remove.
 */
export interface DamagedJson {
  /** The name its file carries (`<name>.json`). */
  name: string;
  /** The metadata file. */
  file: string;
  error: { code: ErrorCode; message: string; details?: Record<string, unknown> };
}

export interface GuestsJson {
  guests: GuestInfoJson[];
  /** Definitions that failed validation at start, with the error. */
  damaged: DamagedJson[];
}

export interface GuestInfoJson {
  name: string;
  state: 'stopped' | 'booting' | 'running' | 'failed';
  pid: number | null;
  command: string[];
  restart: 'never' | 'on-failure' | 'always';
  restarts: number;
  resets: number;
  lastExit: { code: number | null; signal: string | null } | null;
  error: string | null;
  /** Its CPU share in cores (0.25 is a quarter of one core); null: no share of its own. */
  cpu: number | null;
  /** How many CPUs it may run on; null: all. */
  cores: number | null;
  /** Its memory limit in bytes; null: none. */
  memoryLimit: number | null;
  /** Who enforces its limits: a cgroup, the signal fallback, or nothing (no limits, no cgroup). */
  enforcement: 'cgroup2' | 'cgroup1' | 'signal' | 'none';
  /** Cores it used over the last second; null when not running or not yet measured. */
  cpuUsed: number | null;
  /** CPU time used, all runs. */
  cpuSeconds: number;
  /** Time it was held back from running by its CPU share. */
  throttledSeconds: number;
  /** Memory its processes use now (the cgroup's charge, or the sum of their RSS). */
  memoryBytes: number;
  /** Volumes and NVRAM devices attached: what its cut-through sockets serve. */
  volumes: string[];
  nvram: string[];
  /** The user it runs as; null: the node's own. */
  user: string | null;
  /** Bytes of NVRAM it may allocate itself, and what its own devices take now. */
  nvramQuota: number | null;
  nvramOwned: number;
  /** Its cut-through sockets and the connections on each; null before its first boot. */
  sockets: { nbd: string; rmem: string; nbdConnections: number; rmemConnections: number } | null;
}

export interface NvramListJson {
  devices: DeviceInfo[];
  /** Devices not loaded at start (damaged metadata, or no room to restore them), with the error. */
  damaged: DamagedJson[];
  /** Journals kept aside (nvram/NAME.diverged-MS), by device name, whether the device still exists or not. */
  diverged: DivergedJson[];
  /** rmem sessions that have a journal open on a device, and the path each came in by. */
  holders: JournalHolderJson[];
}

export interface JournalHolderJson {
  device: string;
  serverId: string;
  /** `tcp` (the node's rmem port) or `unix` (a guest's cut-through socket). */
  via: 'tcp' | 'unix';
  /** The client's address (tcp), or the guest (unix: guest:NAME). */
  remote: string;
  /** The epoch the journal was opened with. */
  epoch: number;
}

export interface DivergedJson {
  name: string;
  /** Oldest first. */
  files: string[];
}

export interface NvramRecordJson {
  seq: number;
  timestamp: number;
  epoch: number;
  target: { volume: string; offset: number } | null;
  length: number;
  /** The payload, base64. */
  payload: string;
  /** The writer id and its number, for records appended by a multipath writer (JAPPENDW). */
  writer: { id: string; seq: number } | null;
}

export interface NvramDumpJson {
  /** Null when dumping a journal kept aside for a device that no longer exists. */
  device: DeviceInfo | null;
  records: NvramRecordJson[];
  /** With `diverged`: the kept-aside journal the records come from. */
  file?: string;
}

export interface PartitionRowJson {
  medium: MediumName;
  start: number;
  length: number;
  /** Inclusive hex range as in the patent's FIG. 12: `0x00000000 to 0x1fffffff`. */
  range: string;
  kind: Kind;
  owner: string | null;
}

export interface PartitionTableJson {
  rows: PartitionRowJson[];
  usage: MediumUsage[];
}

export interface AllocationRowJson {
  serverId: string;
  regionId: number;
  medium: MediumName;
  start: number;
  length: number;
  range: string;
}

export interface AllocationTableJson {
  rows: AllocationRowJson[];
  servers: ServerSummary[];
}

export interface ResizeRequest {
  medium: MediumName;
  kind: UsedKind;
  /** Bytes, or a size string such as `256MiB`. */
  bytes: number | string;
}

export interface ResizeResponse {
  result: ResizeResult;
  partition: PartitionTableJson;
}

/** An rmem session as the service reports it. */
export type RmemSessionJson = SessionInfo;

/** Server memory whose zeroing failed: held by its server's extents, handed to no one until a later session end zeroes it. */
export interface KeptAsideJson {
  serverId: string;
  medium: MediumName;
  start: number;
  length: number;
  range: string;
  /** Why the last zeroing failed. */
  error: string;
}

export interface ServersJson {
  sessions: RmemSessionJson[];
  allocation: AllocationTableJson;
  keptAside: KeptAsideJson[];
}

/** A volume as the volume manager reports it. */
export type VolumeJson = VolumeInfo;

export interface VolumesJson {
  volumes: VolumeJson[];
  /** Volumes not loaded at start (damaged metadata or data file), with the error. */
  damaged: DamagedJson[];
  /** Data files of volumes that have no metadata, moved aside; they stay listed until removed by hand. */
  orphans: OrphanJson[];
}

/**
 * A volume's data file (`<name>.img`) or zero map (`<name>.zmap`) found without its
 * metadata (`<name>.json`): left by a crash in the middle of a create (never
 * acknowledged) or a removal. It is renamed to `<file>.orphan-<time>` so the name can be
 * used again, and kept there until an operator removes it.
 */
export interface OrphanJson {
  /** The volume name the file belonged to. */
  name: string;
  /** Where the file is now. */
  file: string;
}

export interface ErrorResponse {
  error: { code: ErrorCode; message: string; details?: Record<string, unknown> };
}
