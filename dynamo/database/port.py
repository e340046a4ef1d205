"""The PostgreSQL port: every query dynamo makes, on an asyncpg pool behind trio-asyncio.

Each public method is a Trio coroutine; the asyncpg work runs as one asyncio coroutine
through `aio_as_trio`, so a transaction never spans a Trio checkpoint. Step changes are
compare-and-set (`advance`): a stage moves a request only from the step it expects, so a
duplicate or a cancelled request is noticed instead of processed twice. A step write can
carry the costs of the OpenAI calls made just before it (`costs`: `spend_store.CallCost`s),
written in the same statement whether the step moves or not (they were paid for), and
never twice (`dynamo.database.spend_store`).
"""

from __future__ import annotations

import datetime
import functools
import importlib.resources
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import trio
from trio_asyncio import aio_as_trio

from dynamo.database import changes as db_events
from dynamo.database import reads as db_reads
from dynamo.database import spend_store
from dynamo.database.errors import DatabaseUnavailable, DataRejected, driver_errors_mapped
from dynamo.domain.jobs import Step, state_for
from dynamo.supervision.retry import connect_at_startup

log = logging.getLogger(__name__)

# The schema (the repository's top-level schema.sql is a link to this file), read as a
# resource so that an installed wheel finds it.
SCHEMA = importlib.resources.files("dynamo.database") / "schema.sql"
# A few connections suffice: every stage holds one only for a single short statement.
POOL_MAX_SIZE = 8
# asyncpg closes a connection idle for 300 s by default, which costs a timer scheduled on
# every release and cancelled on the next acquire: through trio-asyncio, one more turn of
# the bridge's loop per statement (and a heap of cancelled timers). Eight connections
# kept open cost the server nothing worth that.
POOL_INACTIVE_LIFETIME_S = 0  # never closed for being idle
# How long startup waits for the database to come up before it gives up.
STARTUP_CONNECT_S = 60.0
# Lets several dynamo processes apply the schema at once without deadlocking.
SCHEMA_LOCK_KEY = 0x64796E616D6F

REQUEST_COLUMNS = """
    r.id, r.twitch_user_id, r.twitch_display_name, r.broadcast_id, r.screening_id, r.style,
    r.inputs, r.prompt, r.created_at, r.finished_at, r.error_message, r.step, r.state,
    r.source, r.expires_at, r.points_cost, r.flow_id, r.failure_reason, r.failure_detail,
    r.announced_at, r.discord_posted_at, r.orphan_suspected, r.approval_deadline,
    r.approval_decision,
    (select a.value from dynamo.answer a where a.image_request_id = r.id limit 1) as name,
    (select i.url from dynamo.image i where i.image_request_id = r.id and i.index = 0) as image_url,
    (select i.color from dynamo.image i where i.image_request_id = r.id and i.index = 0) as image_color,
    (select coalesce(sum(c.cost_usd), 0) from dynamo.openai_call c
     where c.image_request_id = r.id) as cost_usd
"""


# Returns the new row as `load_request` reads it, so that intake need not read it back.
_INSERT_REQUEST_SQL = f"""
    insert into dynamo.image_request as r (
        id, twitch_user_id, twitch_display_name, broadcast_id, screening_id, style,
        inputs, prompt, source, message_key, body_sha256, intake_acked, expires_at,
        points_cost, step, state, failure_reason, error_message, owner)
    values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
            now() + make_interval(secs => $13), $14, $15, $16, $17, $18, $19)
    on conflict (message_key) do nothing
    returning {REQUEST_COLUMNS}
"""


__all__ = ["Database", "DatabaseUnavailable", "DataRejected", "open_database"]


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is. asyncpg's default reset (advisory
    unlock all, CLOSE ALL, UNLISTEN *, RESET ALL) costs a round trip and a transaction on
    every release, about 17 a request, to undo session state dynamo never leaves: its
    locks are transaction-scoped (pg_advisory_xact_lock), its settings `set local`, it
    keeps no cursor open, and it LISTENs on a connection of its own (`db_events`). A
    transaction left open is still rolled back by asyncpg before this is called."""


class Database:
    def __init__(self, pool: asyncpg.Pool, dsn: str | None = None):
        self._pool = pool
        self._dsn = dsn  # for the change listener's own connection

    async def _run(self, fn, *args):
        with driver_errors_mapped():
            return await aio_as_trio(fn)(self._pool, *args)

    async def run_with_pool(self, fn, *args):
        """Runs the asyncio coroutine `fn(pool, *args)`: for a port module with its own SQL
        (`dynamo.database.fleet_store`); a transaction in it never spans a Trio checkpoint."""
        return await self._run(fn, *args)

    async def fetch(self, sql: str, *args) -> list[asyncpg.Record]:
        with driver_errors_mapped():
            return await aio_as_trio(self._pool.fetch)(sql, *args)

    async def fetchrow(self, sql: str, *args) -> asyncpg.Record | None:
        with driver_errors_mapped():
            return await aio_as_trio(self._pool.fetchrow)(sql, *args)

    async def fetchval(self, sql: str, *args):
        with driver_errors_mapped():
            return await aio_as_trio(self._pool.fetchval)(sql, *args)

    async def execute(self, sql: str, *args) -> str:
        with driver_errors_mapped():
            return await aio_as_trio(self._pool.execute)(sql, *args)

    async def ping(self) -> None:
        await self.fetchval("select 1")

    async def apply_schema(self) -> None:
        await self._run(_apply_schema, SCHEMA.read_text(encoding="utf-8"))

    # -- intake ---------------------------------------------------------------------

    async def insert_request(self, **fields: Any) -> tuple[uuid.UUID | None, bool]:
        """Stores a new request (the fields of `store_request`); returns (id, created). An
        existing `message_key` wins (None: that request was deleted between the two
        statements)."""
        row, created = await self.store_request(**fields, load_existing=False)
        return (None if row is None else row["id"]), created

    async def store_request(
        self,
        *,
        viewer_id: str,
        display_name: str,
        broadcast_id: int | None,
        screening_id: uuid.UUID | None,
        style: str,
        inputs: dict,
        prompt: str,
        source: str,
        owner: uuid.UUID | None,
        timeout_s: float,
        points_cost: int,
        message_key: str | None = None,
        body_sha256: str | None = None,
        intake_acked: bool = True,
        failure_reason: str | None = None,
        failure_message: str | None = None,
        load_existing: bool = True,
    ) -> tuple[asyncpg.Record | None, bool]:
        """As `insert_request`, returning the row as `load_request` reads it (of the new
        request in the same round trip; of the existing one, read after, unless
        `load_existing` is false: then only its id)."""
        request_id = uuid.uuid4()
        failed = failure_reason is not None
        step = Step.REFUNDED if failed else Step.RECEIVED
        # A NUL byte or a number out of range comes out of fetchrow as DataRejected.
        row = await self.fetchrow(
            _INSERT_REQUEST_SQL,
            request_id,
            viewer_id,
            display_name,
            broadcast_id,
            screening_id,
            style,
            inputs,
            prompt,
            source,
            message_key,
            body_sha256,
            intake_acked,
            timeout_s,
            points_cost,
            step.value,
            state_for(step, failed).value,
            failure_reason,
            failure_message,
            owner,
        )
        if row is not None:
            return row, True
        if not load_existing:
            existing = await self.fetchrow(
                "select id from dynamo.image_request where message_key = $1", message_key
            )
            return existing, False
        existing = await self.fetchrow(
            f"select {REQUEST_COLUMNS} from dynamo.image_request r where r.message_key = $1",
            message_key,
        )
        return existing, False

    async def claim_unacked_by_body(self, body_sha256: str) -> uuid.UUID | None:
        """The request stored from an identical body whose ack was never confirmed."""
        return await self.fetchval(
            """
            update dynamo.image_request set intake_acked = true
            where id = (select id from dynamo.image_request
                        where body_sha256 = $1 and not intake_acked
                        order by created_at limit 1 for update skip locked)
            returning id
            """,
            body_sha256,
        )

    async def mark_acked(self, request_id: uuid.UUID) -> None:
        await self.execute(
            "update dynamo.image_request set intake_acked = true where id = $1", request_id
        )

    # -- pipeline -------------------------------------------------------------------

    async def advance(
        self,
        request_id: uuid.UUID,
        from_steps: Iterable[Step],
        to_step: Step,
        *,
        costs: Sequence[spend_store.CallCost] = (),
        **fields: Any,
    ) -> bool:
        """Moves the request to `to_step` iff it is at one of `from_steps`; writes `costs`
        in the same statement, moved or not."""
        failed = to_step in (Step.FAILING, Step.REFUNDED) or (
            to_step is Step.DONE and "failure_reason" in fields
        )
        return await self._run(
            _advance, request_id, [s.value for s in from_steps], to_step, failed, fields, costs
        )

    async def record_late_flow(self, request_id: uuid.UUID, flow_id: str) -> bool:
        """Keeps a flow id that arrived after the request had moved on, for the record.
        False if another request adopted the flow meanwhile (it is that one's to settle)."""
        return await self._run(_record_late_flow, request_id, flow_id)

    async def load_request(self, request_id: uuid.UUID) -> asyncpg.Record | None:
        return await self.fetchrow(
            f"select {REQUEST_COLUMNS} from dynamo.image_request r where r.id = $1", request_id
        )

    async def unfinished_requests(self) -> list[asyncpg.Record]:
        return await self.fetch(
            f"select {REQUEST_COLUMNS} from dynamo.image_request r "
            "where r.step <> 'done' order by r.created_at"
        )

    async def save_name(self, request_id: uuid.UUID, prompt: str, name: str) -> None:
        await self.execute(
            """
            insert into dynamo.answer (image_request_id, prompt, value)
            select $1, $2, $3
            where not exists (select 1 from dynamo.answer where image_request_id = $1)
            """,
            request_id,
            prompt,
            name,
        )

    async def save_generated(
        self,
        request_id: uuid.UUID,
        data: bytes,
        prompt: str | None = None,
        *,
        costs: Sequence[spend_store.CallCost] = (),
    ) -> bool:
        """Keeps the raw image and moves generating → generated, in one statement;
        `prompt` (the one the image was asked with) replaces the stored prompt. `costs`
        (the image call's) are written with it, also when the request moved on meanwhile
        (cancelled): the image was paid for."""
        return await self._run(
            _save_generated, request_id, data, prompt, spend_store.calls_param(costs)
        )

    async def load_generated(self, request_id: uuid.UUID) -> bytes | None:
        return await self.fetchval(
            "select data from dynamo.generated_image where image_request_id = $1", request_id
        )

    async def save_image(self, request_id: uuid.UUID, url: str, color: str) -> bool:
        """Records the stored image and moves generated (or approved) → stored, dropping
        the raw bytes."""
        return await self._run(_save_image, request_id, url, color)

    async def mark_discord_posted(self, request_id: uuid.UUID) -> bool:
        status = await self.execute(
            "update dynamo.image_request set discord_posted_at = now() "
            "where id = $1 and discord_posted_at is null",
            request_id,
        )
        return status.endswith(" 1")

    # -- ownership and resume ---------------------------------------------------------

    async def heartbeat(self, worker_id: uuid.UUID, hostname: str, pid: int) -> None:
        await self.execute(
            "insert into dynamo.worker (id, hostname, pid) values ($1, $2, $3) "
            "on conflict (id) do update set heartbeat_at = now()",
            worker_id,
            hostname,
            pid,
        )

    async def workers_on(self, hostname: str) -> list[asyncpg.Record]:
        return await self.fetch("select id, pid from dynamo.worker where hostname = $1", hostname)

    async def retire(self, worker_id: uuid.UUID) -> None:
        await self.execute("delete from dynamo.worker where id = $1", worker_id)

    async def claim_unfinished(
        self, worker_id: uuid.UUID, in_flight: Sequence[uuid.UUID], lease_s: float
    ) -> list[asyncpg.Record]:
        """Takes every unfinished request nobody alive owns, plus own ones not in flight;
        not those awaiting approval: nobody holds them, a decision moves them on."""
        return await self.fetch(
            f"""
            with claimed as (
                update dynamo.image_request r set owner = $1
                where r.step <> 'done' and r.step <> 'awaiting_approval'
                  and (r.owner is null
                       or (r.owner = $1 and not (r.id = any($2::uuid[])))
                       or (r.owner <> $1 and not exists (
                           select 1 from dynamo.worker w where w.id = r.owner
                           and w.heartbeat_at > now() - make_interval(secs => $3))))
                returning r.id
            )
            select {REQUEST_COLUMNS} from dynamo.image_request r
            where r.id in (select id from claimed) order by r.created_at
            """,
            worker_id,
            list(in_flight),
            lease_s,
        )

    # -- a reservation's flow (actors.ledger): one flow id belongs to one request ------

    async def store_flow(self, request_id: uuid.UUID, flow_id: str) -> str:
        """Moves reserving → reserved with the ledger's new flow id. Returns "stored",
        "moved" (the request is not at reserving any more) or "taken" (another request
        adopted this flow meanwhile: this one has no debit of its own)."""
        return await self._run(_take_flow, request_id, flow_id)

    async def adopt_flow(self, request_id: uuid.UUID, flow_id: str) -> str:
        """As `store_flow`, for a debit found in the ledger's history after a crash:
        "stored" only if no request knows the flow (checked atomically by the unique
        index); "taken" if one does."""
        return await self._run(_take_flow, request_id, flow_id)

    async def reserving_since(self, request_id: uuid.UUID) -> datetime.datetime | None:
        """When the request's reservation began (its move to reserving)."""
        return await self.fetchval(
            "select coalesce(reserving_since, updated_at) from dynamo.image_request "
            "where id = $1",
            request_id,
        )

    # -- operators ------------------------------------------------------------------

    async def counts_by_state(self) -> dict[str, int]:
        rows = await self.fetch(
            "select state, count(*) as n from dynamo.image_request group by state"
        )
        return {row["state"]: row["n"] for row in rows}

    async def orphan_debit_count(self) -> int:
        return await self.fetchval(
            "select count(*) from dynamo.image_request where orphan_suspected"
        )

    # -- the HTTP API's reads (dynamo/database/reads.py) and change feed (dynamo/database/changes.py) -

    async def list_requests(self, **filters) -> list[asyncpg.Record]:
        return await db_reads.list_requests(self, REQUEST_COLUMNS, **filters)

    async def find_idempotency_key(self, caller: str, key: str) -> asyncpg.Record | None:
        return await db_reads.find_idempotency_key(self, caller, key)

    async def save_idempotency_key(self, caller: str, key: str, body_sha256: str, request_id):
        await db_reads.save_idempotency_key(self, caller, key, body_sha256, request_id)

    async def request_body_sha256(self, request_id: uuid.UUID) -> str | None:
        return await db_reads.request_body_sha256(self, request_id)

    def request_changes(self) -> db_events.RequestChanges:
        """A feed of request step/state changes by any process (LISTEN/NOTIFY); run it."""
        return db_events.RequestChanges(self._dsn)


async def _apply_schema(pool: asyncpg.Pool, schema_sql: str) -> None:
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("select pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
            await conn.execute(schema_sql)


async def _advance(
    pool, request_id, from_steps, to_step: Step, failed: bool, fields: dict, costs
) -> bool:
    assignments = ["step = $3", "state = $4", "updated_at = now()"]
    args: list[Any] = [request_id, from_steps, to_step.value, state_for(to_step, failed).value]
    if to_step is Step.DONE and not failed:
        # The end state follows the failure decided at an earlier step, if any.
        assignments[1] = (
            "state = coalesce($4::text, "
            "case when failure_reason is null then 'succeeded' else 'failed' end)"
        )
        args[3] = None
    for column, value in fields.items():
        if column not in _ADVANCE_COLUMNS:
            raise ValueError(f"advance() cannot set {column}")
        args.append(value)
        assignments.append(f"{column} = ${len(args)}")
    if to_step is Step.DONE:
        assignments.append("finished_at = now()")
    sql = (
        f"update dynamo.image_request set {', '.join(assignments)} "
        "where id = $1 and step = any($2::text[])"
    )
    if not costs:
        status = await pool.execute(sql, *args)
        return status.endswith(" 1")
    # One statement: the move, and the calls' costs whether it moves or not.
    args.append(spend_store.calls_param(costs))
    sql = (
        f"with moved as ({sql} returning id), "
        f"paid as ({spend_store.insert_calls_sql(len(args))}) "
        "select count(*) from moved"
    )
    return await pool.fetchval(sql, *args) == 1


# Columns a step may set as it advances; anything else is a programming error.
_ADVANCE_COLUMNS = frozenset(
    {
        "flow_id",
        "orphan_suspected",
        "failure_reason",
        "failure_detail",
        "error_message",
        "announced_at",
        "accepted_at",
        "refunded_at",
        "points_cost",
        "reserving_since",
    }
)


# One statement each (atomic, one round trip instead of BEGIN, two or three, COMMIT):
# the step moves only from the one expected, and the rest follows only if it moved; the
# image call's cost ($4) is written either way.
_SAVE_GENERATED_SQL = f"""
    with moved as (
        update dynamo.image_request set step = 'generated', updated_at = now(),
               prompt = coalesce($2, prompt)
         where id = $1 and step = 'generating'
        returning id
    ), kept as (
        insert into dynamo.generated_image (image_request_id, data)
        select id, $3 from moved
        on conflict (image_request_id) do update set data = excluded.data
    ), paid as ({spend_store.insert_calls_sql(4)})
    select count(*) from moved
"""

_SAVE_IMAGE_SQL = """
    with moved as (
        update dynamo.image_request set step = 'stored', updated_at = now()
         where id = $1 and step in ('generated', 'approved')
        returning id
    ), recorded as (
        insert into dynamo.image (image_request_id, index, url, color)
        select id, 0, $2, $3 from moved
        on conflict (image_request_id, index)
        do update set url = excluded.url, color = excluded.color
    ), dropped as (
        delete from dynamo.generated_image
         where image_request_id = $1 and exists (select 1 from moved)
    )
    select count(*) from moved
"""


async def _save_generated(pool, request_id, data: bytes, prompt: str | None, costs) -> bool:
    return await pool.fetchval(_SAVE_GENERATED_SQL, request_id, prompt, data, costs) == 1


async def _save_image(pool, request_id, url: str, color: str) -> bool:
    return await pool.fetchval(_SAVE_IMAGE_SQL, request_id, url, color) == 1


async def _record_late_flow(pool, request_id, flow_id: str) -> bool:
    try:
        await pool.execute(
            "update dynamo.image_request set flow_id = $2 where id = $1 and flow_id is null",
            request_id,
            flow_id,
        )
    except asyncpg.exceptions.UniqueViolationError:
        return False
    return True


async def _take_flow(pool, request_id, flow_id: str) -> str:
    try:
        status = await pool.execute(
            "update dynamo.image_request set step = 'reserved', state = $3, flow_id = $2, "
            "updated_at = now() where id = $1 and step = 'reserving'",
            request_id,
            flow_id,
            state_for(Step.RESERVED, False).value,
        )
    except asyncpg.exceptions.UniqueViolationError:
        return "taken"
    if status.endswith(" 1"):
        return "stored"
    # A retry after a connection lost during COMMIT finds its own write done.
    mine = await pool.fetchval(
        "select step = 'reserved' and flow_id = $2 from dynamo.image_request where id = $1",
        request_id,
        flow_id,
    )
    return "stored" if mine else "moved"


@asynccontextmanager
async def open_database(dsn: str) -> AsyncIterator[Database]:
    """A connected `Database` (inside a trio-asyncio loop), closed on exit."""
    pool = await connect_at_startup(
        functools.partial(
            aio_as_trio(asyncpg.create_pool),
            dsn,
            min_size=1,
            max_size=POOL_MAX_SIZE,
            max_inactive_connection_lifetime=POOL_INACTIVE_LIFETIME_S,
            init=_init_connection,
            reset=_keep_session,
        ),
        system="database",
        within_s=STARTUP_CONNECT_S,
    )
    try:
        yield Database(pool, dsn)
    finally:
        with trio.move_on_after(5, shield=True):
            await aio_as_trio(pool.close)()


def iso(value: datetime.datetime | None) -> str | None:
    return value.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z") if value else None
