"""A request's cost does not grow with history: every request load and list row looks its
friend's name up in `dynamo.answer` by request id, which the schema indexes (the original
service's table had no index there, so each lookup scanned the table once per row).
`python -m bench.history` measures it with 100,000 requests."""

from __future__ import annotations

import pytest

from dynamo.database.port import REQUEST_COLUMNS, open_database
from tests.support import infra

pytestmark = pytest.mark.integration

HISTORY = 5000


async def test_the_name_of_a_request_is_found_by_index_not_by_scanning_history(pg_database):
    async with open_database(infra.pg_dsn(pg_database)) as db:
        await db.apply_schema()
        await db.execute(
            """
            insert into dynamo.image_request (id, twitch_user_id, style, inputs, prompt, step,
                                              state)
            select gen_random_uuid(), (n % 50)::text, 'friend', '{}', 'p', 'done', 'succeeded'
              from generate_series(1, $1) as n
            """, HISTORY)
        await db.execute("insert into dynamo.answer (image_request_id, prompt, value) "
                         "select id, 'p', 'Sir Hatsworth' from dynamo.image_request")
        await db.execute("analyze")
        request_id = await db.fetchval("select id from dynamo.image_request limit 1")
        plan = "\n".join(row[0] for row in await db.fetch(
            f"explain select {REQUEST_COLUMNS} from dynamo.image_request r where r.id = $1",
            request_id))
        assert "Seq Scan on answer" not in plan, plan
        assert "using answer_image_request_id on answer" in plan, plan
        row = await db.load_request(request_id)
        assert row["name"] == "Sir Hatsworth"
