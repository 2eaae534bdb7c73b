// What a node tells the cluster about itself, and where: the member record under
// /memstrata/<cluster>/nodes/<id>, bound to the node's etcd lease, so it disappears when
// the node has been silent for a lease (FIG. 14: the network tells every device that a
// node appeared or went).
//
// The record is JSON. Readers (other nodes, hosts) validate it: a record they cannot
// read is skipped and reported, never trusted, so a newer node's extra fields do no harm
// and a damaged one cannot take a host down.

import { z } from 'zod';

/** The record's format; a reader skips records of a format it does not know. */
export const MEMBER_FORMAT = 1;

/** `/memstrata/<cluster>/`: everything of one cluster. */
export function clusterPrefix(cluster: string): string {
  return `/memstrata/${cluster}/`;
}

/** `/memstrata/<cluster>/nodes/`: the member records. */
export function membersPrefix(cluster: string): string {
  return `${clusterPrefix(cluster)}nodes/`;
}

export function memberKey(cluster: string, id: string): string {
  return `${membersPrefix(cluster)}${id}`;
}

/** host:port, the host a name or an address (IPv6 in brackets), the port 1 to 65535. */
const address = z.string().max(300).regex(/^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([1-9]\d{0,4})$/, 'expected host:port').refine((a) => Number(a.slice(a.lastIndexOf(':') + 1)) <= 65535, 'expected a port up to 65535');
const bytes = z.number().int().nonnegative();

const kindSchema = z.object({ bytes, idleBytes: bytes });

const mediumSchema = z.object({
  medium: z.string().min(1).max(32),
  capacity: bytes,
  kinds: z.object({ free: kindSchema, cache: kindSchema, server: kindSchema, nvram: kindSchema }),
  /** Bytes a new NVRAM device (a replica) could take on this medium: nvram extents no device owns, and what nvram may still grow by (free extents, cache above its minimum, up to its maximum). Absent in records of older nodes. */
  nvramRoom: bytes.optional(),
});

const deviceSchema = z.object({
  name: z.string().min(1).max(255),
  policy: z.string().min(1).max(32),
  size: bytes,
  role: z.string().min(1).max(32),
  epoch: z.number().int().nonnegative(),
  state: z.string().min(1).max(32),
  /** A primary's partner: the node that holds its replica (chosen by the cluster, or set by hand); absent in records of older nodes. */
  partner: z.string().max(300).nullable().optional(),
});

const memberSchema = z.object({
  format: z.literal(MEMBER_FORMAT),
  id: z.string().min(1).max(64),
  zone: z.string().min(1).max(64).nullable(),
  version: z.string().max(64),
  startedAt: z.string().max(64),
  /** Where each service is reached, host:port. */
  services: z.object({ nbd: address, rmem: address, mirror: address, admin: address }),
  /** Which services speak TLS: NBD's mode (STARTTLS offered or required), and whether rmem, the mirror and admin do. */
  tls: z.object({ nbd: z.enum(['off', 'on', 'require']), rmem: z.boolean(), mirror: z.boolean(), admin: z.boolean() }).optional(),
  capacity: z.array(mediumSchema).max(16),
  /** The mirror partner set by hand (mirror.partner) this node replicates to; null: none (or chosen per device, see `mirrored`). */
  partner: z.string().max(300).nullable(),
  /** Mirrored NVRAM devices on this node, with their role. */
  mirrored: z.array(deviceSchema).max(4096),
});

export type MemberRecord = z.infer<typeof memberSchema>;
export type MemberMedium = z.infer<typeof mediumSchema>;
export type MemberDevice = z.infer<typeof deviceSchema>;

export function encodeMember(record: MemberRecord): string {
  return JSON.stringify(record);
}

/** Largest member record a reader accepts. */
export const MEMBER_MAX_BYTES = 1024 * 1024;

/** The record, or why it cannot be read (a string); never throws. */
export function decodeMember(value: Buffer | string, key: string): MemberRecord | string {
  const bytes = typeof value === 'string' ? Buffer.byteLength(value) : value.length;
  if (bytes > MEMBER_MAX_BYTES) return `member record ${key} is ${bytes} bytes, more than ${MEMBER_MAX_BYTES}`;
  const text = typeof value === 'string' ? value : value.toString('utf8');
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    return `member record ${key} is not JSON`;
  }
  const parsed = memberSchema.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    return `member record ${key} is not a format-${MEMBER_FORMAT} record: ${issue === undefined ? 'invalid' : `${issue.path.join('.') || '(record)'}: ${issue.message}`}`;
  }
  if (key.slice(key.lastIndexOf('/') + 1) !== parsed.data.id) return `member record ${key} names another node (${parsed.data.id})`;
  return parsed.data;
}
