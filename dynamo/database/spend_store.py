"""The SQL of OpenAI spend (`dynamo.openai_call`): each answered call stored with its
request, the totals since a day's and a month's start, and one request's calls.

`dynamo.openai_port.spend.Spend` decides what to store and what the totals mean; the
queries live here, in the database package, with the rest of dynamo's SQL. A call's row
is written by itself (`record_call`) or, to spare a round trip and a transaction, inside
the step write that follows the call (`dynamo.database.port`: `advance`,
`save_generated`), with `insert_calls_sql`.

Writing a row is idempotent: each call has its own id (`call_id`, unique), given when
its answer came, and a row whose id is there already is not added again. A write whose
COMMIT went through but whose answer was lost can so be tried again as it is
(`outages.patiently`): the call is counted once.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid


@dataclasses.dataclass(frozen=True)
class CallCost:
    """One answered OpenAI call as `dynamo.openai_call` keeps it; built once, when the
    answer came, and written as it is however often the write is tried."""

    request_id: uuid.UUID
    kind: str
    model: str
    usage: dict
    cost_usd: float
    answered_at: datetime.datetime  # aware
    call_id: uuid.UUID = dataclasses.field(default_factory=uuid.uuid4)  # tells a row written

    def as_json(self) -> dict:
        return {
            "call_id": str(self.call_id),
            "image_request_id": str(self.request_id),
            "kind": self.kind,
            "model": self.model,
            "usage": self.usage,
            "cost_usd": self.cost_usd,
            "created_at": self.answered_at.isoformat(),
        }


def insert_calls_sql(param: int) -> str:
    """An INSERT of the calls passed as `${param}` (`calls_param(...)`) that skips those
    written already: a statement of its own, or one data-modifying CTE of a step write."""
    return f"""
        insert into dynamo.openai_call
               (call_id, image_request_id, kind, model, usage, cost_usd, created_at)
        select c.call_id, c.image_request_id, c.kind, c.model, coalesce(c.usage, '{{}}'),
               c.cost_usd, c.created_at
          from jsonb_to_recordset(${param}::jsonb) as c(
               call_id uuid, image_request_id uuid, kind text, model text, usage jsonb,
               cost_usd numeric, created_at timestamptz)
        on conflict (call_id) do nothing
    """


def calls_param(calls) -> list[dict]:
    """The value of `insert_calls_sql`'s parameter (jsonb) for `calls` (`CallCost`s)."""
    return [call.as_json() for call in calls]


_INSERT_SQL = insert_calls_sql(1)
_TOTALS_SQL = """
    select coalesce(sum(cost_usd) filter (where created_at >= $2), 0) as today,
           coalesce(sum(cost_usd), 0) as month
    from dynamo.openai_call where created_at >= $1
"""
_CALLS_SQL = """
    select kind, model, usage, cost_usd, created_at from dynamo.openai_call
    where image_request_id = $1 order by created_at, id
"""


async def record_call(db, *calls: CallCost) -> None:
    """Stores answered calls, in one statement, each once however often this is tried
    (`db` is the `Database` port)."""
    if calls:
        await db.execute(_INSERT_SQL, calls_param(calls))


async def totals_usd(
    db, month_start: datetime.datetime, today_start: datetime.datetime
) -> tuple[float, float]:
    """(USD spent since `today_start`, USD spent since `month_start`)."""
    row = await db.fetchrow(_TOTALS_SQL, month_start, today_start)
    return float(row["today"]), float(row["month"])


async def request_calls(db, request_id: uuid.UUID) -> list:
    """One request's calls, oldest first: kind, model, usage, cost_usd, created_at."""
    return await db.fetch(_CALLS_SQL, request_id)
