"""The announcer actor alone: the onscreen alert, then the viewer's result (contract §2,
§3), with the broker port faked."""

import logging

import trio

from actors import announcer
from dynamo import metrics
from dynamo.domain.jobs import Reason, Step
from tests.fakes.ports import (
    FakeBroker,
    channel,
    nothing_within,
    running,
)
from tests.support.actor import ActorHarness
from tests.support.timeouts import VIRTUAL_S as TEST_TIMEOUT_S
from tests.unit.test_resume_unreadable import Sweep, SweptDatabase

QUIET_S = 60

VIEWER_JSON = {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"}


class Announcer(ActorHarness):
    CHANNELS = ("announce", "results", "finalize", "discord")
    JOB_ROW = {"flow_id": "flow-1"}

    def __init__(self, *, request_timeout_s: float = 900.0, fail_publishes: int = 0):
        super().__init__(request_timeout_s=request_timeout_s)
        self.broker = FakeBroker(fail_publishes=fail_publishes)

    async def job(self, *, url_suffix: str = "jpg", color: str = "#000000", name=None, **row):
        request_id = self.add_request(**row)
        if url_suffix:
            self.db.images[request_id] = {
                "url": f"https://cdn.example/{request_id}/{request_id}-0.{url_suffix}",
                "color": color}
        if name:
            self.db.answers[request_id] = {"prompt": "…", "value": name}
        return await self.in_flight(request_id)

    def run(self):
        return self.running(announcer.run, broker=self.broker,
                            announce_recv=self.announce_recv, results_recv=self.results_recv,
                            finalize_send=self.finalize_send, discord_send=self.discord_send)


# -- the alert --------------------------------------------------------------------------


async def test_stored_ghost_is_announced_then_sent_to_finalize(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer()
        job = await actor.job(step=Step.STORED)
        async with actor.run():
            await actor.announce_send.send(job)
            announced = await actor.finalize_recv.receive()
        [message] = actor.broker.published
        assert message.exchange == "onscreen-events"
        assert message.message_id == str(job.id)
        assert message.body == {
            "type": "image",
            "payload": {
                "type": "ghost",
                "viewer": VIEWER_JSON,
                "details": {"image_url": f"https://cdn.example/{job.id}/{job.id}-0.jpg",
                            "description": "a seal"},
            },
        }
        assert announced.id == job.id and announced.step is Step.ANNOUNCED
        row = actor.db.row(job.id)
        assert row["step"] == "announced" and row["announced_at"] is not None
        assert job.id in actor.pipeline.inflight  # not finished until its result is out


async def test_stored_friend_is_announced_with_name_and_color(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer()
        job = await actor.job(step=Step.STORED, style="friend", url_suffix="webp",
                              color="#5a3fc2", name="Sir Hatsworth")
        async with actor.run():
            await actor.announce_send.send(job)
            await actor.finalize_recv.receive()
        [message] = actor.broker.published
        assert message.body == {
            "type": "image",
            "payload": {
                "type": "friend",
                "viewer": VIEWER_JSON,
                "details": {"image_url": f"https://cdn.example/{job.id}/{job.id}-0.webp",
                            "description": "a caterpillar in a top hat",
                            "name": "Sir Hatsworth",
                            "background_color": "#5a3fc2"},
            },
        }


async def test_broker_failing_twice_then_ok_publishes_the_alert_once(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer(fail_publishes=2)
        job = await actor.job(step=Step.STORED)
        async with actor.run():
            await actor.announce_send.send(job)
            announced = await actor.finalize_recv.receive()
        assert actor.broker.publish_attempts == 3
        assert [m.message_id for m in actor.broker.published] == [str(job.id)]
        assert announced.step is Step.ANNOUNCED


async def test_broker_down_past_the_deadline_expires_the_request(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer(request_timeout_s=120, fail_publishes=10**6)
        job = await actor.job(step=Step.STORED)
        async with actor.run():
            await actor.announce_send.send(job)
            failed = await actor.finalize_recv.receive()
        assert trio.current_time() <= job.deadline
        assert failed.step is Step.FAILING and failed.failure.reason is Reason.EXPIRED
        assert actor.broker.published == []
        row = actor.db.row(job.id)
        assert (row["step"], row["failure_reason"]) == ("failing", "expired")


async def test_job_already_announced_is_not_announced_again(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer()
        job = await actor.job(step=Step.ANNOUNCED)
        async with actor.run():
            await actor.announce_send.send(job)
            await actor.finalize_recv.receive()
        assert actor.broker.publish_attempts == 0


# -- the result -------------------------------------------------------------------------


async def test_accepted_job_gets_a_success_result_and_is_done(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer()
        job = await actor.job(step=Step.ACCEPTED)
        async with actor.run():
            await actor.results_send.send(job)
            posted = await actor.discord_recv.receive()
        [message] = actor.broker.published
        assert message.exchange == "generation-results"
        assert message.message_id == f"{job.id}:result"
        assert message.body == {
            "request_id": str(job.id),
            "outcome": "success",
            "viewer": VIEWER_JSON,
            "style": "ghost",
            "description": "a seal",
            "image_url": f"https://cdn.example/{job.id}/{job.id}-0.jpg",
        }
        row = actor.db.row(job.id)
        assert (row["step"], row["state"]) == ("done", "succeeded")
        assert row["finished_at"] is not None
        assert job.id not in actor.pipeline.inflight
        assert posted.id == job.id and posted.step is Step.DONE


async def test_refunded_job_gets_a_failure_result(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer()
        job = await actor.job(
            step=Step.REFUNDED, url_suffix=None, failure_reason="rejected",
            error_message="Your image request was rejected by the content filter. No points were spent.",
            failure_detail="moderation flagged the subject")
        async with actor.run():
            await actor.results_send.send(job)
            await actor.db.wait_until(lambda: actor.db.row(job.id)["step"] == "done")
            assert await nothing_within(actor.discord_recv, QUIET_S) is None
        [message] = actor.broker.published
        assert message.exchange == "generation-results"
        assert message.message_id == f"{job.id}:result"
        assert message.body == {
            "request_id": str(job.id),
            "outcome": "failure",
            "viewer": VIEWER_JSON,
            "style": "ghost",
            "description": "a seal",
            "reason": "rejected",
            "message": "Your image request was rejected by the content filter. No points were spent.",
        }
        row = actor.db.row(job.id)
        assert (row["step"], row["state"]) == ("done", "failed")
        assert job.id not in actor.pipeline.inflight


async def test_invalid_request_gets_a_failure_result_with_its_style_as_sent(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer()
        job = await actor.job(
            step=Step.REFUNDED, url_suffix=None, style="dragon", inputs={"subject": "a big one"},
            prompt="", failure_reason="invalid", points_cost=0,
            error_message="Your image request could not be understood. No points were spent.")
        async with actor.run():
            await actor.results_send.send(job)
            await actor.db.wait_until(lambda: actor.db.row(job.id)["step"] == "done")
        [message] = actor.broker.published
        assert message.body == {
            "request_id": str(job.id),
            "outcome": "failure",
            "viewer": VIEWER_JSON,
            "style": "dragon",
            "description": "a big one",
            "reason": "invalid",
            "message": "Your image request could not be understood. No points were spent.",
        }


async def test_broker_failing_twice_then_ok_publishes_the_result_once(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer(fail_publishes=2)
        job = await actor.job(step=Step.ACCEPTED)
        async with actor.run():
            await actor.results_send.send(job)
            await actor.discord_recv.receive()
        assert actor.broker.publish_attempts == 3
        assert [m.message_id for m in actor.broker.published] == [f"{job.id}:result"]
        assert actor.db.row(job.id)["step"] == "done"


async def test_result_outlasts_a_long_broker_outage(autojump_clock):
    """A result is never given up, even after the request's own deadline."""
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer(request_timeout_s=60, fail_publishes=200)
        job = await actor.job(step=Step.REFUNDED, failure_reason="error", url_suffix=None)
        async with actor.run():
            await actor.results_send.send(job)
            await actor.db.wait_until(lambda: actor.db.row(job.id)["step"] == "done")
        assert trio.current_time() > job.deadline
        assert actor.broker.publish_attempts == 201 and len(actor.broker.published) == 1


async def test_full_discord_queue_skips_the_post_without_delaying_results(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer()
        actor.discord_send, actor.discord_recv = channel(0)  # nobody posting to Discord
        first = await actor.job(step=Step.ACCEPTED)
        second = await actor.job(step=Step.ACCEPTED)
        async with actor.run():
            await actor.results_send.send(first)
            await actor.results_send.send(second)
            await actor.db.wait_until(
                lambda: all(actor.db.row(j.id)["step"] == "done" for j in (first, second)))
        assert len(actor.broker.published) == 2


# -- one result's bug is its own ----------------------------------------------------------


def _job_errors() -> float:
    return metrics.REGISTRY.get_sample_value(
        "dynamo_job_errors_total", {"actor": announcer.ACTOR}) or 0.0


async def test_a_result_that_cannot_be_made_fails_alone_and_is_set_aside(autojump_clock, caplog):
    """An accepted request without its image (success_result raises): logged with its
    request id and counted; the actor goes on with the next result; the request leaves
    the pipeline but is not routed again by this process (the next start retries it)."""
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer()
        broken = await actor.job(step=Step.ACCEPTED, url_suffix=None)
        healthy = await actor.job(step=Step.ACCEPTED)
        before = _job_errors()
        with caplog.at_level(logging.ERROR):
            async with actor.run():
                await actor.results_send.send(broken)
                await actor.results_send.send(healthy)
                posted = await actor.discord_recv.receive()
                assert await nothing_within(actor.discord_recv, QUIET_S) is None
        assert posted.id == healthy.id
        assert [m.message_id for m in actor.broker.published] == [f"{healthy.id}:result"]
        assert _job_errors() == before + 1
        about_it = [r for r in caplog.records if getattr(r, "request_id", None) == str(broken.id)]
        assert about_it and about_it[0].exc_info is not None  # with its traceback
        assert actor.db.row(broken.id)["step"] == Step.ACCEPTED.value  # left as it was
        assert broken.id not in actor.pipeline.inflight
        assert broken.id in actor.pipeline.inflight.set_aside_ids()


async def test_the_resume_sweep_does_not_route_a_result_that_cannot_be_made_again(autojump_clock):
    """The sweep routes every unfinished row: a result that raises was routed again every
    5 s and crashed the announcer each time (5 crashes in 60 s end the process, at every
    start). Now it raises once, and the actor serves later results."""
    with trio.fail_after(TEST_TIMEOUT_S):
        db = SweptDatabase()
        broken = db.add_request(step=Step.ACCEPTED, flow_id="flow-1")  # no image stored
        sweep = Sweep(db)
        broker = FakeBroker()
        before = _job_errors()
        async with sweep.run(), running(
                announcer.run, broker=broker, pipeline=sweep.pipeline, announce_recv=channel()[1],
                results_recv=sweep.recv("results"), finalize_send=channel()[0],
                discord_send=None):
            await db.wait_until(lambda: db.claims >= 6)  # the first sweep, and five more
            healthy = db.add_request(step=Step.ACCEPTED, flow_id="flow-2")
            db.images[healthy] = {"url": f"https://cdn.example/{healthy}-0.jpg", "color": "#000000"}
            await db.wait_until(lambda: db.row(healthy)["step"] == Step.DONE.value)
        assert _job_errors() == before + 1
        assert [m.message_id for m in broker.published] == [f"{healthy}:result"]
        assert db.row(broken)["step"] == Step.ACCEPTED.value
