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
}

export function openEtcd(options: EtcdOptions): Etcd3 {
  const timeout = options.callTimeoutMs ?? ETCD_CALL_TIMEOUT_MS;
  return new Etcd3({
    hosts: [...options.endpoints],
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
