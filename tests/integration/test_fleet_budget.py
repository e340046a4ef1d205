"""The fleet's budget in the real PostgreSQL (`dynamo.database.fleet_store.PostgresStore`): budgets of
two "processes" (two `Budget`s, each its own worker id) over one throwaway database.

These run on the real clock (the database's is the fleet's time base), so they check
what the database guarantees, not how fast anything is: the grants' own timestamps, what
one process learned as seen by the other, turns, a lock left by a killed transaction.
"""

from __future__ import annotations

import uuid

import asyncpg
import pytest
import trio
from trio_asyncio import aio_as_trio

from dynamo.database import fleet_store as fleet_db
from dynamo.database.fleet_store import EXACT_GRANTS, LOCK_KEYS, FleetQueries, PostgresStore
from dynamo.database.port import open_database
from dynamo.limits.budget import Budget, BudgetUnavailable, KindConfig
from dynamo.limits.permits import CallKind, CallOutcome
from dynamo.limits.window import EDGE_MARGIN_S, WINDOW_S
from dynamo.openai_port.rate_headers import parse_ratelimit_headers
from tests.support import infra
from tests.support.timeouts import PORT_S, SLOW_S

pytestmark = pytest.mark.integration

MEDIUM_SQUARE = 1056


@pytest.fixture
async def db(pg_database):
    async with open_database(infra.pg_dsn(pg_database)) as db:
        await db.apply_schema()
        yield db


def fleet_of(db, count: int, config: KindConfig, kind=CallKind.IMAGE) -> list[Budget]:
    budgets = []
    for _ in range(count):
        worker_id = uuid.uuid4()
        budget = Budget(PostgresStore(db, worker_id), worker=str(worker_id))
        budget.configure({kind: config})
        budgets.append(budget)
    return budgets


async def take_permits(budget: Budget, count: int, kind=CallKind.IMAGE, tokens=0) -> None:
    """A process whose workers want `count` permits, one after the other."""
    for _ in range(count):
        while (decision := await budget.try_grant(kind, tokens)).permit is None:
            await trio.sleep(decision.retry_in_s)


async def grant_rows(db, kind=CallKind.IMAGE):
    return await db.fetch(
        "select worker_id, granted_at, tokens from dynamo.permit_grant "
        "where kind = $1 and is_call order by granted_at", kind.value)


async def test_two_processes_share_one_limit_in_turns(db):
    """120/min: every grant at least 0.5 s after the previous one, whoever made it, by the
    database's clock; and the two take turns."""
    with trio.fail_after(SLOW_S):
        budgets = fleet_of(db, 2, KindConfig(120))
        async with trio.open_nursery() as nursery:
            for budget in budgets:
                nursery.start_soon(take_permits, budget, 8)
        rows = await grant_rows(db)
        assert len(rows) == 16
        times = [row["granted_at"] for row in rows]
        assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 0.5
        whose = [row["worker_id"] for row in rows]
        # In turns once both wait (the first may ask twice before the other asks at all).
        assert sum(a == b for a, b in zip(whose[2:], whose[3:], strict=False)) <= 1, whose
        fleet = await FleetQueries(db).snapshot(lease_s=15)
        assert fleet["budget"]["image"]["calls"] == 16


async def test_what_one_process_learns_applies_to_the_other(db):
    with trio.fail_after(PORT_S):
        first, second = fleet_of(db, 2, KindConfig(100))
        granted = await first.try_grant(CallKind.IMAGE, MEDIUM_SQUARE)
        # The API shows a token limit of two images a minute, then refuses with a pause.
        await first.report(CallOutcome(
            CallKind.IMAGE, succeeded=True, tokens_used=MEDIUM_SQUARE, permit=granted.permit,
            limits=parse_ratelimit_headers({"x-ratelimit-limit-requests": "100",
                     "x-ratelimit-limit-tokens": str(2 * MEDIUM_SQUARE)})))
        decision = await second.try_grant(CallKind.IMAGE, MEDIUM_SQUARE)
        assert decision.permit is None and 25 < decision.retry_in_s <= 30  # 30 s spacing
        await first.report(CallOutcome(CallKind.IMAGE, rate_limited=True, retry_after_s=45))
        decision = await second.try_grant(CallKind.IMAGE, MEDIUM_SQUARE)
        assert decision.permit is None and 40 < decision.retry_in_s <= 45
        second_view, _ = second.view(CallKind.IMAGE)
        assert second_view.limit.token_ceiling(second.view(CallKind.IMAGE)[1]) == 2 * MEDIUM_SQUARE
        # The auth circuit too: a refused key stops both.
        await first.report(CallOutcome(CallKind.IMAGE, auth_failed=True))
        await second.refresh(CallKind.IMAGE)
        assert second.view(CallKind.IMAGE)[0].circuit.is_open


async def test_an_answer_corrects_its_grant_and_an_unused_permit_is_given_back(db):
    with trio.fail_after(PORT_S):
        (budget,) = fleet_of(db, 1, KindConfig(100, tokens_per_minute=21120))
        granted = (await budget.try_grant(CallKind.IMAGE, MEDIUM_SQUARE)).permit
        await budget.report(CallOutcome(CallKind.IMAGE, succeeded=True, tokens_used=1100,
                                        permit=granted))
        assert [row["tokens"] for row in await grant_rows(db)] == [1100]
        # The next call is expected to cost what the last one did.
        await trio.sleep(WINDOW_S / (21120 // 1100))  # spaced by the whole calls a window holds
        unused = (await budget.try_grant(CallKind.IMAGE, MEDIUM_SQUARE)).permit
        assert [row["tokens"] for row in await grant_rows(db)] == [1100, 1100]
        await budget.release(CallKind.IMAGE, unused)
        assert [row["tokens"] for row in await grant_rows(db)] == [1100]


async def test_a_process_killed_inside_a_transaction_holds_nothing(db, pg_database):
    """A connection that dies holding the kind's lock (kill -9 mid-transaction) frees it:
    PostgreSQL ends the transaction with the connection."""
    with trio.fail_after(PORT_S):
        (budget,) = fleet_of(db, 1, KindConfig(100))
        conn = await aio_as_trio(asyncpg.connect)(infra.pg_dsn(pg_database))
        await aio_as_trio(conn.execute)("begin")
        await aio_as_trio(conn.execute)(f"select pg_advisory_xact_lock({LOCK_KEYS[CallKind.IMAGE]})")
        with trio.move_on_after(1) as blocked:
            await budget.try_grant(CallKind.IMAGE)
        assert blocked.cancelled_caught  # waiting for the lock
        conn.terminate()  # as the kernel closes a killed process's socket
        assert (await budget.try_grant(CallKind.IMAGE)).permit is not None


async def test_a_database_that_cannot_answer_makes_the_budget_unavailable():
    """The port is sealed: the rate limiter sees BudgetUnavailable, never asyncpg's or the
    socket's exceptions (and then grants nothing: tests/unit/test_budget.py)."""
    class DownDatabase:
        async def run_with_pool(self, fn, *args):
            raise ConnectionRefusedError(111, "Connection refused")

    store = PostgresStore(DownDatabase(), uuid.uuid4())
    with pytest.raises(BudgetUnavailable, match="ConnectionRefusedError"):
        await store.transact(CallKind.IMAGE, KindConfig(5), lambda limiter, now: None)


async def test_a_busy_window_is_loaded_summed_up_and_still_counted_exactly(db):
    """600 calls in the last minute (200 a second for 3 s): a step loads the newest
    EXACT_GRANTS one by one and the rest summed up per second; the count is exact, and
    the count rule waits for the oldest of them no earlier than if all were loaded."""
    with trio.fail_after(PORT_S):
        (budget,) = fleet_of(db, 1, KindConfig(600))
        now = await db.fetchval("select extract(epoch from clock_timestamp())::float8")
        times = [now - 10 + n / 200 for n in range(600)]
        await db.execute(
            "insert into dynamo.permit_grant (id, kind, worker_id, granted_at, tokens, is_call) "
            "select gen_random_uuid(), 'image', $1, t, 5, true from unnest($2::float8[]) as t",
            uuid.uuid4(), times)
        decision = await budget.try_grant(CallKind.IMAGE)
        limiter, seen_now = budget.view(CallKind.IMAGE)
        grants = limiter.limit.window.grants()
        assert len(grants) <= EXACT_GRANTS + 4  # 3 s of older grants: 3 or 4 summaries
        assert limiter.limit.window.count(seen_now) == 600
        assert limiter.limit.window.tokens(seen_now) == 600 * 5
        # Full: the next call waits until the oldest leaves (it went out at now - 10).
        assert decision.permit is None
        assert decision.retry_in_s >= WINDOW_S - 10 + EDGE_MARGIN_S - 0.5


async def test_a_pooled_connection_comes_back_with_no_session_state(db):
    """The pool gives connections back without asyncpg's reset query (a round trip and a
    transaction per release): a budget step and a step's transaction must leave nothing
    in the session, neither a lock nor a setting. (The pool hands out the connection
    released last first, so the query after a step runs on that step's connection.)"""
    with trio.fail_after(PORT_S):
        (budget,) = fleet_of(db, 1, KindConfig(100))
        defaults = await db.fetchrow(SESSION_SQL)
        assert defaults["locks"] == 0
        await budget.try_grant(CallKind.IMAGE)
        assert await db.fetchrow(SESSION_SQL) == defaults
        with pytest.raises(ZeroDivisionError):  # a step that fails midway
            await budget.store.transact(CallKind.IMAGE, KindConfig(100), lambda *_: 1 / 0)
        assert await db.fetchrow(SESSION_SQL) == defaults
        assert await db.fetchval(
            "select count(*) from pg_locks l join pg_stat_activity a using (pid) "
            "where a.datname = current_database() and l.locktype = 'advisory'") == 0


SESSION_SQL = """
    select current_setting('lock_timeout') as lock_timeout,
           current_setting('idle_in_transaction_session_timeout') as idle_timeout,
           current_setting('synchronous_commit') as synchronous_commit,
           (select count(*) from pg_locks where pid = pg_backend_pid()
                                           and locktype = 'advisory') as locks,
           (select count(*) from pg_listening_channels()) as channels
"""


async def test_a_query_bug_is_loud_not_an_unavailable_budget(db):
    """Schema drift (a column the budget's query reads is gone) is a bug: it comes out of
    the port as the driver's error, so that the rate limiter crashes and the supervisor
    counts it, instead of holding every OpenAI call with one warning."""
    with trio.fail_after(PORT_S):
        (budget,) = fleet_of(db, 1, KindConfig(100))
        await db.execute("alter table dynamo.permit_grant drop column tokens")
        with pytest.raises(asyncpg.exceptions.UndefinedColumnError):
            await budget.try_grant(CallKind.IMAGE)


async def test_a_lock_timeout_or_a_cancelled_query_makes_the_budget_unavailable(
        db, pg_database, monkeypatch):
    """What means "wait": the kind's lock not free within the lock timeout, and a query
    cancelled under the budget (pg_cancel_backend, a statement timeout)."""
    with trio.fail_after(PORT_S):
        (budget,) = fleet_of(db, 1, KindConfig(100))
        monkeypatch.setattr(fleet_db, "_BEGIN_SQL", fleet_db._BEGIN_SQL.replace(
            f"'lock_timeout', '{fleet_db.LOCK_TIMEOUT}'", "'lock_timeout', '200ms'"))
        assert "'200ms'" in fleet_db._BEGIN_SQL
        holder = await aio_as_trio(asyncpg.connect)(infra.pg_dsn(pg_database))
        try:
            await aio_as_trio(holder.execute)("begin")
            await aio_as_trio(holder.execute)(
                f"select pg_advisory_xact_lock({LOCK_KEYS[CallKind.IMAGE]})")
            with pytest.raises(BudgetUnavailable, match="LockNotAvailableError"):
                await budget.try_grant(CallKind.IMAGE)

            monkeypatch.setattr(fleet_db, "_BEGIN_SQL", fleet_db._BEGIN_SQL.replace(
                "'lock_timeout', '200ms'", "'lock_timeout', '20s'"))

            async def cancel_the_waiter():
                while not await aio_as_trio(holder.fetchval)(
                        "select pg_cancel_backend(pid) from pg_stat_activity"
                        " where wait_event_type = 'Lock' and pid <> pg_backend_pid()"
                        " and datname = current_database()"):
                    await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_the_waiter)
                with pytest.raises(BudgetUnavailable, match="QueryCanceledError"):
                    await budget.try_grant(CallKind.IMAGE)
        finally:
            await aio_as_trio(holder.close)()
