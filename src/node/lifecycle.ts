// Ordered start-up and shutdown. Steps start in the order added; stop runs in reverse,
// each step after the one above it has drained. A step that fails to start stops the
// ones already started, in reverse, before the error is passed on. Stop is idempotent
// and keeps going past a failing step so the lock is always released last.

import { toMemstrataError } from '../errors.js';
import type { Logger } from './logger.js';

export interface Step {
  name: string;
  start(): Promise<void>;
  stop(): Promise<void>;
}

export class Lifecycle {
  private readonly steps: Step[];
  private readonly started: Step[];
  private readonly log: Logger;
  private stopping: Promise<void> | undefined;

  constructor(log: Logger) {
    this.steps = [];
    this.started = [];
    this.log = log;
    this.stopping = undefined;
  }

  add(step: Step): void {
    this.steps.push(step);
  }

  async start(): Promise<void> {
    for (const step of this.steps) {
      const t0 = performance.now();
      try {
        await step.start();
      } catch (error) {
        this.log.error({ step: step.name, err: error }, 'start-up failed');
        await this.stop();
        throw error;
      }
      this.started.push(step);
      this.log.debug({ step: step.name, ms: Math.round(performance.now() - t0) }, 'started');
    }
  }

  stop(): Promise<void> {
    this.stopping ??= this.stopAll();
    return this.stopping;
  }

  private async stopAll(): Promise<void> {
    let failure: unknown;
    for (const step of [...this.started].reverse()) {
      const t0 = performance.now();
      try {
        await step.stop();
        this.log.debug({ step: step.name, ms: Math.round(performance.now() - t0) }, 'stopped');
      } catch (error) {
        failure ??= error;
        this.log.error({ step: step.name, err: error }, 'stop failed');
      }
    }
    this.started.length = 0;
    if (failure !== undefined) throw toMemstrataError(failure);
  }
}
