// The admin API's bearer token check (RFC 6750 `Authorization: Bearer <token>`).
//
// Both sides are hashed with SHA-256 before timingSafeEqual: the comparison then takes
// the same time whatever the presented token's length or content, so timing tells an
// attacker neither how long the token is nor how many leading bytes they guessed. The
// token itself is kept only as its digest, so nothing here can log it.

import { createHash, timingSafeEqual } from 'node:crypto';

export type AuthVerdict = 'ok' | 'missing' | 'wrong';

// The scheme is case-insensitive (RFC 7235 2.1); the token is the rest, without spaces.
const BEARER = /^Bearer +([\x21-\x7e]+) *$/i;

export class BearerAuth {
  private readonly digest: Buffer;

  constructor(token: string) {
    this.digest = sha256(token);
  }

  /** Judges an Authorization header value (undefined when the header is absent). */
  check(header: string | undefined): AuthVerdict {
    if (header === undefined || header === '') return 'missing';
    const match = BEARER.exec(header);
    // A malformed header is compared like a wrong token, so it costs the same time.
    const presented = sha256(match?.[1] ?? header);
    return timingSafeEqual(presented, this.digest) && match !== null ? 'ok' : 'wrong';
  }
}

function sha256(text: string): Buffer {
  return createHash('sha256').update(text, 'utf8').digest();
}
