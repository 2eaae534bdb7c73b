// The metadata file of an NVRAM device, nvram/<name>.json: its format (version 1), its
// validation and its durable replacement. The device's records live in its journal file
// and vault (device-manager.ts); this file says what the device is.
//
//   {"name":"j1","size":67108864,"policy":"local","medium":"dram","role":"primary",
//    "createdAt":"2025-01-01T00:00:00.000Z","version":1}           (role optional: primary)
//
// Invariants of a file that loads:
//   - version is 1 and no field is unknown;
//   - name matches the file name; size is a whole number of 4 KiB pages, at least one;
//     policy, medium and role are ones this node knows; createdAt is an ISO 8601 time.
// Whether the size is a whole number of extents is the partition table's to say, at load.
// A frozen copy of a version 1 file is in test/fixtures/meta.

import { z } from 'zod';
import { metaInvalid, readMetaFile, replaceFile, type MetaFs } from '../fs/meta-file.js';
import { MEDIA, type MediumName } from '../kinds.js';
import { DEVICE_NAME_PATTERN, POLICIES, type Policy, type Role } from '../protocol/journal/policy.js';
import { deviceFile } from './device-files.js';

export { DEVICE_NAME_PATTERN };

const DEVICE_META_VERSION = 1;

const deviceMetaSchema = z.strictObject({
  version: z.literal(DEVICE_META_VERSION, { error: `expected version ${DEVICE_META_VERSION}; this node reads no other` }),
  name: z.string().regex(DEVICE_NAME_PATTERN, 'expected 1 to 64 letters, digits, ".", "_" or "-"'),
  size: z.number().int().min(4096).max(Number.MAX_SAFE_INTEGER).multipleOf(4096, 'expected a multiple of 4096'),
  policy: z.enum(POLICIES),
  medium: z.enum(MEDIA),
  role: z.enum(['primary', 'replica']).optional(),
  /** A replica whose primary is a volume's write log on the partner (RESET flag): no client may take it over. */
  nodeOwned: z.boolean().optional(),
  createdAt: z.iso.datetime(),
});

export interface DeviceMeta {
  name: string;
  size: number;
  policy: Policy;
  medium: MediumName;
  /** Absent in files written before mirroring: primary. */
  role?: Role;
  nodeOwned?: boolean;
  createdAt: string;
}

export function deviceMetaPath(dir: string, name: string): string {
  return deviceFile(dir, name, '.json');
}

/** Reads and checks nvram/<name>.json; MS_META_INVALID names the file and the field. */
export async function readDeviceMeta(dir: string, name: string, fs?: MetaFs): Promise<DeviceMeta> {
  const path = deviceMetaPath(dir, name);
  const { name: stored, size, policy, medium, role, nodeOwned, createdAt } = await readMetaFile(path, deviceMetaSchema, 'NVRAM device metadata', fs);
  const meta: DeviceMeta = { name: stored, size, policy, medium, createdAt, ...(role === undefined ? {} : { role }), ...(nodeOwned === true ? { nodeOwned } : {}) };
  if (meta.name !== name) throw metaInvalid(path, 'NVRAM device metadata', 'name', `field name: "${meta.name}" is not the file's name "${name}"`);
  return meta;
}

/** Replaces nvram/<name>.json durably (see fs/meta-file.ts). */
export function writeDeviceMeta(dir: string, meta: DeviceMeta, fs?: MetaFs): Promise<void> {
  const { name, size, policy, medium, role, nodeOwned, createdAt } = meta;
  return replaceFile(deviceMetaPath(dir, name), `${JSON.stringify({ name, size, policy, medium, role, ...(nodeOwned === true ? { nodeOwned } : {}), createdAt, version: DEVICE_META_VERSION })}\n`, fs);
}
