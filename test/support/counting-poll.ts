// A BusyPoll that counts its pokes, stopped when the test ends: the server tests check
// with it that a connection pokes the poll for its input and again for its reply.

import { BusyPoll } from '../../src/net/busy-poll.js';

export class CountingPoll extends BusyPoll {
  pokes = 0;

  override poke(): void {
    this.pokes++;
    super.poke();
  }
}

/** A CountingPoll with a 100 us window on the real clock, stopped when the test ends. */
export function countingPoll(t: { after(fn: () => void): void }): CountingPoll {
  const poll = new CountingPoll(100);
  t.after(() => {
    poll.stop();
  });
  return poll;
}
