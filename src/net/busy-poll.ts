// Busy polling: after a server connection hands the node's event loop a chunk of input,
// or hands the kernel a tick's replies, the loop keeps polling for the next chunk for a
// short window instead of going to sleep in epoll_wait. Replies poke too, so a request
// that took longer than the window (a journal sync) still finds the loop awake for the
// client's next one. A turn queued with setImmediate makes libuv wait for I/O with a
// zero timeout; each turn queues the next until the window has passed since the last
// poke.
//
// Why: on a machine whose idle cores halt (a virtual machine's vCPU, or a server with
// deep C-states), a request that finds the node's thread asleep pays for waking it up,
// and in this project's VM that wake-up is most of a request's round trip: rmem 4 KiB
// READ at one in flight 81-88 us p50 sleeping, 28-29 us polling (docs/BENCHMARKS.md,
// "busy polling"). Poll-mode storage targets (SPDK) and Linux's `busy_poll` buy the
// same latency the same way: with CPU.
//
// What it costs: while requests keep arriving within the window of each other, the
// node's main thread never sleeps (a core while it serves, however light the load).
// When they stop, it sleeps again one window after the last one. So it is off by default
// (`node.busyPoll` 0); the time in polling mode is counted (`pollingSeconds`: from a
// stretch's first poke to one window after its last, serving included, so an upper bound
// on what polling cost) and shown with the node's metrics, so an operator sees it.
//
// Invariants:
//   - polling only adds turns of the loop: it changes how soon the loop notices I/O,
//     never what a callback does or the order of the loop's phases, so nothing it does
//     can change a reply;
//   - at most one turn is queued at a time, however many chunks arrive;
//   - once stop() is called no turn is queued again, so a node shutting down is not kept
//     alive by its own polling (a queued setImmediate holds the loop open).

import type { InputHandlers, SocketInput } from './socket-input.js';

/** The longest window `node.busyPoll` takes, in microseconds. */
export const BUSY_POLL_MAX_US = 10_000;

export class BusyPoll {
  /** The window in milliseconds; 0: off. */
  private readonly windowMs: number;
  private readonly clock: () => number;
  /** Polling goes on until this time (the clock's ms). */
  private until: number;
  /** A turn is queued. */
  private polling: boolean;
  /** When the current stretch of polling began. */
  private since: number;
  private stopped: boolean;
  /** Milliseconds spent polling in stretches that ended. */
  private polledMs: number;
  private readonly turnBound: () => void;
  /** poke(), bound: for a server connection's CorkedWriter, told when its replies go out. */
  readonly pokeFn: (() => void) | undefined;

  /** `windowUs`: how long the loop polls after the last poke, in microseconds (0: never). */
  constructor(windowUs: number, clock: () => number = () => performance.now()) {
    this.windowMs = windowUs / 1000;
    this.clock = clock;
    this.until = 0;
    this.polling = false;
    this.since = 0;
    this.stopped = false;
    this.polledMs = 0;
    this.turnBound = () => {
      this.turn();
    };
    this.pokeFn = windowUs > 0
      ? () => {
          this.poke();
        }
      : undefined;
  }

  get enabled(): boolean {
    return this.windowMs > 0 && !this.stopped;
  }

  /** The loop is polling now. */
  get active(): boolean {
    return this.polling;
  }

  /** Seconds the loop has spent in polling mode (serving included), the current stretch too. */
  get pollingSeconds(): number {
    return (this.polledMs + (this.polling ? this.clock() - this.since : 0)) / 1000;
  }

  /** Input arrived or replies went out: poll until the window has passed from now. */
  poke(): void {
    if (this.windowMs === 0 || this.stopped) return;
    const now = this.clock();
    this.until = now + this.windowMs;
    if (this.polling) return;
    this.polling = true;
    this.since = now;
    setImmediate(this.turnBound);
  }

  /** No more polling: the turn queued, if any, is the last. */
  stop(): void {
    this.stopped = true;
  }

  /**
   * `input`, with every chunk it hands over poking this first; `input` itself while
   * polling is off.
   */
  input(input: SocketInput): SocketInput {
    if (!this.enabled) return input;
    const wrap = (handlers: InputHandlers): InputHandlers => ({
      data: (chunk) => {
        this.poke();
        handlers.data(chunk);
      },
      end: () => {
        handlers.end();
      },
      ...(handlers.target === undefined ? {} : { target: () => handlers.target?.() }),
    });
    return {
      socket: input.socket,
      transient: input.transient,
      listen: (handlers) => {
        input.listen(handlers === undefined ? undefined : wrap(handlers));
      },
      isPaused: () => input.isPaused(),
      pendingBytes: () => input.pendingBytes(),
      pause: () => {
        input.pause();
      },
      resume: () => {
        input.resume();
      },
    };
  }

  private turn(): void {
    const now = this.clock();
    if (now < this.until && !this.stopped) {
      setImmediate(this.turnBound);
      return;
    }
    this.polling = false;
    this.polledMs += now - this.since;
  }
}
