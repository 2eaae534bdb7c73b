// Load on a journal from many lanes, and the check afterwards: every acknowledged record
// on the device exactly once, where its acknowledgement said, in the writer's order.

import assert from 'node:assert/strict';
import type { MultipathJournal, RmemClient, Journal, JournalRecord } from '../../src/client/index.js';
import { RECORD_FLAG } from '../../src/protocol/journal/record.js';

export async function readAll(c: RmemClient, journal: Journal): Promise<JournalRecord[]> {
  const out: JournalRecord[] = [];
  for (;;) {
    const batch = await c.journalRead(journal, (out.at(-1)?.seq ?? 0) + 1);
    if (batch.length === 0) return out;
    out.push(...batch);
  }
}

/** Lanes appending unique payloads until stopped; what was acknowledged, by payload. */
export function appenders(journal: MultipathJournal, lanes: number) {
  const acked = new Map<string, number>();
  const failures: string[] = [];
  let next = 0;
  let stop = false;
  const lane = async (): Promise<void> => {
    while (!stop) {
      const payload = `r${next++}`;
      try {
        const [ack] = await journal.append([{ payload: Buffer.from(payload) }]);
        if (ack !== undefined) acked.set(payload, ack.seq);
      } catch (error) {
        failures.push(`${payload}: ${(error as Error).message}`);
        return;
      }
    }
  };
  const running = Array.from({ length: lanes }, () => lane());
  return {
    acked,
    failures,
    count: () => acked.size,
    stop: async () => {
      stop = true;
      await Promise.all(running);
    },
  };
}

/** Every acknowledged payload once, no payload twice, this writer's numbers in increasing order. Void records (appends that failed after taking their number) hold nothing and are skipped. */
export function checkExactlyOnce(records: readonly JournalRecord[], acked: ReadonlyMap<string, number>, writerId: string): void {
  const seen = new Map<string, number>();
  for (const r of records) {
    if ((r.flags & RECORD_FLAG.VOID) !== 0) continue;
    const text = Buffer.from(r.payload).toString();
    assert.ok(!seen.has(text), `record ${text} is on the device twice (seq ${seen.get(text)} and ${r.seq})`);
    seen.set(text, r.seq);
  }
  for (const [payload, seq] of acked) assert.equal(seen.get(payload), seq, `acknowledged ${payload} (seq ${seq}) is not where its acknowledgement said`);
  const numbers = records.filter((r) => r.writer?.id === writerId).map((r) => r.writer?.seq ?? 0);
  for (let i = 1; i < numbers.length; i++) assert.ok((numbers[i] ?? 0) > (numbers[i - 1] ?? 0), `writer numbers out of order at ${i}: ${numbers[i - 1]} then ${numbers[i]}`);
  assert.deepEqual(records.map((r) => r.seq), records.map((_, i) => (records[0]?.seq ?? 1) + i), 'sequence numbers without a gap');
}

