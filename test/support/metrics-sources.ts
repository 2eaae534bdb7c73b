// NodeMetrics over a node with nothing in it: for tests of the admin server and of single
// metrics, which pass only the sources they care about.

import { NodeMetrics, type MetricsSources } from '../../src/admin/metrics.js';

export function emptyNodeMetrics(sources: Partial<MetricsSources> = {}): NodeMetrics {
  return new NodeMetrics({
    nodeId: 'ms-test',
    partition: { usage: () => [] } as never,
    allocation: { rows: () => [], servers: () => [] } as never,
    media: [],
    rmem: () => undefined,
    nbd: () => undefined,
    volumes: { list: () => [] } as never,
    cache: () => undefined,
    nvram: () => [],
    mirror: () => undefined,
    ...sources,
  });
}
