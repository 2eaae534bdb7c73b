// `memstrata`: embed a storage node in a Node.js program.
//
//   const { config } = await loadConfig({ env: process.env });
//   const node = new StorageNode(config, createLogger(config.log));
//   await node.start();

export { StorageNode } from './node/storage-node.js';
export { SETTINGS, envName, loadConfig, mediumLayouts } from './node/config.js';
export type { ConfigSources, LoadedConfig, NodeConfig, Setting } from './node/config.js';
export { createLogger } from './node/logger.js';
export { PartitionTable } from './memory/partition-table.js';
export type { MediumLayout, PartitionRow, Reclaimer, ReclaimRequest, ResizeResult } from './memory/partition-table.js';
export { AllocationTable } from './memory/allocation-table.js';
export type { AllocationRow, PhysicalRange, Region } from './memory/allocation-table.js';
export type { Medium, MediumCapabilities } from './memory/medium.js';
export { DramMedium } from './memory/dram-medium.js';
export { FlashMedium } from './memory/flash-medium.js';
export { KINDS, MEDIA, type Kind, type MediumName, type UsedKind } from './kinds.js';
export * from './errors.js';
export { formatSize, parseSize } from './units.js';
export { VERSION } from './version.js';
