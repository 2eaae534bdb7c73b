// Loaded before every test file (scripts/run-tests.mjs passes it with --import): a
// property that fails prints the error it failed with (which assertion, which record)
// in its report. fast-check 4 otherwise keeps that error only as the report's `cause`,
// which node's test reporter does not print, and a failure seen once in CI then names
// its seed and counterexample but not what went wrong.

import fc from 'fast-check';

fc.configureGlobal({ includeErrorInReport: true });
