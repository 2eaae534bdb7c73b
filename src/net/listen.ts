// Listening and closing for the node's TCP services, with one error shape.

import { chmod, unlink } from 'node:fs/promises';
import type { Server } from 'node:net';
import { NetworkError } from '../errors.js';
import type { Logger } from '../logger.js';
import { formatAddress, type ListenAddress } from '../units.js';

/**
 * Connections the kernel queues before the node accepts them (capped by the kernel's
 * somaxconn). Node.js's default, 511, overflows under a flood of connects, and the kernel
 * then drops connections the node never saw, so a client gets a reset or a timeout
 * instead of the node's own refusal (the connection limits close what is over them at
 * once). nbdkit listens with SOMAXCONN too.
 */
const LISTEN_BACKLOG = 4096;

/** Listens on `address`; resolves with the bound address (port 0 resolved) or throws MS_LISTEN_FAILED. */
export async function listenOn(server: Server, address: ListenAddress, service: string, log: Logger): Promise<ListenAddress> {
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host: address.host, port: address.port, backlog: LISTEN_BACKLOG }, () => {
        server.off('error', reject);
        resolve();
      });
    });
  } catch (error) {
    throw new NetworkError('MS_LISTEN_FAILED', `${service} service cannot listen on ${formatAddress(address)}: ${(error as Error).message}`, {
      cause: error,
      details: { service, address: formatAddress(address) },
    });
  }
  server.on('error', (error) => {
    log.error({ err: error, service }, 'listener error');
  });
  const info = server.address();
  return typeof info === 'object' && info !== null ? { host: address.host, port: info.port } : address;
}

/**
 * At shutdown, how long a connection's requests in flight may take before it is cut: a
 * client that does not read its replies, or storage that does not answer, must not keep
 * the node from stopping. Each service's connections apply it in drainAndClose().
 */
export const DRAIN_DEADLINE_MS = 10_000;

/** Stops accepting, drains every connection, destroys what is left, and waits for the listener to close. */
export async function closeServer<C extends { drainAndClose(): Promise<void>; socket: { destroy(): void } }>(
  server: Server | undefined,
  connections: Iterable<C>,
): Promise<void> {
  const closed = server === undefined ? Promise.resolve() : new Promise<void>((resolve) => server.close(() => {
    resolve();
  }));
  const all = [...connections];
  await Promise.all(all.map((c) => c.drainAndClose()));
  for (const c of all) c.socket.destroy();
  await closed;
}

/** Listens on a Unix socket only the node's user may use; a stale socket file from an earlier run is replaced. */
export async function listenUnix(server: Server, path: string, service: string, log: Logger): Promise<void> {
  try {
    await unlink(path).catch(() => undefined);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ path, backlog: LISTEN_BACKLOG }, () => {
        server.off('error', reject);
        resolve();
      });
    });
    await chmod(path, 0o600);
  } catch (error) {
    throw new NetworkError('MS_LISTEN_FAILED', `${service} cannot listen on ${path}: ${(error as Error).message}`, { cause: error, details: { service, address: path } });
  }
  server.on('error', (error) => {
    log.error({ err: error, service, path }, 'listener error');
  });
}


/** A cut-through socket a service listens on for one guest (issue 12). */
export interface ScopedListener {
  readonly path: string;
  connections(): number;
  /** What each connection holds: the NBD export it is attached to, the NVRAM devices it has open. */
  holding(): string[];
  close(): Promise<void>;
}
