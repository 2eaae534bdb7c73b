// The `memstrata` command line. Read commands print aligned text tables, or JSON with
// `--json`; every command that talks to a node takes `--admin URL` and `--token` (or
// MEMSTRATA_ADMIN_TOKEN) for a node with admin.token. Errors print one
// line, `memstrata: CODE: message`, and exit 2 for misuse, 1 for everything else.

import { realpath } from 'node:fs/promises';
import { basename, dirname, resolve } from 'node:path';
import { Command, CommanderError, Option } from 'commander';
import { MisuseError, isMemstrataError } from '../errors.js';
import type { AllocationTableJson, ClusterJson, DamagedJson, DivergedJson, GuestInfoJson, GuestsJson, JournalHolderJson, KeptAsideJson, LatencyJson, NodeInfo, OrphanJson, PartitionTableJson, ResizeResponse, RmemSessionJson, ServersJson, VolumeJson, VolumesJson, NvramListJson, NvramDumpJson } from '../protocol/admin/api.js';
import { POLICIES, type DeviceInfo } from '../nvram/device.js';
import { cutJournal } from '../nvram/journal-file.js';
import { RmemClient } from '../client/rmem-client.js';
import { KINDS, MEDIA, USED_KINDS } from '../kinds.js';
import { SETTINGS } from '../node/config.js';
import { formatSize, humanSize, parseAddress } from '../units.js';
import { VERSION } from '../version.js';
import { AdminClient, DEFAULT_ADMIN_URL } from '../client/admin-client.js';
import { startNodeCommand } from './node-start.js';
import { DataDirLock } from '../node/lock.js';
import { textTable } from '../text-table.js';

export interface Output {
  out(text: string): void;
  err(text: string): void;
}

const processOutput: Output = {
  out: (text) => process.stdout.write(`${text}\n`),
  err: (text) => process.stderr.write(`${text}\n`),
};

export function buildProgram(output: Output = processOutput): Command {
  const program = new Command('memstrata')
    .description('memstrata storage node: DRAM and flash pooled into memory tiers, served as remote memory, block cache and NVRAM')
    .version(VERSION)
    .showHelpAfterError('(run with --help for usage)')
    .configureOutput({
      writeOut: (s) => {
        output.out(s.trimEnd());
      },
      writeErr: (s) => {
        output.err(s.trimEnd());
      },
    });

  const adminOption = () =>
    new Option('--admin <url>', 'admin API of the node').env('MEMSTRATA_ADMIN').default(DEFAULT_ADMIN_URL);
  // The environment keeps the token out of `ps` and shell history; the flag is for scripts that hold it.
  const tokenOption = () => new Option('--token <token>', 'admin API token (the node\'s admin.token); prefer MEMSTRATA_ADMIN_TOKEN').env('MEMSTRATA_ADMIN_TOKEN');
  const jsonOption = () => new Option('--json', 'print JSON instead of tables');

  // ---- node ----
  const node = program.command('node').description('run a storage node');
  const start = node
    .command('start')
    .description('start a node in the foreground with the embedded defaults, a config file, MEMSTRATA_* variables and flags (in rising precedence)')
    .option('--config <path>', 'YAML configuration file');
  for (const setting of SETTINGS) {
    if (setting.flag !== undefined) start.option(`${setting.flag} <value>`, `${setting.path}: ${setting.doc} (default ${setting.default})`);
  }
  start
    .option('--set <path=value>', 'set any setting by its path, e.g. --set partition.dram.server.max=512MiB (repeatable)', collect, [])
    .action(async (options: Record<string, unknown>) => {
      const flags: [string, string][] = [];
      for (const setting of SETTINGS) {
        if (setting.flag === undefined) continue;
        const value = options[camel(setting.flag)];
        if (typeof value === 'string') flags.push([setting.path, value]);
      }
      for (const pair of options.set as string[]) {
        const at = pair.indexOf('=');
        if (at <= 0) throw new MisuseError('MS_CONFIG_INVALID', `--set expects path=value, got "${pair}"`);
        flags.push([pair.slice(0, at), pair.slice(at + 1)]);
      }
      const file = typeof options.config === 'string' ? options.config : undefined;
      await startNodeCommand(file === undefined ? { flags } : { file, flags });
    });

  // ---- status ----
  program
    .command('status')
    .description('node information, media, and the partition and allocation tables (patent FIG. 12, 13)')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (options: { admin: string; token?: string; json?: boolean }) => {
      const client = adminClient(options);
      const [info, partition, allocation] = await Promise.all([
        client.get<NodeInfo>('/v1/node'),
        client.get<PartitionTableJson>('/v1/tables/partition'),
        client.get<AllocationTableJson>('/v1/tables/allocation'),
      ]);
      if (options.json === true) {
        output.out(JSON.stringify({ node: info, partition, allocation }, null, 2));
        return;
      }
      output.out([renderNode(info), renderPartition(partition), renderAllocation(allocation)].join('\n\n'));
    });

  // ---- volumes ----
  const volume = program.command('volume').description('block volumes served over NBD');
  volume
    .command('list')
    .description('volumes with size, read-only flag and connected clients')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (options: { admin: string; token?: string; json?: boolean }) => {
      const list = await adminClient(options).get<VolumesJson>('/v1/volumes');
      output.out(options.json === true ? JSON.stringify(list, null, 2) : [renderVolumes(list.volumes), ...renderDamaged('volumes', list.damaged), ...renderOrphans(list.orphans)].join('\n\n'));
    });
  volume
    .command('create <name>')
    .description('create a volume (a sparse file in the data directory); it is an NBD export at once')
    .requiredOption('--size <size>', 'size, a multiple of 4KiB, e.g. 10GiB')
    .option('--read-only', 'refuse writes, trims and zeroes (EPERM)')
    .option('--write-log <device>', 'an NVRAM device that journals every write; FUA and FLUSH then cost a journal append')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (name: string, options: { size: string; readOnly?: boolean; writeLog?: string; admin: string; token?: string; json?: boolean }) => {
      const body = { name, size: options.size, readOnly: options.readOnly === true, ...(options.writeLog === undefined ? {} : { writeLog: options.writeLog }) };
      const created = await adminClient(options).post<VolumeJson>('/v1/volumes', body);
      output.out(
        options.json === true
          ? JSON.stringify(created, null, 2)
          : `volume ${created.name} created: ${formatSize(created.size)}${created.readOnly ? ', read-only' : ''}${created.writeLog === null ? '' : `, write log ${created.writeLog}`}`,
      );
    });
  volume
    .command('resize <name>')
    .description('grow or shrink a volume (shrinking only while no client is connected)')
    .requiredOption('--size <size>', 'new size, a multiple of 4KiB')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (name: string, options: { size: string; admin: string; token?: string; json?: boolean }) => {
      const resized = await adminClient(options).post<VolumeJson>(`/v1/volumes/${encodeURIComponent(name)}/resize`, { size: options.size });
      output.out(options.json === true ? JSON.stringify(resized, null, 2) : `volume ${resized.name} is now ${formatSize(resized.size)}`);
    });
  volume
    .command('rm <name>')
    .description('delete a volume and its data (refused while clients are connected)')
    .addOption(adminOption())
    .addOption(tokenOption())
    .action(async (name: string, options: { admin: string; token?: string }) => {
      await adminClient(options).delete(`/v1/volumes/${encodeURIComponent(name)}`);
      output.out(`volume ${name} removed`);
    });

  // ---- nvram ----
  const nvram = program.command('nvram').description('NVRAM journaling devices in the nvram partition');
  nvram
    .command('list')
    .description('devices with size, used space, first and last sequence number, epoch, policy and state')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (options: { admin: string; token?: string; json?: boolean }) => {
      const list = await adminClient(options).get<NvramListJson>('/v1/nvram');
      output.out(options.json === true ? JSON.stringify(list, null, 2) : [renderNvram(list.devices), ...renderHolders(list.holders), ...renderDamaged('NVRAM devices', list.damaged), ...renderDiverged(list.diverged)].join('\n\n'));
    });
  nvram
    .command('create <name>')
    .description('create a journaling device in the nvram partition')
    .requiredOption('--size <size>', 'journal space, e.g. 64MiB (rounded up to whole extents)')
    .addOption(new Option('--policy <policy>', 'durability: volatile (memory; vaulted on a clean stop), local (journal file, group commit), mirrored (held by the partner node set in mirror.partner) or mirrored+local (both)').choices(POLICIES).default('local'))
    .addOption(new Option('--medium <medium>', 'medium of the nvram extents').choices(MEDIA).default('dram'))
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (name: string, options: { size: string; policy: string; medium: string; admin: string; token?: string; json?: boolean }) => {
      const info = await adminClient(options).post<DeviceInfo>('/v1/nvram', { name, size: options.size, policy: options.policy, medium: options.medium });
      output.out(options.json === true ? JSON.stringify(info, null, 2) : `NVRAM device ${info.name} created: ${formatSize(info.size)}, ${info.policy}, on ${info.medium}`);
    });
  nvram
    .command('accept-local <name>')
    .description('end the wait of a mirrored device back from a crash without its partner (gone for good): it serves its own journal file under a newer epoch; records only the partner held are given up')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (name: string, options: { admin: string; token?: string; json?: boolean }) => {
      const info = await adminClient(options).post<DeviceInfo>(`/v1/nvram/${encodeURIComponent(name)}/accept-local`, {});
      output.out(options.json === true ? JSON.stringify(info, null, 2) : `NVRAM device ${info.name} serves its own journal file: epoch ${info.epoch}, last sequence number ${info.lastSeq ?? '-'}`);
    });
  nvram
    .command('cut-journal <file>')
    .description('with the node stopped: drop what a damaged journal file holds beyond where reading stops (MS_NVRAM_DAMAGED names the file), so the node loads the records before it; copy the file aside first to keep what is dropped')
    .option('--dry-run', 'say what would be dropped, change nothing')
    .addOption(jsonOption())
    .action(async (file: string, options: { dryRun?: boolean; json?: boolean }) => {
      // A journal in a data directory (<dataDir>/nvram/NAME.journal) is cut only while no
      // node runs there: the node's lock is taken for the while (MS_NODE_LOCKED otherwise).
      const dir = dirname(await realpath(resolve(file)));
      const lock = basename(dir) === 'nvram' ? new DataDirLock(dirname(dir)) : undefined;
      await lock?.acquire();
      try {
        const result = await cutJournal(file, options.dryRun === true);
        const verb = options.dryRun === true ? 'would be dropped (dry run: nothing changed)' : 'dropped';
        output.out(options.json === true ? JSON.stringify({ ...result, dryRun: options.dryRun === true }, null, 2) : `${file}: ${result.dropped} record(s) beyond the damage ${verb}; ${result.kept} record(s) kept, the last numbered ${result.lastSeq ?? '-'}`);
      } finally {
        await lock?.release();
      }
    });
  nvram
    .command('rm <name>')
    .description('delete a device, its records and its journal; its memory is zeroed')
    .addOption(adminOption())
    .addOption(tokenOption())
    .action(async (name: string, options: { admin: string; token?: string }) => {
      await adminClient(options).delete(`/v1/nvram/${encodeURIComponent(name)}`);
      output.out(`NVRAM device ${name} removed`);
    });
  nvram
    .command('dump <name>')
    .description('print records: sequence number, timestamp, epoch, target, length, and the payload start')
    .option('--from <seq>', 'first sequence number', '0')
    .option('--max <count>', 'most records to print', '100')
    .option('--diverged', 'print the newest journal this node kept aside when its mirror partner\'s copy replaced it')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (name: string, options: { from: string; max: string; diverged?: boolean; admin: string; token?: string; json?: boolean }) => {
      const dump = await adminClient(options).get<NvramDumpJson>(
        `/v1/nvram/${encodeURIComponent(name)}/records?from=${encodeURIComponent(options.from)}&max=${encodeURIComponent(options.max)}${options.diverged === true ? '&diverged=1' : ''}`,
      );
      if (options.json === true) {
        output.out(JSON.stringify(dump, null, 2));
        return;
      }
      const rows = dump.records.map((r) => [
        String(r.seq),
        new Date(r.timestamp / 1000).toISOString(),
        String(r.epoch),
        r.target === null ? '-' : `${r.target.volume}@${r.target.offset}`,
        r.writer === null ? '-' : `${r.writer.id}#${r.writer.seq}`,
        String(r.length),
        Buffer.from(r.payload, 'base64').subarray(0, 16).toString('hex'),
      ]);
      const from = dump.file === undefined ? '' : `records kept aside in ${dump.file}\n`;
      const head = dump.device === null ? `NVRAM device ${name}: removed; its journal kept aside remains` : renderNvram([dump.device]);
      output.out(`${head}\n\n${from}${textTable(['SEQ', 'TIMESTAMP', 'EPOCH', 'TARGET', 'WRITER', 'LENGTH', 'PAYLOAD (first 16 bytes)'], rows, [0, 2, 5])}`);
    });

  // ---- guests ----
  const guest = program.command('guest').description('programs the node runs and keeps running, each with a share of its CPU');
  guest
    .command('create <name>')
    .description('define a guest and start it: memstrata guest create NAME [options] -- COMMAND [ARGS...]')
    .argument('<command...>', 'the program and its arguments (after --)')
    .option('--cpu <cores>', 'CPU share, a fraction of one core such as 0.25 (up to the machine\'s cores)')
    .option('--cores <n>', 'how many CPUs it may run on, fewer than the machine has')
    .option('--memory <size>', 'memory limit, such as 256MiB')
    .option('--volume <name...>', 'a volume its cut-through NBD socket serves (repeatable)')
    .option('--nvram <name...>', 'an NVRAM device its cut-through rmem socket serves (repeatable)')
    .option('--nvram-quota <size>', 'NVRAM the guest may allocate itself through its rmem socket, such as 64MiB')
    .option('--user <user>', 'run it as this user (a node running as root; setpriv from util-linux)')
    .addOption(new Option('--restart <policy>', 'restart policy').choices(['never', 'on-failure', 'always']).default('on-failure'))
    .option('--env <K=V...>', 'environment variables for the guest')
    .option('--no-start', 'only define it')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (name: string, command: string[], options: GuestLimitOptions & { volume?: string[]; nvram?: string[]; nvramQuota?: string; user?: string; restart: string; env?: string[]; start: boolean; admin: string; token?: string; json?: boolean }) => {
      const env: Record<string, string> = {};
      for (const pair of options.env ?? []) {
        const at = pair.indexOf('=');
        if (at <= 0) throw new MisuseError('MS_GUEST_INVALID', `--env ${JSON.stringify(pair)}: expected NAME=VALUE`);
        env[pair.slice(0, at)] = pair.slice(at + 1);
      }
      const devices = { ...(options.volume === undefined ? {} : { volumes: options.volume }), ...(options.nvram === undefined ? {} : { nvram: options.nvram }), ...(options.nvramQuota === undefined ? {} : { nvramQuota: options.nvramQuota }), ...(options.user === undefined ? {} : { user: options.user }) };
      const info = await adminClient(options).post<GuestInfoJson>('/v1/guests', { name, command, env, restart: options.restart, start: options.start, ...guestLimits(options), ...devices });
      output.out(options.json === true ? JSON.stringify(info, null, 2) : `guest ${info.name} created: ${info.state}${renderLimits(info)}`);
    });
  guest
    .command('set <name>')
    .description('change a guest\'s CPU share, cores or memory limit, while it runs too ("none" removes one)')
    .option('--cpu <cores>', 'CPU share, a fraction of one core such as 0.6, or none')
    .option('--cores <n>', 'how many CPUs it may run on, or none')
    .option('--memory <size>', 'memory limit such as 256MiB, or none')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (name: string, options: GuestLimitOptions & { admin: string; token?: string; json?: boolean }) => {
      const change = guestLimits(options);
      if (Object.keys(change).length === 0) throw new MisuseError('MS_GUEST_INVALID', 'guest set: expected --cpu, --cores or --memory');
      const info = await adminClient(options).patch<GuestInfoJson>(`/v1/guests/${encodeURIComponent(name)}`, change);
      output.out(options.json === true ? JSON.stringify(info, null, 2) : `guest ${info.name}: ${info.state}${renderLimits(info)}`);
    });
  for (const action of ['attach', 'detach'] as const) {
    guest
      .command(`${action} <name>`)
      .description(action === 'attach'
        ? 'give a guest a volume (served on its nbd.sock) or an NVRAM device (on its rmem.sock), while it runs too'
        : 'take a volume or NVRAM device from a guest; a volume it has an NBD connection to is refused')
      .option('--volume <name>', 'the volume')
      .option('--nvram <name>', 'the NVRAM device')
      .addOption(adminOption())
      .addOption(tokenOption())
      .addOption(jsonOption())
      .action(async (name: string, options: { volume?: string; nvram?: string; admin: string; token?: string; json?: boolean }) => {
        if ((options.volume === undefined) === (options.nvram === undefined)) throw new MisuseError('MS_GUEST_INVALID', `guest ${action}: expected one of --volume or --nvram`);
        const body = options.volume === undefined ? { nvram: options.nvram } : { volume: options.volume };
        const info = await adminClient(options).post<GuestInfoJson>(`/v1/guests/${encodeURIComponent(name)}/${action}`, body);
        output.out(options.json === true ? JSON.stringify(info, null, 2) : `guest ${info.name}: volumes ${info.volumes.join(', ') || '-'}; NVRAM ${info.nvram.join(', ') || '-'}`);
      });
  }
  guest
    .command('list')
    .description('guests with state, pid, CPU share and use, throttled time, memory, restarts, enforcement and command')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (options: { admin: string; token?: string; json?: boolean }) => {
      const list = await adminClient(options).get<GuestsJson>('/v1/guests');
      output.out(options.json === true ? JSON.stringify(list.guests, null, 2) : [renderGuests(list.guests), ...renderDamaged('guests', list.damaged)].join('\n\n'));
    });
  for (const action of ['start', 'stop', 'reset'] as const) {
    guest
      .command(`${action} <name>`)
      .description(action === 'reset' ? 'kill the guest\'s process tree and boot it again' : action === 'stop' ? 'stop the guest\'s process tree (SIGTERM, then SIGKILL after 5 s); it stays stopped across node restarts' : 'start a stopped or failed guest')
      .addOption(adminOption())
      .addOption(tokenOption())
      .addOption(jsonOption())
      .action(async (name: string, options: { admin: string; token?: string; json?: boolean }) => {
        const info = await adminClient(options).post<GuestInfoJson>(`/v1/guests/${encodeURIComponent(name)}/${action}`, {});
        output.out(options.json === true ? JSON.stringify(info, null, 2) : `guest ${info.name}: ${info.state}${info.pid === null ? '' : `, pid ${info.pid}`}`);
      });
  }
  guest
    .command('rm <name>')
    .description('remove a stopped guest, its directory and its log')
    .addOption(adminOption())
    .addOption(tokenOption())
    .action(async (name: string, options: { admin: string; token?: string }) => {
      await adminClient(options).delete(`/v1/guests/${encodeURIComponent(name)}`);
      output.out(`guest ${name} removed`);
    });
  guest
    .command('logs <name>')
    .description('the last 64 KiB of the guest\'s output; --follow goes on printing what it writes until Ctrl-C')
    .option('--follow', 'keep printing the guest\'s output as it comes')
    .addOption(adminOption())
    .addOption(tokenOption())
    .action(async (name: string, options: { admin: string; token?: string; follow?: boolean }) => {
      const path = `/v1/guests/${encodeURIComponent(name)}/logs`;
      if (options.follow !== true) {
        output.out(await adminClient(options).text(path));
        return;
      }
      const stop = new AbortController();
      process.once('SIGINT', () => { stop.abort(); });
      await adminClient(options).follow(`${path}?follow=1`, (chunk) => { process.stdout.write(chunk); }, stop.signal);
    });

  // ---- servers ----
  program
    .command('servers')
    .description('rmem sessions and the server memory allocate table (patent FIG. 13) of a node')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (options: { admin: string; token?: string; json?: boolean }) => {
      const servers = await adminClient(options).get<ServersJson>('/v1/servers');
      const keptAside = servers.keptAside.length === 0 ? '' : `\n\n${renderKeptAside(servers.keptAside)}`;
      output.out(options.json === true ? JSON.stringify(servers, null, 2) : `${renderSessions(servers.sessions)}\n\n${renderAllocation(servers.allocation)}${keptAside}`);
    });

  // ---- rmem ----
  const rmem = program.command('rmem').description('talk to a node\'s rmem remote-memory service');
  rmem
    .command('capacity')
    .description('ask a node for its capacity per medium, as a host does at discovery (patent FIG. 14)')
    .option('--node <host:port>', 'rmem address of the node', '127.0.0.1:10810')
    .option('--server-id <id>', 'server id to say HELLO with', `memstrata-cli-${process.pid}`)
    .addOption(new Option('--token <token>', 'shared token, if the node requires one').env('MEMSTRATA_RMEM_TOKEN'))
    .addOption(jsonOption())
    .action(async (options: { node: string; serverId: string; token?: string; json?: boolean }) => {
      const address = parseNodeAddress(options.node);
      const client = await RmemClient.connect({ ...address, serverId: options.serverId, ...(options.token === undefined ? {} : { token: options.token }), reconnect: false, keepalive: false });
      try {
        const capacity = await client.capacity();
        if (options.json === true) {
          output.out(JSON.stringify({ node: client.session.nodeId, leaseMs: client.session.leaseMs, capacity }, null, 2));
          return;
        }
        const rows = capacity.map((c) => [c.medium, formatSize(c.total), formatSize(c.partition), formatSize(c.available), formatSize(c.growable), formatSize(c.used)]);
        output.out(`node ${client.session.nodeId}  lease ${client.session.leaseMs} ms\n${textTable(['MEDIUM', 'TOTAL', 'SERVER PARTITION', 'AVAILABLE', 'GROWABLE', 'USED'], rows, [1, 2, 3, 4, 5])}`);
      } finally {
        await client.close();
      }
    });

  // ---- cluster ----
  const cluster = program.command('cluster').description('the cluster a node belongs to through etcd (cluster.etcd)');
  cluster
    .command('status')
    .description('members with their lease time left, zones, services and free memory; partners and the role of each mirrored device')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (options: { admin: string; token?: string; json?: boolean }) => {
      const view = await adminClient(options).get<ClusterJson>('/v1/cluster');
      output.out(options.json === true ? JSON.stringify(view, null, 2) : renderCluster(view));
    });

  // ---- partition ----
  const partition = program.command('partition').description('show or change the memory partition table');
  partition
    .command('show')
    .description('the memory partition table (patent FIG. 12)')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (options: { admin: string; token?: string; json?: boolean }) => {
      const table = await adminClient(options).get<PartitionTableJson>('/v1/tables/partition');
      output.out(options.json === true ? JSON.stringify(table, null, 2) : renderPartition(table));
    });
  partition
    .command('resize')
    .description('set the size of one kind on one medium; extents move from free (and, to grow, from the cache)')
    .addOption(new Option('--medium <medium>', 'medium').choices(MEDIA).makeOptionMandatory())
    .addOption(new Option('--kind <kind>', 'partition kind').choices(USED_KINDS).makeOptionMandatory())
    .requiredOption('--bytes <size>', 'new size, e.g. 256MiB')
    .addOption(adminOption())
    .addOption(tokenOption())
    .addOption(jsonOption())
    .action(async (options: { medium: string; kind: string; bytes: string; admin: string; token?: string; json?: boolean }) => {
      const response = await adminClient(options).post<ResizeResponse>('/v1/partition/resize', {
        medium: options.medium,
        kind: options.kind,
        bytes: options.bytes,
      });
      if (options.json === true) {
        output.out(JSON.stringify(response, null, 2));
        return;
      }
      const { result } = response;
      const moved = Object.entries(result.moved).map(([kind, bytes]) => (bytes > 0 ? `${formatSize(bytes)} from ${kind}` : `${formatSize(-bytes)} to ${kind}`));
      output.out(
        `${result.medium} ${result.kind}: ${formatSize(result.fromBytes)} -> ${formatSize(result.toBytes)}` +
          (moved.length > 0 ? ` (${moved.join(', ')})` : ' (unchanged)') +
          (result.reclaimedBytes > 0 ? `, ${formatSize(result.reclaimedBytes)} reclaimed from owners` : ''),
      );
      output.out('');
      output.out(renderPartition(response.partition));
    });

  return program;
}

/** Runs the CLI and returns the exit code. */
export async function runCli(argv: readonly string[], output: Output = processOutput): Promise<number> {
  const program = buildProgram(output);
  program.exitOverride();
  for (const command of allCommands(program)) command.exitOverride();
  try {
    await program.parseAsync([...argv], { from: 'user' });
    return 0;
  } catch (error) {
    if (error instanceof CommanderError) {
      if (error.code === 'commander.helpDisplayed' || error.code === 'commander.version' || error.code === 'commander.help') return 0;
      return 2;
    }
    if (isMemstrataError(error)) {
      output.err(`memstrata: ${error.code}: ${error.message}`);
      return error.category === 'misuse' ? 2 : 1;
    }
    output.err(`memstrata: MS_INTERNAL: ${error instanceof Error ? error.message : String(error)}`);
    return 1;
  }
}

/** The admin client for a command's --admin and --token (or MEMSTRATA_ADMIN_TOKEN). */
function adminClient(options: { admin: string; token?: string }): AdminClient {
  return new AdminClient(options.admin, options.token === undefined ? {} : { token: options.token });
}

function allCommands(command: Command): Command[] {
  return command.commands.flatMap((c) => [c, ...allCommands(c)]);
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function camel(flag: string): string {
  return flag.replace(/^--/, '').replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
}

// ---- renderers ----

export function renderNode(info: NodeInfo): string {
  const head = [
    `node ${info.id}  version ${info.version}  pid ${info.pid}  up ${formatUptime(info.uptimeSeconds)}`,
    `data directory  ${info.dataDir}`,
    `admin           ${info.listen.admin}`,
    `rmem            ${info.listen.rmem}`,
    `nbd             ${info.listen.nbd}`,
    `mirror          ${info.listen.mirror}  ${renderMirror(info.mirror)}`,
    ...(info.busyPoll === undefined ? [] : [`busy polling    ${info.busyPoll.windowUs === 0 ? 'off' : `${info.busyPoll.windowUs} us after input and replies; ${info.busyPoll.seconds.toFixed(1)} s in polling mode since start (serving included)`}`]),
    ...(info.cpuWakeLatency === undefined ? [] : [`cpu wake-up     ${renderWakeLatency(info.cpuWakeLatency)}`]),
  ].join('\n');
  const rows = info.media.map((m) => {
    const usage = info.usage.find((u) => u.medium === m.name);
    return [
      m.name,
      formatSize(m.capacity),
      formatSize(m.extentSize),
      humanSize(m.residentBytes),
      ...KINDS.filter((k) => k !== 'free').map((k) => formatSize(usage?.kinds[k].bytes ?? 0)),
      formatSize(usage?.kinds.free.bytes ?? 0),
    ];
  });
  const media = `Media\n${textTable(['MEDIUM', 'CAPACITY', 'EXTENT', 'RESIDENT', 'CACHE', 'SERVER', 'NVRAM', 'FREE'], rows, [1, 2, 3, 4, 5, 6, 7])}`;
  const damaged = [...renderDamaged('volumes', info.damaged.volumes), ...renderDamaged('NVRAM devices', info.damaged.nvram), ...renderOrphans(info.orphans)];
  const g = info.guests;
  const guests = renderGuests(g.list, `Guests (limits by ${g.enforcement}; shares may add up to ${g.budget} of ${g.cpus} cores, ${g.reserveCpu} kept for the node; period ${g.periodMs} ms)`);
  return [head, media, renderCache(info.cache), renderNvram(info.nvram), guests, ...renderLatency(info.latency), ...damaged].join('\n\n');
}

/** Request latencies since start; nothing before the first request. */
export function renderLatency(latency: NodeInfo['latency'] | undefined): string[] {
  if (latency === undefined) return [];
  const bound = (s: number | null): string => (s === null ? '>10s' : `<=${formatDuration(s)}`);
  const row = (service: string, l: LatencyJson): string[] => [service, l.key, String(l.count), formatDuration(l.meanSeconds), bound(l.p50Seconds), bound(l.p99Seconds)];
  const rows = [...latency.nbd.map((l) => row('nbd', l)), ...latency.rmem.map((l) => row('rmem', l)), ...latency.journalSync.map((l) => row('journal sync', l))];
  if (rows.length === 0) return [];
  const table = textTable(['SERVICE', 'REQUEST', 'COUNT', 'MEAN', 'P50', 'P99'], rows, [2, 3, 4, 5]);
  return [`Latency since start (request in to reply out; journal sync: a batch's write and sync; P50 and P99 are histogram bucket bounds)\n${table}`];
}

/** 12us, 1.50ms, 25.0ms, 2.0s: the unit chosen after rounding (999.6 us is 1.00ms). */
export function formatDuration(seconds: number): string {
  const us = Math.round(seconds * 1e6);
  if (us < 1000) return `${us}us`;
  const ms2 = Number((seconds * 1000).toFixed(2));
  if (ms2 < 10) return `${ms2.toFixed(2)}ms`;
  const ms1 = Number((seconds * 1000).toFixed(1));
  if (ms1 < 1000) return `${ms1.toFixed(1)}ms`;
  return `${seconds.toFixed(1)}s`;
}

/** Volumes or devices that were not loaded at start; nothing when there are none. */
/** Journals kept aside when a mirror partner's copy replaced this node's; empty when none. */
export function renderDiverged(diverged: readonly DivergedJson[] | undefined): string[] {
  if (diverged === undefined || diverged.length === 0) return [];
  const rows = diverged.flatMap((d) => d.files.map((f) => [d.name, f]));
  return [`Journals kept aside (may hold records acknowledged here that the partner never had; memstrata nvram dump --diverged NAME)\n${textTable(['DEVICE', 'FILE'], rows, [])}`];
}

export function renderGuests(guests: readonly GuestInfoJson[], head = 'Guests'): string {
  if (guests.length === 0) return `${head}\n(none)`;
  const rows = guests.map((g) => [
    g.name,
    g.state,
    g.pid === null ? '-' : String(g.pid),
    g.cpu === null ? '-' : String(g.cpu),
    g.cpuUsed === null ? '-' : g.cpuUsed.toFixed(2),
    g.cores === null ? 'all' : String(g.cores),
    `${g.throttledSeconds.toFixed(1)}s`,
    `${humanSize(g.memoryBytes)}/${g.memoryLimit === null ? '-' : humanSize(g.memoryLimit)}`,
    String(g.restarts),
    g.enforcement,
    g.command.join(' ').slice(0, 50),
  ]);
  const table = textTable(['NAME', 'STATE', 'PID', 'CPU', 'USED', 'CORES', 'THROTTLED', 'MEMORY/LIMIT', 'RESTARTS', 'ENFORCEMENT', 'COMMAND'], rows, [2, 3, 4, 6, 8]);
  const deviceRows = guests.filter((g) => g.volumes.length + g.nvram.length > 0 || g.sockets !== null).map((g) => [
    g.name,
    g.volumes.join(',') || '-',
    g.nvram.join(',') || '-',
    g.sockets === null ? '-' : `${g.sockets.nbdConnections}/${g.sockets.rmemConnections}`,
    g.sockets === null ? '-' : g.sockets.nbd.replace(/nbd\.sock$/, '{nbd,rmem}.sock'),
  ]);
  const devices = deviceRows.length === 0 ? [] : [`\nCut-through devices\n${textTable(['GUEST', 'VOLUMES', 'NVRAM', 'CONNECTIONS (NBD/RMEM)', 'SOCKETS'], deviceRows, [3])}`];
  const errors = guests.filter((g) => g.error !== null).map((g) => `${g.name}: ${g.error ?? ''}`);
  return [`${head}\n${table}`, ...errors, ...devices].join('\n');
}

interface GuestLimitOptions {
  cpu?: string;
  cores?: string;
  memory?: string;
}

/** --cpu/--cores/--memory as the API takes them: numbers, a size string, or null for "none". */
function guestLimits(options: GuestLimitOptions): { cpu?: number | null; cores?: number | null; memory?: string | null } {
  const number = (flag: string, value: string): number | null => {
    if (value === 'none') return null;
    const n = Number(value);
    if (value.trim() === '' || !Number.isFinite(n)) throw new MisuseError('MS_GUEST_INVALID', `--${flag} ${JSON.stringify(value)}: expected a number or none`);
    return n;
  };
  return {
    ...(options.cpu === undefined ? {} : { cpu: number('cpu', options.cpu) }),
    ...(options.cores === undefined ? {} : { cores: number('cores', options.cores) }),
    ...(options.memory === undefined ? {} : { memory: options.memory === 'none' ? null : options.memory }),
  };
}

function renderLimits(g: GuestInfoJson): string {
  const parts = [g.cpu === null ? undefined : `cpu ${g.cpu}`, g.cores === null ? undefined : `cores ${g.cores}`, g.memoryLimit === null ? undefined : `memory ${humanSize(g.memoryLimit)}`];
  const set = parts.filter((p) => p !== undefined);
  return `${set.length === 0 ? '' : `, ${set.join(', ')}`} (${g.enforcement})`;
}

export function renderDamaged(what: string, damaged: readonly DamagedJson[] | undefined): string[] {
  if (damaged === undefined || damaged.length === 0) return [];
  const rows = damaged.map((d) => [d.name, d.file, `${d.error.code}: ${d.error.message}`]);
  return [`Damaged ${what} (not loaded; their files are left as they are)\n${textTable(['NAME', 'FILE', 'ERROR'], rows)}`];
}

/** Volume files found without metadata and moved aside; nothing when there are none. */
export function renderOrphans(orphans: readonly OrphanJson[] | undefined): string[] {
  if (orphans === undefined || orphans.length === 0) return [];
  const rows = orphans.map((o) => [o.name, o.file]);
  return [`Orphaned volume files (no metadata: a create or removal was cut short; moved aside, remove them once not needed)\n${textTable(['VOLUME', 'FILE'], rows)}`];
}

export function renderCache(cache: NodeInfo['cache']): string {
  if (cache === null) return 'Storage cache\n(disabled: volumes are written straight to their data store)';
  const lookups = cache.hits + cache.misses;
  const ratio = lookups === 0 ? '-' : `${((cache.hits / lookups) * 100).toFixed(1)}%`;
  const rows = [
    ['dram', `${cache.lines.dram}/${cache.slots.dram}`],
    ['flash', `${cache.lines.flash}/${cache.slots.flash}`],
  ];
  return [
    'Storage cache',
    `hits ${cache.hits}  misses ${cache.misses}  hit ratio ${ratio}  dirty ${humanSize(cache.dirtyBytes)}  staged ${humanSize(cache.stagedBytes)}  destaged ${humanSize(cache.destagedBytes)}`,
    `evictions ${cache.evictions}  promotions ${cache.promotions}  demotions ${cache.demotions}  hits served from flash ${cache.flashHits} (${cache.flashReadsNow ?? 0} at once)  reads sent from DRAM without a copy ${cache.viewReads ?? 0} (slots held now ${cache.pinnedSlots ?? 0})  writes stored at once ${cache.writesNow ?? 0}`,
    textTable(['LEVEL', 'LINES/SLOTS (64KiB)'], rows, [1]),
  ].join('\n');
}

export function renderPartition(table: PartitionTableJson): string {
  const rows = table.rows.map((r) => [r.medium, r.range, formatSize(r.length), r.kind, r.owner ?? '-']);
  return `Memory partition table\n${textTable(['MEDIUM', 'PHYSICAL ADDRESS', 'SIZE', 'KIND', 'OWNER'], rows, [2])}`;
}

export function renderAllocation(table: AllocationTableJson): string {
  if (table.rows.length === 0) return 'Server memory allocate table\n(no server holds memory on this node)';
  const rows = table.rows.map((r) => [r.serverId, String(r.regionId), r.medium, r.range, formatSize(r.length)]);
  return `Server memory allocate table\n${textTable(['SERVER ID', 'REGION', 'MEDIUM', 'PHYSICAL ADDRESS', 'SIZE'], rows, [1, 4])}`;
}

export function renderKeptAside(rows: readonly KeptAsideJson[]): string {
  const table = rows.map((k) => [k.serverId, k.medium, k.range, formatSize(k.length), k.error]);
  return `Server memory kept aside (zeroing failed; handed to no one until a later session end zeroes it)\n${textTable(['SERVER ID', 'MEDIUM', 'PHYSICAL ADDRESS', 'SIZE', 'LAST ERROR'], table, [3])}`;
}

function renderMirror(m: NodeInfo['mirror']): string {
  if (m.chosen) {
    const links = m.links.map((l) => `${l.node ?? '?'} at ${l.address} ${l.up ? 'up' : 'down'} (${l.devices.join(', ') || 'no device'})`);
    return `partners chosen by the cluster${links.length === 0 ? ', none yet' : `: ${links.join('; ')}`}, on partner down: ${m.onPartnerDown}`;
  }
  if (m.link === 'none') return 'no partner';
  const who = m.partnerNode === null ? m.partner : `${m.partnerNode} at ${m.partner}`;
  return `partner ${who ?? '-'}, link ${m.link}, on partner down: ${m.onPartnerDown}`;
}

export function renderCluster(view: ClusterJson): string {
  const self = view.self;
  if (!view.enabled || self === null) return `node ${view.node} is on its own (no cluster.etcd)`;
  const lease = self.lease === null ? 'no lease' : `lease ${(self.leaseRemainingMs / 1000).toFixed(1)} s left of ${self.leaseTtlMs / 1000} s`;
  const state = { member: 'a member', joining: 'joining', conflict: 'waiting for its id to be free', left: 'gone' }[self.state];
  const parts = [`Cluster ${self.cluster} (etcd ${self.endpoints.join(', ')}): node ${view.node} is ${state}, ${lease}${self.problem === null ? '' : `; ${self.problem}`}`];
  if (view.problem !== null) parts.push(view.problem);
  const free = (m: ClusterJson['members'][number], medium: string): string => {
    const c = m.capacity.find((x) => x.medium === medium);
    return c === undefined ? '-' : humanSize(c.kinds.free.bytes + c.kinds.server.idleBytes);
  };
  const nvram = (m: ClusterJson['members'][number]): string => humanSize(m.capacity.reduce((sum, c) => sum + (c.nvramRoom ?? c.kinds.nvram.idleBytes), 0));
  const rows = view.members.map((m) => [
    m.self ? `${m.id} *` : m.id,
    m.zone ?? '-',
    m.version,
    m.leaseSeconds === null ? '?' : `${m.leaseSeconds}s`,
    m.services.rmem,
    m.services.nbd,
    m.services.admin,
    free(m, 'dram'),
    free(m, 'flash'),
    nvram(m),
    m.partner ?? '-',
  ]);
  parts.push(view.members.length === 0 ? 'Members\n(none)' : `Members (* this node)\n${textTable(['NODE', 'ZONE', 'VERSION', 'LEASE', 'RMEM', 'NBD', 'ADMIN', 'DRAM FREE', 'FLASH FREE', 'NVRAM FREE', 'PARTNER'], rows, [3, 7, 8, 9])}`);
  if (view.devices.length > 0) {
    const devices = view.devices.map((d) => [d.device, d.node, d.role, d.policy, String(d.epoch), d.state, d.partner ?? '-']);
    parts.push(`Mirrored NVRAM devices\n${textTable(['DEVICE', 'NODE', 'ROLE', 'POLICY', 'EPOCH', 'STATE', 'PARTNER'], devices, [4])}`);
  }
  if (view.ownership.length > 0) {
    const rows = view.ownership.map((o) => [o.device, o.term === null ? '-' : String(o.term), o.primary ?? '-', o.replica ?? '-', o.inSync === null ? '-' : o.inSync ? 'yes' : 'no', o.held ? 'yes' : 'no']);
    parts.push(`Ownership of this node's mirrored devices (etcd)\n${textTable(['DEVICE', 'TERM', 'PRIMARY', 'REPLICA', 'IN SYNC', 'HELD HERE'], rows, [1])}`);
  }
  if (view.unreadable.length > 0) parts.push(`Records skipped\n${view.unreadable.join('\n')}`);
  return parts.join('\n\n');
}

/** Who has each device open, and through which path (a multipath client shows on each path it used). */
export function renderHolders(holders: readonly JournalHolderJson[] | undefined): string[] {
  if (holders === undefined || holders.length === 0) return [];
  const rows = holders.map((h) => [h.device, h.serverId, h.via, h.remote, String(h.epoch)]);
  return [`Journals open\n${textTable(['DEVICE', 'SESSION', 'PATH', 'FROM', 'EPOCH'], rows, [4])}`];
}

export function renderNvram(devices: readonly DeviceInfo[]): string {
  if (devices.length === 0) return 'NVRAM devices\n(none)';
  const rows = devices.map((d) => [
    d.name,
    d.policy,
    d.role,
    d.mirror ?? '-',
    d.medium,
    formatSize(d.size),
    humanSize(d.used),
    d.firstSeq === null ? '-' : String(d.firstSeq),
    d.lastSeq === null ? '-' : String(d.lastSeq),
    String(d.epoch),
    d.journal === null ? '-' : `${humanSize(d.journal.spanBytes)} of ${formatSize(d.journal.ringBytes)}`,
    d.diverged === undefined || d.diverged === 0 ? d.state : `${d.state}, diverged (${d.diverged})`,
  ]);
  return `NVRAM devices\n${textTable(['NAME', 'POLICY', 'ROLE', 'MIRROR', 'MEDIUM', 'SIZE', 'USED', 'FIRST SEQ', 'LAST SEQ', 'EPOCH', 'JOURNAL', 'STATE'], rows, [5, 6, 7, 8, 9])}`;
}

export function renderVolumes(volumes: readonly VolumeJson[]): string {
  const rows = volumes.map((v) => [v.name, formatSize(v.size), v.readOnly ? 'yes' : 'no', v.writeLog ?? '-', String(v.connections), v.state, v.createdAt]);
  const table = textTable(['NAME', 'SIZE', 'READ-ONLY', 'WRITE LOG', 'CLIENTS', 'STATE', 'CREATED'], rows, [1, 4]);
  // A fenced or recovering volume says why, below the table: a sync failed and it is
  // read-only until a restart, or its mirrored write log waits for the mirror partner.
  const fenced = volumes.filter((v) => v.failure !== null).map((v) => `${v.name} is ${v.state}: ${v.failure ?? ''}`);
  return `Volumes\n${table}${fenced.length > 0 ? `\n${fenced.join('\n')}` : ''}`;
}

export function renderSessions(sessions: readonly RmemSessionJson[]): string {
  if (sessions.length === 0) return 'rmem sessions\n(no server is connected or within its lease)';
  const rows = sessions.map((s) => [s.serverId, s.state, s.remote ?? '-', s.since, s.expiresInMs === undefined ? '-' : `${(s.expiresInMs / 1000).toFixed(1)}s`]);
  return `rmem sessions\n${textTable(['SERVER ID', 'STATE', 'REMOTE', 'SINCE', 'REGIONS FREED IN'], rows)}`;
}

function parseNodeAddress(text: string): { host: string; port: number } {
  try {
    return parseAddress(text);
  } catch {
    throw new MisuseError('MS_BAD_REQUEST', `--node expects HOST:PORT, got "${text}"`);
  }
}

function formatUptime(seconds: number): string {
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m${seconds % 60}s`;
  return `${Math.floor(seconds / 3600)}h${Math.floor((seconds % 3600) / 60)}m`;
}

/** node.cpuWakeLatency for `memstrata status`. */
function renderWakeLatency(w: NonNullable<NodeInfo['cpuWakeLatency']>): string {
  if (w.requestedUs === null) return 'no bound asked (node.cpuWakeLatency off)';
  if (w.held) return `a CPU latency request of ${w.requestedUs} us is held on /dev/cpu_dma_latency while the node runs (machine-wide; cpuidle: ${w.cpuidle ?? 'unknown'})`;
  return `${w.requestedUs} us asked, NOT held: ${w.failure ?? 'not yet requested'}`;
}
