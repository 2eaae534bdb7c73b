// journaled-kv: a small key-value service that runs as a memstrata guest and uses the
// node's NVRAM as its journal, the way the EMC seed has a guest OS journal to global
// memory. It is the README's worked example.
//
//   PUT /kv/KEY  (body: the value)  -> 204 once the put is in the NVRAM journal
//   GET /kv/KEY                     -> 200 with the value, or 404
//   GET /healthz                    -> 200 once it has replayed its journal
//
// Where things live (all reached through the guest's cut-through sockets):
//
//   NVRAM device (MEMSTRATA_NVRAM_DEVICES, first,   one timestamped record per put:
//     or one it allocates itself: --nvram-quota)
//                                                   {k, v}, target = {volume, page offset}
//   volume (MEMSTRATA_CTD_VOLUMES, first)           one 4 KiB page per key:
//                                                   "KVP1" | u32 length | f64 seq | {k, v}
//
// A put is acknowledged once its record is in the journal (what a commit costs: a memory
// write on the node). Pages are written afterwards; every CHECKPOINT_EVERY puts (or
// second) the applied pages are flushed on the volume and the journal is trimmed up to
// the last record they hold. At boot the service reads every page, then replays the
// journal: a record newer than its page is applied again. So a kill -9 or a `guest reset`
// at any moment loses no acknowledged put. Each boot opens the journal with a newer
// epoch (the clock), which fences an older instance that might still be running.
//
// Limits of an example: values up to about 4000 bytes, no deletes, one key per page, the
// whole index in memory.

import { createServer } from 'node:http';
import { NbdClient, RmemClient } from 'memstrata/client';

const PAGE = 4096;
const HEADER = 16;
const MAGIC = 'KVP1';
const CHECKPOINT_EVERY = 64;
const CHECKPOINT_MS = 1000;

const env = process.env;
const port = Number(env.KV_PORT ?? 7379);
const attached = (env.MEMSTRATA_NVRAM_DEVICES ?? '').split(',')[0];
const volume = (env.MEMSTRATA_CTD_VOLUMES ?? '').split(',')[0];
if (!volume || !env.MEMSTRATA_NVRAM_SOCKET || !env.MEMSTRATA_CTD_SOCKET) {
  console.error('journaled-kv: run it as a guest with a volume attached (--volume V) and an NVRAM device (--nvram D) or a quota to allocate one (--nvram-quota SIZE)');
  process.exit(2);
}

// ---- the volume: one page per key ----

const nbd = await NbdClient.connect({ path: env.MEMSTRATA_CTD_SOCKET, export: volume });
const slots = Math.min(Math.floor(nbd.size / PAGE), 1 << 16);
/** key -> { slot, seq, value } */
const index = new Map();
/** slot -> key, for the slots in use */
const used = new Map();

function encodePage(seq, key, value) {
  const body = Buffer.from(JSON.stringify({ k: key, v: value }));
  if (HEADER + body.length > PAGE) throw new Error('value too large');
  const page = Buffer.alloc(PAGE);
  page.write(MAGIC, 0, 'latin1');
  page.writeUInt32LE(body.length, 4);
  page.writeDoubleLE(seq, 8);
  body.copy(page, HEADER);
  return page;
}

function decodePage(page) {
  if (page.toString('latin1', 0, 4) !== MAGIC) return undefined;
  const length = page.readUInt32LE(4);
  if (HEADER + length > PAGE) return undefined;
  const { k, v } = JSON.parse(page.toString('utf8', HEADER, HEADER + length));
  return { seq: page.readDoubleLE(8), key: k, value: v };
}

for (let first = 0; first < slots; first += 256) {
  const count = Math.min(256, slots - first);
  const chunk = await nbd.read(first * PAGE, count * PAGE);
  for (let i = 0; i < count; i++) {
    const page = decodePage(chunk.subarray(i * PAGE, (i + 1) * PAGE));
    if (page === undefined) continue;
    used.set(first + i, page.key);
    // A key in two pages (an older build could do that): the newer record wins.
    const known = index.get(page.key);
    if (known === undefined || known.seq < page.seq) index.set(page.key, { slot: first + i, seq: page.seq, value: page.value });
  }
}

/** Slots given to keys whose first put is not acknowledged yet: a second put waits for none. */
const assigned = new Map();

/** The key's slot: its own (or the one its first put took), else a free one by linear probing from its hash. */
function slotFor(key) {
  const known = index.get(key) ?? assigned.get(key);
  if (known !== undefined) return typeof known === 'number' ? known : known.slot;
  let h = 2166136261;
  for (const c of Buffer.from(key)) h = Math.imul(h ^ c, 16777619) >>> 0;
  for (let i = 0; i < slots; i++) {
    const slot = (h + i) % slots;
    if (!used.has(slot)) return slot;
  }
  throw new Error('the volume is full');
}

/** Page writes in flight, per slot, so two puts of one key land in order. */
const writing = new Map();
function writePage(slot, seq, key, value) {
  const before = writing.get(slot) ?? Promise.resolve();
  const done = before.then(() => nbd.write(slot * PAGE, encodePage(seq, key, value)));
  writing.set(slot, done.catch(() => undefined));
  return done;
}

// ---- the journal: one record per put ----

const rmem = await RmemClient.connect({ path: env.MEMSTRATA_NVRAM_SOCKET, serverId: 'journaled-kv', keepalive: true });
// No device attached: allocate one of its own, within the guest's NVRAM quota (it stays
// attached, so the next boot finds it in MEMSTRATA_NVRAM_DEVICES).
const device = attached || `${env.MEMSTRATA_GUEST}-journal`;
if (!attached) await rmem.journalCreate(device, Number(env.KV_JOURNAL_BYTES ?? 4 << 20), 'local');
const journal = await rmem.journalOpen(device, Date.now());
let replayed = 0;
for (let from = journal.info.firstSeq; from !== 0 && from <= journal.info.lastSeq;) {
  const records = await rmem.journalRead(journal, from);
  if (records.length === 0) break;
  for (const record of records) {
    const { k, v } = JSON.parse(Buffer.from(record.payload).toString());
    const slot = record.target.offset / PAGE;
    const known = index.get(k);
    if (known === undefined || known.seq < record.seq) {
      index.set(k, { slot, seq: record.seq, value: v });
      used.set(slot, k);
      await writePage(slot, record.seq, k, v);
      replayed++;
    }
    from = record.seq + 1;
  }
}
await nbd.flush();
if (journal.info.lastSeq > 0) await rmem.journalTrim(journal, journal.info.lastSeq);
console.log(`journaled-kv: ${index.size} keys on ${volume}, ${replayed} replayed from ${device}`);

// ---- checkpoints: flush the pages, then trim what they hold ----

let appliedSeq = 0;
let sinceCheckpoint = 0;
let checkpointing = Promise.resolve();
function checkpoint() {
  checkpointing = checkpointing.then(async () => {
    if (sinceCheckpoint === 0) return;
    const upTo = appliedSeq;
    sinceCheckpoint = 0;
    await Promise.all(writing.values());
    await nbd.flush();
    await rmem.journalTrim(journal, upTo);
  }).catch((error) => {
    console.error(`journaled-kv: checkpoint failed: ${error.message}`);
    process.exit(1);
  });
  return checkpointing;
}
setInterval(checkpoint, CHECKPOINT_MS).unref();

/** Records appended whose pages are not yet written, lowest first: the trim may not pass them. */
const unapplied = new Set();

async function put(key, value) {
  const slot = slotFor(key);
  used.set(slot, key);
  assigned.set(key, slot);
  const [ack] = await rmem.journalAppend(journal, [{ payload: Buffer.from(JSON.stringify({ k: key, v: value })), target: { volume, offset: slot * PAGE } }]);
  // Acknowledged: it is in NVRAM. What follows only makes the page catch up.
  const known = index.get(key);
  if (known === undefined || known.seq < ack.seq) index.set(key, { slot, seq: ack.seq, value });
  unapplied.add(ack.seq);
  writePage(slot, ack.seq, key, value).then(() => {
    unapplied.delete(ack.seq);
    const lowest = Math.min(...unapplied);
    appliedSeq = Math.max(appliedSeq, unapplied.size === 0 ? ack.seq : lowest - 1);
    if (++sinceCheckpoint >= CHECKPOINT_EVERY) void checkpoint();
  }, (error) => {
    console.error(`journaled-kv: page write failed: ${error.message}`);
    process.exit(1);
  });
}

// ---- the service ----

const server = createServer(async (request, response) => {
  const url = new URL(request.url ?? '/', 'http://kv');
  if (url.pathname === '/healthz') return void response.end('ok\n');
  const key = decodeURIComponent(url.pathname.replace(/^\/kv\//, ''));
  if (!url.pathname.startsWith('/kv/') || key === '') {
    response.statusCode = 404;
    return void response.end();
  }
  try {
    if (request.method === 'PUT') {
      const chunks = [];
      for await (const chunk of request) chunks.push(chunk);
      await put(key, Buffer.concat(chunks).toString());
      response.statusCode = 204;
      return void response.end();
    }
    const entry = index.get(key);
    response.statusCode = entry === undefined ? 404 : 200;
    response.end(entry?.value);
  } catch (error) {
    response.statusCode = 500;
    response.end(`${error.code ?? 'error'}: ${error.message}\n`);
  }
});
server.listen(port, '127.0.0.1', () => console.log(`journaled-kv: listening on 127.0.0.1:${port}`));

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.once(signal, async () => {
    server.close();
    await checkpoint();
    await rmem.close();
    await nbd.close();
    process.exit(0);
  });
}
