#!/usr/bin/env node
// Entry point of the `memstrata` binary.

import { runCli } from './program.js';

const code = await runCli(process.argv.slice(2));
// The node has drained by now; exit once stdout is flushed, without waiting on stray
// handles that a library may have left.
process.stdout.write('', () => process.exit(code));
