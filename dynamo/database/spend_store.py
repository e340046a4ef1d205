"""The SQL of OpenAI spend (`dynamo.openai_call`): each answered call stored with its
request, the totals since a day's and a month's start, and one request's calls.

`dynamo.openai_port.spend.Spend` decides what to store and what the totals mean; the
queries live here, in the database package, with the rest of dynamo's SQL.
"""

from __future__ import annotations

import datetime
import uuid

_INSERT_SQL = """
    insert into dynamo.openai_call (image_request_id, kind, model, usage, cost_usd)
    values ($1, $2, $3, $4, $5)
"""
_TOTALS_SQL = """
    select coalesce(sum(cost_usd) filter (where created_at >= $2), 0) as today,
           coalesce(sum(cost_usd), 0) as month
    from dynamo.openai_call where created_at >= $1
"""
_CALLS_SQL = """
    select kind, model, usage, cost_usd, created_at from dynamo.openai_call
    where image_request_id = $1 order by created_at, id
"""


async def record_call(
    db, request_id: uuid.UUID, kind: str, model: str, usage: dict, cost_usd: float
) -> None:
    """Stores one answered call of `request_id` (`db` is the `Database` port)."""
    await db.execute(_INSERT_SQL, request_id, kind, model, usage, cost_usd)


async def totals_usd(
    db, month_start: datetime.datetime, today_start: datetime.datetime
) -> tuple[float, float]:
    """(USD spent since `today_start`, USD spent since `month_start`)."""
    row = await db.fetchrow(_TOTALS_SQL, month_start, today_start)
    return float(row["today"]), float(row["month"])


async def request_calls(db, request_id: uuid.UUID) -> list:
    """One request's calls, oldest first: kind, model, usage, cost_usd, created_at."""
    return await db.fetch(_CALLS_SQL, request_id)
