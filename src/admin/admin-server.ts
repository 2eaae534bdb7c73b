// The admin HTTP API (fastify): node information, the partition and allocation tables,
// partition resizes, Prometheus metrics and a health check.
//
// Every request body is validated with zod before it reaches a table; every failure is
// answered as `{ "error": { "code", "message", "details"? } }` with the status from the
// error registry, so scripts can branch on the code. Closing drains requests in flight.
//
// Who may ask (admin.token):
//   - with a token, every request but GET/HEAD /healthz (and /metrics with
//     admin.metricsPublic) must carry `Authorization: Bearer <token>`. The check is the
//     first hook (onRequest), before routing to a handler and before any body byte is
//     read, so unknown routes (404) and bodies are refused alike and reveal nothing;
//   - a refusal is 401 MS_ADMIN_UNAUTHORIZED with WWW-Authenticate, and `Connection:
//     close`, so a refused client cannot stream a body into the node;
//   - the framework's own refusals (a URL that does not decode, a path parameter over
//     fastify's length limit) come before routing, so fastify answers them before any
//     hook: they go through the same check first (frameworkErrors), so a stranger gets
//     401 whether the route exists or not, and the rest get the coded error shape;
//   - `Expect: 100-continue`: Node would answer "100 Continue" by itself before any of
//     this runs, inviting the body; only a client with the token is told to go on
//     (checkContinue), the others get the 401 without it;
//   - without a token the API is open; config.ts allows that only on a loopback address.
//
// What one client may cost (hostile clients):
//   - sockets: admin.maxConnections for the service (the HTTP server's maxConnections),
//     admin.maxConnectionsPerClient per remote address (net/client-limit.ts); more are
//     closed at once;
//   - time: headers within admin.headersTimeout, the whole request within
//     admin.requestTimeout, or 408 MS_ADMIN_REQUEST_TIMEOUT and the socket is closed
//     (a slowloris client that trickles header lines is cut off); an idle keep-alive
//     socket is closed after KEEP_ALIVE_MS;
//   - bytes: headers up to Node's 16 KiB, a body up to admin.bodyLimit, or 413
//     MS_ADMIN_BODY_TOO_LARGE (a declared Content-Length over the limit is refused
//     before the body is read).
// So the service's memory is bounded by about maxConnections x (16 KiB + bodyLimit).

import Fastify, { type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { z } from 'zod';
import { MisuseError, NetworkError, isMemstrataError, toMemstrataError, type MemstrataError } from '../errors.js';
import { MEDIA, USED_KINDS } from '../kinds.js';
import type { AllocationTable } from '../memory/allocation-table.js';
import type { PartitionTable } from '../memory/partition-table.js';
import type { KeptAside } from '../memory/server-memory.js';
import { SIZE_FORM, formatAddress, formatSize, hexRange, hexWidth, parseSize, type ListenAddress } from '../units.js';
import type { Logger } from '../logger.js';
import { MIN_TLS_VERSION, type TlsFiles } from '../net/tls.js';
import type { AllocationTableJson, ClusterJson, ErrorResponse, NodeInfo, PartitionTableJson, ResizeResponse, RmemSessionJson, ServersJson, VolumeJson, VolumesJson, NvramListJson, NvramDumpJson, GuestsJson, JournalHolderJson } from '../protocol/admin/api.js';
import type { VolumeManager } from '../storage/volume-manager.js';
import type { DeviceManager } from '../nvram/device-manager.js';
import { POLICIES } from '../nvram/device.js';
import { decodeOne } from '../protocol/journal/record.js';
import type { NodeMetrics } from './metrics.js';
import { BearerAuth } from './bearer-auth.js';
import { ClientLimit } from '../net/client-limit.js';
import { GuestSupervisor, type GuestInfo } from '../guest/supervisor.js';
import { RESTART_POLICIES } from '../guest/guest-meta.js';

export interface AdminContext {
  info(): Promise<NodeInfo>;
  partition: PartitionTable;
  allocation: AllocationTable;
  rmemSessions(): RmemSessionJson[];
  /** Journals open over rmem, with the path each came in by. */
  journalHolders?(): JournalHolderJson[];
  /** Server memory kept aside because its zeroing failed (ServerMemory.keptAside). */
  keptAside(): readonly KeptAside[];
  volumes: VolumeManager;
  nvram: DeviceManager;
  guests: GuestSupervisor;
  /** GET /v1/cluster. */
  cluster?(): Promise<ClusterJson>;
  metrics: NodeMetrics;
  log: Logger;
  isStopping(): boolean;
}

/** Who may use the API and what one client may cost it; config.ts validates these (AdminConfig). */
export interface AdminServerOptions {
  /** HTTPS with the node's certificate (admin.tls); clients are not asked for certificates: the token is the admin API's authentication. */
  tls?: TlsFiles | undefined;
  token: string | undefined;
  metricsPublic: boolean;
  maxConnections: number;
  maxConnectionsPerClient: number;
  headersTimeoutMs: number;
  requestTimeoutMs: number;
  bodyLimit: number;
}

/** Counters for /metrics (read at scrape time). */
export interface AdminStats {
  /** Connections open now. */
  connections: number;
  /** Connections closed at once: the service had admin.maxConnections open. */
  refusedMaxConnections: number;
  /** Connections closed at once: their address had admin.maxConnectionsPerClient open. */
  refusedPerClient: number;
  /** Requests refused with MS_ADMIN_UNAUTHORIZED. */
  authFailures: number;
  /** Connections closed with MS_ADMIN_REQUEST_TIMEOUT (headers or request too slow). */
  requestTimeouts: number;
}

// An idle keep-alive socket holds a slot of admin.maxConnectionsPerClient; the CLI
// opens one request per command, so a short wait loses nothing.
const KEEP_ALIVE_MS = 5000;
const REALM = 'Bearer realm="memstrata admin"';
// Failed logins are counted always, logged at most this often (a flood must not flood the log).
const AUTH_WARN_EVERY_MS = 60_000;

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
// Limits: a number (or null to remove it); the supervisor checks the ranges.
const guestLimits = {
  cpu: z.union([z.number(), z.null()]).optional(),
  cores: z.union([z.number(), z.null()]).optional(),
  memory: z.union([size, z.null()]).optional(),
};
const guestBody = z.strictObject({
  name: z.string(),
  command: z.array(z.string()).min(1),
  env: z.record(z.string(), z.string()).optional(),
  restart: z.enum(RESTART_POLICIES).optional(),
  start: z.boolean().optional(),
  volumes: z.array(z.string()).max(256).optional(),
  nvram: z.array(z.string()).max(256).optional(),
  nvramQuota: size.optional(),
  user: z.string().optional(),
  ...guestLimits,
});
const guestDeviceBody = z.union([z.strictObject({ volume: z.string() }), z.strictObject({ nvram: z.string() })]);
const guestLimitsBody = z.strictObject(guestLimits);
const logsQuery = z.strictObject({ follow: z.enum(['0', '1', 'true', 'false']).optional() });
const dumpQuery = z.strictObject({ from: count(0), max: count(100), diverged: z.enum(['0', '1', 'true', 'false']).optional() });

/** The fields that were given (exactOptionalPropertyTypes: absent, not undefined). */
function definedOnly<T extends Record<string, unknown>>(fields: T): { [K in keyof T]?: Exclude<T[K], undefined> } {
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined)) as { [K in keyof T]?: Exclude<T[K], undefined> };
}

/** Validates a request body once, at the edge, into a coded error naming each bad field. */
function parseBody<T>(schema: z.ZodType<T>, body: unknown, what: string): T {
  const parsed = schema.safeParse(body ?? {});
  if (parsed.success) return parsed.data;
  const message = parsed.error.issues.map((i) => `${i.path.join('.') || 'body'}: ${i.message}`).join('; ');
  throw new MisuseError('MS_BAD_REQUEST', `invalid ${what} request: ${message}`, { details: { issues: parsed.error.issues.map((i) => i.path.join('.')) } });
}

export class AdminServer {
  readonly stats: AdminStats;
  /** Every route served, as fastify registered it (HEAD twins included), so tests can try each one. */
  readonly routeList: { method: string; url: string }[];
  private readonly app: FastifyInstance;
  private readonly context: AdminContext;
  private readonly auth: BearerAuth | undefined;
  private readonly publicRoutes: ReadonlySet<string>;
  private readonly clients: ClientLimit;
  private readonly bodyLimit: number;
  private bound: ListenAddress | undefined;
  private authWarnedAt: number;
  private authFailuresUnlogged: number;

  constructor(context: AdminContext, options: AdminServerOptions) {
    this.context = context;
    this.bound = undefined;
    this.routeList = [];
    this.stats = { connections: 0, refusedMaxConnections: 0, refusedPerClient: 0, authFailures: 0, requestTimeouts: 0 };
    this.auth = options.token === undefined ? undefined : new BearerAuth(options.token);
    this.publicRoutes = new Set(['/healthz', ...(options.metricsPublic ? ['/metrics'] : [])]);
    this.clients = new ClientLimit(options.maxConnectionsPerClient);
    this.bodyLimit = options.bodyLimit;
    this.authWarnedAt = -Infinity;
    this.authFailuresUnlogged = 0;
    // Node checks both deadlines on a timer of this period; its default (30 s) would let
    // a slow client stay that much longer than admin.headersTimeout.
    const timeouts = { headersTimeout: options.headersTimeoutMs, connectionsCheckingInterval: Math.max(10, Math.min(1000, Math.floor(options.headersTimeoutMs / 4))) };
    const transport = options.tls === undefined
      ? { http: timeouts }
      : { https: { ...timeouts, cert: options.tls.cert, key: options.tls.key, minVersion: MIN_TLS_VERSION } };
    this.app = Fastify({
      ...(transport as { http: typeof timeouts }),
      logger: false,
      bodyLimit: options.bodyLimit,
      return503OnClosing: true,
      forceCloseConnections: 'idle',
      keepAliveTimeout: KEEP_ALIVE_MS,
      requestTimeout: options.requestTimeoutMs,
      clientErrorHandler: (error, socket) => {
        this.clientError(error, socket);
      },
      frameworkErrors: (error, request, reply) => {
        this.frameworkError(error, request, reply);
      },
    });
    const server = this.app.server;
    server.on('checkContinue', (request: IncomingMessage, response: ServerResponse) => {
      if (this.auth === undefined || this.auth.check(request.headers.authorization) === 'ok') response.writeContinue();
      // Handled here, so Node no longer passes the request on by itself.
      server.emit('request', request, response);
    });
    server.maxConnections = options.maxConnections;
    server.on('drop', () => {
      this.stats.refusedMaxConnections++;
    });
    server.on('connection', (socket: Socket) => {
      if (!this.clients.admit(socket)) {
        this.stats.refusedPerClient++;
        return;
      }
      this.stats.connections++;
      socket.once('close', () => {
        this.stats.connections--;
      });
    });
    this.app.addHook('onRoute', (route) => {
      for (const method of [route.method].flat()) this.routeList.push({ method, url: route.url });
    });
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

  /**
   * Lets the request through, or answers 401 and returns false. Public routes are told
   * by the route that matched (never by the raw URL, which a client can dress up);
   * undefined when none did.
   */
  private authorized(request: FastifyRequest, reply: FastifyReply, route: string | undefined): boolean {
    if (this.auth === undefined) return true;
    if (route !== undefined && this.publicRoutes.has(route)) return true;
    const verdict = this.auth.check(request.headers.authorization);
    if (verdict === 'ok') return true;
    this.stats.authFailures++;
    this.noteAuthFailure(request.ip);
    const error = new MisuseError(
      'MS_ADMIN_UNAUTHORIZED',
      verdict === 'missing'
        ? 'this admin API requires a token: send Authorization: Bearer <admin.token> (the CLI takes --token or MEMSTRATA_ADMIN_TOKEN)'
        : 'the admin token was refused',
    );
    void reply
      .code(error.status)
      .header('www-authenticate', verdict === 'missing' ? REALM : `${REALM}, error="invalid_token"`)
      .header('connection', 'close')
      .send(errorBody(error));
    return false;
  }

  private noteAuthFailure(remote: string): void {
    this.authFailuresUnlogged++;
    const now = Date.now();
    if (now - this.authWarnedAt < AUTH_WARN_EVERY_MS) return;
    this.context.log.warn({ remote, failures: this.authFailuresUnlogged }, 'admin API request refused: missing or wrong token');
    this.authWarnedAt = now;
    this.authFailuresUnlogged = 0;
  }

  /**
   * What fastify's router refuses before any hook: a URL that does not decode, a path
   * parameter over its length limit. No route matched, so the token is required first;
   * then the refusal in the coded shape, without echoing the URL.
   */
  private frameworkError(error: FastifyError, request: FastifyRequest, reply: FastifyReply): void {
    if (!this.authorized(request, reply, undefined)) return;
    const coded =
      error.code === 'FST_ERR_BAD_URL'
        ? new MisuseError('MS_BAD_REQUEST', 'the request URL is not valid (a malformed percent-encoding)')
        : error.code === 'FST_ERR_MAX_PARAM_LENGTH'
          ? new MisuseError('MS_BAD_REQUEST', 'a name in the request URL is too long (names are at most 64 characters)')
          : toMemstrataError(error);
    if (coded.status >= 500) this.context.log.error({ err: error }, 'admin request failed in routing');
    void reply.code(coded.status).send(errorBody(coded));
  }

  /** Errors Node's HTTP parser raises before fastify sees a request: timeouts, malformed or oversized headers. */
  private clientError(error: Error & { code?: string }, socket: Socket): void {
    if (error.code === 'ECONNRESET' || socket.destroyed) return;
    const timeout = error.code === 'ERR_HTTP_REQUEST_TIMEOUT';
    if (timeout) this.stats.requestTimeouts++;
    const coded = timeout
      ? new MisuseError('MS_ADMIN_REQUEST_TIMEOUT', 'request not received in time (admin.headersTimeout, admin.requestTimeout)')
      : new MisuseError('MS_BAD_REQUEST', error.code === 'HPE_HEADER_OVERFLOW' ? 'request headers larger than 16 KiB' : 'malformed HTTP request');
    const body = JSON.stringify(errorBody(coded));
    if (socket.writable) {
      socket.write(`HTTP/1.1 ${coded.status} ${coded.status === 408 ? 'Request Timeout' : 'Bad Request'}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
    }
    socket.destroy();
  }

  private routes(): void {
    const { app, context } = this;

    app.addHook('onRequest', (request, reply, done) => {
      if (this.authorized(request, reply, request.routeOptions.url)) done();
    });

    app.setErrorHandler((error: FastifyError, request, reply) => {
      const coded = isMemstrataError(error)
        ? error
        : error.code === 'FST_ERR_CTP_BODY_TOO_LARGE'
          ? new MisuseError('MS_ADMIN_BODY_TOO_LARGE', `request body larger than admin.bodyLimit (${formatSize(this.bodyLimit)})`, { cause: error })
          : error.statusCode !== undefined && error.statusCode < 500
            ? new MisuseError('MS_BAD_REQUEST', error.message, { cause: error })
            : toMemstrataError(error);
      if (coded.status >= 500) context.log.error({ err: error, url: request.url }, 'admin request failed');
      void reply.code(coded.status).send(errorBody(coded));
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

    app.get('/v1/cluster', async (): Promise<ClusterJson> => context.cluster?.() ?? { enabled: false, node: (await context.info()).id, self: null, members: [], devices: [], ownership: [], unreadable: [], problem: null });

    app.get('/v1/tables/partition', (): PartitionTableJson => partitionJson(context.partition));

    app.get('/v1/tables/allocation', (): AllocationTableJson => allocationJson(context.allocation, context.partition));

    app.get('/v1/servers', (): ServersJson => {
      const width = Math.max(...context.partition.usage().map((u) => hexWidth(u.capacity)), 8);
      return {
        sessions: context.rmemSessions(),
        allocation: allocationJson(context.allocation, context.partition),
        keptAside: context.keptAside().map((k) => ({ ...k, range: hexRange(k.start, k.length, width) })),
      };
    });

    app.get('/v1/volumes', (): VolumesJson => ({ volumes: context.volumes.list().map((v) => v.info()), damaged: context.volumes.damaged(), orphans: context.volumes.orphans() }));

    app.post('/v1/volumes', async (request, reply): Promise<VolumeJson> => {
      const { name, size, readOnly, writeLog } = parseBody(volumeBody, request.body, 'volume');
      // The volume layer decides whether the device may be its write log (write-log.ts);
      // one attached to a guest may not be, and none can be attached while it is claimed.
      const volume = writeLog === undefined
        ? await context.volumes.create(name, size, readOnly ?? false)
        : await context.guests.exclusive('nvram', writeLog, 'made a write log', () => context.volumes.create(name, size, readOnly ?? false, writeLog));
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
      await context.guests.exclusive('volume', name, 'removed', () => context.volumes.remove(name));
      context.log.info({ volume: name }, `volume ${name} removed`);
      return reply.code(204).send();
    });

    app.get('/v1/guests', (): GuestsJson => ({ guests: context.guests.list(), damaged: context.guests.damaged() }));

    // Guests run programs as the node's user: only a client that proved it holds the token may.
    const tokenRequired = (): void => {
      if (this.auth === undefined) {
        throw new MisuseError('MS_ADMIN_TOKEN_REQUIRED', 'running programs through the node needs admin.token (or admin.tokenFile) set on the node: without one, any local user could run commands as the node\'s user');
      }
    };

    app.post('/v1/guests', async (request, reply): Promise<GuestInfo> => {
      tokenRequired();
      const { name, command, env, restart, start, cpu, cores, memory, volumes, nvram, nvramQuota, user } = parseBody(guestBody, request.body, 'guest');
      const info = await context.guests.create({ name, command, ...definedOnly({ env, restart, cpu, cores, memory, volumes, nvram, nvramQuota, user }) }, start ?? true);
      context.log.info({ guest: name, command }, `guest ${name} created`);
      void reply.code(201);
      return info;
    });

    // Limits change while the guest runs; like start, this needs the token (a share buys CPU).
    app.patch('/v1/guests/:name', async (request): Promise<GuestInfo> => {
      tokenRequired();
      const name = (request.params as { name: string }).name;
      const { cpu, cores, memory } = parseBody(guestLimitsBody, request.body, 'guest limits');
      return context.guests.set(name, definedOnly({ cpu, cores, memory }));
    });

    for (const action of ['attach', 'detach'] as const) {
      app.post(`/v1/guests/:name/${action}`, async (request): Promise<GuestInfo> => {
        tokenRequired();
        const name = (request.params as { name: string }).name;
        const body = parseBody(guestDeviceBody, request.body, `guest ${action}`);
        const [kind, device] = 'volume' in body ? (['volume', body.volume] as const) : (['nvram', body.nvram] as const);
        return action === 'attach' ? context.guests.attach(name, kind, device) : context.guests.detach(name, kind, device);
      });
    }

    app.post('/v1/guests/:name/:action', async (request): Promise<GuestInfo> => {
      const { name, action } = request.params as { name: string; action: string };
      if (action === 'stop') return context.guests.stop(name);
      tokenRequired();
      if (action === 'start') return context.guests.start(name);
      if (action === 'reset') return context.guests.reset(name);
      throw new MisuseError('MS_GUEST_INVALID', `unknown guest action ${JSON.stringify(action.slice(0, 40))}: expected start, stop, reset, attach or detach`);
    });

    app.delete('/v1/guests/:name', async (request, reply) => {
      const name = (request.params as { name: string }).name;
      await context.guests.remove(name);
      context.log.info({ guest: name }, `guest ${name} removed`);
      return reply.code(204).send();
    });

    app.get('/v1/guests/:name/logs', async (request, reply) => {
      const name = (request.params as { name: string }).name;
      const { follow } = parseBody(logsQuery, request.query, 'logs query');
      if (follow === '1' || follow === 'true') {
        // The last 64 KiB, then what the guest writes, until the client goes away.
        const stream = context.guests.followLogs(name);
        request.raw.once('close', () => stream.destroy());
        return reply.type('text/plain; charset=utf-8').send(stream);
      }
      const text = await context.guests.logs(name, 64 * 1024);
      return reply.type('text/plain; charset=utf-8').send(text);
    });

    app.get('/v1/nvram', async (): Promise<NvramListJson> => ({ devices: context.nvram.list(), damaged: context.nvram.damaged(), diverged: await context.nvram.divergedJournals(), holders: context.journalHolders?.() ?? [] }));

    app.post('/v1/nvram', async (request, reply) => {
      const { name, size, policy, medium } = parseBody(nvramBody, request.body, 'NVRAM device');
      const info = await context.nvram.create(name, size, policy, medium);
      void reply.code(201);
      return info;
    });

    app.post('/v1/nvram/:name/accept-local', async (request) => {
      const name = (request.params as { name: string }).name;
      return context.nvram.acceptLocal(name);
    });

    app.delete('/v1/nvram/:name', async (request, reply) => {
      const name = (request.params as { name: string }).name;
      await context.guests.exclusive('nvram', name, 'removed', () => context.nvram.remove(name));
      context.log.info({ device: name }, `NVRAM device ${name} removed`);
      return reply.code(204).send();
    });

    app.get('/v1/nvram/:name/records', async (request): Promise<NvramDumpJson> => {
      const name = (request.params as { name: string }).name;
      const { from, max, diverged } = parseBody(dumpQuery, request.query, 'dump');
      let file: string | undefined;
      let records;
      let info = null;
      if (diverged === '1' || diverged === 'true') {
        // Kept-aside journals outlive their device: no device is needed to read them.
        ({ file, records } = await context.nvram.divergedRecords(name, from, max));
        const device = context.nvram.find(name);
        info = device === undefined ? null : context.nvram.info(device);
      } else {
        const device = context.nvram.get(name);
        records = (await device.collect(from, max, 16 * 1024 * 1024)).map((buf) => decodeOne(buf));
        info = context.nvram.info(device);
      }
      return {
        ...(file === undefined ? {} : { file }),
        device: info,
        records: records.map((r) => ({
          seq: r.seq,
          timestamp: r.timestamp,
          epoch: r.epoch,
          target: r.target ?? null,
          length: r.payload.length,
          payload: r.payload.toString('base64'),
          writer: r.writer ?? null,
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

function errorBody(error: MemstrataError): ErrorResponse {
  return { error: error.toJSON() };
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

export function adminUrl(address: ListenAddress, tls = false): string {
  return `${tls ? 'https' : 'http'}://${formatAddress(address)}`;
}
