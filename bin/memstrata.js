#!/usr/bin/env node
// The `memstrata` command. The CLI itself is compiled into dist/ (npm run build; npm start
// and npm test build it too); this file is committed executable, which tsc's output is
// not, so `npx memstrata` works in a fresh clone.

try {
  await import('../dist/src/cli/main.js');
} catch (error) {
  if (error?.code === 'ERR_MODULE_NOT_FOUND' && String(error.message).includes('dist/src/cli/main.js')) {
    process.stderr.write('memstrata: MS_INTERNAL: the CLI is not built yet; run npm run build (or npm start) in the memstrata directory first\n');
    process.exit(1);
  }
  throw error;
}
