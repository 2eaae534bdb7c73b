// The metadata file of a volume, volumes/<name>.json: its format (version 1), its
// validation and its durable replacement. The volume's bytes live in the data store
// (<name>.img, <name>.zmap); this file says what they are.
//
//   {"name":"vm1","size":10737418240,"readOnly":false,"createdAt":"2025-01-01T00:00:00.000Z",
//    "writeLog":"j1","version":1}                                  (writeLog optional)
//
// Invariants of a file that loads:
//   - version is 1 and no field is unknown: a file written by a newer format is refused,
//     never half understood;
//   - name matches the file name and VOLUME_NAME_FORM; size is a positive multiple of
//     SECTOR up to MAX_VOLUME_SIZE; createdAt is an ISO 8601 time; writeLog, if present,
//     is a device name.
// A frozen copy of a version 1 file is in test/fixtures/meta.

import { join } from 'node:path';
import { z } from 'zod';
import { metaInvalid, readMetaFile, replaceFile, type MetaFs } from '../fs/meta-file.js';

export const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
export const VOLUME_NAME_FORM = '1 to 64 letters, digits, ".", "_" or "-", starting with a letter or digit';
export const SECTOR = 4096;
// 16 TiB. The data store keeps one bit per 64 KiB chunk in memory (32 MiB at this size)
// and makes it at create and at every start; ext4 with 4 KiB blocks ends about here too.
export const MAX_VOLUME_SIZE = 2 ** 44;

const VOLUME_META_VERSION = 1;

const volumeMetaSchema = z.strictObject({
  version: z.literal(VOLUME_META_VERSION, { error: `expected version ${VOLUME_META_VERSION}; this node reads no other` }),
  name: z.string().regex(NAME_PATTERN, `expected ${VOLUME_NAME_FORM}`),
  size: z
    .number()
    .int()
    .positive()
    .multipleOf(SECTOR, `expected a multiple of ${SECTOR}`)
    .max(MAX_VOLUME_SIZE),
  readOnly: z.boolean(),
  createdAt: z.iso.datetime(),
  writeLog: z.string().regex(NAME_PATTERN, 'expected an NVRAM device name').optional(),
});

export interface VolumeMeta {
  name: string;
  size: number;
  readOnly: boolean;
  createdAt: string;
  writeLog?: string;
}

export function volumeMetaPath(dir: string, name: string): string {
  return join(dir, `${name}.json`);
}

/** Reads and checks volumes/<name>.json; MS_META_INVALID names the file and the field. */
export async function readVolumeMeta(dir: string, name: string, fs?: MetaFs): Promise<VolumeMeta> {
  const path = volumeMetaPath(dir, name);
  const { name: stored, size, readOnly, createdAt, writeLog } = await readMetaFile(path, volumeMetaSchema, 'volume metadata', fs);
  const meta: VolumeMeta = { name: stored, size, readOnly, createdAt, ...(writeLog === undefined ? {} : { writeLog }) };
  if (meta.name !== name) throw metaInvalid(path, 'volume metadata', 'name', `field name: "${meta.name}" is not the file's name "${name}"`);
  return meta;
}

/** Replaces volumes/<name>.json durably (see fs/meta-file.ts). */
export function writeVolumeMeta(dir: string, meta: VolumeMeta, fs?: MetaFs): Promise<void> {
  const body = { name: meta.name, size: meta.size, readOnly: meta.readOnly, createdAt: meta.createdAt, writeLog: meta.writeLog, version: VOLUME_META_VERSION };
  return replaceFile(volumeMetaPath(dir, meta.name), `${JSON.stringify(body)}\n`, fs);
}
