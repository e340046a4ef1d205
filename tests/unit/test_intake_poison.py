"""The intake actor and poison messages (issue 10): a delivery whose handling crashes is
requeued, and dead-lettered with the error after three crashes, while the actor keeps
consuming; an outage is not counted against the message. Fake broker and database."""

from __future__ import annotations

import copy
import json

import pytest
import trio

from dynamo.database.errors import DatabaseUnavailable
from dynamo.domain import genreq
from dynamo.domain.jobs import Step, Viewer
from dynamo.inflight import attempts
from tests.fakes.ports import MemoryDatabase, make_pipeline
from tests.support.timeouts import VIRTUAL_S as TEST_TIMEOUT_S
from tests.unit.test_actor_intake import Intake

GHOST = {"type": "image",
         "viewer": {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"},
         "payload": {"style": "ghost", "inputs": {"subject": "a seal"}}}


def ghost(subject: str) -> bytes:
    message = copy.deepcopy(GHOST)
    message["payload"]["inputs"]["subject"] = subject
    return json.dumps(message).encode()


class CrashingDatabase(MemoryDatabase):
    """Storing a request whose subject is in `crash_on` raises, `crashes` times each
    (forever by default): a bug that one message triggers."""

    def __init__(self, crash_on: dict[str, Exception], crashes: int = 1_000):
        super().__init__()
        self.crash_on = crash_on
        self.crashes_left = {subject: crashes for subject in crash_on}
        self.attempts: list[str] = []

    async def insert_request(self, **fields):
        subject = fields["inputs"].get("subject")
        self.attempts.append(subject)
        if subject in self.crash_on and self.crashes_left[subject] > 0:
            self.crashes_left[subject] -= 1
            raise self.crash_on[subject]
        return await super().insert_request(**fields)


def intake_on(db, deliveries) -> Intake:
    """The intake harness on `db`, with room for every answer the test lets pile up."""
    return Intake(deliveries, db=db, channel_capacity=64)


@pytest.mark.parametrize("message_id", ["poison-1", None])
async def test_a_delivery_that_keeps_crashing_is_dead_lettered_after_three_attempts(
        autojump_clock, message_id):
    with trio.fail_after(TEST_TIMEOUT_S):
        db = CrashingDatabase({"a poison seal": RuntimeError("a bug this message triggers")})
        actor = intake_on(db, [(ghost("a seal"), "m-1", False), (ghost("a poison seal"), message_id, False),
                            (ghost("an owl"), "m-3", False)])
        async with actor.run():  # a crash of the actor would fail the test here
            await actor.all_settled()
            jobs = [await actor.reserve_recv.receive() for _ in range(2)]

        assert db.attempts.count("a poison seal") == attempts.MAX_ATTEMPTS
        tries = [d for d in actor.broker.deliveries_given if d.body == ghost("a poison seal")]
        assert [d.redelivered for d in tries] == [False, True, True]
        assert [getattr(d, "requeued", False) for d in tries] == [True, True, False]
        assert tries[-1].dead_letter_reason == (
            "crashed intake 3 times: RuntimeError: a bug this message triggers")
        assert actor.broker.dead_letters == [(ghost("a poison seal"), tries[-1].dead_letter_reason)]
        # The others went on: stored, acked, sent on; no row for the poison message.
        assert sorted(job.description for job in jobs) == ["a seal", "an owl"]
        assert sorted(row["inputs"]["subject"] for row in db.rows()) == ["a seal", "an owl"]


async def test_a_delivery_that_crashes_once_is_taken_on_its_second_attempt(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        db = CrashingDatabase({"a seal": RuntimeError("a fluke")}, crashes=1)
        actor = intake_on(db, [(ghost("a seal"), "m-1", False)])
        async with actor.run():
            job = await actor.reserve_recv.receive()
            await actor.all_settled()
        assert job.description == "a seal" and db.row(job.id)["step"] == Step.RECEIVED.value
        assert actor.broker.dead_letters == []
        assert [d.acked for d in actor.broker.deliveries_given] == [False, True]


async def test_an_outage_is_not_counted_against_the_message(autojump_clock):
    """The database drops out five times in a row under one message: waited out each
    time (dynamo.supervision.outages), never counted as a crash; the message is then taken once."""
    with trio.fail_after(TEST_TIMEOUT_S):
        db = CrashingDatabase({"a seal": DatabaseUnavailable("connection refused")},
                              crashes=attempts.MAX_ATTEMPTS + 2)
        actor = intake_on(db, [(ghost("a seal"), "m-1", False)])
        async with actor.run():
            job = await actor.reserve_recv.receive()
            await actor.all_settled()
        assert job.description == "a seal" and db.attempts.count("a seal") == attempts.MAX_ATTEMPTS + 3
        assert actor.broker.dead_letters == [] and len(actor.broker.deliveries_given) == 1
        assert actor.broker.deliveries_given[0].acked


async def test_a_crash_after_the_ack_is_logged_and_the_actor_goes_on(autojump_clock, monkeypatch):
    with trio.fail_after(TEST_TIMEOUT_S):
        db = MemoryDatabase()
        actor = intake_on(db, [(ghost("a seal"), "m-1", False), (ghost("an owl"), "m-2", False)])
        real_job = actor.pipeline.job_from_row  # the job made from the stored row
        calls = []

        def job(row):
            calls.append(row["id"])
            if len(calls) == 1:
                raise RuntimeError("a bug after the ack")
            return real_job(row)

        monkeypatch.setattr(actor.pipeline, "job_from_row", job)
        async with actor.run():
            await actor.all_settled()
            sent = await actor.reserve_recv.receive()
        assert sent.description == "an owl"
        assert [d.acked for d in actor.broker.deliveries_given] == [True, True]
        assert actor.broker.dead_letters == [] and len(db.rows()) == 2


def test_counts_are_bounded_and_forgotten():
    crashed = attempts.CrashedAttempts(remembered=2)
    assert [crashed.crashed("a"), crashed.crashed("a")] == [1, 2]
    crashed.crashed("b")
    crashed.crashed("c")  # "a" is the oldest: forgotten
    assert crashed.crashed("a") == 1
    crashed.forget("a")
    assert crashed.crashed("a") == 1
    assert attempts.message_key("id-1", b"x") == "message-id:id-1"
    assert attempts.message_key(None, b"x") == attempts.message_key("", b"x") != attempts.message_key(None, b"y")


async def test_an_invalid_message_with_a_list_subject_is_answered_and_dead_lettered(autojump_clock):
    """Intake stored such inputs as they came, then crashed reading its own row back."""
    with trio.fail_after(TEST_TIMEOUT_S):
        message = copy.deepcopy(GHOST)
        message["payload"]["inputs"] = {"subject": ["a"], "note": "a\x00b", "n": 5}
        body = json.dumps(message).encode()
        db = MemoryDatabase()
        actor = intake_on(db, [(body, "m-1", False)])
        async with actor.run():
            answered = await actor.results_recv.receive()
            await actor.all_settled()
        assert actor.broker.dead_letters == [(body, "payload.inputs.subject: must be a valid string")]
        assert answered.failure.reason.value == "invalid" and answered.description == ""
        assert db.row(answered.id)["inputs"] == {"note": "ab"}  # its text fields, storable


def test_what_is_kept_of_an_invalid_message_can_be_stored():
    """PostgreSQL refuses NUL in text and jsonb: found by the broker fuzz (a style "a\\0b")."""
    message = copy.deepcopy(GHOST)
    message["payload"] = {"style": "a\x00b", "inputs": {"subject": "a\x00b", "k\x00": "v", "n": [1]}}
    refusal = genreq.InvalidRequest("payload.style: bad", Viewer("1", "x"))
    fields = make_pipeline(MemoryDatabase()).invalid_fields(refusal, json.dumps(message).encode())
    assert fields["style"] == "ab" and fields["inputs"] == {"subject": "ab", "k": "v"}
