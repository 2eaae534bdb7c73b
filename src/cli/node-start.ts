// `memstrata node start`: load the configuration, start a node in the foreground, and
// stop it in order on SIGINT or SIGTERM. A second signal while stopping, a second or more
// after the first, exits at once. One sooner is the same stop delivered twice: Ctrl-C on
// `npm start` reaches the node from the terminal (the whole foreground group) and again
// from npm, which forwards it.
// Resolves once the node has stopped; invalid configuration is thrown before anything
// starts, so it reaches the user as one line.

import { isMemstrataError } from '../errors.js';
import { loadConfig, type ConfigSources } from '../node/config.js';
import { createLogger } from '../node/logger.js';
import { StorageNode } from '../node/storage-node.js';

/** A signal this soon after the first is taken as the same stop, delivered twice. */
const DUPLICATE_SIGNAL_MS = 1000;

export async function startNodeCommand(sources: Omit<ConfigSources, 'env' | 'cwd'>): Promise<void> {
  const { config, warnings } = await loadConfig({ ...sources, env: process.env });
  const log = createLogger({ level: config.log.level, format: config.log.format });
  for (const warning of warnings) log.warn(warning);
  const node = new StorageNode(config, log);

  let stopRequested: ((signal: NodeJS.Signals) => void) | undefined;
  const stopSignal = new Promise<NodeJS.Signals>((resolve) => {
    stopRequested = resolve;
  });
  let firstAt: number | undefined;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (firstAt === undefined) {
      firstAt = performance.now();
      stopRequested?.(signal);
      return;
    }
    if (performance.now() - firstAt < DUPLICATE_SIGNAL_MS) return;
    log.warn({ signal }, 'second signal while stopping: exiting without draining');
    process.exit(130);
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
