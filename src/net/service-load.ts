// What a service's limits look like from outside (metrics, status): its gate, its flows
// and its shared budget, read at scrape time.

import type { GateStats } from './connection-gate.js';
import type { FlowStats, SharedBudget } from './request-flow.js';

export interface ServiceLoad {
  /** Connections open now. */
  connections: number;
  /** Connections closed at once because the service was full. */
  refused: number;
  /** Connections closed at once because their address had its maximum open. */
  refusedPerClient: number;
  /** Connections closed because their handshake did not finish in time. */
  handshakeTimeouts: number;
  /** Times a connection stopped being read because it was over its budget. */
  pauses: number;
  /** Connections not being read now. */
  paused: number;
  /** Bytes held by requests in flight on all connections. */
  bytesInFlight: number;
  /** Connections the node closed because they stalled after their handshake (rmem: the lease; mirror: mirror.stallTimeout). */
  stalled: number;
}

export function serviceLoad(gate: GateStats, flows: FlowStats, budget: SharedBudget, stalled: number): ServiceLoad {
  return {
    connections: gate.open,
    refused: gate.refused,
    refusedPerClient: gate.refusedPerClient,
    handshakeTimeouts: gate.handshakeTimeouts,
    pauses: flows.pauses,
    paused: flows.pausedNow,
    bytesInFlight: budget.bytes,
    stalled,
  };
}
