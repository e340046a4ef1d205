"""The fleet's PostgreSQL port: the OpenAI budget every process shares, and who is in it.

`PostgresStore` is the `dynamo.limits.budget` store of a fleet. Each step of the budget (a
permit decided, an answer learned from) is one short transaction on a pooled connection:

1. begin and take the kind's advisory transaction lock (one lock per kind, so image and
   text calls never wait for each other), with `lock_timeout` and
   `idle_in_transaction_session_timeout` set, so that a process frozen inside a
   transaction cannot hold the fleet up, in one round trip;
2. read the database's clock, the kind's learned state (`dynamo.rate_limit_state`) and its
   grants of the last 60 s (`dynamo.permit_grant`; in a busy window the older ones summed
   up per second, `EXACT_GRANTS`) in one query;
3. run the step on a `KindLimiter` rebuilt from them (the same pure logic as in memory);
4. write what the step changed (new grants, corrected token counts, a new state) in one
   statement, dropping grants older than KEEP_GRANTS_S on the way, and commit.

The database's clock is the fleet's time base, so processes on different hosts agree on
every window. Nothing is held between transactions: a killed process's connection dies,
its transaction with it, and the lock is free.

`FleetQueries` reads the live processes (`dynamo.worker`) and their shares of the budget
for GET /status and the fleet-wide metrics.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

from dynamo.database.errors import DatabaseUnavailable, driver_errors_mapped
from dynamo.limits.budget import BudgetUnavailable, KindConfig
from dynamo.limits.kind import KindLimiter
from dynamo.limits.permits import CallKind
from dynamo.limits.window import WINDOW_S, Grant

# One advisory lock per kind ("dynamo" in ASCII, then the kind), distinct from the schema's.
LOCK_KEYS = {CallKind.IMAGE: 0x64796E616D6F01, CallKind.TEXT: 0x64796E616D6F02}
# A step waits at most this long for the lock (it is held for a millisecond or two).
LOCK_TIMEOUT = "5s"
# A process stopped inside a budget transaction (SIGSTOP, a hung host) has its session
# ended by PostgreSQL after this, which frees the lock for the rest of the fleet.
IDLE_IN_TRANSACTION_TIMEOUT = "10s"
# Grants are kept a minute longer than any window needs them, for /status and debugging.
KEEP_GRANTS_S = 2 * WINDOW_S

_BEGIN_SQL = (
    # One round trip opens the transaction, sets it up in one statement (set_config with
    # is_local true is SET LOCAL) and takes the lock in the next, once `lock_timeout`
    # applies. A grant need not wait for its WAL record to reach the disk: a
    # PostgreSQL crash could lose the last fraction of a second of grants (a call or two
    # uncounted for a minute), while every grant waiting for an fsync under the lock would
    # slow the whole fleet.
    "begin; "
    "select set_config('synchronous_commit', 'off', true), "
    f"set_config('lock_timeout', '{LOCK_TIMEOUT}', true), "
    f"set_config('idle_in_transaction_session_timeout', '{IDLE_IN_TRANSACTION_TIMEOUT}', true); "
    "select pg_advisory_xact_lock({key})"
)

# The newest grants of a window are loaded one by one, older ones summed up per second
# (each summary taken as made at the latest of its grants, so that it leaves the window
# no earlier than they do). A busy window (no limit, thousands of calls a minute) then
# costs a step a few hundred rows instead of all of them, which made the step's CPU grow
# with the rate; a window of up to this many grants is exact, and beyond it the window's
# edge is at most a second late.
EXACT_GRANTS = 128

# The fleet's clock: when this statement arrived, after the lock was taken. Not
# clock_timestamp(): a volatile function keeps the window's bound out of the index scan.
_NOW_SQL = "extract(epoch from statement_timestamp())::float8"

_LOAD_SQL = f"""
    with clock as (select {_NOW_SQL} as now),
    recent as (  -- the newest, backwards along an index on granted_at
        select g.id, g.granted_at, g.tokens, g.is_call
          from dynamo.permit_grant g
         where g.kind = $1 and g.granted_at > {_NOW_SQL} - $2::float8
         order by g.granted_at desc, g.id desc
         limit $3
    ), cut as (  -- the oldest of them; older grants exist only if there are $3 of them
        select r.granted_at, r.id from recent r
         where (select count(*) from recent) = $3
         order by r.granted_at, r.id limit 1
    )
    select clock.now,
           (select s.state from dynamo.rate_limit_state s where s.kind = $1) as state,
           (select coalesce(json_agg(json_build_array(r.id, r.granted_at, r.tokens, r.is_call)
                                     order by r.granted_at), '[]'::json)
              from recent r) as grants,
           (select coalesce(json_agg(json_build_array(b.at, b.tokens, b.calls)
                                     order by b.at), '[]'::json)
              from (select max(g.granted_at) as at, sum(g.tokens) as tokens,
                           count(*) filter (where g.is_call) as calls
                      from dynamo.permit_grant g, cut
                     where g.kind = $1 and g.granted_at > clock.now - $2::float8
                       and (g.granted_at, g.id) < (cut.granted_at, cut.id)
                     group by floor(g.granted_at)) b) as older
    from clock
"""

_SAVE_SQL = """
    with added as (
        insert into dynamo.permit_grant (id, kind, worker_id, granted_at, tokens, is_call)
        select a.id, $1, $2, a.at, a.tokens, a.is_call
          from unnest($3::uuid[], $4::float8[], $5::int[], $6::bool[]) as a(id, at, tokens, is_call)
    ), corrected as (
        update dynamo.permit_grant g set tokens = c.tokens
          from unnest($7::uuid[], $8::int[]) as c(id, tokens)
         where g.id = c.id
    ), removed as (  -- two statements, so that each takes its index (an OR scans all)
        delete from dynamo.permit_grant g where g.id = any($9::uuid[])
    ), expired as (
        delete from dynamo.permit_grant g where g.kind = $1 and g.granted_at < $10::float8
    ), saved as (
        insert into dynamo.rate_limit_state (kind, state, updated_at)
        select $1, $11::jsonb, now() where $11::jsonb is not null
        on conflict (kind) do update set state = excluded.state, updated_at = excluded.updated_at
    )
    select 1
"""



class PostgresStore:
    """The budget's store for a fleet; `worker_id` marks the grants this process makes."""

    shared = True

    def __init__(self, db, worker_id: uuid.UUID):
        self._db = db
        self._worker_id = worker_id

    async def transact(self, kind: CallKind, config: KindConfig, step):
        # Only "not now" (connection lost, lock timeout, a cancelled query: db_errors
        # decides) makes the budget unavailable; a bug in the SQL or a schema that drifted
        # goes out as it is, so that the rate limiter crashes and the supervisor counts it.
        try:
            with driver_errors_mapped():
                return await self._db.run_with_pool(
                    _transact, kind, config, step, self._worker_id
                )
        except DatabaseUnavailable as exc:
            raise BudgetUnavailable(str(exc)) from exc


async def _transact(pool, kind: CallKind, config: KindConfig, step, worker_id: uuid.UUID):
    async with pool.acquire() as conn:
        # BEGIN goes in one round trip with the statements after it (asyncpg's
        # `transaction()` sends it alone), so the transaction is ended here: a statement the
        # server refused (the lock timeout, a cancelled query, a bug in the SQL) leaves the
        # connection sound, and ROLLBACK ends the transaction on it; any other way out (a
        # cancellation, the step's own error, the connection lost) closes the connection,
        # which ends the transaction too: a statement cut off while waiting for the lock
        # leaves nothing a ROLLBACK could be sent on. The pool opens another.
        try:
            await conn.execute(_BEGIN_SQL.format(key=LOCK_KEYS[kind]))
            result = await _locked_step(conn, kind, config, step, worker_id)
            await conn.execute("commit")
        except asyncpg.PostgresError:
            await _roll_back(conn)
            raise
        except BaseException:
            conn.terminate()
            raise
    return result


async def _roll_back(conn) -> None:
    try:
        await conn.execute("rollback")
    except BaseException:
        conn.terminate()
        raise


async def _locked_step(conn, kind: CallKind, config: KindConfig, step, worker_id: uuid.UUID):
    row = await conn.fetchrow(_LOAD_SQL, kind.value, WINDOW_S, EXACT_GRANTS)
    now = row["now"]
    grants = [
        Grant(at, tokens, call, uuid.UUID(id_))
        for id_, at, tokens, call in json.loads(row["grants"])
    ]
    grants += [  # summaries: never saved, as their ids are no rows' (see `loaded`)
        Grant(at, int(tokens), calls > 0, calls=calls)
        for at, tokens, calls in json.loads(row["older"])
    ]
    loaded = {grant.id: grant.tokens for grant in grants}
    limiter = KindLimiter(kind, config.per_minute, config.tokens_per_minute)
    limiter.restore(row["state"], grants)
    state = limiter.state()
    result = step(limiter, now)
    kept = limiter.limit.window.grants()
    added = [grant for grant in kept if grant.id not in loaded]
    corrected = [g for g in kept if g.id in loaded and loaded[g.id] != g.tokens]
    removed = set(loaded) - {grant.id for grant in kept}
    new_state = limiter.state()
    if added or corrected or removed or new_state != state:
        await conn.execute(
            _SAVE_SQL,
            kind.value,
            worker_id,
            [grant.id for grant in added],
            [grant.at for grant in added],
            [grant.tokens for grant in added],
            [grant.call for grant in added],
            [grant.id for grant in corrected],
            [grant.tokens for grant in corrected],
            list(removed),
            now - KEEP_GRANTS_S,
            new_state if new_state != state else None,
        )
    return result, now, limiter


class FleetUnavailable(Exception):
    """The database cannot say who is in the fleet now."""


class FleetQueries:
    """What GET /status and the fleet metrics read about the fleet."""

    def __init__(self, db):
        self._db = db

    async def report_in_hand(self, worker_id: uuid.UUID, in_hand: int, http_addr: str) -> None:
        """Updates this process's row (made by the resume sweep's heartbeat)."""
        try:
            with driver_errors_mapped():
                await self._db.execute(
                    "update dynamo.worker set in_hand = $2, http_addr = $3 where id = $1",
                    worker_id,
                    in_hand,
                    http_addr,
                )
        except DatabaseUnavailable as exc:
            raise FleetUnavailable(str(exc)) from exc

    async def snapshot(self, lease_s: float) -> dict[str, Any]:
        """The processes whose heartbeat is fresh, oldest first, each with its calls and
        tokens in the last 60 s by kind; and the fleet's totals in the same 60 s."""
        try:
            with driver_errors_mapped():
                workers = await self._db.fetch(_WORKERS_SQL, lease_s)
                shares = await self._db.fetch(_SHARES_SQL, WINDOW_S)
        except DatabaseUnavailable as exc:
            raise FleetUnavailable(str(exc)) from exc
        processes = [dict(worker) | {"budget": {}} for worker in workers]
        by_id = {process["id"]: process for process in processes}
        totals: dict[str, dict[str, int]] = {}
        for share in shares:
            figures = {"calls": share["calls"], "tokens": share["tokens"]}
            total = totals.setdefault(share["kind"], {"calls": 0, "tokens": 0})
            total["calls"] += figures["calls"]
            total["tokens"] += figures["tokens"]
            if share["worker_id"] in by_id:
                by_id[share["worker_id"]]["budget"][share["kind"]] = figures
        return {"processes": processes, "budget": totals}


_WORKERS_SQL = """
    select w.id, w.hostname, w.pid, w.started_at, w.in_hand, w.http_addr,
           extract(epoch from clock_timestamp() - w.heartbeat_at)::float8 as heartbeat_age_s
      from dynamo.worker w
     where w.heartbeat_at > clock_timestamp() - make_interval(secs => $1)
     order by w.started_at, w.id
"""

_SHARES_SQL = """
    select g.worker_id, g.kind, count(*) filter (where g.is_call) as calls,
           coalesce(sum(g.tokens), 0)::bigint as tokens
      from dynamo.permit_grant g
     where g.granted_at > extract(epoch from clock_timestamp()) - $1::float8
     group by g.worker_id, g.kind
"""
