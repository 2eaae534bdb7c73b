// A guest's definition on disk: guests/<name>.json, validated on load, replaced durably.
//
//   {"name":"kv","command":["node","kv.js"],"env":{"K":"V"},"restart":"on-failure",
//    "running":true,"createdAt":"2026-11-29T00:00:00.000Z","version":1}
//
// `running` is what the operator asked for last (start or stop): a node that starts boots
// again the guests that were running. `cpu` (a fraction of one core), `cores` (how many
// CPUs it may run on) and `memory` (bytes) are its limits, null for none; files written
// before they existed have none. `volumes` and `nvram` are what is attached to it,
// `nvramQuota` what it may allocate itself and `ownNvram` what it did, `user` who it runs
// as (null: the node's user).

import { join } from 'node:path';
import { z } from 'zod';
import { metaInvalid, readMetaFile, replaceFile, type MetaFs } from '../fs/meta-file.js';

export const GUEST_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
export const GUEST_NAME_FORM = '1 to 64 letters, digits, ".", "_" or "-", starting with a letter or digit';
export const RESTART_POLICIES = ['never', 'on-failure', 'always'] as const;
export type RestartPolicy = (typeof RESTART_POLICIES)[number];

const GUEST_META_VERSION = 1;

const guestMetaSchema = z.strictObject({
  version: z.literal(GUEST_META_VERSION, { error: `expected version ${GUEST_META_VERSION}; this node reads no other` }),
  name: z.string().regex(GUEST_NAME_PATTERN, `expected ${GUEST_NAME_FORM}`),
  command: z.array(z.string().min(1).max(4096).regex(/^[^\0]*$/, 'expected no NUL')).min(1).max(1024),
  env: z.record(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'expected an environment variable name'), z.string().max(65536).regex(/^[^\0]*$/, 'expected no NUL')),
  restart: z.enum(RESTART_POLICIES),
  running: z.boolean(),
  createdAt: z.iso.datetime(),
  cpu: z.number().min(0.01).max(4096).nullable().default(null),
  cores: z.number().int().min(1).max(4096).nullable().default(null),
  memory: z.number().int().min(1024 * 1024).max(Number.MAX_SAFE_INTEGER).nullable().default(null),
  volumes: z.array(z.string().min(1).max(255)).max(256).default([]),
  nvram: z.array(z.string().min(1).max(255)).max(256).default([]),
  nvramQuota: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER).nullable().default(null),
  ownNvram: z.array(z.string().min(1).max(255)).max(256).default([]),
  user: z.string().regex(/^[a-z_][a-z0-9_.-]{0,31}\$?$/i).nullable().default(null),
});

export interface GuestDefinition {
  name: string;
  command: string[];
  env: Record<string, string>;
  restart: RestartPolicy;
  running: boolean;
  createdAt: string;
  cpu: number | null;
  cores: number | null;
  memory: number | null;
  /** Volumes and NVRAM devices attached to it: what its cut-through sockets serve. */
  volumes: string[];
  nvram: string[];
  /** Bytes of NVRAM the guest may allocate itself (JCREATE); null: none. */
  nvramQuota: number | null;
  /** The devices it allocated itself (also in `nvram`): they count against the quota. */
  ownNvram: string[];
  /** The user it runs as; null: the node's own. */
  user: string | null;
}

export function guestMetaPath(dir: string, name: string): string {
  return join(dir, `${name}.json`);
}

/** Reads and checks guests/<name>.json; MS_META_INVALID names the file and the field. */
export async function readGuestMeta(dir: string, name: string, fs?: MetaFs): Promise<GuestDefinition> {
  const path = guestMetaPath(dir, name);
  const { name: stored, command, env, restart, running, createdAt, cpu, cores, memory, volumes, nvram, nvramQuota, ownNvram, user } = await readMetaFile(path, guestMetaSchema, 'guest definition', fs);
  if (stored !== name) throw metaInvalid(path, 'guest definition', 'name', `field name: "${stored}" is not the file's name "${name}"`);
  return { name: stored, command, env, restart, running, createdAt, cpu, cores, memory, volumes, nvram, nvramQuota, ownNvram, user };
}

export function writeGuestMeta(dir: string, definition: GuestDefinition, fs?: MetaFs): Promise<void> {
  return replaceFile(guestMetaPath(dir, definition.name), `${JSON.stringify({ ...definition, version: GUEST_META_VERSION })}\n`, fs);
}
