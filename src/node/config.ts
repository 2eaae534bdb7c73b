// Node configuration: embedded defaults, then a YAML file, then MEMSTRATA_* environment
// variables, then command-line flags, validated once with zod.
//
// Every setting is a leaf in SETTINGS; its environment variable is derived from its path
// (`media.dram.size` -> MEMSTRATA_MEDIA_DRAM_SIZE) and any leaf can be set from the
// command line with `--set path=value`; the common ones also have a flag of their own.
// The origin of each value is remembered, so an invalid one is reported with the field,
// the value, where it came from and the form that is accepted:
//
//   invalid configuration: media.dram.size is "12XB" (from environment variable
//   MEMSTRATA_MEDIA_DRAM_SIZE): expected a size in bytes such as 4096, 64KiB, ...

import { readFile, stat } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { BlockList, isIP } from 'node:net';
import { createSecureContext } from 'node:tls';
import type { TlsFiles } from '../net/tls.js';
import { resolve } from 'node:path';
import { YAMLParseError, parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { MisuseError, isMemstrataError } from '../errors.js';
import { MEDIA, USED_KINDS, type MediumName, type UsedKind } from '../kinds.js';
import type { MediumLayout } from '../memory/partition-table.js';
import { ADDRESS_FORM, DURATION_FORM, GiB, KiB, MiB, SIZE_FORM, formatSize, parseAddress, parseDuration, parseSize, type ListenAddress } from '../units.js';
import { LARGEST_REQUEST_COST } from '../protocol/rmem/codec.js';
import { MIRROR_LARGEST_REQUEST_COST } from '../protocol/mirror/codec.js';
import { ENFORCEMENTS, type EnforcementSetting } from '../guest/supervisor.js';
import { BUSY_POLL_MAX_US } from '../net/busy-poll.js';
import { CPU_WAKE_LATENCY_MAX_US } from './cpu-wake-latency.js';

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];
export const LOG_FORMATS = ['auto', 'json', 'pretty'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

/** The admin HTTP API: where it listens, who may use it, and what one client may cost it. */
export interface AdminConfig {
  listen: ListenAddress;
  /** HTTPS with the node's certificate. */
  tls: boolean;
  /** Bearer token every route but /healthz requires (from admin.token or admin.tokenFile); undefined: none. */
  token: string | undefined;
  /** /metrics answers without the token. */
  metricsPublic: boolean;
  maxConnections: number;
  maxConnectionsPerClient: number;
  headersTimeoutMs: number;
  requestTimeoutMs: number;
  bodyLimit: number;
}

/** A partition size: bytes, or a share of the medium. */
export type Share = { bytes: number } | { percent: number };

export interface KindSetting {
  initial: number;
  min: number;
  max: number;
}

export const NBD_TLS_MODES = ['off', 'on', 'require'] as const;
export type NbdTlsMode = (typeof NBD_TLS_MODES)[number];
export const TLS_MODES = ['off', 'require'] as const;
export type TlsMode = (typeof TLS_MODES)[number];

export interface NodeConfig {
  /**
   * `busyPollUs`: how long the event loop polls for input after the last chunk, in microseconds (0: off; net/busy-poll.ts).
   * `cpuWakeLatencyUs`: the CPU wake-up latency bound the node holds while it runs (undefined: off; cpu-wake-latency.ts).
   */
  node: { id: string | undefined; zone: string | undefined; busyPollUs: number; cpuWakeLatencyUs: number | undefined };
  /** Loaded from tls.cert, tls.key and tls.ca; undefined when no service uses TLS. */
  tls: TlsFiles | undefined;
  /** Membership and ownership through etcd; `etcd` undefined: a node on its own (the default). */
  cluster: { etcd: string[] | undefined; name: string; leaseMs: number; advertise: string | undefined };
  dataDir: string;
  admin: AdminConfig;
  rmem: {
    tls: TlsMode;
    listen: ListenAddress;
    leaseMs: number;
    token: string | undefined;
    maxInFlight: number;
    maxInFlightBytes: number;
    maxInFlightBytesTotal: number;
    maxConnections: number;
    maxConnectionsPerClient: number;
    handshakeTimeoutMs: number;
  };
  nbd: {
    listen: ListenAddress;
    /** off: NBD_OPT_STARTTLS refused; on: offered; require: every option but STARTTLS and ABORT waits for it (FORCEDTLS). */
    tls: NbdTlsMode;
    maxConnections: number;
    handshakeTimeoutMs: number;
    maxInFlight: number;
    maxInFlightBytes: number;
    maxInFlightBytesTotal: number;
  };
  mirror: {
    listen: ListenAddress;
    tls: TlsMode;
    partner: ListenAddress | undefined;
    partnerId: string | undefined;
    onPartnerDown: 'degrade' | 'refuse';
    timeoutMs: number;
    token: string | undefined;
    maxInFlight: number;
    maxInFlightBytes: number;
    maxInFlightBytesTotal: number;
    maxConnections: number;
    maxConnectionsPerClient: number;
    handshakeTimeoutMs: number;
    stallTimeoutMs: number;
  };
  volumes: { defaultSize: number };
  cache: { enabled: boolean; maxDirtyAgeMs: number };
  guests: { enforcement: EnforcementSetting; reserveCpu: number; periodMs: number; maxConnections: number };
  log: { level: LogLevel; format: LogFormat };
  media: {
    extentSize: number;
    dram: { size: number };
    flash: { size: number; path: string };
  };
  /** Resolved to bytes, whole extents. */
  partition: Record<MediumName, Record<UsedKind, KindSetting>>;
}

// ---- leaf types: each turns raw input into a value or names the accepted form ----

function leaf<T>(form: string, convert: (value: unknown) => T | undefined) {
  return z.unknown().transform((value, ctx): T => {
    let result: T | undefined;
    try {
      result = convert(value);
    } catch {
      result = undefined;
    }
    if (result === undefined) {
      ctx.addIssue({ code: 'custom', message: `expected ${form}`, input: value });
      return z.NEVER;
    }
    return result;
  });
}

const sizeLeaf = leaf(SIZE_FORM, (v) => (typeof v === 'number' || typeof v === 'string' ? parseSize(v) : undefined));

const SHARE_FORM = `${SIZE_FORM}, or a share of the medium such as 25%`;
const SHARE_PATTERN = /^\s*(\d+(?:\.\d+)?)\s*%\s*$/;
const shareLeaf = leaf<Share>(SHARE_FORM, (v) => {
  if (typeof v === 'string') {
    const m = SHARE_PATTERN.exec(v);
    if (m !== null) {
      const percent = Number(m[1]);
      return percent <= 100 ? { percent } : undefined;
    }
  }
  return typeof v === 'number' || typeof v === 'string' ? { bytes: parseSize(v) } : undefined;
});

const addressLeaf = leaf<ListenAddress>(ADDRESS_FORM, (v) => (typeof v === 'string' ? parseAddress(v) : undefined));

const durationLeaf = leaf<number>(DURATION_FORM, (v) => (typeof v === 'number' || typeof v === 'string' ? parseDuration(v) : undefined));

/** Whole microseconds from 0 to `max`: a number, or a string N, Nus or Nms; undefined otherwise. */
function micros(v: unknown, max: number): number | undefined {
  const match = typeof v === 'string' ? /^\s*(\d+)\s*(us|ms)?\s*$/.exec(v) : null;
  const us = typeof v === 'number' ? v : match === null ? undefined : Number(match[1]) * (match[2] === 'ms' ? 1000 : 1);
  return us !== undefined && Number.isSafeInteger(us) && us >= 0 && us <= max ? us : undefined;
}

const BUSY_POLL_FORM = `a time from 0 to ${BUSY_POLL_MAX_US}us such as 0, 50us, 200us or 1ms (a bare number is microseconds)`;
const busyPollLeaf = leaf<number>(BUSY_POLL_FORM, (v) => micros(v, BUSY_POLL_MAX_US));

const CPU_WAKE_LATENCY_FORM = `off, or a time from 0 to ${CPU_WAKE_LATENCY_MAX_US / 1000}ms such as 0, 10us or 1ms (a bare number is microseconds)`;
const cpuWakeLatencyLeaf = leaf<number | null>(CPU_WAKE_LATENCY_FORM, (v) =>
  typeof v === 'string' && v.trim().toLowerCase() === 'off' ? null : micros(v, CPU_WAKE_LATENCY_MAX_US),
);

const booleanLeaf = leaf<boolean>('true or false', (v) => (v === true || v === 'true' ? true : v === false || v === 'false' ? false : undefined));

const TOKEN_FORM = 'a string of 1 to 1024 bytes';
const tokenLeaf = leaf<string>(TOKEN_FORM, (v) => (typeof v === 'string' && v.length > 0 && Buffer.byteLength(v) <= 1024 ? v : undefined));

// A bearer token travels in an HTTP header (RFC 6750 b64token is a subset of visible
// ASCII); 16 characters at least, so a guessable word is refused.
const ADMIN_TOKEN_FORM = '16 to 1024 visible ASCII characters without spaces, such as the output of `openssl rand -hex 32`';
const ADMIN_TOKEN_PATTERN = /^[\x21-\x7e]{16,1024}$/;
const adminTokenLeaf = leaf<string>(ADMIN_TOKEN_FORM, (v) => (typeof v === 'string' && ADMIN_TOKEN_PATTERN.test(v) ? v : undefined));

function intLeaf(min: number, max: number) {
  const form = `a whole number from ${min} to ${max}`;
  return leaf<number>(form, (v) => {
    const n = typeof v === 'string' && /^\s*\d+\s*$/.test(v) ? Number(v) : v;
    return typeof n === 'number' && Number.isInteger(n) && n >= min && n <= max ? n : undefined;
  });
}

const PATH_FORM = 'a non-empty file system path';
const pathLeaf = leaf<string>(PATH_FORM, (v) => (typeof v === 'string' && v.trim() !== '' ? v : undefined));

export const NODE_ID_FORM = '1 to 64 letters, digits, ".", "_" or "-", starting with a letter or digit';
export const NODE_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const nodeIdLeaf = leaf<string>(NODE_ID_FORM, (v) => (typeof v === 'string' && NODE_ID_PATTERN.test(v) ? v : undefined));

export const ZONE_FORM = NODE_ID_FORM;
const zoneLeaf = leaf<string>(ZONE_FORM, (v) => (typeof v === 'string' && NODE_ID_PATTERN.test(v) ? v : undefined));

export const ETCD_FORM = 'etcd client URLs such as http://10.0.0.1:2379, separated by commas';
const etcdLeaf = leaf<string[]>(ETCD_FORM, (v) => {
  const items = typeof v === 'string' ? v.split(',').map((u) => u.trim()) : Array.isArray(v) ? v : undefined;
  if (items === undefined || items.length === 0) return undefined;
  const urls: string[] = [];
  for (const item of items) {
    if (typeof item !== 'string') return undefined;
    const url = new URL(item);
    if ((url.protocol !== 'http:' && url.protocol !== 'https:') || url.port === '' || url.pathname !== '/' || url.search !== '' || url.username !== '') return undefined;
    urls.push(`${url.protocol}//${url.host}`);
  }
  return urls;
});

const HOST_FORM = 'a host name or IP address other nodes and hosts can reach';
const hostLeaf = leaf<string>(HOST_FORM, (v) => (typeof v === 'string' && /^[A-Za-z0-9.:_-]{1,253}$/.test(v) ? v : undefined));

const CORES_FORM = 'a number of cores such as 0.5 or 1';
const coresLeaf = leaf<number>(CORES_FORM, (v) => {
  const n = typeof v === 'string' && /^\s*\d+(\.\d+)?\s*$/.test(v) ? Number(v) : v;
  return typeof n === 'number' && Number.isFinite(n) && n >= 0 ? n : undefined;
});

function enumLeaf<const T extends readonly string[]>(values: T) {
  return leaf<T[number]>(`one of ${values.join(', ')}`, (v) => (typeof v === 'string' && values.includes(v) ? v : undefined));
}

const kindSchema = (initial: string) =>
  z.strictObject({
    initial: shareLeaf.prefault(initial),
    min: shareLeaf.prefault('0'),
    max: shareLeaf.prefault('100%'),
  }).prefault({});

const DEFAULT_SHARES: Record<UsedKind, string> = { cache: '50%', server: '25%', nvram: '6.25%' };

const mediumPartitionSchema = z
  .strictObject({
    cache: kindSchema(DEFAULT_SHARES.cache),
    server: kindSchema(DEFAULT_SHARES.server),
    nvram: kindSchema(DEFAULT_SHARES.nvram),
  })
  .prefault({});

const rawSchema = z.strictObject({
  node: z.strictObject({ id: nodeIdLeaf.optional(), zone: zoneLeaf.optional(), busyPoll: busyPollLeaf.prefault('0'), cpuWakeLatency: cpuWakeLatencyLeaf.prefault('off') }).prefault({}),
  cluster: z
    .strictObject({
      etcd: etcdLeaf.optional(),
      name: nodeIdLeaf.prefault('default'),
      lease: durationLeaf.prefault('5s'),
      advertise: hostLeaf.optional(),
    })
    .prefault({}),
  dataDir: pathLeaf.prefault('./memstrata-data'),
  tls: z.strictObject({ cert: pathLeaf.optional(), key: pathLeaf.optional(), ca: pathLeaf.optional() }).prefault({}),
  admin: z
    .strictObject({
      listen: addressLeaf.prefault('127.0.0.1:10880'),
      tls: booleanLeaf.prefault('false'),
      token: adminTokenLeaf.optional(),
      tokenFile: pathLeaf.optional(),
      metricsPublic: booleanLeaf.prefault('false'),
      maxConnections: intLeaf(1, 65536).prefault(256),
      maxConnectionsPerClient: intLeaf(1, 65536).prefault(32),
      headersTimeout: durationLeaf.prefault('10s'),
      requestTimeout: durationLeaf.prefault('30s'),
      bodyLimit: sizeLeaf.prefault('64KiB'),
    })
    .prefault({}),
  nbd: z
    .strictObject({
      listen: addressLeaf.prefault('127.0.0.1:10809'),
      tls: enumLeaf(NBD_TLS_MODES).prefault('off'),
      maxConnections: intLeaf(1, 65536).prefault(128),
      handshakeTimeout: durationLeaf.prefault('10s'),
      maxInFlight: intLeaf(1, 65536).prefault(128),
      maxInFlightBytes: sizeLeaf.prefault('32MiB'),
      maxInFlightBytesTotal: sizeLeaf.prefault('96MiB'),
    })
    .prefault({}),
  volumes: z.strictObject({ defaultSize: sizeLeaf.prefault('1GiB') }).prefault({}),
  cache: z.strictObject({ enabled: booleanLeaf.prefault('true'), maxDirtyAge: durationLeaf.prefault('5s') }).prefault({}),
  rmem: z
    .strictObject({
      listen: addressLeaf.prefault('127.0.0.1:10810'),
      tls: enumLeaf(TLS_MODES).prefault('off'),
      lease: durationLeaf.prefault('30s'),
      token: tokenLeaf.optional(),
      maxInFlight: intLeaf(1, 65536).prefault(256),
      maxInFlightBytes: sizeLeaf.prefault('32MiB'),
      maxInFlightBytesTotal: sizeLeaf.prefault('128MiB'),
      maxConnections: intLeaf(1, 65536).prefault(256),
      maxConnectionsPerClient: intLeaf(1, 65536).prefault(64),
      handshakeTimeout: durationLeaf.prefault('5s'),
    })
    .prefault({}),
  mirror: z
    .strictObject({
      listen: addressLeaf.prefault('127.0.0.1:10811'),
      tls: enumLeaf(TLS_MODES).prefault('off'),
      partner: addressLeaf.optional(),
      partnerId: nodeIdLeaf.optional(),
      onPartnerDown: enumLeaf(['degrade', 'refuse'] as const).prefault('degrade'),
      timeout: durationLeaf.prefault('1s'),
      token: tokenLeaf.optional(),
      maxInFlight: intLeaf(1, 65536).prefault(64),
      maxInFlightBytes: sizeLeaf.prefault('64MiB'),
      maxInFlightBytesTotal: sizeLeaf.prefault('128MiB'),
      maxConnections: intLeaf(1, 65536).prefault(16),
      maxConnectionsPerClient: intLeaf(1, 65536).prefault(4),
      handshakeTimeout: durationLeaf.prefault('5s'),
      stallTimeout: durationLeaf.prefault('5s'),
    })
    .prefault({}),
  guests: z
    .strictObject({
      enforcement: enumLeaf(ENFORCEMENTS).prefault('auto'),
      reserveCpu: coresLeaf.prefault('0.5'),
      period: durationLeaf.prefault('100ms'),
      maxConnections: intLeaf(1, 65536).prefault(32),
    })
    .prefault({}),
  log: z
    .strictObject({ level: enumLeaf(LOG_LEVELS).prefault('info'), format: enumLeaf(LOG_FORMATS).prefault('auto') })
    .prefault({}),
  media: z
    .strictObject({
      extentSize: sizeLeaf.prefault('1MiB'),
      dram: z.strictObject({ size: sizeLeaf.prefault('1GiB') }).prefault({}),
      flash: z.strictObject({ size: sizeLeaf.prefault('4GiB'), path: pathLeaf.optional() }).prefault({}),
    })
    .prefault({}),
  partition: z.strictObject({ dram: mediumPartitionSchema, flash: mediumPartitionSchema }).prefault({}),
});

// ---- the catalogue: every leaf, its flag, its documentation ----

export interface Setting {
  path: string;
  /** A flag of its own on `memstrata node start`; every setting also takes `--set path=value`. */
  flag?: string;
  default: string;
  doc: string;
}

const partitionSettings: Setting[] = MEDIA.flatMap((medium) =>
  USED_KINDS.flatMap((kind) => [
    { path: `partition.${medium}.${kind}.initial`, default: DEFAULT_SHARES[kind], doc: `${kind} partition on ${medium} at start` },
    { path: `partition.${medium}.${kind}.min`, default: '0', doc: `smallest the ${kind} partition on ${medium} may become` },
    { path: `partition.${medium}.${kind}.max`, default: '100%', doc: `largest the ${kind} partition on ${medium} may become` },
  ]),
);

export const SETTINGS: readonly Setting[] = [
  { path: 'node.id', flag: '--node-id', default: '(generated, kept in the data directory)', doc: 'name of this node in tables, logs and the cluster' },
  { path: 'node.busyPoll', flag: '--busy-poll', default: '0', doc: 'after each chunk of input on its NBD, rmem and mirror connections (and each tick\'s replies on them), the node\'s event loop polls for the next one for this long (up to 10ms; a bare number is microseconds) instead of sleeping: lower latency where waking a core costs much (virtual machines, deep C-states), paid with a core while requests keep coming; 0 is off' },
  { path: 'node.cpuWakeLatency', flag: '--cpu-wake-latency', default: 'off', doc: 'while the node runs it holds a Linux CPU latency request (/dev/cpu_dma_latency) of this many microseconds (up to `1000ms`; a bare number is microseconds; `0` is the strongest request, not off): `0` keeps idle CPUs polling in the kernel instead of halting, so waking an idle node costs no halt exit (in a VM whose halt state advertises 1 us only `0` has an effect; with no cpuidle driver nothing does). Its costs are machine-wide and outside the scheduler\'s sight (idle CPUs that never rest: power, an SMT sibling\'s share, the host\'s CPU time in a VM); needs write access to the device, and where the request cannot be made the node warns (`MS_CPU_LATENCY_UNAVAILABLE`) and runs without it; `memstrata status` and `memstrata_cpu_wake_latency_held` show whether it is held' },
  { path: 'node.zone', flag: '--zone', default: '(none)', doc: 'failure zone of this node (a rack, a room, a site), shown in its cluster record' },
  { path: 'cluster.etcd', flag: '--etcd', default: '(none: a node on its own)', doc: 'etcd client URLs, separated by commas; set, the node registers in the cluster under its lease' },
  { path: 'cluster.name', default: 'default', doc: 'name of the cluster: nodes and hosts of one cluster share the etcd prefix /memstrata/<name>/' },
  { path: 'cluster.lease', default: '5s', doc: 'the node\'s etcd lease, whole seconds from 2s to 1h: a node silent for this long leaves the cluster' },
  { path: 'cluster.advertise', default: '(each service\'s listen host; the machine\'s host name where that is 0.0.0.0 or ::)', doc: 'host name or address other nodes and hosts reach this node\'s services at' },
  { path: 'dataDir', flag: '--data-dir', default: './memstrata-data', doc: 'the flash file, volumes, NVRAM journals, the node id and the lock' },
  { path: 'tls.cert', flag: '--tls-cert', default: '(none)', doc: 'PEM certificate (chain) the node presents on every service with TLS' },
  { path: 'tls.key', flag: '--tls-key', default: '(none)', doc: 'PEM private key of tls.cert; keep it mode 600' },
  { path: 'tls.ca', flag: '--tls-ca', default: '(none: clients need no certificate)', doc: 'PEM CA certificate(s): clients and peers of every TLS service must present a certificate it signed, and the node checks its mirror partner and etcd against it' },
  { path: 'admin.listen', flag: '--admin-listen', default: '127.0.0.1:10880', doc: 'admin HTTP API, /metrics and /healthz; port 0 picks a free port; an address that is not loopback needs admin.token or admin.tokenFile' },
  { path: 'admin.tls', default: 'false', doc: 'true serves the admin API over HTTPS with tls.cert' },
  { path: 'admin.token', default: '(none)', doc: 'bearer token every admin route but /healthz requires (16 to 1024 visible ASCII characters); set it in the environment or use admin.tokenFile, not a command line' },
  { path: 'admin.tokenFile', default: '(none)', doc: 'file holding admin.token (surrounding whitespace ignored); read once at start' },
  { path: 'admin.metricsPublic', default: 'false', doc: 'true lets /metrics answer without the token' },
  { path: 'admin.maxConnections', default: '256', doc: 'admin connections open at once; more are closed at once' },
  { path: 'admin.maxConnectionsPerClient', default: '32', doc: 'admin connections open at once from one remote address; more are closed at once' },
  { path: 'admin.headersTimeout', default: '10s', doc: 'a client must send a request\'s headers within this, or gets 408 and is disconnected' },
  { path: 'admin.requestTimeout', default: '30s', doc: 'a client must send a whole request, body included, within this; at least admin.headersTimeout' },
  { path: 'admin.bodyLimit', default: '64KiB', doc: 'largest admin request body; a larger one is refused with MS_ADMIN_BODY_TOO_LARGE' },
  { path: 'nbd.listen', flag: '--nbd-listen', default: '127.0.0.1:10809', doc: 'NBD block service; port 0 picks a free port' },
  { path: 'nbd.tls', flag: '--nbd-tls', default: 'off', doc: 'off (NBD_OPT_STARTTLS refused), on (offered; clients choose), or require (nothing but STARTTLS and ABORT before TLS: FORCEDTLS)' },
  { path: 'nbd.maxConnections', default: '128', doc: 'NBD connections open at once; one more is closed at once' },
  { path: 'nbd.handshakeTimeout', default: '10s', doc: 'an NBD client that has not entered transmission (or sent ABORT) in this time is disconnected' },
  { path: 'nbd.maxInFlight', default: '128', doc: 'NBD requests served at once per connection before the node stops reading it' },
  { path: 'nbd.maxInFlightBytes', default: '32MiB', doc: 'bytes of NBD payloads and replies in flight per connection before the node stops reading it' },
  { path: 'nbd.maxInFlightBytesTotal', default: '96MiB', doc: 'bytes of NBD payloads and replies in flight across all connections; a connection waits, unread, while the service is at this cap' },
  { path: 'volumes.defaultSize', default: '1GiB', doc: 'size of the `default` volume made on first start' },
  { path: 'cache.enabled', default: 'true', doc: 'write-back storage cache for volumes in the cache partition; false writes straight to the data store' },
  { path: 'cache.maxDirtyAge', default: '5s', doc: 'dirty cache data older than this is written back to the data store' },
  { path: 'rmem.listen', flag: '--rmem-listen', default: '127.0.0.1:10810', doc: 'rmem remote-memory service; port 0 picks a free port' },
  { path: 'rmem.tls', default: 'off', doc: 'off, or require: the rmem service speaks TLS only, from the first byte' },
  { path: 'rmem.lease', flag: '--rmem-lease', default: '30s', doc: 'how long a lost server keeps its regions, and how long a silent connection lives' },
  { path: 'rmem.token', default: '(none)', doc: 'shared token every server must present at HELLO; set it in the file or environment, not on the command line' },
  { path: 'rmem.maxInFlight', default: '256', doc: 'requests served at once per connection before the node stops reading it' },
  { path: 'rmem.maxInFlightBytes', default: '32MiB', doc: 'bytes one connection may hold in flight (request bodies and replies not yet written) before the node stops reading it' },
  { path: 'rmem.maxInFlightBytesTotal', default: '128MiB', doc: 'bytes all rmem connections together may hold in flight; a connection waits, unread, while the service is at this cap' },
  { path: 'rmem.maxConnections', default: '256', doc: 'rmem connections open at once; more are closed as they arrive' },
  { path: 'rmem.maxConnectionsPerClient', default: '64', doc: 'rmem connections open at once from one remote address; more are closed as they arrive' },
  { path: 'rmem.handshakeTimeout', default: '5s', doc: 'a connection whose HELLO has not succeeded in this time is closed' },
  { path: 'mirror.listen', flag: '--mirror-listen', default: '127.0.0.1:10811', doc: 'mirror service, where a partner node keeps replicas of its mirrored NVRAM devices here; port 0 picks a free port' },
  { path: 'mirror.tls', default: 'off', doc: 'off, or require: the mirror service speaks TLS only, and the link to the partner is TLS (the partner\'s certificate checked against tls.ca)' },
  { path: 'mirror.partner', flag: '--mirror-partner', default: '(none)', doc: 'mirror service of the partner node that holds replicas of this node\'s mirrored NVRAM devices, such as 10.0.0.2:10811' },
  { path: 'mirror.partnerId', default: '(any)', doc: 'node id of the mirror partner: the mirror service admits only that node, and the link mirrors only to a node that answers with it' },
  { path: 'mirror.onPartnerDown', default: 'degrade', doc: 'when the partner is unreachable, mirrored devices degrade (acknowledge once the local journal is synced) or refuse appends' },
  { path: 'mirror.timeout', default: '1s', doc: 'a partner that has not answered a mirror request in this time is taken as lost' },
  { path: 'mirror.token', default: '(none)', doc: 'shared token both partners present on the mirror link; set it in the file or environment' },
  { path: 'mirror.maxInFlight', default: '64', doc: 'requests taken in at once per mirror connection (applied in order) before the node stops reading it' },
  { path: 'mirror.maxInFlightBytes', default: '64MiB', doc: 'bytes one mirror connection may hold in flight (request bodies and replies not yet written) before the node stops reading it' },
  { path: 'mirror.maxInFlightBytesTotal', default: '128MiB', doc: 'bytes all mirror connections together may hold in flight' },
  { path: 'mirror.maxConnections', default: '16', doc: 'mirror connections open at once; more are closed as they arrive' },
  { path: 'mirror.maxConnectionsPerClient', default: '4', doc: 'mirror connections open at once from one remote address; more are closed as they arrive' },
  { path: 'mirror.handshakeTimeout', default: '5s', doc: 'a mirror connection whose HELLO has not succeeded in this time is closed' },
  { path: 'mirror.stallTimeout', default: '5s', doc: 'after HELLO, a mirror connection that began a frame and sent no more of it, or does not read its replies, for this long is closed' },
  { path: 'guests.enforcement', default: 'auto', doc: 'how guests\' CPU shares, cores and memory limits are enforced: cgroup2, cgroup1, signal (SIGSTOP/SIGCONT duty cycle, taskset, RSS watch), or auto, the first of these the machine allows' },
  { path: 'guests.reserveCpu', default: '0.5', doc: 'cores the node keeps for itself: guests\' CPU shares may add up to the machine\'s cores less this, and in a cgroup all guests together are held to it' },
  { path: 'guests.period', default: '100ms', doc: 'the period a guest\'s CPU share is enforced over (cgroup quota period or duty cycle), from 1ms to 1s; shorter is smoother and costs more' },
  { path: 'guests.maxConnections', default: '32', doc: 'connections each guest\'s cut-through socket (nbd.sock, rmem.sock) admits at once; they count against nbd.maxConnections and rmem.maxConnections too' },
  { path: 'log.level', flag: '--log-level', default: 'info', doc: LOG_LEVELS.join(', ') },
  { path: 'log.format', flag: '--log-format', default: 'auto', doc: 'json, pretty, or auto (pretty when stdout is a terminal)' },
  { path: 'media.extentSize', flag: '--extent-size', default: '1MiB', doc: 'unit of the partition table; a power of two from 4KiB to 1GiB' },
  { path: 'media.dram.size', flag: '--dram-size', default: '1GiB', doc: 'process memory offered, taken only as it is written; 0 disables' },
  { path: 'media.flash.size', flag: '--flash-size', default: '4GiB', doc: 'size of the sparse flash file; 0 disables' },
  { path: 'media.flash.path', flag: '--flash-path', default: '<dataDir>/flash.img', doc: 'the flash file, ideally on local SSD' },
  ...partitionSettings,
];

export function envName(path: string): string {
  return `MEMSTRATA_${path.split('.').map((part) => part.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toUpperCase()).join('_')}`;
}

const SETTING_BY_ENV = new Map(SETTINGS.map((s) => [envName(s.path), s]));
const SETTING_BY_PATH = new Map(SETTINGS.map((s) => [s.path, s]));

// ---- loading ----

export interface ConfigSources {
  /** YAML file, from `--config`. */
  file?: string;
  env?: NodeJS.ProcessEnv;
  /** `[path, value]` pairs from flags, in the order given. */
  flags?: readonly (readonly [string, string])[];
  cwd?: string;
}

export interface LoadedConfig {
  config: NodeConfig;
  /** Things worth a log line, such as MEMSTRATA_* variables that name no setting. */
  warnings: string[];
}

/** Environment variables that other parts of memstrata read; not node settings. */
const NON_SETTING_ENV = new Set(['MEMSTRATA_ADMIN', 'MEMSTRATA_REQUIRE_INTEROP']);

export async function loadConfig(sources: ConfigSources = {}): Promise<LoadedConfig> {
  const cwd = sources.cwd ?? process.cwd();
  const origin = new Map<string, string>();
  const warnings: string[] = [];
  let raw: Record<string, unknown> = {};

  if (sources.file !== undefined) {
    const file = resolve(cwd, sources.file);
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (error) {
      throw new MisuseError('MS_CONFIG_FILE', `cannot read configuration file ${file}: ${(error as Error).message}`, { cause: error });
    }
    let parsed: unknown;
    try {
      // No pretty errors (their code frame quotes the file) and no warnings on stderr
      // (they quote tags): the file may hold a token, and none of its text is shown.
      parsed = parseYaml(text, { prettyErrors: false, logLevel: 'error' });
    } catch (error) {
      throw new MisuseError('MS_CONFIG_FILE', `configuration file ${file} is not valid YAML: ${yamlProblem(error, text)} (the file's text is not shown: it may hold a token)`);
    }
    if (parsed !== null && parsed !== undefined) {
      if (typeof parsed !== 'object' || Array.isArray(parsed)) {
        throw new MisuseError('MS_CONFIG_FILE', `configuration file ${file} must hold a mapping of settings at the top level`);
      }
      raw = parsed as Record<string, unknown>;
      for (const path of leafPaths(raw)) origin.set(path, `file ${file}`);
    }
  }

  for (const [name, value] of Object.entries(sources.env ?? {})) {
    if (!name.startsWith('MEMSTRATA_') || value === undefined) continue;
    const setting = SETTING_BY_ENV.get(name);
    if (setting === undefined) {
      if (!NON_SETTING_ENV.has(name)) warnings.push(`environment variable ${name} names no setting and is ignored`);
      continue;
    }
    setPath(raw, setting.path, value);
    origin.set(setting.path, `environment variable ${name}`);
  }

  for (const [path, value] of sources.flags ?? []) {
    const setting = SETTING_BY_PATH.get(path);
    if (setting === undefined) {
      throw new MisuseError('MS_CONFIG_INVALID', `invalid configuration: unknown setting ${path} (from flag --set); known settings: ${SETTINGS.map((s) => s.path).join(', ')}`, {
        details: { field: path },
      });
    }
    setPath(raw, path, value);
    origin.set(path, setting.flag === undefined ? `flag --set ${path}=` : `flag ${setting.flag}`);
  }

  const result = rawSchema.safeParse(raw);
  if (!result.success) {
    const lines = result.error.issues.map((issue) => describeIssue(issue, raw, origin));
    throw new MisuseError('MS_CONFIG_INVALID', `invalid configuration: ${lines.join('; ')}`, {
      details: { fields: result.error.issues.map((i) => i.path.join('.')) },
    });
  }
  const parsed = result.data;
  const dataDir = resolve(cwd, parsed.dataDir);
  const config: NodeConfig = {
    node: { id: parsed.node.id, zone: parsed.node.zone, busyPollUs: parsed.node.busyPoll, cpuWakeLatencyUs: parsed.node.cpuWakeLatency ?? undefined },
    cluster: { etcd: parsed.cluster.etcd, name: parsed.cluster.name, leaseMs: parsed.cluster.lease, advertise: parsed.cluster.advertise },
    tls: undefined,
    dataDir,
    admin: {
      listen: parsed.admin.listen,
      tls: parsed.admin.tls,
      token: parsed.admin.token,
      metricsPublic: parsed.admin.metricsPublic,
      maxConnections: parsed.admin.maxConnections,
      maxConnectionsPerClient: parsed.admin.maxConnectionsPerClient,
      headersTimeoutMs: parsed.admin.headersTimeout,
      requestTimeoutMs: parsed.admin.requestTimeout,
      bodyLimit: parsed.admin.bodyLimit,
    },
    nbd: {
      listen: parsed.nbd.listen,
      tls: parsed.nbd.tls,
      maxConnections: parsed.nbd.maxConnections,
      handshakeTimeoutMs: parsed.nbd.handshakeTimeout,
      maxInFlight: parsed.nbd.maxInFlight,
      maxInFlightBytes: parsed.nbd.maxInFlightBytes,
      maxInFlightBytesTotal: parsed.nbd.maxInFlightBytesTotal,
    },
    volumes: { defaultSize: parsed.volumes.defaultSize },
    cache: { enabled: parsed.cache.enabled, maxDirtyAgeMs: parsed.cache.maxDirtyAge },
    guests: { enforcement: parsed.guests.enforcement, reserveCpu: parsed.guests.reserveCpu, periodMs: parsed.guests.period, maxConnections: parsed.guests.maxConnections },
    rmem: {
      tls: parsed.rmem.tls,
      listen: parsed.rmem.listen,
      leaseMs: parsed.rmem.lease,
      token: parsed.rmem.token,
      maxInFlight: parsed.rmem.maxInFlight,
      maxInFlightBytes: parsed.rmem.maxInFlightBytes,
      maxInFlightBytesTotal: parsed.rmem.maxInFlightBytesTotal,
      maxConnections: parsed.rmem.maxConnections,
      maxConnectionsPerClient: parsed.rmem.maxConnectionsPerClient,
      handshakeTimeoutMs: parsed.rmem.handshakeTimeout,
    },
    mirror: {
      listen: parsed.mirror.listen,
      tls: parsed.mirror.tls,
      partner: parsed.mirror.partner,
      partnerId: parsed.mirror.partnerId,
      onPartnerDown: parsed.mirror.onPartnerDown,
      timeoutMs: parsed.mirror.timeout,
      token: parsed.mirror.token,
      maxInFlight: parsed.mirror.maxInFlight,
      maxInFlightBytes: parsed.mirror.maxInFlightBytes,
      maxInFlightBytesTotal: parsed.mirror.maxInFlightBytesTotal,
      maxConnections: parsed.mirror.maxConnections,
      maxConnectionsPerClient: parsed.mirror.maxConnectionsPerClient,
      handshakeTimeoutMs: parsed.mirror.handshakeTimeout,
      stallTimeoutMs: parsed.mirror.stallTimeout,
    },
    log: { level: parsed.log.level, format: parsed.log.format },
    media: {
      extentSize: parsed.media.extentSize,
      dram: { size: parsed.media.dram.size },
      flash: { size: parsed.media.flash.size, path: resolve(dataDir, parsed.media.flash.path ?? 'flash.img') },
    },
    partition: { dram: emptyPartition(), flash: emptyPartition() },
  };
  checkMedia(config, raw, origin);
  config.tls = await loadTls(config, parsed.tls, cwd, raw, origin, warnings);
  await checkAdmin(config, parsed.admin.tokenFile, cwd, raw, origin, warnings);
  if (config.volumes.defaultSize <= 0 || config.volumes.defaultSize % 4096 !== 0) {
    throw invalid('volumes.defaultSize', raw, origin, 'expected a positive multiple of 4096 bytes');
  }
  if (config.rmem.leaseMs < 100 || config.rmem.leaseMs > 86_400_000) {
    throw invalid('rmem.lease', raw, origin, 'expected a duration from 100ms to 24h');
  }
  for (const service of ['nbd', 'rmem', 'mirror'] as const) {
    const limits = config[service];
    if (limits.maxInFlightBytes < 64 * KiB) throw invalid(`${service}.maxInFlightBytes`, raw, origin, 'expected at least 64KiB');
    if (limits.maxInFlightBytesTotal < limits.maxInFlightBytes) {
      throw invalid(`${service}.maxInFlightBytesTotal`, raw, origin, `expected at least ${service}.maxInFlightBytes (${formatSize(limits.maxInFlightBytes)})`);
    }
    // rmem and the mirror serve the oldest waiter first: a request that could never fit
    // the service budget would hold up every other connection's for good.
    const cost = service === 'rmem' ? LARGEST_REQUEST_COST : service === 'mirror' ? MIRROR_LARGEST_REQUEST_COST : 0;
    const largest = Math.ceil(cost / MiB) * MiB;
    if (limits.maxInFlightBytesTotal < largest) {
      throw invalid(`${service}.maxInFlightBytesTotal`, raw, origin, `expected at least ${formatSize(largest)}, what the largest ${service} request can hold (its body and its reply)`);
    }
    if (limits.handshakeTimeoutMs < 10 || limits.handshakeTimeoutMs > 600_000) {
      throw invalid(`${service}.handshakeTimeout`, raw, origin, 'expected a duration from 10ms to 10m');
    }
  }
  if (config.mirror.timeoutMs < 10 || config.mirror.timeoutMs > 600_000) {
    throw invalid('mirror.timeout', raw, origin, 'expected a duration from 10ms to 10m');
  }
  if (config.mirror.stallTimeoutMs < 10 || config.mirror.stallTimeoutMs > 600_000) {
    throw invalid('mirror.stallTimeout', raw, origin, 'expected a duration from 10ms to 10m');
  }
  if (config.cluster.leaseMs < 2000 || config.cluster.leaseMs > 3_600_000 || config.cluster.leaseMs % 1000 !== 0) {
    throw invalid('cluster.lease', raw, origin, 'expected whole seconds from 2s to 1h (an etcd lease counts in seconds)');
  }
  const cores = availableParallelism();
  if (config.guests.reserveCpu >= cores) {
    throw invalid('guests.reserveCpu', raw, origin, `expected less than this machine's ${cores} cores, so guests can have a share`);
  }
  if (config.guests.periodMs < 1 || config.guests.periodMs > 1000) {
    throw invalid('guests.period', raw, origin, 'expected a duration from 1ms to 1s (the kernel\'s CFS period range)');
  }
  const partner = config.mirror.partner;
  if (partner !== undefined && partner.host === config.mirror.listen.host && partner.port === config.mirror.listen.port && partner.port !== 0) {
    throw invalid('mirror.partner', raw, origin, 'expected another node\'s mirror service, not this node\'s own mirror.listen');
  }
  for (const medium of MEDIA) {
    config.partition[medium] = resolvePartition(medium, parsed.partition[medium], config, raw, origin);
  }
  return { config, warnings };
}

/** The layouts the partition table is built from; a medium of size 0 is left out. */
export function mediumLayouts(config: NodeConfig): MediumLayout[] {
  return MEDIA.filter((medium) => config.media[medium].size > 0).map((medium) => {
    const kinds = config.partition[medium];
    return {
      name: medium,
      capacity: config.media[medium].size,
      extentSize: config.media.extentSize,
      initial: { cache: kinds.cache.initial, server: kinds.server.initial, nvram: kinds.nvram.initial },
      bounds: {
        cache: { min: kinds.cache.min, max: kinds.cache.max },
        server: { min: kinds.server.min, max: kinds.server.max },
        nvram: { min: kinds.nvram.min, max: kinds.nvram.max },
      },
    };
  });
}

// ---- cross-field checks ----

/**
 * Resolves admin.tokenFile into the token, and refuses an admin API that anyone on the
 * network could reach without one: every route but /healthz can delete volumes.
 */
async function checkAdmin(config: NodeConfig, tokenFile: string | undefined, cwd: string, raw: Record<string, unknown>, origin: Map<string, string>, warnings: string[]): Promise<void> {
  const admin = config.admin;
  if (tokenFile !== undefined) {
    if (admin.token !== undefined) throw invalid('admin.tokenFile', raw, origin, 'expected admin.token or admin.tokenFile, not both');
    const file = resolve(cwd, tokenFile);
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (error) {
      throw invalid('admin.tokenFile', raw, origin, `expected a readable file (${(error as NodeJS.ErrnoException).code ?? (error as Error).message})`);
    }
    const token = text.trim();
    if (!ADMIN_TOKEN_PATTERN.test(token)) throw invalid('admin.tokenFile', raw, origin, `expected the file to hold ${ADMIN_TOKEN_FORM}`);
    admin.token = token;
    const mode = (await stat(file)).mode;
    if ((mode & 0o077) !== 0) warnings.push(`admin.tokenFile ${file} can be read by other users (mode ${(mode & 0o777).toString(8)}); chmod 600 it`);
  }
  if (admin.token === undefined && !isLoopback(admin.listen.host)) {
    throw invalid('admin.listen', raw, origin, 'expected a loopback address (127.0.0.1, ::1, localhost) unless admin.token or admin.tokenFile is set: anyone who reaches this address could change the node');
  }
  if (admin.requestTimeoutMs < admin.headersTimeoutMs) {
    throw invalid('admin.requestTimeout', raw, origin, `expected at least admin.headersTimeout (${admin.headersTimeoutMs} ms)`);
  }
  if (admin.headersTimeoutMs < 10 || admin.requestTimeoutMs > 3_600_000) {
    throw invalid(admin.headersTimeoutMs < 10 ? 'admin.headersTimeout' : 'admin.requestTimeout', raw, origin, 'expected a duration from 10ms to 1h');
  }
  if (admin.bodyLimit < 1024 || admin.bodyLimit > 64 * 1024 * 1024) throw invalid('admin.bodyLimit', raw, origin, 'expected a size from 1KiB to 64MiB');
}

/** Reads tls.cert, tls.key and tls.ca when a service (or an https etcd) needs them; each problem names its field. */
async function loadTls(config: NodeConfig, files: { cert?: string | undefined; key?: string | undefined; ca?: string | undefined }, cwd: string, raw: Record<string, unknown>, origin: Map<string, string>, warnings: string[]): Promise<TlsFiles | undefined> {
  const users = [
    ...(config.nbd.tls !== 'off' ? ['nbd.tls'] : []),
    ...(config.rmem.tls !== 'off' ? ['rmem.tls'] : []),
    ...(config.mirror.tls !== 'off' ? ['mirror.tls'] : []),
    ...(config.admin.tls ? ['admin.tls'] : []),
  ];
  const etcdTls = config.cluster.etcd?.some((u) => u.startsWith('https:')) === true;
  if (users.length === 0 && !etcdTls) {
    for (const field of ['cert', 'key', 'ca'] as const) if (files[field] !== undefined) warnings.push(`tls.${field} is set but no service uses TLS (nbd.tls, rmem.tls, mirror.tls, admin.tls, or an https cluster.etcd)`);
    return undefined;
  }
  const read = async (field: 'cert' | 'key' | 'ca', what: string): Promise<Buffer> => {
    const file = resolve(cwd, files[field] ?? '');
    let text: Buffer;
    try {
      // A regular file (symlinks followed: certificate stores use them), read whole: never a FIFO or a device that could hang the start.
      const kind = await stat(file);
      if (!kind.isFile()) throw Object.assign(new Error('not a regular file'), { code: 'not a regular file' });
      if (kind.size > 1024 * 1024) throw Object.assign(new Error('larger than 1 MiB'), { code: 'larger than 1 MiB' });
      text = await readFile(file);
    } catch (error) {
      throw invalid(`tls.${field}`, raw, origin, `expected a readable file (${(error as NodeJS.ErrnoException).code ?? (error as Error).message})`);
    }
    if (!text.includes('-----BEGIN ')) throw invalid(`tls.${field}`, raw, origin, `expected a PEM file holding ${what}`);
    if (field === 'key' && ((await stat(file)).mode & 0o077) !== 0) warnings.push(`tls.key ${file} can be read by other users; chmod 600 it`);
    return text;
  };
  if (users.length > 0 && (files.cert === undefined || files.key === undefined)) {
    throw invalid(files.cert === undefined ? 'tls.cert' : 'tls.key', raw, origin, `expected a PEM file: ${users.join(', ')} ${users.length > 1 ? 'use' : 'uses'} TLS`);
  }
  if (etcdTls && files.ca === undefined) throw invalid('tls.ca', raw, origin, 'expected a PEM file with the CA of etcd\'s certificate: cluster.etcd uses https');
  if (users.length === 0 && (files.cert === undefined) !== (files.key === undefined)) {
    throw invalid(files.cert === undefined ? 'tls.cert' : 'tls.key', raw, origin, 'expected tls.cert and tls.key together (a client certificate for etcd), or neither');
  }
  const tls: TlsFiles = {
    cert: files.cert === undefined ? Buffer.alloc(0) : await read('cert', 'a certificate'),
    key: files.key === undefined ? Buffer.alloc(0) : await read('key', 'a private key'),
    ca: files.ca === undefined ? undefined : await read('ca', 'CA certificates'),
  };
  if (tls.cert.length > 0) {
    try {
      createSecureContext({ cert: tls.cert, key: tls.key, ...(tls.ca === undefined ? {} : { ca: tls.ca }) });
    } catch (error) {
      throw invalid('tls.key', raw, origin, `expected the key of tls.cert, and PEM files node:tls can load (${(error as Error).message})`);
    }
  }
  return tls;
}

const LOOPBACK = new BlockList();
LOOPBACK.addSubnet('127.0.0.0', 8, 'ipv4');
LOOPBACK.addAddress('::1', 'ipv6');

/** Loopback hosts: 127.0.0.0/8, ::1 (also IPv4-mapped, ::ffff:127.0.0.1) and localhost (RFC 6761). */
export function isLoopback(host: string): boolean {
  if (host.toLowerCase() === 'localhost') return true;
  const family = isIP(host);
  return family !== 0 && LOOPBACK.check(host, family === 4 ? 'ipv4' : 'ipv6');
}

function checkMedia(config: NodeConfig, raw: Record<string, unknown>, origin: Map<string, string>): void {
  const extent = config.media.extentSize;
  if (extent < 4 * KiB || extent > GiB || (extent & (extent - 1)) !== 0) {
    throw invalid('media.extentSize', raw, origin, 'expected a power of two from 4KiB to 1GiB');
  }
  for (const medium of MEDIA) {
    const size = config.media[medium].size;
    if (size % extent !== 0) {
      throw invalid(`media.${medium}.size`, raw, origin, `expected a whole number of extents (media.extentSize is ${formatSize(extent)})`);
    }
  }
}

function resolvePartition(
  medium: MediumName,
  shares: Record<UsedKind, Record<keyof KindSetting, Share>>,
  config: NodeConfig,
  raw: Record<string, unknown>,
  origin: Map<string, string>,
): Record<UsedKind, KindSetting> {
  const size = config.media[medium].size;
  const extent = config.media.extentSize;
  const toBytes = (kind: UsedKind, field: keyof KindSetting): number => {
    const share = shares[kind][field];
    if ('percent' in share) {
      const exact = (size * share.percent) / 100 / extent;
      // A share rounds down to whole extents, the same way for initial, min and max, so
      // equal shares stay equal.
      return Math.floor(exact) * extent;
    }
    const path = `partition.${medium}.${kind}.${field}`;
    if (share.bytes % extent !== 0) throw invalid(path, raw, origin, `expected a whole number of extents (media.extentSize is ${formatSize(extent)})`);
    if (share.bytes > size) throw invalid(path, raw, origin, `expected at most the ${medium} size, ${formatSize(size)}`);
    return share.bytes;
  };
  const result = emptyPartition();
  let sum = 0;
  for (const kind of USED_KINDS) {
    const setting = { initial: toBytes(kind, 'initial'), min: toBytes(kind, 'min'), max: toBytes(kind, 'max') };
    const base = `partition.${medium}.${kind}`;
    if (setting.min > setting.max) throw invalid(`${base}.min`, raw, origin, `expected at most ${base}.max (${formatSize(setting.max)})`);
    if (setting.initial < setting.min || setting.initial > setting.max) {
      throw invalid(`${base}.initial`, raw, origin, `expected between ${base}.min (${formatSize(setting.min)}) and ${base}.max (${formatSize(setting.max)})`);
    }
    sum += setting.initial;
    result[kind] = setting;
  }
  if (sum > size) {
    throw new MisuseError(
      'MS_CONFIG_INVALID',
      `invalid configuration: partition.${medium}.*.initial add up to ${formatSize(sum)} but media.${medium}.size is ${formatSize(size)}; expected a sum no larger than the medium`,
      { details: { field: `partition.${medium}`, sum, size } },
    );
  }
  return result;
}

function emptyPartition(): Record<UsedKind, KindSetting> {
  return { cache: { initial: 0, min: 0, max: 0 }, server: { initial: 0, min: 0, max: 0 }, nvram: { initial: 0, min: 0, max: 0 } };
}

// ---- messages ----

/**
 * Where and what a YAML error is, without a word of the file: the yaml library's messages
 * may quote the text (an escape, a tag, an alias), so only its error code and the line
 * and column are kept, and the error itself is not kept as a cause.
 */
function yamlProblem(error: unknown, text: string): string {
  if (!(error instanceof YAMLParseError)) return 'the document cannot be resolved (an alias without its anchor, or too many aliases)';
  const at = Math.max(0, Math.min(error.pos[0], text.length));
  const before = text.slice(0, at).split('\n');
  const line = before.length;
  const column = (before.at(-1)?.length ?? 0) + 1;
  return `${error.code} at line ${line}, column ${column}`;
}

function describeIssue(issue: z.core.$ZodIssue, raw: Record<string, unknown>, origin: Map<string, string>): string {
  const path = issue.path.map(String).join('.');
  if (issue.code === 'unrecognized_keys') {
    const parent = path === '' ? '' : `${path}.`;
    const unknown = issue.keys.map((key) => `${parent}${key}`);
    const from = unknown.map((key) => origin.get(key) ?? [...origin].find(([p]) => p.startsWith(`${key}.`))?.[1]).find((o) => o !== undefined);
    const known = SETTINGS.filter((s) => s.path.startsWith(parent)).map((s) => s.path.slice(parent.length).split('.')[0]);
    return `unknown setting ${unknown.join(', ')}${from === undefined ? '' : ` (from ${from})`}; known at this level: ${[...new Set(known)].join(', ')}`;
  }
  const value = getPath(raw, path);
  const from = origin.get(path);
  const form = issue.code === 'custom' ? issue.message : `expected ${SETTING_BY_PATH.has(path) ? 'a single value' : 'a mapping of settings'}`;
  return `${path} is ${shown(path, value) ?? 'missing'}${from === undefined ? '' : ` (from ${from})`}: ${form}`;
}

/** A value as a message shows it; tokens never reach a message, a log or a terminal. */
function shown(path: string, value: unknown): string | undefined {
  return value !== undefined && isSecret(path) ? '(hidden)' : JSON.stringify(value);
}

function isSecret(path: string): boolean {
  return /(^|\.)token$/.test(path);
}

function invalid(path: string, raw: Record<string, unknown>, origin: Map<string, string>, form: string): MisuseError {
  const value = getPath(raw, path);
  const from = origin.get(path) ?? 'default';
  return new MisuseError('MS_CONFIG_INVALID', `invalid configuration: ${path} is ${shown(path, value ?? SETTING_BY_PATH.get(path)?.default)} (from ${from}): ${form}`, {
    details: { field: path, value: isSecret(path) ? '(hidden)' : value },
  });
}

// ---- nested object helpers ----

function setPath(target: Record<string, unknown>, path: string, value: unknown): void {
  const parts = path.split('.');
  let node = target;
  for (const part of parts.slice(0, -1)) {
    const next = node[part];
    if (typeof next === 'object' && next !== null && !Array.isArray(next)) {
      node = next as Record<string, unknown>;
    } else {
      const created: Record<string, unknown> = {};
      node[part] = created;
      node = created;
    }
  }
  node[parts[parts.length - 1] ?? ''] = value;
}

function getPath(source: Record<string, unknown>, path: string): unknown {
  let node: unknown = source;
  for (const part of path.split('.')) {
    if (typeof node !== 'object' || node === null) return undefined;
    node = (node as Record<string, unknown>)[part];
  }
  return node;
}

function leafPaths(source: Record<string, unknown>, prefix = ''): string[] {
  return Object.entries(source).flatMap(([key, value]) =>
    typeof value === 'object' && value !== null && !Array.isArray(value)
      ? leafPaths(value as Record<string, unknown>, `${prefix}${key}.`)
      : [`${prefix}${key}`],
  );
}

export function isConfigError(error: unknown): boolean {
  return isMemstrataError(error) && (error.code === 'MS_CONFIG_INVALID' || error.code === 'MS_CONFIG_FILE');
}
