"""The cost of one request as history grows: GET /requests/{id}'s query (`load_request`)
and a list page (`list_requests`), with and without the index on
`dynamo.answer (image_request_id)`.

Every request load and list row runs a subquery on `dynamo.answer` by request id (the
friend's name). Without an index that subquery scans the whole table, once per row.
This fills a throwaway database with `--history` finished requests (half ghosts, half
friends with a name and an image each, as the service leaves them), then times the two
queries as the HTTP API runs them, first without the index, then with it.

    python -m bench.history [--history 100000] [--repeat 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import trio_asyncio
from dynamo.api.queries import list_requests

from bench import harness
from dynamo.database.port import open_database
from tests.support import infra

FILL_SQL = """
    insert into dynamo.image_request (id, twitch_user_id, twitch_display_name, style, inputs,
        prompt, created_at, finished_at, step, state, source)
    select gen_random_uuid(), (n % 500)::text, 'viewer ' || (n % 500),
           case when n % 2 = 0 then 'ghost' else 'friend' end,
           jsonb_build_object('subject', 'a seal number ' || n),
           'a ghostly image of a seal number ' || n,
           now() - make_interval(secs => $1 - n), now() - make_interval(secs => $1 - n),
           'done', 'succeeded', 'broker'
      from generate_series(1, $1) as n
"""
ANSWERS_SQL = """
    insert into dynamo.answer (image_request_id, prompt, value)
    select id, 'Please come up with a name', 'Sir ' || left(id::text, 8)
      from dynamo.image_request where style = 'friend'
"""
IMAGES_SQL = """
    insert into dynamo.image (image_request_id, index, url, color)
    select id, 0, 'https://cdn.example/' || id || '/' || id || '-0.jpg', '#000000'
      from dynamo.image_request
"""
INDEX = "dynamo.answer_image_request_id"


async def timed(repeat: int, fn) -> tuple[float, float]:
    """Median and p90 of `repeat` runs, in ms."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.9)]


async def measure(db, ids, repeat: int) -> dict[str, tuple[float, float]]:
    rng_ids = iter(ids * (repeat // len(ids) + 1))
    figures = {
        "load one request (GET /requests/{id})": await timed(
            repeat, lambda: db.load_request(next(rng_ids))),
        "list page of 20, newest (GET /requests)": await timed(
            repeat, lambda: list_requests(db, viewer_id=None, state=None, style=None,
                                          before=None, limit=20)),
        "list page of 100, one viewer": await timed(
            repeat, lambda: list_requests(db, viewer_id="7", state=None, style=None,
                                          before=None, limit=100)),
    }
    plan = await db.fetch(f"explain select {_columns()} from dynamo.image_request r where r.id = $1",
                          ids[0])
    figures["plan"] = next(row[0] for row in plan if "answer" in row[0] or "Seq Scan" in row[0])
    return figures


def _columns() -> str:
    from dynamo.database.port import REQUEST_COLUMNS

    return REQUEST_COLUMNS


async def main(args) -> None:
    async with trio_asyncio.open_loop():
        database = await infra.create_database()
        try:
            async with open_database(infra.pg_dsn(database)) as db:
                await db.apply_schema()
                started = time.perf_counter()
                await db.execute(FILL_SQL, args.history)
                await db.execute(ANSWERS_SQL)
                await db.execute(IMAGES_SQL)
                await db.execute("analyze")
                print(f"history: {args.history} requests, "
                      f"{await db.fetchval('select count(*) from dynamo.answer')} names, "
                      f"{await db.fetchval('select count(*) from dynamo.image')} images "
                      f"(filled in {time.perf_counter() - started:.1f} s)")
                rows = await db.fetch(
                    "select id from dynamo.image_request order by random() limit 200")
                ids = [row["id"] for row in rows] or [uuid.uuid4()]
                await db.execute(f"drop index {INDEX}")
                await db.execute("analyze dynamo.answer")
                before = await measure(db, ids, args.repeat)
                await db.apply_schema()  # puts the index back, as a startup does
                await db.execute("analyze dynamo.answer")
                after = await measure(db, ids, args.repeat)
        finally:
            await infra.drop_database(database)
    rows = [(what, f"{before[what][0]:.2f} / {before[what][1]:.2f} ms",
             f"{after[what][0]:.2f} / {after[what][1]:.2f} ms")
            for what in before if what != "plan"]
    harness.print_table(f"{args.history} requests in history; median / p90 of {args.repeat} runs",
                        ("query", "without the index", "with it"), rows)
    print(f"\nplan of the name subquery without the index: {before['plan'].strip()}")
    print(f"plan of the name subquery with the index:    {after['plan'].strip()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=200)
    harness.run(main, parser.parse_args())
