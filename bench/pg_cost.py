"""What a benchmark run costs PostgreSQL: statements, round trips, transactions, CPU.

`StatementCounter` is a TCP relay between dynamo and PostgreSQL (127.0.0.1, no TLS: the
DSN it gives says sslmode=disable) that reads the frontend messages of the wire protocol
as they pass: every simple Query ('Q', whose statements are counted by their `;`), every
Execute ('E') of a prepared statement, every Parse ('P', a statement prepared) and every
Sync ('S'). A round trip is a Query or a Sync. Statements are tallied by their first
word (begin, commit, select, update, ... and "reset" for the reset query asyncpg runs
when a pooled connection is released). On the way back it reads the server's
ReadyForQuery ('Z') messages: a transaction is counted each time the connection comes
back to idle ('I') after statements ran (an autocommit statement, or COMMIT/ROLLBACK of
a block), which is exact, where pg_stat_database's counts reach the statistics only
when a backend flushes them (at most once a second, later when it is idle) and can be
off by half in a run of seconds.

`BackendCpu` follows the server processes of one database (pg_stat_activity, polled) and
sums their CPU time with psutil, so that other databases on the same server (other jobs)
do not count. `transactions()` reads pg_stat_database's commits and rollbacks.
"""

from __future__ import annotations

import collections
import re
import struct

import asyncpg
import psutil
import trio
from trio_asyncio import aio_as_trio

from tests.support import infra

RELAY_CHUNK = 65536
POLL_S = 0.5
OPENING_CHARS = 90
_FIRST_WORD = re.compile(r"\s*(?:--[^\n]*\n\s*)*\(?\s*([A-Za-z_]+)")
# The statements of asyncpg's reset query, one name for the lot.
_RESET_WORDS = {"pg_advisory_unlock_all", "close", "unlisten", "reset"}


def first_word(sql: str) -> str:
    match = _FIRST_WORD.match(sql)
    word = match.group(1).lower() if match else "?"
    if word == "select" and "pg_advisory_unlock_all" in sql:
        return "reset"
    return "reset" if word in _RESET_WORDS else word


def opening(sql: str) -> str:
    """A statement's first words, on one line, to tell statements apart in a tally."""
    return " ".join(sql.split())[:OPENING_CHARS]


class StatementCounter:
    """A relay to PostgreSQL that counts what its clients send."""

    def __init__(self, target_port: int = 5432):
        self.target_port = target_port
        self.port: int | None = None
        self.statements: collections.Counter[str] = collections.Counter()
        self.texts: collections.Counter[str] = collections.Counter()  # each one's opening
        self.round_trips = 0
        self.parses = 0
        self.transactions = 0
        self.connections = 0

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def snapshot(self) -> tuple[collections.Counter[str], int, int, collections.Counter[str], int]:
        return (collections.Counter(self.statements), self.round_trips, self.parses,
                collections.Counter(self.texts), self.transactions)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:
            frontend = _Frontend(self)
            async with trio.open_nursery() as pipes:
                pipes.start_soon(self._pump, server, client, _Backend(frontend), pipes.cancel_scope)
                pipes.start_soon(self._pump, client, server, frontend, pipes.cancel_scope)

    @staticmethod
    async def _pump(source, sink, parser, done: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(RELAY_CHUNK):
                if parser is not None:
                    parser.feed(data)
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        done.cancel()


class _Frontend:
    """The client's side of one connection: the startup message, then typed messages."""

    def __init__(self, counter: StatementCounter):
        self.counter = counter
        self.buffer = bytearray()
        self.started = False
        self.prepared: dict[bytes, str] = {}  # statement name -> its first word
        self.bound: str = "?"
        self.ran = False  # a statement was sent since the server was last ready

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if not self.started:
                if len(self.buffer) < 8:
                    return
                (length,) = struct.unpack("!I", self.buffer[:4])
                if len(self.buffer) < length:
                    return
                code = struct.unpack("!I", self.buffer[4:8])[0]
                del self.buffer[:length]
                self.started = code != 80877103  # SSLRequest: the real startup comes next
                continue
            if len(self.buffer) < 5:
                return
            kind = chr(self.buffer[0])
            (length,) = struct.unpack("!I", self.buffer[1:5])
            if len(self.buffer) < 1 + length:
                return
            body = bytes(self.buffer[5 : 1 + length])
            del self.buffer[: 1 + length]
            self.message(kind, body)

    def message(self, kind: str, body: bytes) -> None:
        counter = self.counter
        if kind == "Q":
            counter.round_trips += 1
            self.ran = True
            sql = body.rstrip(b"\0").decode(errors="replace")
            for part in sql.split(";"):
                if part.strip():
                    counter.statements[first_word(part)] += 1
                    counter.texts[opening(part)] += 1
        elif kind == "P":
            name, _, rest = body.partition(b"\0")
            query = rest.partition(b"\0")[0].decode(errors="replace")
            self.prepared[name] = opening(query)
            counter.parses += 1
        elif kind == "B":
            _portal, _, rest = body.partition(b"\0")
            self.bound = self.prepared.get(rest.partition(b"\0")[0], "?")
        elif kind == "E":
            self.ran = True
            counter.statements[first_word(self.bound)] += 1
            counter.texts[self.bound] += 1
        elif kind == "S":
            counter.round_trips += 1


class _Backend:
    """The server's side of one connection (no SSL: typed messages from the first byte):
    only ReadyForQuery matters, for the transactions its frontend's statements made."""

    def __init__(self, frontend: _Frontend):
        self.frontend = frontend
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data
        at = 0
        while len(self.buffer) - at >= 5:
            (length,) = struct.unpack_from("!I", self.buffer, at + 1)
            if len(self.buffer) - at < 1 + length:
                break
            if self.buffer[at] == ord("Z"):
                self.ready(self.buffer[at + 5])
            at += 1 + length
        del self.buffer[:at]

    def ready(self, status: int) -> None:
        # 'I': idle, 'T': in a transaction block, 'E': in a failed one.
        if status == ord("I") and self.frontend.ran:
            self.frontend.counter.transactions += 1
        if status == ord("I"):
            self.frontend.ran = False


class BackendCpu:
    """CPU seconds of the server processes serving `database`, followed while it runs."""

    def __init__(self, database: str):
        self.database = database
        self.processes: dict[int, psutil.Process] = {}
        self.start: dict[int, float] = {}
        self.last: dict[int, float] = {}

    async def follow(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        conn = await aio_as_trio(asyncpg.connect)(infra.PG_ADMIN_DSN)
        try:
            started = False
            while True:
                pids = await aio_as_trio(conn.fetch)(
                    "select pid from pg_stat_activity where datname = $1", self.database)
                for row in pids:
                    self._see(row["pid"], first=not started)
                self.sample()
                if not started:
                    started = True
                    task_status.started(self)
                await trio.sleep(POLL_S)
        finally:
            with trio.CancelScope(shield=True):
                await aio_as_trio(conn.close)()

    def _see(self, pid: int, *, first: bool) -> None:
        if pid in self.processes:
            return
        try:
            process = psutil.Process(pid)
            times = process.cpu_times()
        except psutil.Error:
            return
        self.processes[pid] = process
        # A backend seen at the start counts from then; one that appears later, whole.
        self.start[pid] = times.user + times.system if first else 0.0

    def sample(self) -> None:
        for pid, process in self.processes.items():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue  # gone: its last sample stands
            self.last[pid] = times.user + times.system

    def reset(self) -> None:
        """Counts from now on (a backend that appears later counts whole)."""
        self.sample()
        self.start = {pid: self.last.get(pid, 0.0) for pid in self.processes}

    def seconds(self) -> float:
        self.sample()
        return sum(self.last.get(pid, start) - start for pid, start in self.start.items())


async def transactions(database: str) -> int:
    """Commits and rollbacks of `database` so far (the statistics lag by up to a second)."""
    conn = await aio_as_trio(asyncpg.connect)(infra.PG_ADMIN_DSN)
    try:
        return await aio_as_trio(conn.fetchval)(
            "select xact_commit + xact_rollback from pg_stat_database where datname = $1",
            database)
    finally:
        await aio_as_trio(conn.close)()
