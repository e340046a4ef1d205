"""The database port's promises, checked on the real PostgreSQL (`dynamo.database.port.Database`)
and on the in-memory fake the actor unit tests use (`tests.fakes.ports.MemoryDatabase`),
with the same cases: a change to either that breaks a promise fails here, and the fake
cannot drift from the real thing unnoticed.

- intake: a redelivered body without `message_id` is matched to the oldest identical
  body stored and never acked, once (`claim_unacked_by_body`); a `message_key` is one
  request however often it is inserted;
- steps: every step change is a compare-and-set (`advance`, `save_generated`,
  `save_image`): it moves a request only from the steps it names, and of two racing
  changes from one step exactly one wins (on PostgreSQL they really run at once);
- flows: a flow id belongs to one request (`store_flow`, `adopt_flow`,
  `record_late_flow`), whoever gets there first, even at once;
- costs: a step write carries the costs of the calls before it (`costs=`), written in
  the same statement whether the step moves or not, each once however often the write
  is tried (a COMMIT whose answer was lost is tried again as it was);
- Discord: `mark_discord_posted` is true once.
"""

from __future__ import annotations

import datetime
import uuid
from functools import partial

import pytest
import trio

from dynamo.database import spend_store
from dynamo.database.port import Database, open_database
from dynamo.database.spend_store import CallCost
from dynamo.domain.jobs import Step
from tests.fakes.ports import MemoryDatabase
from tests.support import infra
from tests.support.timeouts import PORT_S as TEST_TIMEOUT_S

pytestmark = pytest.mark.integration

# Races run this many times on PostgreSQL, each a fresh pair of concurrent statements.
RACES = 20


@pytest.fixture(params=["memory", "postgres"])
async def db(request, aio_loop):
    if request.param == "memory":
        yield MemoryDatabase()
        return
    name = await infra.create_database()
    try:
        async with open_database(infra.pg_dsn(name)) as database:
            await database.apply_schema()
            yield database
    finally:
        await infra.drop_database(name)


async def store(db, *, viewer="1001", message_key=None, body_sha256=None, acked=True) -> uuid.UUID:
    request_id, created = await db.insert_request(
        viewer_id=viewer, display_name="GhostFan", broadcast_id=None, screening_id=None,
        style="ghost", inputs={"subject": "a seal"}, prompt="a seal", source="broker",
        owner=None, timeout_s=900, points_cost=200, message_key=message_key,
        body_sha256=body_sha256, intake_acked=acked)
    assert created
    return request_id


async def test_a_stored_request_comes_back_as_it_is_read(db):
    """`store_request` returns the new row in the round trip that stores it, the same
    as `load_request` reads it; for a key stored before, that request's row."""
    with trio.fail_after(TEST_TIMEOUT_S):
        fields = dict(
            viewer_id="1001", display_name="GhostFan", broadcast_id=7, screening_id=None,
            style="ghost", inputs={"subject": "a seal"}, prompt="a seal", source="broker",
            owner=None, timeout_s=900, points_cost=200, message_key="message-id:m1")
        row, created = await db.store_request(**fields)
        assert created and dict(row) == dict(await db.load_request(row["id"]))
        again, created = await db.store_request(**fields)
        assert not created and dict(again) == dict(row)


async def step_of(db, request_id) -> str:
    return (await db.load_request(request_id))["step"]


async def at_step(db, step: Step, **fields) -> uuid.UUID:
    """A request moved step by step (each a compare-and-set) to `step`."""
    request_id = await store(db)
    path = [Step.RECEIVED, Step.RESERVING, Step.RESERVED, Step.SCREENED, Step.GENERATING]
    for old, new in zip(path, path[1:], strict=False):
        if old is step:
            break
        assert await db.advance(request_id, [old], new)
    assert await step_of(db, request_id) == step.value
    return request_id


# -- intake -------------------------------------------------------------------------------


async def test_a_redelivered_body_claims_the_oldest_unacked_identical_one_once(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        body = "ab" * 32
        acked = await store(db, body_sha256=body, acked=True)
        first = await store(db, body_sha256=body, acked=False)
        second = await store(db, body_sha256=body, acked=False)
        other = await store(db, body_sha256="cd" * 32, acked=False)
        assert await db.claim_unacked_by_body(body) == first
        assert await db.claim_unacked_by_body(body) == second
        assert await db.claim_unacked_by_body(body) is None
        assert await db.claim_unacked_by_body("ef" * 32) is None
        assert acked not in (first, second) and other not in (first, second)
        assert await db.claim_unacked_by_body("cd" * 32) == other


async def test_a_message_key_is_one_request(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        first = await store(db, message_key="message-1")
        again, created = await db.insert_request(
            viewer_id="1001", display_name="GhostFan", broadcast_id=None, screening_id=None,
            style="ghost", inputs={"subject": "a seal"}, prompt="a seal", source="broker",
            owner=None, timeout_s=900, points_cost=200, message_key="message-1")
        assert (again, created) == (first, False)


# -- steps --------------------------------------------------------------------------------


async def test_advance_moves_only_from_the_steps_it_names(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await store(db)
        assert not await db.advance(request_id, [Step.RESERVED], Step.SCREENED)
        assert await step_of(db, request_id) == "received"
        assert await db.advance(request_id, [Step.RECEIVED], Step.RESERVING)
        assert not await db.advance(request_id, [Step.RECEIVED], Step.RESERVING)
        assert not await db.advance(uuid.uuid4(), [Step.RECEIVED], Step.RESERVING)
        row = await db.load_request(request_id)
        assert (row["step"], row["state"]) == ("reserving", "queued")


async def test_a_failure_then_done_ends_failed_and_a_success_succeeded(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        failed = await store(db)
        assert await db.advance(failed, [Step.RECEIVED], Step.FAILING, failure_reason="cancelled")
        assert (await db.load_request(failed))["state"] == "processing"
        assert await db.advance(failed, [Step.FAILING], Step.REFUNDED)
        assert await db.advance(failed, [Step.REFUNDED], Step.DONE)
        row = await db.load_request(failed)
        assert (row["step"], row["state"], row["failure_reason"]) == ("done", "failed", "cancelled")
        assert row["finished_at"] is not None
        succeeded = await at_step(db, Step.GENERATING)
        assert await db.save_generated(succeeded, b"png")
        assert await db.save_image(succeeded, "https://cdn/x.png", "#123456")
        for old, new in [(Step.STORED, Step.ANNOUNCED), (Step.ANNOUNCED, Step.ACCEPTED),
                         (Step.ACCEPTED, Step.DONE)]:
            assert await db.advance(succeeded, [old], new)
        row = await db.load_request(succeeded)
        assert (row["step"], row["state"], row["image_url"]) == ("done", "succeeded", "https://cdn/x.png")


async def test_the_raw_image_is_kept_only_from_generating_and_dropped_once_stored(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await at_step(db, Step.SCREENED)
        assert not await db.save_generated(request_id, b"png")
        assert await db.load_generated(request_id) is None
        assert await db.advance(request_id, [Step.SCREENED], Step.GENERATING)
        assert await db.save_generated(request_id, b"png")
        assert not await db.save_generated(request_id, b"other")  # generated already
        assert await db.load_generated(request_id) == b"png"
        assert await db.save_image(request_id, "https://cdn/x.png", "#000000")
        assert not await db.save_image(request_id, "https://cdn/y.png", "#000000")
        assert await db.load_generated(request_id) is None
        assert (await db.load_request(request_id))["image_url"] == "https://cdn/x.png"


CANCEL_FROM = [Step.RECEIVED, Step.RESERVING, Step.RESERVED, Step.SCREENED]


async def race(*calls) -> list:
    """Runs the calls at once; their results in order."""
    results = [None] * len(calls)

    async def run(index, call):
        results[index] = await call()

    async with trio.open_nursery() as nursery:
        for index, call in enumerate(calls):
            nursery.start_soon(run, index, call)
    return results


async def test_a_cancel_racing_the_generators_claim_one_wins(db):
    """The generator's claim (screened → generating) and a cancel (to failing, only from
    a cancellable step) at once: exactly one moves the request, every time."""
    with trio.fail_after(TEST_TIMEOUT_S):
        outcomes = set()
        for _ in range(RACES):
            request_id = await at_step(db, Step.SCREENED)
            claimed, cancelled = await race(
                partial(db.advance, request_id, [Step.SCREENED], Step.GENERATING),
                partial(db.advance, request_id, CANCEL_FROM, Step.FAILING,
                        failure_reason="cancelled"))
            assert claimed != cancelled
            assert await step_of(db, request_id) == ("generating" if claimed else "failing")
            outcomes.add(claimed)
        print(f"claim won: {sorted(outcomes)}")


async def test_two_copies_of_a_step_move_the_request_once(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        for _ in range(RACES):
            request_id = await at_step(db, Step.GENERATING)
            results = await race(partial(db.save_generated, request_id, b"one"),
                                 partial(db.save_generated, request_id, b"two"))
            assert sorted(results) == [False, True]


# -- flows --------------------------------------------------------------------------------


async def test_a_flow_id_is_stored_for_one_request_only(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        first = await at_step(db, Step.RESERVING)
        second = await at_step(db, Step.RESERVING)
        assert await db.store_flow(first, "flow-a") == "stored"
        assert await db.adopt_flow(second, "flow-a") == "taken"
        assert await db.store_flow(second, "flow-a") == "taken"
        assert await step_of(db, second) == "reserving"
        assert await db.adopt_flow(second, "flow-b") == "stored"
        assert await db.adopt_flow(second, "flow-c") == "moved"  # reserved already
        rows = {rid: await db.load_request(rid) for rid in (first, second)}
        assert [(r["step"], r["flow_id"], r["state"]) for r in rows.values()] == [
            ("reserved", "flow-a", "queued"), ("reserved", "flow-b", "queued")]


async def test_two_requests_adopting_one_flow_at_once_one_gets_it(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        for n in range(RACES):
            first, second = await at_step(db, Step.RESERVING), await at_step(db, Step.RESERVING)
            flow = f"flow-{n}"
            results = await race(partial(db.adopt_flow, first, flow),
                                 partial(db.store_flow, second, flow))
            assert sorted(results) == ["stored", "taken"]


async def test_a_late_flow_is_recorded_unless_another_request_holds_it(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        holder = await at_step(db, Step.RESERVING)
        assert await db.store_flow(holder, "flow-held") == "stored"
        cancelled = await at_step(db, Step.RESERVING)
        assert await db.advance(cancelled, [Step.RESERVING], Step.FAILING, failure_reason="cancelled")
        assert await db.store_flow(cancelled, "flow-late") == "moved"
        assert await db.record_late_flow(cancelled, "flow-held") is False
        assert await db.record_late_flow(cancelled, "flow-late") is True
        assert (await db.load_request(cancelled))["flow_id"] == "flow-late"


async def test_the_reservations_start_is_kept(db):
    import datetime
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await store(db)
        began = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        assert await db.advance(request_id, [Step.RECEIVED], Step.RESERVING, reserving_since=began)
        assert await db.reserving_since(request_id) == began
        assert await db.reserving_since(uuid.uuid4()) is None


# -- costs with the steps -----------------------------------------------------------------

IMAGE_USAGE = {"input_tokens": 40, "output_tokens": 439, "total_tokens": 479}


def answered(request_id: uuid.UUID, kind: str, model: str, usage: dict, usd: float) -> CallCost:
    """A call's row as `Spend.row` builds it, answered now."""
    return CallCost(request_id, kind, model, usage, usd, datetime.datetime.now(datetime.UTC))


async def costs_of(db, request_id) -> list[tuple]:
    """(kind, model, usage, cost_usd, created_at) of the request's stored calls, oldest first."""
    if isinstance(db, MemoryDatabase):
        rows = [call for call in db.openai_calls if call["image_request_id"] == request_id]
    else:
        rows = await spend_store.request_calls(db, request_id)
    return [(r["kind"], r["model"], dict(r["usage"]), float(r["cost_usd"]), r["created_at"])
            for r in rows]


def stored(*costs: CallCost) -> list[tuple]:
    return [(c.kind, c.model, c.usage, c.cost_usd, c.answered_at) for c in costs]


async def written_together(db, request_id) -> bool:
    """On PostgreSQL: whether the request's row and every one of its calls were last
    written by one transaction (the same `xmin`); the fake has no transactions."""
    if isinstance(db, MemoryDatabase):
        return True
    request_xmin = await db.fetchval(
        "select xmin::text from dynamo.image_request where id = $1", request_id)
    calls_xmin = await db.fetch(
        "select distinct xmin::text as x from dynamo.openai_call where image_request_id = $1",
        request_id)
    return [row["x"] for row in calls_xmin] == [request_xmin]


async def test_the_screening_costs_are_written_with_screened_once(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await at_step(db, Step.RESERVED)
        moderation = answered(request_id, "moderation", "omni-moderation-latest", {}, 0.0)
        name = answered(request_id, "name", "gpt-6-luna",
                        {"prompt_tokens": 30, "completion_tokens": 20}, 0.000013)
        screened = partial(db.advance, request_id, [Step.RESERVED], Step.SCREENED,
                           costs=[moderation, name])
        assert await screened()
        assert await costs_of(db, request_id) == stored(moderation, name)
        assert await written_together(db, request_id)
        # Tried again as it was (its COMMIT's answer lost): no move, and no second row.
        assert not await screened()
        assert await costs_of(db, request_id) == stored(moderation, name)
        assert float((await db.load_request(request_id))["cost_usd"]) == pytest.approx(0.000013)


async def test_the_image_cost_is_written_with_the_image_even_when_it_is_not_kept(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        kept = await at_step(db, Step.GENERATING)
        image = answered(kept, "image", "gpt-image-2.6-flare", IMAGE_USAGE, 0.013370)
        assert await db.save_generated(kept, b"png", "p", costs=[image])
        assert await costs_of(db, kept) == stored(image)
        assert await written_together(db, kept)
        assert not await db.save_generated(kept, b"png", "p", costs=[image])  # tried again
        assert await costs_of(db, kept) == stored(image)
        # Cancelled while its image was bought (another process): nothing kept, the cost is.
        cancelled = await at_step(db, Step.GENERATING)
        assert await db.advance(cancelled, [Step.GENERATING], Step.FAILING,
                                failure_reason="cancelled")
        paid = answered(cancelled, "image", "gpt-image-2.6-flare", IMAGE_USAGE, 0.013370)
        for _ in range(2):
            assert not await db.save_generated(cancelled, b"png", "p", costs=[paid])
        assert await db.load_generated(cancelled) is None
        assert await step_of(db, cancelled) == "failing"
        assert await costs_of(db, cancelled) == stored(paid)


async def test_two_calls_of_one_kind_are_two_rows(db):
    """A row is known by its request, kind and time: a second call of a kind (a name
    asked again) is not taken for the first one written again."""
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await at_step(db, Step.RESERVED)
        first = answered(request_id, "name", "gpt-6-luna", {"completion_tokens": 1}, 0.0)
        await trio.sleep(0.001)
        second = answered(request_id, "name", "gpt-6-luna", {"completion_tokens": 2}, 0.0)
        assert await db.advance(request_id, [Step.RESERVED], Step.SCREENED, costs=[first, second])
        assert await costs_of(db, request_id) == stored(first, second)


async def test_costs_written_by_themselves_are_written_once(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await at_step(db, Step.RESERVED)
        flagged = answered(request_id, "moderation", "omni-moderation-latest", {}, 0.0)
        for _ in range(2):
            if isinstance(db, Database):
                await spend_store.record_call(db, flagged)
            else:
                db.record_calls([flagged])
        assert await costs_of(db, request_id) == stored(flagged)


# -- Discord ------------------------------------------------------------------------------


async def test_a_discord_post_is_claimed_once(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await store(db)
        assert await db.mark_discord_posted(request_id) is True
        assert await db.mark_discord_posted(request_id) is False
        other = await store(db)
        assert sorted(await race(lambda: db.mark_discord_posted(other),
                                 lambda: db.mark_discord_posted(other))) == [False, True]
