// Ordered start-up and shutdown. Steps start in the order added; stop runs in reverse,
// each step after the one above it has drained. A step that fails to start stops the
// ones already started, in reverse, before the error is passed on. Stop is idempotent
// and keeps going past a failing step so the lock is always released last.
//
// A lifecycle runs once: start() a second time, or after stop(), is refused
// (MS_NODE_STARTED), since a stopped step is not made to start again. stop() during
// start() waits for the step that is starting, starts no more, and stops every step that
// started; start() then rejects with MS_SHUTTING_DOWN (or with the step's own error if it
// failed), once those steps are stopped, so no step is left running behind a stop or a
// start that has settled, and a stop() made before the last step has finished starting
// never lets start() report the node started. (One made in the few microtasks between
// the last step's end and start()'s own settling may find it started, and stops it.)
// Hence a step's start() must never wait for stop(): that would wait for itself. A step
// that fails to start must undo its own part; the steps before it are stopped. A failure
// to stop a step is reported by every stop(), including one after a failed start-up,
// whose own error is the start's.

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
  /** The first failure to stop a step: every stop() rejects with it from then on. */
  private stopFailure: { error: unknown } | undefined;

  constructor(log: Logger) {
    this.steps = [];
    this.started = [];
    this.log = log;
    this.starting = undefined;
    this.stopping = undefined;
    this.stopFailure = undefined;
  }

  add(step: Step): void {
    this.steps.push(step);
  }

  start(): Promise<void> {
    if (this.starting !== undefined || this.stopping !== undefined) {
      const what = this.starting === undefined ? 'was stopped before it started' : 'was started before';
      return Promise.reject(new MisuseError('MS_NODE_STARTED', `a node starts once: this one ${what}; make a new one`));
    }
    // Set before the first step runs (startAll would run it in this same turn), so that a
    // stop() from inside that step's first turn waits for it too.
    this.starting = Promise.resolve().then(() => this.startAll());
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
      if (this.stopping !== undefined) throw await this.stoppedWhileStarting(`before ${step.name}`);
      const t0 = performance.now();
      try {
        await step.start();
      } catch (error) {
        this.log.error({ step: step.name, err: error }, 'start-up failed');
        // Not stop(): it waits for start() to settle, that is for this. A failure to stop
        // a step is logged and kept for stop(); the error passed on is the start's.
        await this.stopAll().catch(() => undefined);
        throw error;
      }
      this.started.push(step);
      this.log.debug({ step: step.name, ms: Math.round(performance.now() - t0) }, 'started');
    }
    // Stopped during the last step: every step started, and they are all stopped now.
    if (this.stopping !== undefined) throw await this.stoppedWhileStarting('after the last step');
  }

  /** Stops the steps started so far (as a failed start-up does), then gives the error start() rejects with. */
  private async stoppedWhileStarting(where: string): Promise<Error> {
    this.log.warn({ where }, 'stopped while starting: the steps started so far are stopped');
    // Not stop(): it waits for start() to settle. Its own stopAll then finds nothing left
    // and reports a failure to stop kept from this one.
    await this.stopAll().catch(() => undefined);
    return new RuntimeError('MS_SHUTTING_DOWN', `the node was stopped while it started (${where})`);
  }

  private async stopAll(): Promise<void> {
    while (this.started.length > 0) {
      const step = this.started.pop() as Step;
      const t0 = performance.now();
      try {
        await step.stop();
        this.log.debug({ step: step.name, ms: Math.round(performance.now() - t0) }, 'stopped');
      } catch (error) {
        this.stopFailure ??= { error };
        this.log.error({ step: step.name, err: error }, 'stop failed');
      }
    }
    if (this.stopFailure !== undefined) throw toMemstrataError(this.stopFailure.error);
  }
}
