"""What dynamo spends on OpenAI: each call's model, usage and cost, kept with its request
(`dynamo.openai_call`), spend today and this month, and the daily budget. The SQL is
`dynamo.database.spend_store`'s.

Each answered call becomes a row (`row`, priced here) that is written by itself (`write`)
or by the step write that follows the call, in the same statement (`dynamo.database.port`);
either way the spend metric counts it once the write went through (`counted`). A row is
written once however often its write is tried (`dynamo.database.spend_store`), so a
write cut off by an outage is simply tried again: the call, already paid for, is never
made again for want of its cost being stored.

Spend is summed from the database, not counted in memory, so that every process sharing
the database shares one budget (`DYNAMO_DAILY_BUDGET_USD`). Days and months are UTC. Once
today's spend reaches the budget no new image is bought until midnight UTC: `paused()`
says so, with one WARNING per paused day in each process.
"""

from __future__ import annotations

import datetime
import json
import logging
import uuid
from collections.abc import Callable, Iterable

from dynamo import metrics
from dynamo.database import spend_store
from dynamo.database.port import iso
from dynamo.database.spend_store import CallCost
from dynamo.openai_port.pricing import PriceTable

log = logging.getLogger(__name__)

# What a call was for, as stored and as the spend metric's `kind` label.
IMAGE, NAME, MODERATION = "image", "name", "moderation"
IMAGE_MODERATION = "image_moderation"  # the screening of a generated image (free)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Spend:
    def __init__(
        self,
        db,
        prices: PriceTable,
        *,
        daily_budget_usd: float | None = None,
        now: Callable[[], datetime.datetime] = _utcnow,
    ):
        self.db = db
        self.prices = prices
        self.daily_budget_usd = daily_budget_usd
        self._now = now
        self._warned_day: datetime.date | None = None

    def row(self, request_id: uuid.UUID, kind: str, answer) -> CallCost:
        """The row of one answered call (an `Answer` with its model and usage), priced,
        stamped with the time now (the answer's) by the clock the days are counted by:
        build it once, as the answer comes, and write that same row however often the
        write is tried."""
        model = answer.model or "unknown"
        cost = self.prices.cost_usd(model, answer.usage)
        return CallCost(request_id, kind, model, answer.usage or {}, cost, self._now())

    async def write(self, calls: Iterable[CallCost]) -> None:
        """Writes `calls` by themselves, in one statement (a row there already is not
        written again), then counts them: for costs no step write takes."""
        calls = list(calls)
        await spend_store.record_call(self.db, *calls)
        self.counted(calls)

    def counted(self, calls: Iterable[CallCost]) -> None:
        """The spend metric, once `calls` are written (by `write` or a step write)."""
        for call in calls:
            metrics.OPENAI_SPEND_USD.labels(call.model, call.kind).inc(call.cost_usd)

    async def totals(self) -> tuple[float, float]:
        """(USD spent today, USD spent this month), UTC."""
        today_start = self._day_start()
        month_start = today_start.replace(day=1)
        return await spend_store.totals_usd(self.db, month_start, today_start)

    async def paused(self) -> bool:
        """Whether today's spend has reached the daily budget (no budget: never)."""
        if self.daily_budget_usd is None:
            return False
        today, _ = await self.totals()
        if today < self.daily_budget_usd:
            return False
        day = self._day_start().date()
        if self._warned_day != day:
            self._warned_day = day
            log.warning(
                "daily OpenAI budget reached: $%.4f spent today of DYNAMO_DAILY_BUDGET_USD="
                "$%.2f; image alerts are paused until %s",
                today,
                self.daily_budget_usd,
                iso(self._next_midnight()),
            )
        return True

    async def status_json(self) -> dict:
        """/status `spend`: today's and this month's USD, the budget, and the pause."""
        today, month = await self.totals()
        paused = self.daily_budget_usd is not None and today >= self.daily_budget_usd
        return {
            "today_usd": round(today, 6),
            "month_usd": round(month, 6),
            "daily_budget_usd": self.daily_budget_usd,
            "paused": paused,
            "paused_until": iso(self._next_midnight()) if paused else None,
        }

    async def request_calls(self, request_id: uuid.UUID) -> list[dict]:
        """One request's calls, for GET /requests/{id}."""
        rows = await spend_store.request_calls(self.db, request_id)
        return [
            {
                "kind": row["kind"],
                "model": row["model"],
                "usage": _json(row["usage"]),
                "cost_usd": float(row["cost_usd"]),
                "created_at": iso(row["created_at"]),
            }
            for row in rows
        ]

    def _day_start(self) -> datetime.datetime:
        return (
            self._now().astimezone(datetime.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        )

    def _next_midnight(self) -> datetime.datetime:
        return self._day_start() + datetime.timedelta(days=1)


def _json(value):
    return json.loads(value) if isinstance(value, str) else value
