"""The approval queries (dynamo/database/approval.py) on the real PostgreSQL: a wait begins only
from `generated`, its deadline is the earlier of the timeout and the request's own, a
decision is taken once however many race for it, a timeout applies only once the wait
is over, and the resume sweep never claims a waiting request (any process may decide)."""

from __future__ import annotations

import uuid

import pytest
import trio

from dynamo.database.approval import APPROVED, REJECTED, TIMEOUT, ApprovalQueries
from dynamo.database.port import open_database
from dynamo.domain.jobs import Step
from tests.support import infra
from tests.support.timeouts import SLOW_S as TEST_TIMEOUT_S

pytestmark = pytest.mark.integration

# Decisions sent at once on one waiting request, each on its own connection of the pool.
RACERS = 8
RACES = 10


@pytest.fixture
async def db(aio_loop):
    name = await infra.create_database()
    try:
        async with open_database(infra.pg_dsn(name)) as database:
            await database.apply_schema()
            yield database
    finally:
        await infra.drop_database(name)


async def waiting_request(db, *, timeout_s: float = 120, request_timeout_s: float = 900):
    request_id, _ = await db.insert_request(
        viewer_id="1001", display_name="GhostFan", broadcast_id=None, screening_id=None,
        style="ghost", inputs={"subject": "a seal"}, prompt="a seal", source="http",
        owner=None, timeout_s=request_timeout_s, points_cost=200)
    for step in (Step.RESERVED, Step.SCREENED, Step.GENERATING):
        assert await db.advance(request_id, [s for s in Step], step)
    assert await db.save_generated(request_id, b"\xff\xd8 image bytes")
    assert await ApprovalQueries(db).await_approval(request_id, timeout_s)
    return request_id


async def test_racing_decisions_end_in_exactly_one(db):
    queries = ApprovalQueries(db)
    with trio.fail_after(TEST_TIMEOUT_S):
        for race in range(RACES):
            request_id = await waiting_request(db)
            outcomes: list[tuple[str, bool]] = []

            async def decide(n: int, request_id=request_id, outcomes=outcomes):
                approve = n % 2 == 0
                taken = await queries.decide(
                    request_id, APPROVED if approve else REJECTED, approve=approve,
                    owner=uuid.uuid4(), message="no", detail=f"racer {n}")
                outcomes.append(("approve" if approve else "reject", bool(taken)))

            async with trio.open_nursery() as nursery:
                for n in range(RACERS):
                    nursery.start_soon(decide, n)
            winners = [kind for kind, taken in outcomes if taken]
            assert len(winners) == 1, (race, outcomes)
            row = await db.load_request(request_id)
            if winners == ["approve"]:
                assert row["step"] == "approved" and row["failure_reason"] is None
                assert await db.load_generated(request_id) is not None  # still to upload
            else:
                assert (row["step"], row["failure_reason"]) == ("failing", "rejected")
                assert await db.load_generated(request_id) is None  # the image is gone
            assert await queries.preview(request_id) is None


async def test_a_timeout_applies_only_once_the_wait_is_over_and_never_after_the_request(db):
    queries = ApprovalQueries(db)
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await waiting_request(db, timeout_s=1)
        assert await queries.timed_out() == []
        assert not await queries.decide(request_id, TIMEOUT, approve=False, owner=uuid.uuid4())
        await trio.sleep(1.2)
        assert await queries.timed_out() == [request_id]
        assert await queries.decide(request_id, TIMEOUT, approve=True, owner=uuid.uuid4())
        assert (await db.load_request(request_id))["approval_decision"] == "timeout"
        # A request that expires before the approval timeout: its own deadline wins.
        short = await waiting_request(db, timeout_s=600, request_timeout_s=30)
        row = await db.load_request(short)
        assert (row["approval_deadline"] - row["expires_at"]).total_seconds() == 0


async def test_a_wait_begins_only_from_generated_and_the_sweep_leaves_it_alone(db):
    queries = ApprovalQueries(db)
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await waiting_request(db)
        assert not await queries.await_approval(request_id, 120)  # already waiting
        claimed = await db.claim_unfinished(uuid.uuid4(), [], 15)
        assert request_id not in [row["id"] for row in claimed]
        waiting = await queries.preview(request_id)
        assert bytes(waiting["data"]) == b"\xff\xd8 image bytes"
        assert (await queries.counts())["waiting"] == 1
