"""The image screen alone: a generated image in, judged by the moderation endpoint, out to
the uploader (contract §4), with the OpenAI port faked and the generator's permit server.

The image comes in hand from the generator; the database is read for it only when a job
was resumed (nothing in hand). The screening's cost is written once, also when its write
is tried again after a lost COMMIT, and also when the database comes back only after the
request's deadline (style.md 17).
"""

import trio

from actors import image_screen
from dynamo.database.errors import DatabaseUnavailable
from dynamo.domain.jobs import Step
from dynamo.openai_port.client import ImageVerdict
from tests.fakes.ports import FakeGenerator, FakeSpend, channel, nothing_within
from tests.support.actor import ActorHarness
from tests.support.timeouts import VIRTUAL_S as TEST_TIMEOUT_S
from tests.unit.test_actor_generator import IMAGE, QUIET_S, PermitServer

SETTINGS = image_screen.ScreenSettings(
    image_moderation=True, approval=False, approval_timeout_s=600.0, max_attempts=3
)


class ImageScreen(ActorHarness):
    CHANNELS = ("screen", "upload", "finalize")
    JOB_ROW = {"step": Step.GENERATED, "flow_id": "flow-1"}

    def __init__(self, *, request_timeout_s: float = 900.0) -> None:
        super().__init__(request_timeout_s=request_timeout_s)
        self.openai = FakeGenerator()
        self.permits = PermitServer()
        self.permits_send, self.permits_recv = channel(0)  # as the service's
        self.spend = FakeSpend(self.db)

    async def job(self, *, in_hand: bool):
        """A generated request whose raw image is stored; `in_hand`: the generator's job,
        the bytes with it (else a resumed job: read from the database)."""
        request_id = self.add_request()
        self.db.generated[request_id] = IMAGE
        job = await self.in_flight(request_id)
        job.generated = IMAGE if in_hand else None
        return job

    def run(self):
        return self.running_behind_permits(
            image_screen.run, generator=self.openai, screen_recv=self.screen_recv,
            permits_send=self.permits_send, upload_send=self.upload_send,
            finalize_send=self.finalize_send, settings=SETTINGS, spend=self.spend)


async def test_an_image_in_hand_is_judged_without_reading_the_database(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = ImageScreen()
        job = await actor.job(in_hand=True)
        async with actor.run():
            await actor.screen_send.send(job)
            passed = await actor.upload_recv.receive()
        assert actor.db.generated_loads == []
        assert actor.openai.calls == [("moderate_image", IMAGE)]
        assert passed.generated == IMAGE  # left in hand for the uploader
        assert [(kind, model) for _, kind, model, _ in actor.spend.calls] == [
            ("image_moderation", "omni-moderation-latest")]


async def test_a_resumed_job_reads_its_image_from_the_database(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = ImageScreen()
        job = await actor.job(in_hand=False)
        async with actor.run():
            await actor.screen_send.send(job)
            await actor.upload_recv.receive()
        assert actor.db.generated_loads == [job.id]
        assert actor.openai.calls == [("moderate_image", IMAGE)]


async def test_a_flagged_image_is_dropped_from_hand_and_fails(autojump_clock, monkeypatch):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = ImageScreen()
        actor.openai.script("moderate_image", ImageVerdict(True, {"violence": ["image"]}))
        flagged = []

        async def flag_image(queries, request_id):
            flagged.append(request_id)

        monkeypatch.setattr(image_screen.ApprovalQueries, "flag_image", flag_image)
        job = await actor.job(in_hand=True)
        async with actor.run():
            await actor.screen_send.send(job)
            failed = await actor.finalize_recv.receive()
        assert failed.step is Step.FAILING and "violence (image)" in failed.failure.detail
        assert failed.generated is None and flagged == [job.id]


class LosingSpend(FakeSpend):
    """Its first `write` commits, then the connection breaks before the answer came."""

    lost = False

    async def write(self, costs) -> None:
        costs = list(costs)
        if not self.lost:
            self.lost = True
            self.db.record_calls(costs)
            raise DatabaseUnavailable("ConnectionDoesNotExistError: lost during COMMIT")
        await super().write(costs)


async def test_the_screening_cost_is_written_once_when_its_commit_answer_was_lost(
        autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = ImageScreen()
        actor.spend = LosingSpend(actor.db)
        job = await actor.job(in_hand=True)
        async with actor.run():
            await actor.screen_send.send(job)
            await actor.upload_recv.receive()
            assert await nothing_within(actor.finalize_recv, QUIET_S) is None
        assert actor.spend.lost and len(actor.spend.alone) == 1  # tried again, as it was
        assert [call["kind"] for call in actor.db.openai_calls] == ["image_moderation"]
        assert [kind for _, kind, _, _ in actor.spend.calls] == ["image_moderation"]
        assert actor.openai.count("moderate_image") == 1


class DownSpend(FakeSpend):
    """Its writes are refused (the database is down) until `back_at`."""

    back_at = 0.0
    refused = 0

    async def write(self, costs) -> None:
        if trio.current_time() < self.back_at:
            self.refused += 1
            raise DatabaseUnavailable("ConnectionRefusedError: [Errno 111] refused")
        await super().write(costs)


async def test_the_screening_cost_is_written_after_an_outage_past_the_deadline(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = ImageScreen(request_timeout_s=60.0)
        actor.spend = DownSpend(actor.db)
        job = await actor.job(in_hand=True)
        actor.spend.back_at = job.deadline + 120.0
        async with actor.run():
            await actor.screen_send.send(job)
            await actor.spend.db.wait_until(lambda: actor.db.openai_calls)
        assert trio.current_time() > job.deadline and actor.spend.refused >= 1
        assert [call["kind"] for call in actor.db.openai_calls] == ["image_moderation"]
