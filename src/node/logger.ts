// The node's logger: pino JSON lines, or pino-pretty's readable lines when asked for or
// when stdout is a terminal. Writes are synchronous so the last lines before a crash or
// a kill are on the terminal or in the file, not in a buffer.

import { pino, type Logger } from 'pino';
import pretty from 'pino-pretty';
import type { LogFormat, LogLevel } from './config.js';

export type { Logger };

export function createLogger(options: { level: LogLevel; format: LogFormat; name?: string }): Logger {
  const usePretty = options.format === 'pretty' || (options.format === 'auto' && process.stdout.isTTY);
  const base = { level: options.level, name: options.name ?? 'memstrata', base: { pid: process.pid } };
  if (usePretty) {
    return pino(base, pretty({ colorize: process.stdout.isTTY, sync: true, ignore: 'pid,hostname', translateTime: 'SYS:HH:MM:ss.l' }));
  }
  return pino(base, pino.destination({ fd: 1, sync: true }));
}
