// A crash loop under fio's verify workload: each cycle, while one fio job writes one half
// of a region at random (never flushing) and the cache destages all the time, a second
// fio job writes the other half with crc32c verify headers and ends with a FLUSH; at a
// random moment within 150 ms of that FLUSH (dirty data otherwise waits up to 2 s, so
// a FLUSH that did not write everything would show) the node gets `kill -9`. After the restart, fio's
// `--verify_only` must find every block of the flushed job intact. The two halves meet
// inside a cache line (the region starts at a random 4 KiB offset), so a destage of the
// unflushed half writes lines that also hold flushed data.
//
// Cycles reuse one data directory, so each start recovers what the last kill left. The
// seed of each cycle is printed; MEMSTRATA_SOAK=1 runs many more cycles.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { startNode, tempDir, type NodeProcess } from '../support/node-process.js';
import { missing, run } from '../support/tools.js';
import { rng } from '../support/rng.js';

const SOAK = process.env.MEMSTRATA_SOAK === '1';
const MiB = 2 ** 20;

const NODE_ARGS = [
  '--dram-size', '16MiB', '--flash-size', '16MiB', '--extent-size', '1MiB',
  '--set', 'partition.dram.cache.initial=4MiB', '--set', 'partition.dram.server.initial=0', '--set', 'partition.dram.nvram.initial=0',
  '--set', 'partition.flash.cache.initial=4MiB', '--set', 'partition.flash.server.initial=0', '--set', 'partition.flash.nvram.initial=0',
  '--set', 'volumes.defaultSize=32MiB', '--set', 'cache.maxDirtyAge=2s',
];

const uri = (n: NodeProcess): string => `nbd://${n.nbd.host}:${n.nbd.port}/default`;

test('kill -9 during destage under fio verify: every block of a flushed fio job verifies after the restart', async (t) => {
  if (missing('fio') !== undefined) return;
  const dir = await tempDir(t);
  const cycles = SOAK ? 25 : 3;
  for (let cycle = 0; cycle < cycles; cycle++) {
    const seed = (Date.now() ^ (cycle * 104729)) >>> 0;
    const random = rng(seed);
    console.log(`# fio crash cycle ${cycle}: seed ${seed}`);
    const node = await startNode({ cwd: dir, small: false, args: NODE_ARGS, timeoutMs: 30_000 });
    t.after(() => node.stop('SIGKILL').then(() => undefined));

    // The region: 16 MiB at a random 4 KiB offset; the two halves swap at random.
    const start = Math.floor(random() * 4096) * 4096;
    const [flushedAt, noiseAt] = random() < 0.5 ? [start, start + 8 * MiB] : [start + 8 * MiB, start];
    const flushed = [
      '--ioengine=nbd', '--name=flushed', '--rw=randwrite', '--bs=4k', '--iodepth=16',
      `--offset=${flushedAt}`, '--size=8M', '--verify=crc32c', `--randseed=${seed}`, '--end_fsync=1', '--do_verify=0',
    ];

    // The noise: mixed sizes, 16 in flight, never flushed, until the node dies.
    const noise = spawn('fio', [
      '--ioengine=nbd', `--uri=${uri(node)}`, '--name=noise', '--rw=randwrite', '--bsrange=4k-64k', '--blockalign=4k',
      '--iodepth=16', `--offset=${noiseAt}`, '--size=8M', '--time_based', '--runtime=60', `--randseed=${seed + 1}`,
    ], { cwd: dir, stdio: 'ignore' });
    const noiseDone = new Promise<void>((resolve) => noise.once('exit', () => resolve()));
    t.after(async () => {
      noise.kill('SIGKILL');
      await noiseDone;
    });
    await new Promise((r) => setTimeout(r, Math.floor(random() * 300)));

    const write = await run('fio', [...flushed, `--uri=${uri(node)}`], { timeoutMs: 120_000, cwd: dir });
    assert.equal(write.code, 0, `cycle ${cycle} (seed ${seed}): ${write.stderr}`);
    await new Promise((r) => setTimeout(r, Math.floor(random() * 150)));
    assert.equal(await node.stop('SIGKILL'), 'SIGKILL');
    noise.kill('SIGKILL');
    await noiseDone;

    const again = await startNode({ cwd: dir, small: false, args: NODE_ARGS, timeoutMs: 30_000 });
    t.after(() => again.stop('SIGKILL').then(() => undefined));
    const verify = await run('fio', [...flushed.filter((a) => a !== '--do_verify=0'), `--uri=${uri(again)}`, '--verify_only', '--verify_fatal=1'], { timeoutMs: 120_000, cwd: dir });
    assert.equal(verify.code, 0, `cycle ${cycle} (seed ${seed}): ${verify.stderr}${verify.stdout}`);
    assert.doesNotMatch(verify.stdout + verify.stderr, /verify: bad|bad magic/, `cycle ${cycle} (seed ${seed})`);
    assert.equal(await again.stop('SIGKILL'), 'SIGKILL');
  }
});
