// Shapes of the admin API's JSON, shared by the server and the CLI. Versioned by the
// `/v1` prefix: fields may be added, never renamed or removed within v1.

import type { MirroringInfo } from '../nvram/mirroring.js';
import type { ErrorCode } from '../errors.js';
import type { Kind, MediumName, UsedKind } from '../memory/kinds.js';
import type { MediumUsage, ResizeResult } from '../memory/partition-table.js';
import type { ServerSummary } from '../memory/allocation-table.js';
import type { CacheStats } from '../storage/cache.js';
import type { DeviceInfo } from '../nvram/device.js';
import type { SessionInfo } from '../server/rmem-service.js';
import type { VolumeInfo } from '../storage/volume-manager.js';

export interface MediumInfo {
  name: MediumName;
  capacity: number;
  extentSize: number;
  persistent: boolean;
  residentBytes: number;
  path?: string;
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
}

export interface NvramListJson {
  devices: DeviceInfo[];
}

export interface NvramRecordJson {
  seq: number;
  timestamp: number;
  epoch: number;
  target: { volume: string; offset: number } | null;
  length: number;
  /** The payload, base64. */
  payload: string;
}

export interface NvramDumpJson {
  device: DeviceInfo;
  records: NvramRecordJson[];
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

export interface ServersJson {
  sessions: RmemSessionJson[];
  allocation: AllocationTableJson;
}

/** A volume as the volume manager reports it. */
export type VolumeJson = VolumeInfo;

export interface VolumesJson {
  volumes: VolumeJson[];
}

export interface ErrorResponse {
  error: { code: ErrorCode; message: string; details?: Record<string, unknown> };
}
