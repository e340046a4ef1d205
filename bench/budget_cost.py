"""What one step of the fleet's shared OpenAI budget costs in PostgreSQL, alone.

A step is one transaction (`dynamo/database/fleet_store.py`): BEGIN; the kind's advisory lock (with
its timeouts set, one statement); one query for the clock, the learned state and the
grants of the last 60 s; one statement writing what changed, if anything; COMMIT. So 4
statements, 5 when something changed. This times each kind of step through the real
port (asyncpg behind trio-asyncio, as dynamo runs it) with a window as full as a busy
fleet keeps it (`--window` grants), in a throwaway database: how much of a
`bench.utilization --processes N` run's "mean step" is the database and how much is a
busy machine.

    python -m bench.budget_cost [--window 30] [--repeat 300]
"""

from __future__ import annotations

import argparse
import time
import uuid

import trio_asyncio

from bench import harness
from dynamo.database.fleet_store import PostgresStore
from dynamo.database.port import open_database
from dynamo.limits.budget import Budget, KindConfig
from dynamo.limits.permits import CallKind, CallOutcome
from tests.support import infra

IMAGE = CallKind.IMAGE


async def timed(repeat: int, step, between=None) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await step()
        times.append((time.perf_counter() - started) * 1000)
        if between is not None:
            await between()
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.9)]


async def main(args) -> None:
    async with trio_asyncio.open_loop():
        database = await infra.create_database()
        try:
            async with open_database(infra.pg_dsn(database)) as db:
                await db.apply_schema()
                worker = uuid.uuid4()
                budget = Budget(PostgresStore(db, worker), worker=str(worker))
                budget.configure({IMAGE: KindConfig(1_000_000)})
                for _ in range(args.window):  # a window as full as a busy fleet's
                    await budget.try_grant(IMAGE, 1056)
                keep = ("delete from dynamo.permit_grant where id not in (select id from "
                        "dynamo.permit_grant order by granted_at desc limit $1)")
                unlimited = await timed(args.repeat, lambda: budget.try_grant(IMAGE, 1056),
                                        lambda: db.execute(keep, args.window))
                budget.configure({IMAGE: KindConfig(1)})  # refused for a minute
                refused = await timed(args.repeat, lambda: budget.try_grant(IMAGE, 1056))
                budget.configure({IMAGE: KindConfig(1_000_000)})
                permit = (await budget.try_grant(IMAGE)).permit
                costs = iter(range(10**9))
                outcome = lambda: budget.report(CallOutcome(  # noqa: E731
                    IMAGE, succeeded=True, tokens_used=1056 + next(costs) % 2, permit=permit))
                corrected = await timed(args.repeat, outcome)
                looked = await timed(args.repeat, lambda: budget.refresh(IMAGE))
                plain = await timed(args.repeat, lambda: db.fetchval("select 1"))
        finally:
            await infra.drop_database(database)
    rows = [(what, f"{median:.2f} ms", f"{p90:.2f} ms") for what, (median, p90) in (
        ("a permit granted (5 statements)", unlimited),
        ("a permit refused: come back later (4 statements)", refused),
        ("an answer's usage corrects its grant (5 statements)", corrected),
        ("a look without a change (4 statements)", looked),
        ("for scale: `select 1` through the same port", plain))]
    harness.print_table(f"one step of the shared budget, {args.window} grants in the window, "
                        f"{args.repeat} runs each", ("", "median", "p90"), rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=300)
    harness.run(main, parser.parse_args())
