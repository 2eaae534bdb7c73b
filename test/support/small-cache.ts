// A storage cache for unit tests of the layers above it: DRAM only, 32 lines of 64 KiB,
// destaging only when asked (destage(), flush(), stop()).

import pino from 'pino';
import { DramMedium } from '../../src/memory/dram-medium.js';
import { PartitionTable, type MediumLayout } from '../../src/memory/partition-table.js';
import { LINE_SIZE } from '../../src/storage/cache/line.js';
import { StorageCache } from '../../src/storage/cache/storage-cache.js';

export async function smallCache(): Promise<StorageCache> {
  const capacity = 64 * LINE_SIZE;
  const layout: MediumLayout = { name: 'dram', capacity, extentSize: 4 * LINE_SIZE, initial: { cache: 32 * LINE_SIZE, server: 0, nvram: 0 }, bounds: { cache: { min: 0, max: capacity }, server: { min: 0, max: capacity }, nvram: { min: 0, max: capacity } } };
  const medium = new DramMedium({ capacity, extentSize: 4 * LINE_SIZE });
  await medium.open();
  const cache = new StorageCache({ partition: new PartitionTable([layout]), media: [medium], log: pino({ level: 'silent' }), maxDirtyAgeMs: 600_000, destageIntervalMs: 0 });
  cache.start();
  return cache;
}
