"""The intake actor alone: deliveries in, stored requests and jobs out (contract §2, §3)."""

import hashlib
import json
import uuid

import trio

from actors import intake
from dynamo.domain.jobs import Reason, Step, Style
from dynamo.domain.viewer_messages import VIEWER_MESSAGES
from dynamo.supervision.readiness import Readiness
from tests.fakes.ports import (
    FakeBroker,
    nothing_within,
)
from tests.support.actor import ActorHarness
from tests.support.timeouts import VIRTUAL_S as TEST_TIMEOUT_S

# Long enough (in virtual time, so instant) that anything the actor would still send is sent.
QUIET_S = 10

GHOST = json.dumps({
    "type": "image",
    "viewer": {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"},
    "state": {"broadcast_id": 13, "screening_id": "96d1ca5c-7658-48c9-8193-9d1739854467",
              "tape_id": 124},
    "payload": {"style": "ghost", "inputs": {"subject": "a seal"}},
}).encode()
FRIEND = json.dumps({
    "type": "image",
    "viewer": {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"},
    "state": {"broadcast_id": 0, "screening_id": "00000000-0000-0000-0000-000000000000",
              "tape_id": 0},
    "payload": {"style": "friend", "inputs": {"color": "yellow", "subject": "caterpillar in a top hat"}},
}).encode()
UNKNOWN_STYLE = json.dumps({
    "type": "image",
    "viewer": {"twitch_user_id": "1234", "twitch_display_name": "Someone"},
    "payload": {"style": "dragon", "inputs": {"subject": "a big one"}},
}).encode()


class Intake(ActorHarness):
    """The intake actor with its fakes, run for the block; `deliveries` are the broker's
    (a body, or (body, message id, redelivered))."""

    CHANNELS = ("reserve", "results")

    def __init__(self, deliveries, **harness):
        super().__init__(**harness)
        self.broker = FakeBroker(deliveries)
        self.readiness = Readiness(db=self.db, broker=self.broker)

    def run(self):
        return self.running(intake.run, broker=self.broker,
                            reserve_send=self.reserve_send, results_send=self.results_send,
                            readiness=self.readiness)

    async def all_settled(self):
        await self.broker.wait_until(
            lambda: self.broker.settled_count() == len(self.broker.deliveries_given))


async def test_valid_ghost_message_is_stored_then_acked_then_sent_to_reserve(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Intake([(GHOST, "msg-1", False)])
        delivery = actor.broker.deliveries_given[0]
        rows_when_acked = []
        original_ack = delivery.ack

        async def ack():
            rows_when_acked.append(actor.db.rows())
            await original_ack()

        delivery.ack = ack
        async with actor.run():
            assert actor.readiness.consuming is True
            job = await actor.reserve_recv.receive()
            await actor.all_settled()

        assert delivery.acked and delivery.dead_letter_reason is None
        # Stored before the ack: a crash in between cannot lose the request.
        assert [row["id"] for row in rows_when_acked[0]] == [job.id]
        [row] = actor.db.rows()
        assert row["id"] == job.id and isinstance(job.id, uuid.UUID) and job.id.version == 4
        assert row["twitch_user_id"] == "90790024"
        assert row["twitch_display_name"] == "wasabimilkshake"
        assert row["broadcast_id"] == 13
        assert row["screening_id"] == uuid.UUID("96d1ca5c-7658-48c9-8193-9d1739854467")
        assert row["style"] == "ghost" and row["inputs"] == {"subject": "a seal"}
        assert row["prompt"] == "a ghostly image of a seal, with glitchy VHS artifacts, dark background"
        assert (row["step"], row["state"], row["source"]) == ("received", "queued", "broker")
        assert row["points_cost"] == 200 and row["failure_reason"] is None
        assert actor.db.requests[job.id]["message_key"] == "message-id:msg-1"
        assert (job.step, job.style, job.description) == (Step.RECEIVED, Style.GHOST, "a seal")
        assert job.id in actor.pipeline.inflight
        assert actor.broker.dead_letters == [] and actor.broker.published == []
        assert actor.readiness.consuming is False  # stopped consuming on the way out


async def test_friend_with_nil_state_stores_nulls(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Intake([(FRIEND, "msg-f", False)])
        async with actor.run():
            job = await actor.reserve_recv.receive()
        row = actor.db.row(job.id)
        assert row["broadcast_id"] is None and row["screening_id"] is None
        assert row["inputs"] == {"color": "yellow", "subject": "caterpillar in a top hat"}
        assert job.description == "a caterpillar in a top hat"


async def test_same_message_id_twice_is_one_request(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Intake([(GHOST, "msg-1", False), (GHOST, "msg-1", True)])
        async with actor.run():
            job = await actor.reserve_recv.receive()
            await actor.all_settled()
            assert await nothing_within(actor.reserve_recv, QUIET_S) is None
        assert [row["id"] for row in actor.db.rows()] == [job.id]
        assert all(delivery.acked for delivery in actor.broker.deliveries_given)
        assert actor.broker.dead_letters == []


async def test_redelivery_without_message_id_matches_the_unacked_stored_request(autojump_clock):
    """A crash after storing and before the ack: the redelivery is the same request."""
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Intake([(GHOST, None, True)])
        stored_id = actor.db.add_request(
            body_sha256=hashlib.sha256(GHOST).hexdigest(), intake_acked=False)
        async with actor.run():
            await actor.all_settled()
            # Not routed again from here: the stored request is the resume sweep's.
            assert await nothing_within(actor.reserve_recv, QUIET_S) is None
        assert [row["id"] for row in actor.db.rows()] == [stored_id]
        assert actor.db.requests[stored_id]["intake_acked"] is True
        assert actor.broker.deliveries_given[0].acked


async def test_two_identical_bodies_published_separately_are_two_requests(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Intake([(GHOST, None, False), (GHOST, None, False)])
        async with actor.run():
            first = await actor.reserve_recv.receive()
            second = await actor.reserve_recv.receive()
            await actor.all_settled()
        assert first.id != second.id
        assert {row["id"] for row in actor.db.rows()} == {first.id, second.id}
        for request_id in (first.id, second.id):
            stored = actor.db.requests[request_id]
            # Acked, so that a later redelivery of the same body is not matched to it.
            assert stored["intake_acked"] is True
            assert stored["body_sha256"] == hashlib.sha256(GHOST).hexdigest()
            assert stored["message_key"] is None


async def test_redelivery_with_nothing_stored_is_a_new_request(autojump_clock):
    """Redelivered, but the crash came before the insert: it is stored now, once."""
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Intake([(GHOST, None, True)])
        async with actor.run():
            job = await actor.reserve_recv.receive()
        assert [row["id"] for row in actor.db.rows()] == [job.id]


async def test_invalid_json_is_dead_lettered_without_a_row(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Intake([(b"{not json", "msg-bad", False)])
        async with actor.run():
            await actor.all_settled()
            assert await nothing_within(actor.reserve_recv, QUIET_S) is None
            assert await nothing_within(actor.results_recv, QUIET_S) is None
        [(body, reason)] = actor.broker.dead_letters
        assert body == b"{not json"
        assert reason.startswith("body: not valid UTF-8 JSON")
        assert actor.broker.deliveries_given[0].dead_letter_reason == reason
        assert actor.db.rows() == []


async def test_invalid_request_with_a_viewer_is_dead_lettered_and_answered(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Intake([(UNKNOWN_STYLE, "msg-dragon", False)])
        async with actor.run():
            job = await actor.results_recv.receive()
            await actor.all_settled()
            assert await nothing_within(actor.reserve_recv, QUIET_S) is None
        [(body, reason)] = actor.broker.dead_letters
        assert body == UNKNOWN_STYLE and "payload.style" in reason
        [row] = actor.db.rows()
        assert row["id"] == job.id
        assert (row["twitch_user_id"], row["twitch_display_name"]) == ("1234", "Someone")
        assert row["failure_reason"] == "invalid"
        assert row["error_message"] == VIEWER_MESSAGES[Reason.INVALID]
        assert row["step"] == "refunded" and row["points_cost"] == 0
        assert row["style"] == "dragon"
        assert job.failure.reason is Reason.INVALID and job.step is Step.REFUNDED
        assert job.style is None and job.raw_style == "dragon"
        assert job.id in actor.pipeline.inflight


async def test_poison_message_between_two_good_ones_does_not_block_them(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Intake([(GHOST, "good-1", False), (b"\xff\xfe poison", "poison", False),
                        (FRIEND, "good-2", False)])
        async with actor.run():
            first = await actor.reserve_recv.receive()
            second = await actor.reserve_recv.receive()
            await actor.all_settled()
        assert (first.style, second.style) == (Style.GHOST, Style.FRIEND)
        assert [body for body, _ in actor.broker.dead_letters] == [b"\xff\xfe poison"]
        assert {row["id"] for row in actor.db.rows()} == {first.id, second.id}
        assert all(delivery.acked for delivery in actor.broker.deliveries_given)
