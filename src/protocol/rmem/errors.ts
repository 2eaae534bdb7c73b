// The one mapping between memstrata's coded errors and rmem wire statuses, both ways.

import { MemstrataError, type ErrorCode } from '../../errors.js';
import { STATUS, STATUS_NAME, type Status } from './spec.js';

const CODE_TO_STATUS: Partial<Record<ErrorCode, Status>> = {
  MS_RMEM_PROTOCOL: STATUS.PROTOCOL,
  MS_RMEM_VERSION: STATUS.VERSION,
  MS_RMEM_NO_SESSION: STATUS.NO_SESSION,
  MS_RMEM_AUTH: STATUS.AUTH,
  MS_RMEM_SECRET: STATUS.SECRET,
  MS_RMEM_NO_CAPACITY: STATUS.NO_CAPACITY,
  MS_RMEM_VIOLATION: STATUS.VIOLATION,
  MS_RMEM_RANGE: STATUS.RANGE,
  MS_RMEM_INVALID: STATUS.INVALID,
  MS_RMEM_TOO_BIG: STATUS.TOO_BIG,
  MS_RMEM_UNSUPPORTED: STATUS.UNSUPPORTED,
  MS_SHUTTING_DOWN: STATUS.SHUTDOWN,
  MS_NVRAM_FENCED: STATUS.FENCED,
  MS_NVRAM_FULL: STATUS.FULL,
  MS_NVRAM_NOT_FOUND: STATUS.NOT_FOUND,
  MS_NVRAM_INVALID: STATUS.INVALID,
  MS_NVRAM_PARTNER_DOWN: STATUS.UNAVAILABLE,
  MS_NVRAM_RECOVERING: STATUS.RECOVERING,
  MS_NVRAM_REPLICA: STATUS.REPLICA,
  // Guests' JCREATE: after the codes above, so a status still maps back to those.
  MS_NVRAM_NO_CAPACITY: STATUS.NO_CAPACITY,
  MS_GUEST_NVRAM_QUOTA: STATUS.NO_CAPACITY,
  MS_NVRAM_EXISTS: STATUS.INVALID,
  MS_GUEST_ATTACHED: STATUS.INVALID,
  MS_GUEST_ATTACH_BUSY: STATUS.INVALID,
};

/** Status -> code; where several codes share a status, the first listed above wins. */
const STATUS_TO_CODE: Readonly<Record<number, ErrorCode>> = (() => {
  const map: Record<number, ErrorCode> = { [STATUS.IO]: 'MS_MEDIUM_IO' };
  for (const [code, status] of Object.entries(CODE_TO_STATUS)) map[status] ??= code as ErrorCode;
  return map;
})();

/** The wire status for an error raised while serving a request; anything unexpected is IO. */
export function statusOf(error: unknown): Status {
  if (error instanceof MemstrataError) return CODE_TO_STATUS[error.code] ?? STATUS.IO;
  return STATUS.IO;
}

/** The coded error a client raises for an error reply. */
export function errorOf(status: number, message: string, op: string): MemstrataError {
  const code = STATUS_TO_CODE[status];
  const text = `${op}: ${message || STATUS_NAME[status] || `status ${status}`}`;
  if (code !== undefined) return new MemstrataError(code, text, { details: { status: STATUS_NAME[status] ?? status } });
  return new MemstrataError('MS_RMEM_PROTOCOL', `${op}: node answered with unknown status ${status}: ${message}`, { details: { status } });
}
