// The etcd client that nodes and hosts share: the `etcd3` package, with its own retry and
// circuit breaker turned off. memstrata's loops (lease renewal, registration, watches)
// retry on their own schedule, bounded by the lease; a breaker that stops calling a
// recovered etcd for five seconds would only make a return slower to notice.

import { ConstantBackoff, noop } from 'cockatiel';
import { Etcd3 } from 'etcd3';

/** How long one etcd call may take before it fails (a stream, such as a watch, has none). */
export const ETCD_CALL_TIMEOUT_MS = 2000;

export interface EtcdOptions {
  /** Client URLs, such as http://127.0.0.1:2379. */
  endpoints: readonly string[];
  /** Per-call deadline; default {@link ETCD_CALL_TIMEOUT_MS}. */
  callTimeoutMs?: number;
  /** For https endpoints: the CA of etcd's certificate, and a client certificate and key when etcd asks for one (--client-cert-auth). */
  tls?: EtcdTls | undefined;
}

export interface EtcdTls {
  ca: Buffer;
  cert?: Buffer | undefined;
  key?: Buffer | undefined;
}

export function openEtcd(options: EtcdOptions): Etcd3 {
  const timeout = options.callTimeoutMs ?? ETCD_CALL_TIMEOUT_MS;
  const tls = options.tls;
  const https = options.endpoints.some((e) => e.startsWith('https:'));
  return new Etcd3({
    hosts: [...options.endpoints],
    ...(https && tls !== undefined
      ? { credentials: { rootCertificate: tls.ca, ...(tls.cert === undefined || tls.key === undefined || tls.cert.length === 0 ? {} : { certChain: tls.cert, privateKey: tls.key }) } }
      : {}),
    dialTimeout: timeout,
    defaultCallOptions: (context) => (context.isStream ? {} : { deadline: Date.now() + timeout }),
    faultHandling: {
      host: () => noop,
      global: noop,
      watchBackoff: new ConstantBackoff(250).next(),
    },
  });
}

/** An error's message, for a log line or a status field. */
export function etcdProblem(error: unknown): string {
  const message = error instanceof Error ? error.message : String(error);
  return message.replace(/[.\s]*Resolution note:\s*$/, '');
}

/*
 * WATCH_ENDED. A watcher that emitted 'error' was cancelled by etcd (the only source of
 * that event in etcd3 1.1), and the client has already dropped it. Cancelling it again
 * sends etcd a cancel request for an id the client no longer knows, and while another
 * watcher keeps the client's stream open, the answer makes etcd3 throw from inside its
 * stream ("Failed to find watcher for IWatchResponse"), which ends the process. So: never
 * cancel a watcher after its 'error', and give each watcher a client of its own.
 */

/**
 * Cancels a watcher without waiting for etcd to confirm for long: a watcher etcd already
 * cancelled (compacted past its revision), or an etcd that is frozen, never confirms, and
 * an await on that would hang whoever asked (a relist, a close).
 */
export async function cancelWatcher(watcher: { cancel(): Promise<void> } | undefined, waitMs = 1000): Promise<void> {
  if (watcher === undefined) return;
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([watcher.cancel().catch(() => undefined), new Promise<void>((resolve) => (timer = setTimeout(resolve, waitMs)))]);
  clearTimeout(timer);
}
