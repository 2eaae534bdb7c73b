// The admin HTTP API (fastify): node information, the partition and allocation tables,
// partition resizes, Prometheus metrics and a health check.
//
// Every request body is validated with zod before it reaches a table; every failure is
// answered as `{ "error": { "code", "message", "details"? } }` with the status from the
// error registry, so scripts can branch on the code. Closing drains requests in flight.

import Fastify, { type FastifyError, type FastifyInstance } from 'fastify';
import { z } from 'zod';
import { MisuseError, NetworkError, isMemstrataError, toMemstrataError } from '../errors.js';
import { MEDIA, USED_KINDS } from '../kinds.js';
import type { AllocationTable } from '../memory/allocation-table.js';
import type { PartitionTable } from '../memory/partition-table.js';
import { SIZE_FORM, formatAddress, hexRange, hexWidth, parseSize, type ListenAddress } from '../units.js';
import type { Logger } from '../logger.js';
import type { AllocationTableJson, ErrorResponse, NodeInfo, PartitionTableJson, ResizeResponse, RmemSessionJson, ServersJson, VolumeJson, VolumesJson, NvramListJson, NvramDumpJson } from '../protocol/admin/api.js';
import type { VolumeManager } from '../storage/volume-manager.js';
import type { DeviceManager } from '../nvram/device-manager.js';
import { POLICIES } from '../nvram/device.js';
import { decodeOne } from '../protocol/journal/record.js';
import type { NodeMetrics } from './metrics.js';

export interface AdminContext {
  info(): Promise<NodeInfo>;
  partition: PartitionTable;
  allocation: AllocationTable;
  rmemSessions(): RmemSessionJson[];
  volumes: VolumeManager;
  nvram: DeviceManager;
  metrics: NodeMetrics;
  log: Logger;
  isStopping(): boolean;
}

const size = z.unknown().transform((value, ctx) => {
  try {
    if (typeof value === 'number' || typeof value === 'string') return parseSize(value);
  } catch {
    // reported below
  }
  ctx.addIssue({ code: 'custom', message: `expected ${SIZE_FORM}` });
  return z.NEVER;
});

const resizeBody = z.strictObject({ medium: z.enum(MEDIA), kind: z.enum(USED_KINDS), bytes: size });
const volumeBody = z.strictObject({ name: z.string(), size, readOnly: z.boolean().optional(), writeLog: z.string().optional() });
const resizeVolumeBody = z.strictObject({ size });
const nvramBody = z.strictObject({ name: z.string(), size, policy: z.enum(POLICIES), medium: z.enum(MEDIA).optional() });
const count = (fallback: number) => z.union([z.number(), z.string()]).optional().transform((value, ctx) => {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 0) {
    ctx.addIssue({ code: 'custom', message: 'expected a whole number' });
    return z.NEVER;
  }
  return n;
});
const dumpQuery = z.strictObject({ from: count(0), max: count(100) });

/** Validates a request body once, at the edge, into a coded error naming each bad field. */
function parseBody<T>(schema: z.ZodType<T>, body: unknown, what: string): T {
  const parsed = schema.safeParse(body ?? {});
  if (parsed.success) return parsed.data;
  const message = parsed.error.issues.map((i) => `${i.path.join('.') || 'body'}: ${i.message}`).join('; ');
  throw new MisuseError('MS_BAD_REQUEST', `invalid ${what} request: ${message}`, { details: { issues: parsed.error.issues.map((i) => i.path.join('.')) } });
}

export class AdminServer {
  private readonly app: FastifyInstance;
  private readonly context: AdminContext;
  private bound: ListenAddress | undefined;

  constructor(context: AdminContext) {
    this.context = context;
    this.bound = undefined;
    this.app = Fastify({ logger: false, bodyLimit: 64 * 1024, return503OnClosing: true, forceCloseConnections: 'idle' });
    this.routes();
  }

  /** The address actually bound (port 0 resolved); undefined before listen. */
  get address(): ListenAddress | undefined {
    return this.bound;
  }

  async listen(address: ListenAddress): Promise<ListenAddress> {
    try {
      await this.app.listen({ host: address.host, port: address.port });
    } catch (error) {
      throw new NetworkError('MS_LISTEN_FAILED', `admin API cannot listen on ${formatAddress(address)}: ${(error as Error).message}`, {
        cause: error,
        details: { service: 'admin', address: formatAddress(address) },
      });
    }
    const bound = this.app.server.address();
    this.bound = typeof bound === 'object' && bound !== null ? { host: address.host, port: bound.port } : address;
    return this.bound;
  }

  async close(): Promise<void> {
    await this.app.close();
  }

  private routes(): void {
    const { app, context } = this;

    app.setErrorHandler((error: FastifyError, request, reply) => {
      const coded = isMemstrataError(error)
        ? error
        : error.statusCode !== undefined && error.statusCode < 500
          ? new MisuseError('MS_BAD_REQUEST', error.message, { cause: error })
          : toMemstrataError(error);
      if (coded.status >= 500) context.log.error({ err: error, url: request.url }, 'admin request failed');
      const body: ErrorResponse = { error: coded.toJSON() };
      void reply.code(coded.status).send(body);
    });

    app.setNotFoundHandler((request, reply) => {
      const body: ErrorResponse = { error: { code: 'MS_NOT_FOUND', message: `no route ${request.method} ${request.url}` } };
      void reply.code(404).send(body);
    });

    app.get('/healthz', (_request, reply) => {
      if (context.isStopping()) return reply.code(503).send({ status: 'stopping' });
      return reply.send({ status: 'ok' });
    });

    app.get('/v1/node', () => context.info());

    app.get('/v1/tables/partition', (): PartitionTableJson => partitionJson(context.partition));

    app.get('/v1/tables/allocation', (): AllocationTableJson => allocationJson(context.allocation, context.partition));

    app.get('/v1/servers', (): ServersJson => ({
      sessions: context.rmemSessions(),
      allocation: allocationJson(context.allocation, context.partition),
    }));

    app.get('/v1/volumes', (): VolumesJson => ({ volumes: context.volumes.list().map((v) => v.info()) }));

    app.post('/v1/volumes', async (request, reply): Promise<VolumeJson> => {
      const { name, size, readOnly, writeLog } = parseBody(volumeBody, request.body, 'volume');
      if (writeLog !== undefined) {
        const device = context.nvram.get(writeLog);
        // A volume's log is replayed before the node serves anything, before the mirror
        // partner is reached: its journal file must hold every acknowledged record.
        if (device.policy === 'mirrored' || device.role === 'replica') {
          throw new MisuseError('MS_VOLUME_INVALID', `NVRAM device ${writeLog} (${device.role === 'replica' ? 'a mirror replica' : 'mirrored'}) cannot be a write log: its local file may lack records only the partner holds; use a local or mirrored+local device`);
        }
        const user = context.volumes.list().find((v) => v.writeLog === writeLog);
        if (user !== undefined) throw new MisuseError('MS_VOLUME_INVALID', `NVRAM device ${writeLog} is already the write log of volume ${user.name}`);
      }
      const volume = await context.volumes.create(name, size, readOnly ?? false, writeLog);
      context.log.info({ volume: volume.info() }, `volume ${name} created`);
      void reply.code(201);
      return volume.info();
    });

    app.post('/v1/volumes/:name/resize', async (request): Promise<VolumeJson> => {
      const { size } = parseBody(resizeVolumeBody, request.body, 'volume resize');
      const name = (request.params as { name: string }).name;
      const volume = await context.volumes.resize(name, size);
      context.log.info({ volume: volume.info() }, `volume ${name} resized`);
      return volume.info();
    });

    app.delete('/v1/volumes/:name', async (request, reply) => {
      const name = (request.params as { name: string }).name;
      await context.volumes.remove(name);
      context.log.info({ volume: name }, `volume ${name} removed`);
      return reply.code(204).send();
    });

    app.get('/v1/nvram', (): NvramListJson => ({ devices: context.nvram.list() }));

    app.post('/v1/nvram', async (request, reply) => {
      const { name, size, policy, medium } = parseBody(nvramBody, request.body, 'NVRAM device');
      const info = await context.nvram.create(name, size, policy, medium);
      void reply.code(201);
      return info;
    });

    app.delete('/v1/nvram/:name', async (request, reply) => {
      const name = (request.params as { name: string }).name;
      const user = context.volumes.list().find((v) => v.writeLog === name);
      if (user !== undefined) throw new MisuseError('MS_NVRAM_INVALID', `NVRAM device ${name} is the write log of volume ${user.name}; remove the volume first`);
      await context.nvram.remove(name);
      context.log.info({ device: name }, `NVRAM device ${name} removed`);
      return reply.code(204).send();
    });

    app.get('/v1/nvram/:name/records', async (request): Promise<NvramDumpJson> => {
      const name = (request.params as { name: string }).name;
      const { from, max } = parseBody(dumpQuery, request.query, 'dump');
      const device = context.nvram.get(name);
      const records = (await device.collect(from, max, 16 * 1024 * 1024)).map((buf) => decodeOne(buf));
      return {
        device: device.info(),
        records: records.map((r) => ({
          seq: r.seq,
          timestamp: r.timestamp,
          epoch: r.epoch,
          target: r.target ?? null,
          length: r.payload.length,
          payload: r.payload.toString('base64'),
        })),
      };
    });

    app.post('/v1/partition/resize', async (request): Promise<ResizeResponse> => {
      const { medium, kind, bytes } = parseBody(resizeBody, request.body, 'resize');
      try {
        const result = await context.partition.resize(medium, kind, bytes);
        context.metrics.resizes.inc({ medium, kind, result: 'ok' });
        context.log.info({ resize: result }, `partition ${medium} ${kind} resized`);
        return { result, partition: partitionJson(context.partition) };
      } catch (error) {
        context.metrics.resizes.inc({ medium, kind, result: isMemstrataError(error) ? error.code : 'MS_INTERNAL' });
        throw error;
      }
    });

    app.get('/metrics', async (_request, reply) => {
      const text = await context.metrics.registry.metrics();
      return reply.type(context.metrics.registry.contentType).send(text);
    });
  }
}

export function partitionJson(partition: PartitionTable): PartitionTableJson {
  const usage = partition.usage();
  const width = Math.max(...usage.map((u) => hexWidth(u.capacity)), 8);
  return {
    rows: partition.rows().map((row) => ({ ...row, range: hexRange(row.start, row.length, width) })),
    usage,
  };
}

export function allocationJson(allocation: AllocationTable, partition: PartitionTable): AllocationTableJson {
  const width = Math.max(...partition.usage().map((u) => hexWidth(u.capacity)), 8);
  return {
    rows: allocation.rows().map((row) => ({ ...row, range: hexRange(row.start, row.length, width) })),
    servers: allocation.servers(),
  };
}

export function adminUrl(address: ListenAddress): string {
  return `http://${formatAddress(address)}`;
}
