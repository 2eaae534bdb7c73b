// The floor of an NBD server in Node.js, for bench/nbd: the least a server on this
// runtime can do per request. One export held in one Buffer; the fixed newstyle
// handshake with NBD_OPT_GO (every other option is answered NBD_REP_ERR_UNSUP);
// simple replies; READ, WRITE, FLUSH and DISC. Nothing else: no cache, no lock, no
// promise, no pool, no validation of what a client sends (never point anything but a
// benchmark at it). What memstrata's QD1 latency is above this is memstrata's; what
// this is above nbdkit is Node.js's event loop and its socket I/O.
//
//   node dist/bench/support/floor-nbd.js <port> <bytes>     prints "listening" when ready

import { createServer, type Socket } from 'node:net';

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const REPLY_MAGIC = 0x3e889045565a9n;
const SIMPLE_REPLY = 0x67446698;
const OPT_EXPORT_NAME = 1;
const OPT_INFO = 6;
const OPT_GO = 7;
const REP_ACK = 1;
const REP_INFO = 3;
const REP_ERR_UNSUP = 0x80000001;
const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const FLAGS = 1 | 4 | 0x100; // HAS_FLAGS, SEND_FLUSH, CAN_MULTI_CONN

const port = Number(process.argv[2]);
const size = Number(process.argv[3]);
const disk = Buffer.alloc(size);

function serve(socket: Socket): void {
  socket.setNoDelay(true);
  const greeting = Buffer.alloc(18);
  greeting.writeBigUInt64BE(NBDMAGIC, 0);
  greeting.writeBigUInt64BE(IHAVEOPT, 8);
  greeting.writeUInt16BE(3, 16); // FIXED_NEWSTYLE, NO_ZEROES
  socket.write(greeting);
  let pending: Buffer = Buffer.alloc(0);
  let phase: 'flags' | 'options' | 'transmission' = 'flags';
  const optionReply = (option: number, type: number, data: Buffer = Buffer.alloc(0)): void => {
    const head = Buffer.alloc(20);
    head.writeBigUInt64BE(REPLY_MAGIC, 0);
    head.writeUInt32BE(option, 8);
    head.writeUInt32BE(type, 12);
    head.writeUInt32BE(data.length, 16);
    socket.write(Buffer.concat([head, data]));
  };
  socket.on('data', (chunk: Buffer) => {
    pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
    for (;;) {
      if (phase === 'flags') {
        if (pending.length < 4) return;
        pending = pending.subarray(4);
        phase = 'options';
      } else if (phase === 'options') {
        if (pending.length < 16) return;
        const option = pending.readUInt32BE(8);
        const length = pending.readUInt32BE(12);
        if (pending.length < 16 + length) return;
        pending = pending.subarray(16 + length);
        if (option === OPT_GO || option === OPT_INFO) {
          const info = Buffer.alloc(12);
          info.writeBigUInt64BE(BigInt(size), 2); // NBD_INFO_EXPORT (type 0)
          info.writeUInt16BE(FLAGS, 10);
          optionReply(option, REP_INFO, info);
          optionReply(option, REP_ACK);
          if (option === OPT_GO) phase = 'transmission';
        } else if (option === OPT_EXPORT_NAME) {
          const reply = Buffer.alloc(10);
          reply.writeBigUInt64BE(BigInt(size), 0);
          reply.writeUInt16BE(FLAGS, 8);
          socket.write(reply);
          phase = 'transmission';
        } else {
          optionReply(option, REP_ERR_UNSUP);
        }
      } else {
        if (pending.length < 28) return;
        const type = pending.readUInt16BE(6);
        const offset = Number(pending.readBigUInt64BE(16));
        const length = pending.readUInt32BE(24);
        if (type === CMD_WRITE && pending.length < 28 + length) return;
        const reply = Buffer.allocUnsafe(type === CMD_READ ? 16 + length : 16);
        reply.writeUInt32BE(SIMPLE_REPLY, 0);
        reply.writeUInt32BE(0, 4);
        pending.copy(reply, 8, 8, 16); // the cookie
        if (type === CMD_READ) disk.copy(reply, 16, offset, offset + length);
        if (type === CMD_WRITE) pending.copy(disk, offset, 28, 28 + length);
        pending = pending.subarray(type === CMD_WRITE ? 28 + length : 28);
        if (type === CMD_DISC) {
          socket.end();
          return;
        }
        socket.write(reply);
      }
    }
  });
  socket.on('error', () => socket.destroy());
}

createServer(serve).listen(port, '127.0.0.1', () => {
  console.log('listening');
});
