// TLS for the node's services and links (node:tls). One certificate and key per node,
// and optionally a CA: with it, every client and peer must present a certificate that CA
// signed (mutual TLS), and the node checks the peers it connects to against it.
// TLS 1.2 at least (the NBD protocol asks for 1.2 and allows later versions).

import type { Socket } from 'node:net';
import { createServer as createTlsServer, type ConnectionOptions, type TLSSocket, type TlsOptions } from 'node:tls';

/** The node's certificate and key (PEM), and the CA of clients and peers, when set. */
export interface TlsFiles {
  cert: Buffer;
  key: Buffer;
  /** Set: clients and peers must present a certificate this CA signed; peers the node connects to are checked against it. */
  ca: Buffer | undefined;
}

export const MIN_TLS_VERSION = 'TLSv1.2';

/** Options of a TLS server (tls.createServer; also fastify's https). */
export function serverTls(files: TlsFiles): TlsOptions {
  const mutual = files.ca !== undefined;
  return {
    cert: files.cert,
    key: files.key,
    ...(mutual ? { ca: files.ca } : {}),
    requestCert: mutual,
    rejectUnauthorized: mutual,
    minVersion: MIN_TLS_VERSION,
  };
}

/** Options of a TLS client of another node (the mirror link): its certificate checked against the CA, this node's presented. */
export function clientTls(files: TlsFiles): ConnectionOptions {
  return {
    ...(files.ca === undefined ? {} : { ca: files.ca }),
    ...(files.cert.length > 0 ? { cert: files.cert, key: files.key } : {}),
    minVersion: MIN_TLS_VERSION,
  };
}

/**
 * Starts TLS on plain sockets a service has already admitted: they go through a TLS
 * server that never listens (node:tls's own handshake, certificate checks and handshake
 * timeout). Each one that completes the handshake, with a certificate tls.ca signed when
 * there is a CA, is handed to `secured` with what was kept for it; one that fails is
 * destroyed and reported to `failed`. The plain socket stays the one the service's
 * connection gate holds: destroying it (its handshake timeout) ends the TLS session too.
 */
export function tlsUpgrader<T>(
  files: TlsFiles,
  handshakeTimeoutMs: number,
  secured: (secure: TLSSocket, kept: T) => void,
  failed: (error: Error, remote: string) => void,
): { upgrade: (socket: Socket, kept: T) => void; close: () => void } {
  const waiting = new Map<string, { socket: Socket; kept: T }>();
  let closed = false;
  // A TCP connection is named by its two ends; the TLS socket reports the same ones.
  const key = (s: Socket): string => `${s.remoteAddress ?? '?'}|${s.remotePort ?? 0}|${s.localAddress ?? '?'}|${s.localPort ?? 0}`;
  const server = createTlsServer({ ...serverTls(files), handshakeTimeout: handshakeTimeoutMs }, (secure) => {
    const k = key(secure);
    const entry = waiting.get(k);
    waiting.delete(k);
    if (entry === undefined || entry.socket.destroyed) {
      secure.destroy();
      return;
    }
    entry.socket.once('close', () => secure.destroy());
    secured(secure, entry.kept);
  });
  server.on('tlsClientError', (error, secure) => {
    waiting.delete(key(secure));
    failed(error, `${secure.remoteAddress ?? '?'}:${secure.remotePort ?? 0}`);
    secure.destroy();
  });
  return {
    upgrade: (socket, kept) => {
      if (closed) socket.destroy();
      if (socket.destroyed) return;
      const k = key(socket);
      waiting.set(k, { socket, kept });
      socket.once('close', () => waiting.delete(k));
      server.emit('connection', socket);
    },
    close: () => {
      closed = true;
      for (const { socket } of waiting.values()) socket.destroy();
      waiting.clear();
    },
  };
}
