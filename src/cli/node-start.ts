// `memstrata node start`: load the configuration, start a node in the foreground, and
// stop it in order on SIGINT or SIGTERM. A second signal while stopping exits at once.
// Resolves once the node has stopped; invalid configuration is thrown before anything
// starts, so it reaches the user as one line.

import { isMemstrataError } from '../errors.js';
import { loadConfig, type ConfigSources } from '../node/config.js';
import { createLogger } from '../node/logger.js';
import { StorageNode } from '../node/storage-node.js';

export async function startNodeCommand(sources: Omit<ConfigSources, 'env' | 'cwd'>): Promise<void> {
  const { config, warnings } = await loadConfig({ ...sources, env: process.env });
  const log = createLogger({ level: config.log.level, format: config.log.format });
  for (const warning of warnings) log.warn(warning);
  const node = new StorageNode(config, log);

  let stopRequested: ((signal: NodeJS.Signals) => void) | undefined;
  const stopSignal = new Promise<NodeJS.Signals>((resolve) => {
    stopRequested = resolve;
  });
  let signals = 0;
  const onSignal = (signal: NodeJS.Signals): void => {
    signals++;
    if (signals > 1) {
      log.warn({ signal }, 'second signal while stopping: exiting without draining');
      process.exit(130);
    }
    stopRequested?.(signal);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  try {
    await node.start();
  } catch (error) {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    if (isMemstrataError(error)) log.error({ code: error.code }, error.message);
    throw error;
  }
  // Keep the loop alive however quiet the node is; the signal handlers end it.
  const keepAlive = setInterval(() => undefined, 1 << 30);
  const signal = await stopSignal;
  log.info({ signal }, 'stopping');
  try {
    await node.stop();
  } finally {
    clearInterval(keepAlive);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}
