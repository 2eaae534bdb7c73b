// The logger every layer writes to: pino's interface. Only the type lives here, at the
// bottom of the import graph, so a subsystem can log without importing the daemon;
// node/logger.ts makes the concrete one.

export type { Logger } from 'pino';
