"""One job's failure is its own (issue 10, style rule 13): a step that raises unexpectedly
fails that job alone (logged with its request id and traceback, persisted as failed with
reason `error`, refunded through the normal failure path), while its siblings in flight
and the actor go on. Before, the exception went into the pool's nursery, cancelled every
sibling and crashed the actor, again after each restart.

The uploader and ledger actors with fake ports, and `serve_jobs` itself, under the
autojump clock."""

from __future__ import annotations

import functools
import logging

import pytest
import trio

from actors import ledger, uploader
from dynamo import metrics
from dynamo.database.errors import DatabaseUnavailable
from dynamo.domain.jobs import Reason, Step
from dynamo.inflight.pipeline import serve_jobs
from tests.fakes.ports import (
    FakePoints,
    FakeStorage,
    MemoryDatabase,
    channel,
    make_pipeline,
    nothing_within,
    solid_png,
    threads_pause_the_clock,
)
from tests.support.actor import ActorHarness
from tests.support.timeouts import VIRTUAL_S as TEST_TIMEOUT_S

QUIET_S = 60
GHOST_RAW = solid_png((12, 10, 18), size=(96, 96), figure=(220, 225, 235))


class BuggyDatabase(MemoryDatabase):
    """Storing the image of a request in `buggy` raises: a bug one request triggers."""

    def __init__(self) -> None:
        super().__init__()
        self.buggy: set = set()

    async def save_image(self, request_id, url, color):
        if request_id in self.buggy:
            raise RuntimeError("a bug this request triggers")
        return await super().save_image(request_id, url, color)


class UploadAndRefund(ActorHarness):
    """The uploader with the ledger's finalize loop behind it, as the service wires them."""

    # reserve and schedule: the ledger's other loop, unused here.
    CHANNELS = ("upload", "announce", "finalize", "results", "reserve", "schedule")
    JOB_ROW = {"step": Step.GENERATED, "flow_id": None}

    def __init__(self) -> None:
        super().__init__(db=BuggyDatabase())
        self.storage = FakeStorage()
        self.points = FakePoints()

    async def job(self, *, buggy: bool = False):
        request_id = self.add_request()
        self.db.requests[request_id]["flow_id"] = f"flow-{request_id}"
        self.db.generated[request_id] = GHOST_RAW
        if buggy:
            self.db.buggy.add(request_id)
        return await self.in_flight(request_id)

    async def run(self, nursery):
        await nursery.start(functools.partial(uploader.run, storage=self.storage, pipeline=self.pipeline,
                            upload_recv=self.upload_recv, announce_send=self.announce_send,
                            finalize_send=self.finalize_send))
        await nursery.start(functools.partial(ledger.run, points=self.points, pipeline=self.pipeline,
                            reserve_recv=self.reserve_recv,
                            finalize_recv=self.finalize_recv,
                            schedule_send=self.schedule_send,
                            finalize_send=self.finalize_send, results_send=self.results_send))


@pytest.fixture
def instant_threads(autojump_clock, monkeypatch):
    threads_pause_the_clock(autojump_clock, monkeypatch)


def _job_errors(actor: str) -> float:
    return metrics.REGISTRY.get_sample_value("dynamo_job_errors_total", {"actor": actor}) or 0.0


async def test_a_job_whose_step_raises_fails_alone_and_is_refunded(
        autojump_clock, instant_threads, caplog):
    with trio.fail_after(TEST_TIMEOUT_S):
        stage = UploadAndRefund()
        before = _job_errors(uploader.ACTOR)
        with caplog.at_level(logging.ERROR):
            async with trio.open_nursery() as nursery:  # an actor's crash fails the test
                await stage.run(nursery)
                first, buggy, last = [await stage.job(buggy=n == 1) for n in range(3)]
                for job in (first, buggy, last):
                    await stage.upload_send.send(job)
                announced = {(await stage.announce_recv.receive()).id for _ in range(2)}
                answered = await stage.results_recv.receive()
                # The actor goes on: a job sent after the bug is served as usual.
                after = await stage.job()
                await stage.upload_send.send(after)
                assert (await stage.announce_recv.receive()).id == after.id
                assert await nothing_within(stage.results_recv, QUIET_S) is None
                nursery.cancel_scope.cancel()

        assert announced == {first.id, last.id}
        assert answered.id == buggy.id and answered.step is Step.REFUNDED
        assert answered.failure.reason is Reason.ERROR
        assert "RuntimeError: a bug this request triggers" in answered.failure.detail
        row = stage.db.row(buggy.id)
        assert (row["step"], row["failure_reason"]) == ("refunded", "error")
        assert stage.points.succeeded("refund") == [f"flow-{buggy.id}"]  # refunded, once
        assert stage.points.succeeded("accept") == []
        assert _job_errors(uploader.ACTOR) == before + 1
        [logged] = [r for r in caplog.records if r.getMessage() == "unexpected error in uploader"]
        assert logged.request_id == str(buggy.id) and logged.exc_info is not None


async def test_siblings_in_flight_are_not_cancelled(autojump_clock):
    """A slow job in flight while another raises finishes its step, undisturbed."""
    with trio.fail_after(TEST_TIMEOUT_S):
        db = MemoryDatabase()
        pipeline = make_pipeline(db)
        jobs_send, jobs_recv = channel()
        done_send, done_recv = channel()
        failed_send, failed_recv = channel()
        slow, buggy = [await pipeline.job(db.add_request(step=Step.RESERVED)) for _ in range(2)]
        finished = []

        async def step(job):
            if job.id == buggy.id:
                await trio.sleep(1)
                raise KeyError("a bug")
            await trio.sleep(30)  # still in flight when its sibling raises
            finished.append(job.id)
            return "done"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve_jobs(
                jobs_recv, actor="test", inflight=pipeline.inflight, concurrency=4, step=step,
                outboxes={"done": done_send, "failed": failed_send}, pipeline=pipeline))
            for job in (slow, buggy):
                pipeline.inflight.add(job.id)
                await jobs_send.send(job)
            assert (await failed_recv.receive()).id == buggy.id
            assert (await done_recv.receive()).id == slow.id
            nursery.cancel_scope.cancel()
        assert finished == [slow.id]
        assert db.row(buggy.id)["step"] == Step.FAILING.value
        assert db.row(buggy.id)["failure_reason"] == Reason.ERROR.value


async def test_a_job_past_failing_leaves_the_pipeline_for_the_resume_sweep(autojump_clock):
    """Announced already: it cannot be failed any more; it is let go (not held in flight
    forever), so that the resume sweep routes it again from its persisted step."""
    with trio.fail_after(TEST_TIMEOUT_S):
        db = MemoryDatabase()
        pipeline = make_pipeline(db)
        jobs_send, jobs_recv = channel()
        results_send, results_recv = channel()
        job = await pipeline.job(db.add_request(step=Step.ANNOUNCED))

        async def step(job):
            raise RuntimeError("a bug while accepting")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve_jobs(
                jobs_recv, actor="test", inflight=pipeline.inflight, concurrency=1, step=step,
                outboxes={True: results_send}, pipeline=pipeline))
            pipeline.inflight.add(job.id)
            await jobs_send.send(job)
            while job.id in pipeline.inflight:
                await trio.sleep(1)
            assert await nothing_within(results_recv, QUIET_S) is None
            nursery.cancel_scope.cancel()
        assert db.row(job.id)["step"] == Step.ANNOUNCED.value  # untouched


async def test_an_outage_is_not_a_job_failure(autojump_clock):
    """An unreachable database is not the job's fault: it goes to the actor (which waits)."""
    with trio.fail_after(TEST_TIMEOUT_S):
        db = MemoryDatabase()
        pipeline = make_pipeline(db)
        jobs_send, jobs_recv = channel()
        job = await pipeline.job(db.add_request(step=Step.RESERVED))

        async def step(job):
            raise DatabaseUnavailable("connection refused")

        with pytest.raises(ExceptionGroup) as raised:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: serve_jobs(
                    jobs_recv, actor="test", inflight=pipeline.inflight, concurrency=1,
                    step=step, outboxes={}, pipeline=pipeline))
                await jobs_send.send(job)
        assert raised.group_contains(DatabaseUnavailable, depth=None)
        assert db.row(job.id)["step"] == Step.RESERVED.value


async def _serve_one_raising(db, job, outboxes):
    """Serves `job` with a step that raises; returns what reached the outbox 'failed'."""
    pipeline = make_pipeline(db)
    jobs_send, jobs_recv = channel()

    async def step(job):
        raise RuntimeError("a bug after a write")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_jobs(
            jobs_recv, actor="test", inflight=pipeline.inflight, concurrency=1, step=step,
            outboxes=outboxes, pipeline=pipeline))
        pipeline.inflight.add(job.id)
        await jobs_send.send(job)
        while job.id in pipeline.inflight:
            await trio.sleep(1)
        nursery.cancel_scope.cancel()


async def test_the_refund_sees_the_flow_id_stored_before_the_error(autojump_clock):
    """The step stored the flow id, then raised before its job in memory had it."""
    with trio.fail_after(TEST_TIMEOUT_S):
        db = MemoryDatabase()
        request_id = db.add_request(step=Step.RESERVING)
        job = await make_pipeline(db).job(request_id)
        db.requests[request_id].update(step=Step.RESERVED.value, flow_id="flow-stored")
        failed_send, failed_recv = channel()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_one_raising, db, job, {"failed": failed_send})
            failed = await failed_recv.receive()
            nursery.cancel_scope.cancel()
        assert failed.flow_id == "flow-stored" and failed.step is Step.FAILING


async def test_a_job_at_reserving_is_left_to_the_sweeps_adoption(autojump_clock):
    """A debit may exist that only the ledger knows: failing the request now would leave
    it pending; the resume sweep first looks for it in the ledger's history."""
    with trio.fail_after(TEST_TIMEOUT_S):
        db = MemoryDatabase()
        job = await make_pipeline(db).job(db.add_request(step=Step.RESERVING))
        failed_send, failed_recv = channel()
        await _serve_one_raising(db, job, {"failed": failed_send})
        assert await nothing_within(failed_recv, QUIET_S) is None
        assert db.row(job.id)["step"] == Step.RESERVING.value
