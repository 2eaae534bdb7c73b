// Certificates for TLS tests, made with the openssl command line in a temporary directory:
// a CA, a server certificate for localhost and 127.0.0.1, a client certificate, and a
// client certificate from another CA (which the node must refuse). The file names are
// the ones libnbd and qemu read from a tls-certificates directory (ca-cert.pem,
// client-cert.pem, client-key.pem; server-cert.pem, server-key.pem).

import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { REQUIRE_INTEROP, have } from './tools.js';

export interface TestCerts {
  /** ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem. */
  dir: string;
  /** A directory like `dir`, whose client certificate another CA signed. */
  rogueDir: string;
  /** A directory with only ca-cert.pem: a client that presents no certificate. */
  anonymousDir: string;
  ca: string;
  cert: string;
  key: string;
}

export function missingOpenssl(): string | undefined {
  if (have('openssl')) return undefined;
  const reason = 'needs openssl (Debian: openssl)';
  if (REQUIRE_INTEROP) throw new Error(`MEMSTRATA_REQUIRE_INTEROP=1 but ${reason}`);
  console.log(`# skipped: ${reason}`);
  return reason;
}

function openssl(cwd: string, args: string[]): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

async function signed(dir: string, caDir: string, name: string, extensions: string): Promise<void> {
  const ext = join(dir, `${name}.ext`);
  await writeFile(ext, extensions);
  openssl(dir, ['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', `/CN=${name === 'server' ? 'localhost' : 'memstrata-test-client'}`]);
  openssl(dir, ['x509', '-req', '-in', `${name}.csr`, '-CA', join(caDir, 'ca-cert.pem'), '-CAkey', join(caDir, 'ca-key.pem'), '-CAcreateserial', '-out', `${name}-cert.pem`, '-days', '2', '-extfile', ext]);
}

async function authority(dir: string, cn: string): Promise<void> {
  await mkdir(dir, { recursive: true });
  openssl(dir, ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', `/CN=${cn}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
}

/** Makes the certificates; `t.after` removes them. */
export async function makeCerts(t: { after(fn: () => Promise<void>): void }): Promise<TestCerts> {
  const root = await mkdtemp(join(tmpdir(), 'memstrata-certs-'));
  t.after(() => rm(root, { recursive: true, force: true }));
  const dir = join(root, 'pki');
  await authority(dir, 'memstrata-test-ca');
  await signed(dir, dir, 'server', 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n');
  await signed(dir, dir, 'client', 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n');
  // Another CA's client, with the right CA to check the server by.
  const rogueCa = join(root, 'rogue-ca');
  await authority(rogueCa, 'memstrata-rogue-ca');
  const rogueDir = join(root, 'rogue');
  await mkdir(rogueDir);
  await signed(rogueDir, rogueCa, 'client', 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n');
  openssl(rogueDir, ['x509', '-in', join(dir, 'ca-cert.pem'), '-out', 'ca-cert.pem']);
  const anonymousDir = join(root, 'anonymous');
  await mkdir(anonymousDir);
  openssl(anonymousDir, ['x509', '-in', join(dir, 'ca-cert.pem'), '-out', 'ca-cert.pem']);
  return { dir, rogueDir, anonymousDir, ca: join(dir, 'ca-cert.pem'), cert: join(dir, 'server-cert.pem'), key: join(dir, 'server-key.pem') };
}
