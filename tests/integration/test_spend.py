"""Spend and the daily budget (dynamo.openai_port.spend) on the real PostgreSQL: sums by UTC day and
month, shared by every process on the database, and the pause that follows the budget; a
cost written with its step counts as one written by itself, once."""

from __future__ import annotations

import datetime
import logging
import uuid

import pytest
import trio

from dynamo import metrics
from dynamo.database.port import open_database
from dynamo.domain.jobs import Step
from dynamo.openai_port.client import Answer
from dynamo.openai_port.pricing import PriceTable
from dynamo.openai_port.spend import IMAGE, NAME, Spend
from tests.support import infra
from tests.support.timeouts import SLOW_S as TEST_TIMEOUT_S

pytestmark = pytest.mark.integration

UTC = datetime.UTC
NOW = datetime.datetime(2026, 12, 15, 18, 30, tzinfo=UTC)
IMAGE_USAGE = {"input_tokens": 40, "output_tokens": 439, "total_tokens": 479,
               "input_tokens_details": {"text_tokens": 40, "image_tokens": 0},
               "output_tokens_details": {"image_tokens": 439, "text_tokens": 0}}
IMAGE_USD = (40 * 5 + 439 * 30) / 1e6


async def new_request(db) -> uuid.UUID:
    request_id, _ = await db.insert_request(
        viewer_id="90790024", display_name="wasabimilkshake", broadcast_id=None,
        screening_id=None, style="ghost", inputs={"subject": "a seal"}, prompt="p",
        source="http", owner=None, timeout_s=900, points_cost=200)
    return request_id


async def record(spend: Spend, request_id: uuid.UUID, kind: str, answer: Answer) -> float:
    """One answered call written by itself (as the image screen writes its cost); its USD."""
    row = spend.row(request_id, kind, answer)
    await spend.write([row])
    return row.cost_usd


def spent_usd(model: str, kind: str) -> float:
    """The spend metric of this process so far."""
    return metrics.REGISTRY.get_sample_value(
        "dynamo_openai_spend_usd_total", {"model": model, "kind": kind}) or 0.0


async def backdate(db, request_id, when: datetime.datetime) -> None:
    await db.execute("update dynamo.openai_call set created_at = $2 where image_request_id = $1",
                     request_id, when)


async def test_spend_by_utc_day_and_month_shared_by_processes(aio_loop, pg_database, caplog):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_database(infra.pg_dsn(pg_database)) as db:
            await db.apply_schema()
            await db.apply_schema()  # safe to apply again
            one = Spend(db, PriceTable(), daily_budget_usd=0.02, now=lambda: NOW)
            other = Spend(db, PriceTable(), daily_budget_usd=0.02, now=lambda: NOW)  # process 2
            image = Answer(None, {}, "gpt-image-2.6-flare", IMAGE_USAGE)
            name = Answer(None, {}, "gpt-6-luna", {"prompt_tokens": 30, "completion_tokens": 20})
            last_month, yesterday, today = [await new_request(db) for _ in range(3)]
            for request_id in (last_month, yesterday, today):
                assert await record(one, request_id, IMAGE, image) == pytest.approx(IMAGE_USD)
            await record(one, today, NAME, name)
            await backdate(db, last_month, datetime.datetime(2026, 11, 30, 23, 59, tzinfo=UTC))
            await backdate(db, yesterday, datetime.datetime(2026, 12, 14, 23, 59, tzinfo=UTC))
            await backdate(db, today, datetime.datetime(2026, 12, 15, 0, 1, tzinfo=UTC))
            name_usd = (30 * 0.10 + 20 * 0.50) / 1e6
            today_usd, month_usd = await other.totals()
            assert today_usd == pytest.approx(IMAGE_USD + name_usd)
            assert month_usd == pytest.approx(2 * IMAGE_USD + name_usd)
            assert not await other.paused()  # 0.0135 of 0.02
            with caplog.at_level(logging.WARNING):
                await record(one, today, IMAGE, image)  # process 1 spends past the budget
                await backdate(db, today, datetime.datetime(2026, 12, 15, 0, 1, tzinfo=UTC))
                assert await other.paused() and await other.paused()
                assert await one.paused()
            status = await other.status_json()
            calls = await one.request_calls(today)
    assert status == {"today_usd": pytest.approx(2 * IMAGE_USD + name_usd, abs=1e-6),
                      "month_usd": pytest.approx(3 * IMAGE_USD + name_usd, abs=1e-6),
                      "daily_budget_usd": 0.02, "paused": True,
                      "paused_until": "2026-12-16T00:00:00Z"}
    assert [(c["kind"], c["model"]) for c in calls] == [
        ("image", "gpt-image-2.6-flare"), ("name", "gpt-6-luna"), ("image", "gpt-image-2.6-flare")]
    assert calls[0]["usage"] == IMAGE_USAGE
    # One WARNING per process and paused day, however often it is asked.
    warned = [r.getMessage() for r in caplog.records if r.name == "dynamo.openai_port.spend"]
    assert len(warned) == 2 and all("paused until 2026-12-16T00:00:00Z" in w for w in warned)


async def test_without_a_budget_nothing_pauses(aio_loop, pg_database):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_database(infra.pg_dsn(pg_database)) as db:
            await db.apply_schema()
            spend = Spend(db, PriceTable())
            request_id = await new_request(db)
            image = Answer(None, {}, "gpt-image-2.6-flare", IMAGE_USAGE)
            await record(spend, request_id, IMAGE, image)
            assert not await spend.paused()
            status = await spend.status_json()
    assert status["daily_budget_usd"] is None and status["paused_until"] is None


async def test_a_cost_written_with_its_step_is_spent_once(aio_loop, pg_database):
    """The image's cost goes with GENERATING → GENERATED: today's spend, the request's
    calls and the metric count it once, also when the write is tried again."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_database(infra.pg_dsn(pg_database)) as db:
            await db.apply_schema()
            spend = Spend(db, PriceTable(), daily_budget_usd=0.02)
            request_id = await new_request(db)
            for old, new in [(Step.RECEIVED, Step.RESERVING), (Step.RESERVING, Step.RESERVED),
                             (Step.RESERVED, Step.SCREENED), (Step.SCREENED, Step.GENERATING)]:
                assert await db.advance(request_id, [old], new)
            before_usd = spent_usd("gpt-image-2.6-flare", IMAGE)
            answer = Answer(None, {}, "gpt-image-2.6-flare", IMAGE_USAGE)
            image = spend.row(request_id, IMAGE, answer)
            assert await db.save_generated(request_id, b"png", costs=[image])
            assert not await db.save_generated(request_id, b"png", costs=[image])  # again
            spend.counted([image])  # once, after the write went through
            today_usd, _ = await spend.totals()
            calls = await spend.request_calls(request_id)
            row = await db.load_request(request_id)
    assert today_usd == pytest.approx(IMAGE_USD)
    assert [(c["kind"], c["usage"]) for c in calls] == [(IMAGE, IMAGE_USAGE)]
    assert float(row["cost_usd"]) == pytest.approx(IMAGE_USD)
    assert spent_usd("gpt-image-2.6-flare", IMAGE) - before_usd == pytest.approx(IMAGE_USD)
