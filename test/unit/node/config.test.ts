import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { SETTINGS, envName, loadConfig, mediumLayouts } from '../../../src/node/config.js';
import { GiB, MiB } from '../../../src/units.js';
import { tempDir } from '../../support/node-process.js';

async function configError(sources: Parameters<typeof loadConfig>[0]): Promise<{ code: string; message: string }> {
  try {
    await loadConfig(sources);
  } catch (error) {
    return error as { code: string; message: string };
  }
  assert.fail('configuration was accepted');
}

test('defaults need no file and match DESIGN section 5', async () => {
  const { config, warnings } = await loadConfig({ cwd: '/srv/x', env: {} });
  assert.deepEqual(warnings, []);
  assert.equal(config.dataDir, '/srv/x/memstrata-data');
  assert.deepEqual(config.admin.listen, { host: '127.0.0.1', port: 10880 });
  assert.equal(config.media.dram.size, GiB);
  assert.equal(config.media.flash.size, 4 * GiB);
  assert.equal(config.media.flash.path, '/srv/x/memstrata-data/flash.img');
  assert.equal(config.media.extentSize, MiB);
  assert.deepEqual(config.partition.dram.cache, { initial: 512 * MiB, min: 0, max: GiB });
  assert.deepEqual(config.partition.dram.server, { initial: 256 * MiB, min: 0, max: GiB });
  assert.deepEqual(config.partition.dram.nvram, { initial: 64 * MiB, min: 0, max: GiB });
  assert.equal(config.partition.flash.cache.initial, 2 * GiB);
  assert.equal(config.node.id, undefined);
});

test('file, then environment, then flags, each overriding the one before', async (t) => {
  const dir = await tempDir(t);
  const file = join(dir, 'memstrata.yaml');
  await writeFile(file, 'media:\n  dram:\n    size: 256MiB\n  flash:\n    size: 1GiB\nlog:\n  level: debug\n');
  const { config } = await loadConfig({
    cwd: dir,
    file: 'memstrata.yaml',
    env: { MEMSTRATA_MEDIA_FLASH_SIZE: '2GiB', MEMSTRATA_LOG_LEVEL: 'warn' },
    flags: [['log.level', 'error'], ['partition.dram.server.max', '50%']],
  });
  assert.equal(config.media.dram.size, 256 * MiB, 'from the file');
  assert.equal(config.media.flash.size, 2 * GiB, 'environment over file');
  assert.equal(config.log.level, 'error', 'flag over environment');
  assert.equal(config.partition.dram.server.max, 128 * MiB);
  assert.equal(config.partition.dram.server.initial, 64 * MiB, '25% of the file-configured 256MiB');
});

test('shares round down to whole extents', async () => {
  const { config } = await loadConfig({
    env: { MEMSTRATA_MEDIA_DRAM_SIZE: '10MiB', MEMSTRATA_PARTITION_DRAM_SERVER_INITIAL: '33%', MEMSTRATA_PARTITION_DRAM_SERVER_MIN: '33%' },
  });
  assert.equal(config.partition.dram.server.min, 3 * MiB, 'rounds down');
  assert.equal(config.partition.dram.server.initial, 3 * MiB, 'equal shares stay equal');
  assert.equal(config.partition.dram.cache.initial, 5 * MiB);
  const [dram] = mediumLayouts(config);
  assert.equal(dram?.capacity, 10 * MiB);
});

test('a medium of size 0 is left out of the layouts', async () => {
  const { config } = await loadConfig({ env: { MEMSTRATA_MEDIA_FLASH_SIZE: '0' } });
  assert.deepEqual(mediumLayouts(config).map((l) => l.name), ['dram']);
});

const badValues: [string, Record<string, string>, RegExp][] = [
  ['size', { MEMSTRATA_MEDIA_DRAM_SIZE: '12XB' }, /media\.dram\.size is "12XB" \(from environment variable MEMSTRATA_MEDIA_DRAM_SIZE\): expected a size in bytes such as 4096/],
  ['decimal unit', { MEMSTRATA_MEDIA_FLASH_SIZE: '4GB' }, /media\.flash\.size is "4GB".*expected a size/],
  ['address', { MEMSTRATA_ADMIN_LISTEN: 'localhost' }, /admin\.listen is "localhost".*expected HOST:PORT/],
  ['port', { MEMSTRATA_ADMIN_LISTEN: '127.0.0.1:70000' }, /admin\.listen is "127\.0\.0\.1:70000".*port 0 to 65535/],
  ['enum', { MEMSTRATA_LOG_LEVEL: 'loud' }, /log\.level is "loud".*expected one of fatal, error, warn, info, debug, trace, silent/],
  ['node id', { MEMSTRATA_NODE_ID: 'has space' }, /node\.id is "has space".*expected 1 to 64 letters/],
  ['path', { MEMSTRATA_DATA_DIR: ' ' }, /dataDir is " ".*expected a non-empty file system path/],
  ['share', { MEMSTRATA_PARTITION_DRAM_CACHE_MAX: '150%' }, /partition\.dram\.cache\.max is "150%".*or a share of the medium such as 25%/],
  ['duration', { MEMSTRATA_RMEM_LEASE: '30 seconds' }, /rmem\.lease is "30 seconds".*expected a duration such as 500ms, 30s/],
  ['lease too short', { MEMSTRATA_RMEM_LEASE: '10ms' }, /rmem\.lease is "10ms".*from 100ms to 24h/],
  ['mirror timeout', { MEMSTRATA_MIRROR_TIMEOUT: '1ms' }, /mirror\.timeout is "1ms".*from 10ms to 10m/],
  ['mirror stall timeout', { MEMSTRATA_MIRROR_STALL_TIMEOUT: '1h' }, /mirror\.stallTimeout is "1h".*from 10ms to 10m/],
  ['connections per client', { MEMSTRATA_RMEM_MAX_CONNECTIONS_PER_CLIENT: '0' }, /rmem\.maxConnectionsPerClient is "0".*expected a whole number from 1 to 65536/],
  ['NBD handshake timeout', { MEMSTRATA_NBD_HANDSHAKE_TIMEOUT: '20m' }, /nbd\.handshakeTimeout is "20m".*from 10ms to 10m/],
  ['NBD connection budget', { MEMSTRATA_NBD_MAX_IN_FLIGHT_BYTES: '4KiB' }, /nbd\.maxInFlightBytes is "4KiB".*at least 64KiB/],
  ['NBD service budget', { MEMSTRATA_NBD_MAX_IN_FLIGHT_BYTES_TOTAL: '16MiB' }, /nbd\.maxInFlightBytesTotal is "16MiB".*at least nbd\.maxInFlightBytes \(32MiB\)/],
  ['rmem service budget below the largest request', { MEMSTRATA_RMEM_MAX_IN_FLIGHT_BYTES: '16MiB', MEMSTRATA_RMEM_MAX_IN_FLIGHT_BYTES_TOTAL: '16MiB' }, /rmem\.maxInFlightBytesTotal is "16MiB".*at least 33MiB, what the largest rmem request can hold/],
  ['mirror service budget below the largest request', { MEMSTRATA_MIRROR_MAX_IN_FLIGHT_BYTES: '16MiB', MEMSTRATA_MIRROR_MAX_IN_FLIGHT_BYTES_TOTAL: '34MiB' }, /mirror\.maxInFlightBytesTotal is "34MiB".*at least 35MiB, what the largest mirror request can hold/],
  ['NBD connections', { MEMSTRATA_NBD_MAX_CONNECTIONS: '0' }, /nbd\.maxConnections is "0".*expected a whole number from 1 to 65536/],
  ['mirror to itself', { MEMSTRATA_MIRROR_PARTNER: '127.0.0.1:10811' }, /mirror\.partner is "127\.0\.0\.1:10811".*not this node's own mirror\.listen/],
  ['mirror policy', { MEMSTRATA_MIRROR_ON_PARTNER_DOWN: 'ignore' }, /mirror\.onPartnerDown is "ignore".*expected one of degrade, refuse/],
  ['whole number', { MEMSTRATA_RMEM_MAX_IN_FLIGHT: '0' }, /rmem\.maxInFlight is "0".*expected a whole number from 1 to 65536/],
  ['extent size', { MEMSTRATA_MEDIA_EXTENT_SIZE: '3000' }, /media\.extentSize is "3000".*power of two from 4KiB to 1GiB/],
  ['medium not whole extents', { MEMSTRATA_MEDIA_DRAM_SIZE: '1536KiB' }, /media\.dram\.size is "1536KiB".*whole number of extents/],
  ['partition not whole extents', { MEMSTRATA_PARTITION_FLASH_NVRAM_INITIAL: '4097' }, /partition\.flash\.nvram\.initial is "4097".*whole number of extents/],
  ['partition larger than medium', { MEMSTRATA_PARTITION_DRAM_SERVER_INITIAL: '2GiB' }, /partition\.dram\.server\.initial is "2GiB".*at most the dram size, 1GiB/],
  ['min above max', { MEMSTRATA_PARTITION_DRAM_SERVER_MIN: '512MiB', MEMSTRATA_PARTITION_DRAM_SERVER_MAX: '256MiB' }, /partition\.dram\.server\.min is "512MiB".*at most partition\.dram\.server\.max/],
  ['initial outside bounds', { MEMSTRATA_PARTITION_DRAM_SERVER_MAX: '128MiB' }, /partition\.dram\.server\.initial is "25%" \(from default\).*between/],
  ['initials exceed medium', { MEMSTRATA_PARTITION_DRAM_CACHE_INITIAL: '90%' }, /partition\.dram\.\*\.initial add up to 1241MiB but media\.dram\.size is 1GiB/],
  ['admin on every address without a token', { MEMSTRATA_ADMIN_LISTEN: '0.0.0.0:10880' }, /admin\.listen is "0\.0\.0\.0:10880" \(from environment variable MEMSTRATA_ADMIN_LISTEN\): expected a loopback address .* unless admin\.token or admin\.tokenFile is set/],
  ['admin on IPv6 any without a token', { MEMSTRATA_ADMIN_LISTEN: '[::]:10880' }, /admin\.listen is "\[::\]:10880".*unless admin\.token/],
  ['admin on a LAN address without a token', { MEMSTRATA_ADMIN_LISTEN: '10.1.2.3:10880' }, /admin\.listen is "10\.1\.2\.3:10880".*unless admin\.token/],
  ['admin on a host name without a token', { MEMSTRATA_ADMIN_LISTEN: 'node-a.example:10880' }, /admin\.listen is "node-a\.example:10880".*unless admin\.token/],
  ['admin token too short', { MEMSTRATA_ADMIN_TOKEN: 'short' }, /admin\.token is \(hidden\) \(from environment variable MEMSTRATA_ADMIN_TOKEN\): expected 16 to 1024 visible ASCII characters/],
  ['admin token with a space', { MEMSTRATA_ADMIN_TOKEN: 'sixteen chars and more' }, /admin\.token is \(hidden\).*without spaces/],
  ['request timeout below headers timeout', { MEMSTRATA_ADMIN_HEADERS_TIMEOUT: '20s', MEMSTRATA_ADMIN_REQUEST_TIMEOUT: '5s' }, /admin\.requestTimeout is "5s".*at least admin\.headersTimeout/],
  ['admin body limit', { MEMSTRATA_ADMIN_BODY_LIMIT: '100' }, /admin\.bodyLimit is "100".*from 1KiB to 64MiB/],
  ['admin connections', { MEMSTRATA_ADMIN_MAX_CONNECTIONS_PER_CLIENT: '0' }, /admin\.maxConnectionsPerClient is "0".*whole number from 1/],
];

for (const [kind, env, message] of badValues) {
  test(`invalid ${kind} stops with one message naming field, value and form`, async () => {
    const error = await configError({ env });
    assert.equal(error.code, 'MS_CONFIG_INVALID');
    assert.match(error.message, message);
    assert.ok(!error.message.includes('\n'), 'one line');
  });
}

test('a flag value is reported as coming from its flag', async () => {
  const error = await configError({ env: {}, flags: [['media.dram.size', 'big']] });
  assert.match(error.message, /media\.dram\.size is "big" \(from flag --dram-size\)/);
});

test('unknown settings are refused, from a file and from --set', async (t) => {
  const dir = await tempDir(t);
  await writeFile(join(dir, 'c.yaml'), 'media:\n  dram:\n    sise: 1GiB\n');
  const fromFile = await configError({ cwd: dir, file: 'c.yaml', env: {} });
  assert.equal(fromFile.code, 'MS_CONFIG_INVALID');
  assert.match(fromFile.message, /unknown setting media\.dram\.sise \(from file .*c\.yaml\); known at this level: size/);
  const fromFlag = await configError({ env: {}, flags: [['media.dram.sise', '1GiB']] });
  assert.match(fromFlag.message, /unknown setting media\.dram\.sise \(from flag --set\)/);
});

test('a type mismatch in the file names the field', async (t) => {
  const dir = await tempDir(t);
  await writeFile(join(dir, 'c.yaml'), 'media: 3\n');
  assert.match((await configError({ cwd: dir, file: 'c.yaml', env: {} })).message, /media is 3 \(from file .*\): expected a mapping of settings/);
  await writeFile(join(dir, 'c.yaml'), 'log:\n  level: [info]\n');
  assert.match((await configError({ cwd: dir, file: 'c.yaml', env: {} })).message, /log\.level is \["info"\].*expected one of/);
});

test('a missing, malformed or non-mapping file is MS_CONFIG_FILE', async (t) => {
  const dir = await tempDir(t);
  const missing = await configError({ cwd: dir, file: 'nope.yaml', env: {} });
  assert.equal(missing.code, 'MS_CONFIG_FILE');
  assert.match(missing.message, /cannot read configuration file .*nope\.yaml/);
  await writeFile(join(dir, 'bad.yaml'), 'media: [1\n');
  const malformed = await configError({ cwd: dir, file: 'bad.yaml', env: {} });
  assert.equal(malformed.code, 'MS_CONFIG_FILE');
  assert.match(malformed.message, /is not valid YAML/);
  await writeFile(join(dir, 'list.yaml'), '- a\n- b\n');
  assert.equal((await configError({ cwd: dir, file: 'list.yaml', env: {} })).code, 'MS_CONFIG_FILE');
});

test('a YAML syntax error names the line and column and never shows the file\'s text, which may hold the token', async (t) => {
  // Review finding: the yaml library's pretty error put a code frame of the file, token
  // included, into the message that node start prints.
  const dir = await tempDir(t);
  const secret = 'c0ffee5ecret0123456789abcdef';
  const warnings: string[] = [];
  const onWarning = (warning: Error): void => {
    warnings.push(warning.message);
  };
  process.on('warning', onWarning);
  t.after(() => process.off('warning', onWarning));
  const cases: [string, string, RegExp][] = [
    ['unclosed quote', `admin:\n  listen: 0.0.0.0:10880\n  token: "${secret}\n`, /MISSING_CHAR at line 4, column 1/],
    ['bad indentation', `admin:\n  token: ${secret}\n   listen: [oops ${secret}\n`, /at line [23], column \d+/],
    ['bad escape', `admin:\n  token: "\\q${secret}"\n`, /BAD_DQ_ESCAPE at line 2, column \d+/],
    ['nested mapping on one line', `admin:\n  token: ${secret}: x\n`, /at line 2, column \d+/],
    ['an alias without its anchor', `admin:\n  token: *${secret}\n`, /cannot be resolved/],
    ['unknown tag', `admin:\n  token: !${secret} ${secret}\n  listen: [1\n`, /at line \d+, column \d+/],
  ];
  for (const [what, text, where] of cases) {
    await writeFile(join(dir, 'c.yaml'), text);
    const error = await configError({ cwd: dir, file: 'c.yaml', env: {} });
    assert.equal(error.code, 'MS_CONFIG_FILE', what);
    assert.match(error.message, /is not valid YAML: /, what);
    assert.match(error.message, where, `${what}: ${error.message}`);
    assert.ok(!error.message.includes(secret.slice(0, 12)), `${what}: ${error.message}`);
    assert.ok(!error.message.includes('\n'), `${what}: one line`);
    assert.equal((error as { cause?: unknown }).cause, undefined, `${what}: the yaml error, which quotes the file, is not kept`);
  }
  await new Promise((resolve) => setImmediate(resolve));
  assert.ok(!warnings.some((w) => w.includes(secret.slice(0, 12))), `no warning quotes the file: ${warnings.join('; ')}`);
});

test('an empty file is the defaults, and unknown MEMSTRATA_* variables are warned about, not fatal', async (t) => {
  const dir = await tempDir(t);
  await writeFile(join(dir, 'empty.yaml'), '# nothing\n');
  const { config, warnings } = await loadConfig({ cwd: dir, file: 'empty.yaml', env: { MEMSTRATA_DRAM_SIZE: '1GiB', MEMSTRATA_ADMIN: 'http://x', PATH: '/bin' } });
  assert.equal(config.media.dram.size, GiB);
  assert.deepEqual(warnings, ['environment variable MEMSTRATA_DRAM_SIZE names no setting and is ignored']);
});

test('every setting has an environment variable derived from its path', () => {
  assert.equal(envName('media.extentSize'), 'MEMSTRATA_MEDIA_EXTENT_SIZE');
  assert.equal(envName('dataDir'), 'MEMSTRATA_DATA_DIR');
  assert.equal(envName('partition.flash.nvram.max'), 'MEMSTRATA_PARTITION_FLASH_NVRAM_MAX');
  assert.equal(new Set(SETTINGS.map((s) => envName(s.path))).size, SETTINGS.length);
});

test('every setting in the catalogue can be set from the command line', async (t) => {
  const tokenFile = join(await tempDir(t), 'token');
  await writeFile(tokenFile, 'a-token-of-24-characters\n', { mode: 0o600 });
  for (const setting of SETTINGS) {
    // A value the leaf accepts: settings differ in type, so try a few.
    const candidates = ['ms-node1', '64MiB', '1MiB', '100%', '127.0.0.1:0', 'info', 'json', './data', '0', '30s', '8', 'false', 'degrade', 'signal', 'a-token-of-24-characters', 'http://127.0.0.1:2379', 'off', tokenFile];
    let accepted = false;
    for (const value of candidates) {
      try {
        await loadConfig({ env: {}, flags: [[setting.path, value]] });
        accepted = true;
        break;
      } catch {
        // try the next candidate
      }
    }
    assert.ok(accepted, `${setting.path} accepts none of the candidate values`);
  }
});

test('the cluster is off by default; its settings are checked and named when wrong', async () => {
  const { config } = await loadConfig({ env: {} });
  assert.deepEqual(config.cluster, { etcd: undefined, name: 'default', leaseMs: 5000, advertise: undefined });
  assert.equal(config.node.zone, undefined);
  const set = await loadConfig({
    env: { MEMSTRATA_CLUSTER_ETCD: 'http://10.0.0.1:2379, http://etcd-2.example:2379/' },
    flags: [['cluster.name', 'prod'], ['cluster.lease', '3s'], ['node.zone', 'rack-1'], ['cluster.advertise', '10.0.0.5']],
  });
  assert.deepEqual(set.config.cluster, { etcd: ['http://10.0.0.1:2379', 'http://etcd-2.example:2379'], name: 'prod', leaseMs: 3000, advertise: '10.0.0.5' });
  assert.equal(set.config.node.zone, 'rack-1');
  for (const [path, value, field] of [
    ['cluster.etcd', '10.0.0.1:2379', /cluster\.etcd is "10\.0\.0\.1:2379".*expected etcd client URLs/],
    ['cluster.etcd', 'http://10.0.0.1', /cluster\.etcd/],
    ['cluster.etcd', 'http://10.0.0.1:2379/v3/path', /cluster\.etcd/],
    ['cluster.etcd', 'ftp://10.0.0.1:2379', /cluster\.etcd/],
    ['cluster.lease', '1s', /cluster\.lease.*whole seconds from 2s to 1h/],
    ['cluster.lease', '2500ms', /cluster\.lease.*whole seconds/],
    ['cluster.name', 'a/b', /cluster\.name/],
    ['node.zone', '', /node\.zone/],
    ['cluster.advertise', 'a b', /cluster\.advertise/],
    ['cluster.etcd', 'https://10.0.0.1:2379', /tls\.ca .*CA of etcd's certificate: cluster\.etcd uses https/],
  ] as const) {
    const error = await configError({ env: {}, flags: [[path, value]] });
    assert.equal(error.code, 'MS_CONFIG_INVALID', `${path}=${value}`);
    assert.match(error.message, field);
  }
});

test('TLS settings: a service with TLS needs tls.cert and tls.key, each a readable PEM file, the key the certificate\'s', async (t) => {
  const dir = await tempDir(t);
  const pem = (label: string) => `-----BEGIN ${label}-----\nAAAA\n-----END ${label}-----\n`;
  await writeFile(join(dir, 'not-pem'), 'hello');
  await writeFile(join(dir, 'bad-cert.pem'), pem('CERTIFICATE'));
  await writeFile(join(dir, 'bad-key.pem'), pem('PRIVATE KEY'), { mode: 0o600 });
  execFileSync('mkfifo', [join(dir, 'fifo')]);
  const cases: [[string, string][], RegExp][] = [
    [[['nbd.tls', 'on'], ['tls.cert', join(dir, 'bad-cert.pem')], ['tls.key', join(dir, 'fifo')]], /tls\.key .*expected a readable file \(not a regular file\)/],
    [[['nbd.tls', 'on'], ['tls.cert', dir], ['tls.key', join(dir, 'bad-key.pem')]], /tls\.cert .*not a regular file/],
    [[['nbd.tls', 'require']], /tls\.cert .*expected a PEM file: nbd\.tls uses TLS/],
    [[['rmem.tls', 'require'], ['tls.cert', join(dir, 'bad-cert.pem')]], /tls\.key .*rmem\.tls uses TLS/],
    [[['admin.tls', 'true'], ['tls.cert', join(dir, 'missing.pem')], ['tls.key', join(dir, 'bad-key.pem')]], /tls\.cert .*expected a readable file \(ENOENT\)/],
    [[['mirror.tls', 'require'], ['tls.cert', join(dir, 'not-pem')], ['tls.key', join(dir, 'bad-key.pem')]], /tls\.cert .*expected a PEM file holding a certificate/],
    [[['nbd.tls', 'on'], ['tls.cert', join(dir, 'bad-cert.pem')], ['tls.key', join(dir, 'bad-key.pem')]], /tls\.key .*expected the key of tls\.cert/],
    [[['nbd.tls', 'maybe']], /nbd\.tls is "maybe".*one of off, on, require/],
    [[['rmem.tls', 'on']], /rmem\.tls is "on".*one of off, require/],
  ];
  for (const [flags, message] of cases) {
    const error = await configError({ env: {}, flags });
    assert.equal(error.code, 'MS_CONFIG_INVALID', JSON.stringify(flags));
    assert.match(error.message, message);
  }
  const { config, warnings } = await loadConfig({ env: {}, flags: [['tls.cert', join(dir, 'bad-cert.pem')]] });
  assert.equal(config.tls, undefined, 'no service uses TLS: nothing is loaded');
  assert.match(warnings.join('\n'), /tls\.cert is set but no service uses TLS/);
});

const TOKEN = 'f3a9c2e4b7d1a8c6e0f2b4d6a8c0e2f4';

test('admin.token comes from the environment; a non-loopback admin address is then accepted', async () => {
  const { config } = await loadConfig({ env: { MEMSTRATA_ADMIN_TOKEN: TOKEN, MEMSTRATA_ADMIN_LISTEN: '0.0.0.0:10880' } });
  assert.equal(config.admin.token, TOKEN);
  assert.deepEqual(config.admin.listen, { host: '0.0.0.0', port: 10880 });
  assert.equal(config.admin.metricsPublic, false);
  const open = await loadConfig({ env: {} });
  assert.equal(open.config.admin.token, undefined, 'no token by default');
});

test('loopback admin addresses need no token', async () => {
  for (const listen of ['127.0.0.1:0', '127.8.9.10:10880', '[::1]:10880', 'localhost:10880', 'LOCALHOST:1', '[::ffff:127.0.0.1]:1']) {
    const { config } = await loadConfig({ env: { MEMSTRATA_ADMIN_LISTEN: listen } });
    assert.equal(config.admin.token, undefined, listen);
  }
});

test('admin.tokenFile is read and trimmed, refused with admin.token, and never shown', async (t) => {
  const dir = await tempDir(t);
  await writeFile(join(dir, 'token'), `  ${TOKEN}\n`, { mode: 0o600 });
  const { config, warnings } = await loadConfig({ cwd: dir, env: { MEMSTRATA_ADMIN_TOKEN_FILE: 'token', MEMSTRATA_ADMIN_LISTEN: '0.0.0.0:1' } });
  assert.equal(config.admin.token, TOKEN);
  assert.deepEqual(warnings, []);

  const both = await configError({ cwd: dir, env: { MEMSTRATA_ADMIN_TOKEN_FILE: 'token', MEMSTRATA_ADMIN_TOKEN: TOKEN } });
  assert.match(both.message, /admin\.tokenFile is "token" \(from environment variable MEMSTRATA_ADMIN_TOKEN_FILE\): expected admin\.token or admin\.tokenFile, not both/);
  assert.ok(!both.message.includes(TOKEN));

  const missing = await configError({ cwd: dir, env: {}, flags: [['admin.tokenFile', 'nope']] });
  assert.equal(missing.code, 'MS_CONFIG_INVALID');
  assert.match(missing.message, /admin\.tokenFile is "nope" \(from flag --set admin\.tokenFile=\): expected a readable file \(ENOENT\)/);

  const secret = 'bad token with spaces in it';
  await writeFile(join(dir, 'bad'), secret, { mode: 0o600 });
  const bad = await configError({ cwd: dir, env: { MEMSTRATA_ADMIN_TOKEN_FILE: 'bad' } });
  assert.match(bad.message, /admin\.tokenFile is "bad".*expected the file to hold 16 to 1024 visible ASCII characters/);
  assert.ok(!bad.message.includes(secret), 'the file content is not shown');

  await writeFile(join(dir, 'loose'), TOKEN, { mode: 0o644 });
  const loose = await loadConfig({ cwd: dir, env: { MEMSTRATA_ADMIN_TOKEN_FILE: 'loose' } });
  assert.equal(loose.config.admin.token, TOKEN);
  assert.match(loose.warnings.join('\n'), /admin\.tokenFile .*loose can be read by other users \(mode 644\); chmod 600 it/);
});

test('no token of any service appears in a configuration error', async () => {
  const long = `x${'y'.repeat(1100)}`;
  for (const [name, value] of [['MEMSTRATA_ADMIN_TOKEN', long], ['MEMSTRATA_RMEM_TOKEN', long], ['MEMSTRATA_MIRROR_TOKEN', long]] as const) {
    const error = await configError({ env: { [name]: value } });
    assert.equal(error.code, 'MS_CONFIG_INVALID');
    assert.match(error.message, /token is \(hidden\)/);
    assert.ok(!error.message.includes('yyyy'), `${name} leaked into: ${error.message.slice(0, 120)}`);
    assert.ok(!JSON.stringify((error as unknown as { details?: unknown }).details ?? {}).includes('yyyy'));
  }
});

test('node.cpuWakeLatency: off by default; off, or microseconds (bare or us) or ms up to 1000ms; anything else is MS_CONFIG_INVALID naming it', async () => {
  assert.equal((await loadConfig({ env: {} })).config.node.cpuWakeLatencyUs, undefined);
  for (const [value, us] of [['off', undefined], [' OFF ', undefined], ['0', 0], ['10', 10], ['20us', 20], [' 5 us ', 5], ['1ms', 1000], ['1000ms', 1_000_000]] as const) {
    assert.equal((await loadConfig({ env: {}, flags: [['node.cpuWakeLatency', value]] })).config.node.cpuWakeLatencyUs, us, value);
  }
  assert.equal((await loadConfig({ env: { MEMSTRATA_NODE_CPU_WAKE_LATENCY: '0us' } })).config.node.cpuWakeLatencyUs, 0);
  for (const value of ['-1', '1.5', '1001ms', '1000001', '1s', 'on', '']) {
    const error = await configError({ env: {}, flags: [['node.cpuWakeLatency', value]] });
    assert.equal(error.code, 'MS_CONFIG_INVALID', value);
    assert.match(error.message, /node\.cpuWakeLatency.*off, or a time from 0 to 1000ms/, value);
  }
});

test('node.busyPoll: off by default; microseconds (bare or us) or ms up to 10ms; anything else is MS_CONFIG_INVALID naming it', async () => {
  assert.equal((await loadConfig({ env: {} })).config.node.busyPollUs, 0);
  for (const [value, us] of [['0', 0], ['150', 150], ['50us', 50], [' 200 us ', 200], ['1ms', 1000], ['10ms', 10_000], ['10000', 10_000]] as const) {
    assert.equal((await loadConfig({ env: {}, flags: [['node.busyPoll', value]] })).config.node.busyPollUs, us, value);
  }
  assert.equal((await loadConfig({ env: { MEMSTRATA_NODE_BUSY_POLL: '75us' } })).config.node.busyPollUs, 75);
  for (const value of ['-1', '1.5', '11ms', '10001', '1s', 'fast', '']) {
    const error = await configError({ env: {}, flags: [['node.busyPoll', value]] });
    assert.equal(error.code, 'MS_CONFIG_INVALID', value);
    assert.match(error.message, /node\.busyPoll.*from 0 to 10000us/, value);
  }
});
