// Ordered start-up and shutdown. Steps start in the order added; stop runs in reverse,
// each step after the one above it has drained. A step that fails to start stops the
// ones already started, in reverse, before the error is passed on. Stop is idempotent
// and keeps going past a failing step so the lock is always released last.
//
// A lifecycle runs once: start() a second time, or after stop(), is refused
// (MS_NODE_STARTED), since a stopped step is not made to start again. stop() during
// start() waits for the step that is starting, starts no more, and stops every step that
// started (start() then rejects with MS_SHUTTING_DOWN), so no step is left running
// behind a stop that has returned.

import { MisuseError, RuntimeError, toMemstrataError } from '../errors.js';
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
  private starting: Promise<void> | undefined;
  private stopping: Promise<void> | undefined;

  constructor(log: Logger) {
    this.steps = [];
    this.started = [];
    this.log = log;
    this.starting = undefined;
    this.stopping = undefined;
  }

  add(step: Step): void {
    this.steps.push(step);
  }

  start(): Promise<void> {
    if (this.starting !== undefined || this.stopping !== undefined) {
      const what = this.starting === undefined ? 'was stopped before it started' : 'was started before';
      return Promise.reject(new MisuseError('MS_NODE_STARTED', `a node starts once: this one ${what}; make a new one`));
    }
    this.starting = this.startAll();
    return this.starting;
  }

  stop(): Promise<void> {
    // While start() runs, its step in progress finishes first; it starts nothing after.
    this.stopping ??= (this.starting ?? Promise.resolve()).then(
      () => this.stopAll(),
      () => this.stopAll(),
    );
    return this.stopping;
  }

  private async startAll(): Promise<void> {
    for (const step of this.steps) {
      if (this.stopping !== undefined) {
        this.log.warn({ step: step.name }, 'stopped while starting: the steps started so far are stopped');
        throw new RuntimeError('MS_SHUTTING_DOWN', `the node was stopped while it started, before ${step.name}`);
      }
      const t0 = performance.now();
      try {
        await step.start();
      } catch (error) {
        this.log.error({ step: step.name, err: error }, 'start-up failed');
        // Not stop(): it waits for start() to settle, that is for this. A step that fails
        // to stop is logged there; the error passed on is the one that failed start-up.
        await this.stopAll().catch(() => undefined);
        throw error;
      }
      this.started.push(step);
      this.log.debug({ step: step.name, ms: Math.round(performance.now() - t0) }, 'started');
    }
  }

  private async stopAll(): Promise<void> {
    let failure: unknown;
    while (this.started.length > 0) {
      const step = this.started.pop() as Step;
      const t0 = performance.now();
      try {
        await step.stop();
        this.log.debug({ step: step.name, ms: Math.round(performance.now() - t0) }, 'stopped');
      } catch (error) {
        failure ??= error;
        this.log.error({ step: step.name, err: error }, 'stop failed');
      }
    }
    if (failure !== undefined) throw toMemstrataError(failure);
  }
}
