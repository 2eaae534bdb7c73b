// A small deterministic generator (xorshift32) for crash loops and schedules: a failing
// cycle prints its seed, and the same seed replays the same choices.

export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 4294967296;
  };
}
