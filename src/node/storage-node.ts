// The daemon wiring of one node: which subsystems exist and the order they start in.
//
//   start:  data directory + lock -> node id -> media -> NVRAM -> volumes -> cache ->
//           write-log replay -> mirror service -> mirroring -> rmem -> NBD -> admin ->
//           cluster (with cluster.etcd) -> guests
//   stop:   the reverse; guests first, then the node leaves the cluster (hosts stop
//           allocating on it), then admin (no new requests, in-flight ones drain); the
//           lock last
//
// The tables are built with the node; services slot in between the media and admin, so
// the API comes up only once everything it reports on is there, and goes first on the
// way down.

import { mkdir } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { MisuseError, RuntimeError, StorageError } from '../errors.js';
import { readSmallFile, replaceFile } from '../fs/meta-file.js';
import { AdminServer, adminUrl } from '../admin/admin-server.js';
import type { ClusterJson, MediumInfo, NodeInfo } from '../protocol/admin/api.js';
import { MEMBER_FORMAT, type MemberRecord } from '../protocol/cluster/member.js';
import { Membership } from '../cluster/membership.js';
import { Ownership } from '../cluster/ownership.js';
import { Partners } from '../cluster/partners.js';
import { NodeMetrics } from '../admin/metrics.js';
import { BusyPoll } from '../net/busy-poll.js';
import { CpuWakeLatency } from './cpu-wake-latency.js';
import { AllocationTable } from '../memory/allocation-table.js';
import { DramMedium } from '../memory/dram-medium.js';
import { FlashMedium } from '../memory/flash-medium.js';
import type { Medium } from '../memory/medium.js';
import { PartitionTable } from '../memory/partition-table.js';
import { ServerMemory } from '../memory/server-memory.js';
import { RmemService } from '../server/rmem-service.js';
import { MAX_RANGES } from '../protocol/rmem/spec.js';
import { NbdService } from '../server/nbd-service.js';
import { DirectVolumeIo, type VolumeIo } from '../storage/volume-io.js';
import { VolumeManager } from '../storage/volume-manager.js';
import { StorageCache } from '../storage/cache/storage-cache.js';
import { WriteLogIo } from '../storage/write-log.js';
import { DeviceManager } from '../nvram/device-manager.js';
import { MirrorService } from '../nvram/mirror-service.js';
import { Mirroring } from '../nvram/mirroring.js';
import { formatAddress, type ListenAddress } from '../units.js';
import { VERSION } from '../version.js';
import { NODE_ID_FORM, NODE_ID_PATTERN, mediumLayouts, type NodeConfig } from './config.js';
import { Lifecycle } from './lifecycle.js';
import { clientTls } from '../net/tls.js';
import { latencySummary } from '../net/latency.js';
import { DataDirLock } from './lock.js';
import type { Logger } from './logger.js';
import { GuestSupervisor } from '../guest/supervisor.js';

const NODE_ID_FILE = 'node-id';
// An id is at most 64 characters; anything much larger is not a node-id file.
const NODE_ID_MAX_BYTES = 4096;

export class StorageNode {
  readonly config: NodeConfig;
  readonly log: Logger;
  readonly partition: PartitionTable;
  readonly allocation: AllocationTable;
  readonly media: readonly Medium[];
  readonly serverMemory: ServerMemory;
  readonly nvram: DeviceManager;
  readonly volumes: VolumeManager;
  readonly guests: GuestSupervisor;
  readonly volumeIo: VolumeIo;
  readonly cache: StorageCache | undefined;
  readonly writeLog: WriteLogIo;
  private readonly lifecycle: Lifecycle;
  private readonly lock: DataDirLock;
  private nodeId: string;
  private startedAt: Date;
  private stopping: boolean;
  /** node.busyPoll: the event loop polls for input a while after each chunk and each tick's replies (off at 0). */
  readonly busyPoll: BusyPoll;
  /** node.cpuWakeLatency: the CPU latency QoS request held while the node runs (nothing when off). */
  private readonly cpuWakeLatency: CpuWakeLatency;
  private admin: AdminServer | undefined;
  private rmem: RmemService | undefined;
  private nbd: NbdService | undefined;
  private mirrorService: MirrorService | undefined;
  private mirroring: Mirroring | undefined;
  private membership: Membership | undefined;
  private ownership: Ownership | undefined;
  /** The members that may hold replicas, when the cluster chooses partners. */
  private partners: Partners | undefined;

  constructor(config: NodeConfig, log: Logger) {
    this.config = config;
    this.log = log;
    this.lifecycle = new Lifecycle(log);
    this.lock = new DataDirLock(config.dataDir);
    this.partition = new PartitionTable(mediumLayouts(config));
    this.allocation = new AllocationTable();
    this.media = this.createMedia();
    // A region has no more ranges than a BIND reply may list.
    this.serverMemory = new ServerMemory({ partition: this.partition, allocation: this.allocation, media: this.media, maxRanges: MAX_RANGES });
    this.nvram = new DeviceManager({ dataDir: config.dataDir, partition: this.partition, media: this.media, log, clustered: config.cluster.etcd !== undefined });
    this.volumes = new VolumeManager(config.dataDir, { log });
    this.guests = new GuestSupervisor({
      dataDir: config.dataDir,
      log,
      nodeId: () => this.nodeId,
      enforcement: config.guests.enforcement,
      reserveCpu: config.guests.reserveCpu,
      periodMs: config.guests.periodMs,
      maxSocketConnections: config.guests.maxConnections,
      cutThrough: {
        check: (kind, name) => {
          if (kind === 'volume') {
            if (this.volumes.find(name) === undefined || name === '') throw new MisuseError('MS_VOLUME_NOT_FOUND', `no volume named ${JSON.stringify(name)}`, { details: { name } });
            return;
          }
          this.nvram.get(name);
          const volume = this.writeLogOwner(name);
          if (volume !== undefined) throw new MisuseError('MS_NVRAM_INVALID', `NVRAM device ${name} is the write log of volume ${volume} and is not open to clients`, { details: { name } });
        },
        findVolume: (name) => this.volumes.find(name),
        listenNbd: (path, catalog, client, max) => this.service(this.nbd, 'NBD').listenScoped(path, catalog, client, max),
        listenRmem: (path, scope, max) => this.service(this.rmem, 'rmem').listenScoped(path, scope, max),
        tcp: () => ({ nbd: formatAddress(this.nbd?.address ?? config.nbd.listen), rmem: formatAddress(this.rmemAddress ?? config.rmem.listen) }),
        createNvram: async (name, size, policy) => (await this.nvram.create(name, size, policy)).size,
        removeNvram: (name) => this.nvram.remove(name),
        nvramSize: (name) => this.nvram.find(name)?.size,
        guestEnded: (name) => this.rmem?.endSessionsOf(`guest:${name}/`),
      },
    });
    this.cache = config.cache.enabled
      ? new StorageCache({ partition: this.partition, media: this.media, log, maxDirtyAgeMs: config.cache.maxDirtyAgeMs })
      : undefined;
    this.writeLog = new WriteLogIo(this.cache ?? new DirectVolumeIo(), this.nvram, log);
    this.volumeIo = this.writeLog;
    this.nodeId = config.node.id ?? '';
    this.startedAt = new Date();
    this.stopping = false;
    this.busyPoll = new BusyPoll(config.node.busyPollUs);
    this.cpuWakeLatency = new CpuWakeLatency(config.node.cpuWakeLatencyUs);
    this.admin = undefined;
    this.rmem = undefined;
    this.nbd = undefined;
    this.mirrorService = undefined;
    this.mirroring = undefined;

    this.lifecycle.add({
      name: 'data directory',
      start: async () => {
        // The clock starts with the first step: a refused start() runs none (lifecycle.ts).
        this.startedAt = new Date();
        await mkdir(config.dataDir, { recursive: true }).catch((error: unknown) => {
          throw new StorageError('MS_DATA_DIR', `cannot create data directory ${config.dataDir}: ${(error as Error).message}`, { cause: error });
        });
        const { stalePid } = await this.lock.acquire();
        if (stalePid !== undefined) log.warn({ stalePid }, 'took over the lock of a node that did not stop cleanly');
        try {
          this.nodeId = config.node.id ?? (await this.loadNodeId());
        } catch (error) {
          await this.lock.release();
          throw error;
        }
      },
      stop: () => this.lock.release(),
    });
    this.lifecycle.add({
      name: 'cpu wake-up latency',
      start: () => this.cpuWakeLatency.hold(log),
      stop: () => this.cpuWakeLatency.release(),
    });
    this.lifecycle.add({
      name: 'media',
      start: async () => {
        // A medium that fails to open closes the ones opened before it: a failed step undoes its own part.
        const opened: Medium[] = [];
        try {
          for (const medium of this.media) {
            await medium.open();
            opened.push(medium);
          }
        } catch (error) {
          for (const medium of opened.reverse()) await medium.close().catch(() => undefined);
          throw error;
        }
      },
      stop: async () => {
        for (const medium of [...this.media].reverse()) await medium.close();
      },
    });
    this.lifecycle.add({
      name: 'nvram',
      start: () => this.nvram.open(),
      stop: () => this.nvram.close(),
    });
    this.lifecycle.add({
      name: 'volumes',
      start: () => this.volumes.open(config.volumes.defaultSize),
      stop: () => this.volumes.close(),
    });
    this.lifecycle.add({
      name: 'cache',
      start: async () => {
        if (this.cache === undefined) return;
        this.cache.start();
        this.volumes.onDrop = (volume, fromOffset) => this.cache?.forget(volume, fromOffset) ?? Promise.resolve();
        log.info({ slots: this.cache.stats().slots, maxDirtyAgeMs: config.cache.maxDirtyAgeMs }, 'storage cache started');
        return Promise.resolve();
      },
      stop: async () => {
        await this.cache?.stop();
      },
    });
    this.lifecycle.add({
      name: 'write-log replay',
      start: async () => {
        // Journaled writes of a crash reach their volumes before anyone is served; a volume
        // whose mirrored write log waits for the partner is `recovering` until it has them.
        for (const volume of this.volumes.list()) await this.writeLog.recover(volume);
        this.volumes.beforeResize = (volume) => this.writeLog.checkpointNow(volume);
        this.volumes.beforeRemove = (volume) => this.writeLog.discard(volume);
        this.volumes.claimWriteLog = (volume, device) => this.writeLog.claim(volume, device);
        this.volumes.releaseWriteLog = (device) => { this.writeLog.release(device); };
        this.nvram.claimedBy = (device) => this.writeLog.owner(device);
      },
      stop: () => this.writeLog.stop(),
    });
    this.lifecycle.add({
      name: 'mirror service',
      start: async () => {
        const service = new MirrorService({
          nvram: this.nvram,
          nodeId: this.nodeId,
          token: config.mirror.token,
          partnerId: config.mirror.partnerId,
          // Partners chosen by the cluster: only its members mirror here.
          refuse: this.choosesPartners()
            ? (id) => (this.partners?.isMember(id) === true ? undefined : `it is not a member of cluster ${config.cluster.name} as this node sees it`)
            : undefined,
          log,
          maxInFlight: config.mirror.maxInFlight,
          maxInFlightBytes: config.mirror.maxInFlightBytes,
          maxInFlightBytesTotal: config.mirror.maxInFlightBytesTotal,
          maxConnections: config.mirror.maxConnections,
          maxConnectionsPerClient: config.mirror.maxConnectionsPerClient,
          handshakeTimeoutMs: config.mirror.handshakeTimeoutMs,
          stallTimeoutMs: config.mirror.stallTimeoutMs,
          busyPoll: this.busyPoll,
          ...(config.mirror.tls === 'require' && config.tls !== undefined ? { tls: config.tls } : {}),
        });
        const bound = await service.listen(config.mirror.listen);
        this.mirrorService = service;
        log.info({ address: formatAddress(bound), token: config.mirror.token !== undefined, tls: config.mirror.tls }, 'mirror service listening');
      },
      stop: async () => {
        await this.mirrorService?.close();
        this.mirrorService = undefined;
      },
    });
    this.lifecycle.add({
      name: 'mirroring',
      start: () => {
        this.mirroring = new Mirroring({
          nvram: this.nvram,
          partner: config.mirror.partner,
          onPartnerDown: config.mirror.onPartnerDown,
          nodeId: this.nodeId,
          token: config.mirror.token,
          partnerId: config.mirror.partnerId,
          timeoutMs: config.mirror.timeoutMs,
          retryMs: Math.min(1000, config.mirror.timeoutMs),
          log,
          tls: config.mirror.tls === 'require' && config.tls !== undefined ? clientTls(config.tls) : undefined,
          peerTls: config.tls === undefined ? undefined : clientTls(config.tls),
          // Without mirror.partner, in a cluster: each device's partner is the replica its ownership record names.
          route: this.choosesPartners()
            ? (device) => {
                const replica = this.ownership?.replicaOf(device);
                return replica === undefined ? undefined : this.partners?.route(replica);
              }
            : undefined,
          // In a cluster, degrading and being in sync go through etcd (the ownership starts with the cluster step).
          ownership: config.cluster.etcd === undefined
            ? undefined
            : {
                outdate: (device) => this.ownership?.outdate(device) ?? Promise.reject(new Error('the cluster\'s ownership has not started')),
                isOutdated: (device) => this.ownership?.isOutdated(device) ?? false,
                inSync: (device, node) => { this.ownership?.inSync(device, node); },
              },
        });
        this.mirroring.start();
        return Promise.resolve();
      },
      stop: () => {
        this.mirroring?.close();
        return Promise.resolve();
      },
    });
    this.lifecycle.add({
      name: 'rmem',
      start: async () => {
        const rmem = new RmemService({
          memory: this.serverMemory,
          nvram: this.nvram,
          writeLogOf: (device) => this.writeLogOwner(device),
          log,
          nodeId: this.nodeId,
          leaseMs: config.rmem.leaseMs,
          token: config.rmem.token,
          maxInFlight: config.rmem.maxInFlight,
          maxInFlightBytes: config.rmem.maxInFlightBytes,
          maxInFlightBytesTotal: config.rmem.maxInFlightBytesTotal,
          maxConnections: config.rmem.maxConnections,
          maxConnectionsPerClient: config.rmem.maxConnectionsPerClient,
          handshakeTimeoutMs: config.rmem.handshakeTimeoutMs,
          busyPoll: this.busyPoll,
          ...(config.rmem.tls === 'require' && config.tls !== undefined ? { tls: config.tls } : {}),
        });
        const bound = await rmem.listen(config.rmem.listen);
        this.rmem = rmem;
        log.info({ address: formatAddress(bound), leaseMs: config.rmem.leaseMs, token: config.rmem.token !== undefined, tls: config.rmem.tls }, 'rmem service listening');
      },
      stop: async () => {
        await this.rmem?.close();
        this.rmem = undefined;
      },
    });
    this.lifecycle.add({
      name: 'nbd',
      start: async () => {
        const tls = config.nbd.tls === 'off' || config.tls === undefined ? {} : { tls: { mode: config.nbd.tls, files: config.tls } };
        const nbd = new NbdService({ volumes: this.volumes, io: this.volumeIo, log, limits: config.nbd, busyPoll: this.busyPoll, ...tls });
        const bound = await nbd.listen(config.nbd.listen);
        this.nbd = nbd;
        log.info({ address: formatAddress(bound), volumes: this.volumes.list().map((v) => v.name), tls: config.nbd.tls }, 'NBD service listening');
      },
      stop: async () => {
        await this.nbd?.close();
        this.nbd = undefined;
      },
    });
    this.lifecycle.add({
      name: 'admin',
      start: async () => {
        const metrics = new NodeMetrics({
          nodeId: this.nodeId,
          partition: this.partition,
          allocation: this.allocation,
          media: this.media,
          rmem: () => this.rmem,
          nbd: () => this.nbd,
          volumes: this.volumes,
          cache: () => this.cache?.stats(),
          nvram: () => this.nvram.list(),
          divergedJournals: () => this.nvram.divergedCounts(),
          mirror: () => this.mirroring?.info(),
          admin: () => this.admin?.stats,
          damaged: () => ({ volumes: this.volumes.damaged().length, nvram: this.nvram.damaged().length, orphans: this.volumes.orphans().length }),
          mirrorLoad: () => this.mirrorService?.load(),
          cluster: () => this.membership?.status(),
          guests: () => this.guests.list(),
          journalSyncs: () => this.nvram.syncLatency.snapshot(),
          busyPoll: () => ({ windowUs: this.config.node.busyPollUs, seconds: this.busyPoll.pollingSeconds }),
          cpuWakeLatency: () => this.cpuWakeLatency.info(),
        });
        const admin = new AdminServer({
          info: () => this.info(),
          partition: this.partition,
          allocation: this.allocation,
          rmemSessions: () => this.rmem?.sessionsInfo() ?? [],
          journalHolders: () => this.rmem?.holders() ?? [],
          keptAside: () => this.rmem?.memory.keptAside() ?? [],
          volumes: this.volumes,
          nvram: this.nvram,
          guests: this.guests,
          cluster: () => this.cluster(),
          metrics,
          log,
          isStopping: () => this.stopping,
        }, { ...config.admin, tls: config.admin.tls ? config.tls : undefined });
        const bound = await admin.listen(config.admin.listen);
        this.admin = admin;
        log.info({ url: adminUrl(bound, config.admin.tls), token: config.admin.token !== undefined, metricsPublic: config.admin.metricsPublic }, 'admin API listening');
      },
      stop: async () => {
        await this.admin?.close();
        this.admin = undefined;
      },
    });
    this.lifecycle.add({
      name: 'cluster',
      start: async () => {
        const endpoints = config.cluster.etcd;
        if (endpoints === undefined) return;
        const tls = config.tls?.ca === undefined ? undefined : { ca: config.tls.ca, cert: config.tls.cert, key: config.tls.key };
        const membership = new Membership({ endpoints, cluster: config.cluster.name, ttlMs: config.cluster.leaseMs, nodeId: this.nodeId, describe: () => this.memberRecord(), log, tls });
        this.membership = membership;
        // A node whose etcd is away still serves; it joins once etcd answers.
        await membership.start(config.cluster.leaseMs);
        const partners = this.choosesPartners() ? new Partners({ etcd: endpoints, tls, cluster: config.cluster.name, nodeId: this.nodeId, zone: config.node.zone ?? null, log }) : undefined;
        this.partners = partners;
        partners?.start();
        // Mirrored devices: who is primary is decided in etcd, under this node's lease.
        const ownership = new Ownership({
          client: membership.etcd,
          keeper: membership.lease,
          cluster: config.cluster.name,
          nodeId: this.nodeId,
          nvram: this.nvram,
          partner: (device) => this.mirroring?.partnerOf(device),
          syncedWith: (device) => this.mirroring?.syncedWith(device),
          placement:
            partners === undefined
              ? undefined
              : {
                  choose: (need, avoid, named) => partners.choose(need, avoid, named),
                  goneForMs: (id) => partners.goneForMs(id),
                  choosesPartners: (id) => partners.choosesPartners(id),
                  graceMs: config.cluster.leaseMs,
                  stuckMs: 3 * config.cluster.leaseMs,
                },
          resync: (device) => { this.mirroring?.retry(device); },
          log,
        });
        this.ownership = ownership;
        this.nvram.ownerCheck = (device) => { ownership.check(device); };
        await ownership.start();
      },
      stop: async () => {
        this.nvram.ownerCheck = undefined;
        await this.ownership?.close();
        this.ownership = undefined;
        await this.partners?.close();
        this.partners = undefined;
        await this.membership?.close();
        this.membership = undefined;
      },
    });
    // Last to start, first to stop: guests go before the services they use.
    this.lifecycle.add({
      name: 'guests',
      start: () => this.guests.open(),
      stop: () => this.guests.close(),
    });
  }

  get id(): string {
    return this.nodeId;
  }

  /** The rmem service's bound address, once started. */
  get rmemAddress(): ListenAddress | undefined {
    return this.rmem?.address;
  }

  /** The admin API's bound address, once started. */
  get adminAddress(): ListenAddress | undefined {
    return this.admin?.address;
  }

  /** Starts every subsystem in order. A node starts once: again, or after stop(), is MS_NODE_STARTED. */
  async start(): Promise<void> {
    await this.lifecycle.start();
    this.log.info(
      { node: this.nodeId, version: VERSION, dataDir: this.config.dataDir, media: this.media.map((m) => ({ name: m.name, capacity: m.capacity })) },
      'node started',
    );
  }

  /** Stops every subsystem in reverse order, draining each. Safe to call more than once. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.busyPoll.stop();
    await this.lifecycle.stop();
    this.log.info({ node: this.nodeId }, 'node stopped');
  }

  /** In a cluster without mirror.partner, the cluster chooses each mirrored device's partner. */
  private choosesPartners(): boolean {
    return this.config.cluster.etcd !== undefined && this.config.mirror.partner === undefined;
  }

  /** The volume whose write log an NVRAM device is, if any. */
  private writeLogOwner(device: string): string | undefined {
    return this.writeLog.owner(device) ?? this.volumes.list().find((v) => v.writeLog === device)?.name;
  }

  /** GET /v1/cluster. */
  async cluster(): Promise<ClusterJson> {
    if (this.membership === undefined) return { enabled: false, node: this.nodeId, self: null, members: [], devices: [], ownership: [], unreadable: [], problem: null };
    return { ...(await this.membership.view()), ownership: this.ownership?.list() ?? [] };
  }

  /** What this node says of itself in the cluster (its member record). */
  private memberRecord(): MemberRecord {
    const advertise = ({ host, port }: ListenAddress): string => {
      const reachable = this.config.cluster.advertise ?? (host === '0.0.0.0' || host === '::' ? hostname() : host);
      return formatAddress({ host: reachable, port });
    };
    const listening = this.listening();
    const mirror = this.mirroring?.info();
    const kind = (k: { bytes: number; idleBytes: number }) => ({ bytes: k.bytes, idleBytes: k.idleBytes });
    return {
      format: MEMBER_FORMAT,
      id: this.nodeId,
      zone: this.config.node.zone ?? null,
      version: VERSION,
      startedAt: this.startedAt.toISOString(),
      services: { nbd: advertise(listening.nbd), rmem: advertise(listening.rmem), mirror: advertise(listening.mirror), admin: advertise(listening.admin) },
      tls: { nbd: this.config.nbd.tls, rmem: this.config.rmem.tls === 'require', mirror: this.config.mirror.tls === 'require', admin: this.config.admin.tls },
      capacity: this.partition.usage().map((u) => ({
        medium: u.medium,
        capacity: u.capacity,
        kinds: { free: kind(u.kinds.free), cache: kind(u.kinds.cache), server: kind(u.kinds.server), nvram: kind(u.kinds.nvram) },
        nvramRoom: u.kinds.nvram.idleBytes + this.partition.headroom(u.medium, 'nvram'),
      })),
      partner: mirror?.partnerNode ?? mirror?.partner ?? null,
      mirrored: this.nvram
        .list()
        .filter((d) => d.policy === 'mirrored' || d.policy === 'mirrored+local')
        .map((d) => ({ name: d.name, policy: d.policy, size: d.size, role: d.role, epoch: d.epoch, state: d.state, partner: d.role === 'primary' ? (this.ownership?.replicaOf(d.name) ?? mirror?.partnerNode ?? null) : null })),
    };
  }

  /** Where each service listens: its bound address once it runs, else the configured one. */
  private listening(): Record<'admin' | 'rmem' | 'nbd' | 'mirror', ListenAddress> {
    return {
      admin: this.adminAddress ?? this.config.admin.listen,
      rmem: this.rmemAddress ?? this.config.rmem.listen,
      nbd: this.nbd?.address ?? this.config.nbd.listen,
      mirror: this.mirrorService?.address ?? this.config.mirror.listen,
    };
  }

  private service<T>(service: T | undefined, name: string): T {
    if (service === undefined) throw new RuntimeError('MS_SHUTTING_DOWN', `the ${name} service is not running`);
    return service;
  }

  async info(): Promise<NodeInfo> {
    const media: MediumInfo[] = [];
    for (const medium of this.media) {
      const entry: MediumInfo = {
        name: medium.name,
        capacity: medium.capacity,
        extentSize: medium.extentSize,
        persistent: medium.capabilities.persistent,
        residentBytes: await medium.resident(),
      };
      if (medium instanceof FlashMedium) entry.path = medium.path;
      media.push(entry);
    }
    const listening = this.listening();
    return {
      id: this.nodeId,
      version: VERSION,
      pid: process.pid,
      startedAt: this.startedAt.toISOString(),
      uptimeSeconds: Math.round((Date.now() - this.startedAt.getTime()) / 1000),
      dataDir: this.config.dataDir,
      listen: {
        admin: formatAddress(listening.admin),
        rmem: formatAddress(listening.rmem),
        nbd: formatAddress(listening.nbd),
        mirror: formatAddress(listening.mirror),
      },
      media,
      usage: this.partition.usage(),
      cache: this.cache?.stats() ?? null,
      nvram: this.nvram.list(),
      damaged: { volumes: this.volumes.damaged(), nvram: this.nvram.damaged() },
      guests: {
        enforcement: this.guests.mode,
        cpus: this.guests.cpus,
        reserveCpu: this.guests.reserveCpu,
        budget: this.guests.cpuBudget,
        periodMs: this.guests.periodMs,
        list: this.guests.list(),
      },
      orphans: this.volumes.orphans(),
      latency: {
        nbd: (this.nbd?.stats.latency.snapshot() ?? []).map(latencySummary),
        rmem: (this.rmem?.stats.latency.snapshot() ?? []).map(latencySummary),
        journalSync: this.nvram.syncLatency.snapshot().map(latencySummary),
      },
      busyPoll: { windowUs: this.config.node.busyPollUs, seconds: this.busyPoll.pollingSeconds },
      cpuWakeLatency: this.cpuWakeLatency.info(),
      mirror: this.mirroring?.info() ?? {
        partner: null,
        partnerNode: null,
        link: 'none',
        chosen: false,
        links: [],
        onPartnerDown: this.config.mirror.onPartnerDown,
        degradations: 0,
        resyncs: 0,
        mirroredRecords: 0,
      },
    };
  }

  private createMedia(): Medium[] {
    const { media } = this.config;
    const result: Medium[] = [];
    if (media.dram.size > 0) result.push(new DramMedium({ capacity: media.dram.size, extentSize: media.extentSize }));
    if (media.flash.size > 0) result.push(new FlashMedium({ path: media.flash.path, capacity: media.flash.size, extentSize: media.extentSize }));
    return result;
  }

  /**
   * The node's id, made on first start and kept in the data directory. The file is read
   * only if it is a small regular file, and its id is checked like node.id: a wrong id
   * would go into every table, log and HELLO (where one over 255 bytes cannot even be
   * encoded), so a damaged file stops the start-up (MS_NODE_ID_INVALID, naming the file)
   * rather than run under it. A new id is written durably (replaceFile).
   */
  private async loadNodeId(): Promise<string> {
    const file = join(this.config.dataDir, NODE_ID_FILE);
    const repair = `write this node's id back into it, or set node.id`;
    let stored = '';
    let existed = true;
    try {
      stored = (await readSmallFile(file, NODE_ID_MAX_BYTES)).trim();
    } catch (error) {
      const errno = (error as NodeJS.ErrnoException).code;
      if (errno === undefined) throw new StorageError('MS_NODE_ID_INVALID', `node id file ${file} ${(error as Error).message}; ${repair}`, { details: { file } });
      if (errno !== 'ENOENT') throw new StorageError('MS_DATA_DIR', `cannot read ${file}: ${(error as Error).message}`, { cause: error, details: { file } });
      existed = false;
    }
    if (stored !== '') {
      // The content is not shown: it is not an id, and may be anything.
      if (!NODE_ID_PATTERN.test(stored)) {
        throw new StorageError('MS_NODE_ID_INVALID', `node id file ${file} does not hold a node id (${stored.length} characters, expected ${NODE_ID_FORM}); ${repair}`, { details: { file } });
      }
      return stored;
    }
    const id = `ms-${randomBytes(4).toString('hex')}`;
    if (existed) this.log.warn({ file, node: id }, `node id file ${file} was empty (an earlier node may have crashed while writing it); it now holds a new id`);
    await replaceFile(file, `${id}\n`);
    return id;
  }
}
