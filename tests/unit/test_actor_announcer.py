"""The announcer actor alone: the onscreen alert, then the viewer's result (contract §2,
§3), with the broker port faked."""

import trio

from actors import announcer
from dynamo.domain.jobs import Reason, Step
from tests.fakes.ports import (
    FakeBroker,
    channel,
    nothing_within,
)
from tests.support.actor import ActorHarness
from tests.support.timeouts import VIRTUAL_S as TEST_TIMEOUT_S

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
