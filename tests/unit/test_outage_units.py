"""Outages of PostgreSQL and RabbitMQ, one actor at a time, under the autojump clock.

The actors' own harnesses (tests/test_actor_*.py) run with the in-memory database wrapped
in `FlakyDatabase`, which can be down for a while, or take a write and lose the answer
(a COMMIT whose connection broke). Each test checks that nothing is done twice that must
not be (an alert published, points reserved, an image bought), that the job goes on
within a second or so of the database's return, and that nothing crashed.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import inspect
import json
import logging
import math

import pytest
import trio

from dynamo import metrics
from dynamo.database.errors import DatabaseUnavailable
from dynamo.domain.jobs import Step
from dynamo.inflight import resume
from dynamo.inflight.confirms import ALERT, Confirms
from dynamo.supervision import outages
from tests.fakes.ports import (
    FakeSpend,
    MemoryDatabase,
    channel,
    make_pipeline,
    nothing_within,
    running,
)
from tests.support.checks import genreq
from tests.support.timeouts import VIRTUAL_S as TEST_TIMEOUT_S
from tests.unit.test_actor_announcer import Announcer
from tests.unit.test_actor_generator import IMAGE, Generator
from tests.unit.test_actor_generator_openai import generator_with_spend
from tests.unit.test_actor_intake import Intake
from tests.unit.test_actor_ledger import Ledger

OUTAGE_S = 30.0
# Work goes on within this long of the database's return (probes are at most 1 s apart).
RESUME_WITHIN_S = outages.PROBE_CAP_S + 0.1


class FlakyDatabase:
    """The in-memory database, unreachable when told, or losing a COMMIT's answer."""

    def __init__(self, db: MemoryDatabase):
        self._db = db
        self.down_until = -math.inf
        self.back_at: float | None = None
        self._ambiguous: collections.Counter[str] = collections.Counter()
        self._ambiguous_outage_s = 0.0
        self.refused: collections.Counter[str] = collections.Counter()

    def outage(self, seconds: float) -> None:
        self.down_until = self.back_at = trio.current_time() + seconds

    def lose_commit_answer(self, method: str, *, then_down_s: float = 3.0) -> None:
        """The next `method` call commits, then its connection breaks (and stays down
        for `then_down_s`)."""
        self._ambiguous[method] += 1
        self._ambiguous_outage_s = then_down_s

    def __getattr__(self, name):
        attribute = getattr(self._db, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        async def call(*args, **kwargs):
            await trio.lowlevel.checkpoint()
            if trio.current_time() < self.down_until:
                self.refused[name] += 1
                raise DatabaseUnavailable("ConnectionRefusedError: [Errno 111] refused")
            result = await attribute(*args, **kwargs)
            if self._ambiguous[name]:
                self._ambiguous[name] -= 1
                self.outage(self._ambiguous_outage_s)
                raise DatabaseUnavailable("ConnectionDoesNotExistError: lost during COMMIT")
            return result

        return call


class WorkerDatabase(MemoryDatabase):
    """The in-memory database with the resume sweep's worker rows."""

    def __init__(self) -> None:
        super().__init__()
        self.workers: dict = {}

    async def heartbeat(self, worker_id, hostname, pid) -> None:
        await trio.lowlevel.checkpoint()
        self.workers[worker_id] = (hostname, pid)

    async def workers_on(self, hostname):
        await trio.lowlevel.checkpoint()
        return []

    async def retire(self, worker_id) -> None:
        await trio.lowlevel.checkpoint()
        self.workers.pop(worker_id, None)

    async def claim_unfinished(self, worker_id, in_flight, lease_s):
        await trio.lowlevel.checkpoint()
        claimed = []
        for request_id, row in self.requests.items():
            if row["step"] != "done" and request_id not in in_flight and (
                    row["owner"] in (None, worker_id)):
                row["owner"] = worker_id
                claimed.append(await self.load_request(request_id))
        return claimed


def flaky(actor) -> FlakyDatabase:
    """Puts a FlakyDatabase under an actor harness's pipeline."""
    db = FlakyDatabase(actor.db)
    actor.pipeline.db = db
    actor.pipeline.dependencies = outages.Dependencies(
        database=outages.Dependency("database", probe=db.ping))
    return db


def sample(name: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


# -- the dependency tracker -------------------------------------------------------------


async def test_an_outage_is_one_warning_and_one_info_with_its_duration(autojump_clock, caplog):
    with trio.fail_after(TEST_TIMEOUT_S):
        caplog.set_level(logging.INFO, logger="dynamo.supervision.outages")
        outages_before = sample("dynamo_outages_total", dependency="unit-db")
        dependency = outages.Dependency("unit-db")
        for _ in range(5):
            dependency.went_down("ConnectionRefusedError")
        assert sample("dynamo_dependency_up", dependency="unit-db") == 0
        await trio.sleep(12)
        assert dependency.describe() == "unreachable for 12 s: ConnectionRefusedError"
        dependency.came_back()
        dependency.came_back()
        lines = [(r.levelname, r.getMessage()) for r in caplog.records]
        assert lines == [
            ("WARNING", "unit-db unreachable (ConnectionRefusedError); waiting for it to come back"),
            ("INFO", "unit-db is back after 12.0 s"),
        ]
        assert sample("dynamo_dependency_up", dependency="unit-db") == 1
        assert sample("dynamo_outages_total", dependency="unit-db") == outages_before + 1


async def test_waiters_resume_within_a_second_of_the_return_and_one_probes_at_a_time(
        autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        back_at = trio.current_time() + OUTAGE_S
        probing = 0
        most_probing = 0
        probes = 0

        async def probe():
            nonlocal probing, most_probing, probes
            probes += 1
            probing += 1
            most_probing = max(most_probing, probing)
            await trio.sleep(0.01)
            probing -= 1
            if trio.current_time() < back_at:
                raise DatabaseUnavailable("refused")

        dependency = outages.Dependency("unit-probe", probe=probe)
        dependency.went_down("refused")
        resumed = []

        async def waiter():
            await dependency.wait_until_up()
            resumed.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(waiter)
        assert len(resumed) == 20
        assert all(back_at <= at <= back_at + RESUME_WITHIN_S for at in resumed), resumed
        assert most_probing == 1
        # Jittered backoff capped at 1 s: about one probe a second, not one per waiter.
        assert probes < 4 * OUTAGE_S


# -- the stages ---------------------------------------------------------------------------


async def test_a_confirmed_alert_is_never_published_again_because_its_write_failed(
        autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer()
        db = flaky(actor)
        job = await actor.job(step=Step.STORED)
        db.lose_commit_answer("advance", then_down_s=OUTAGE_S)
        async with actor.run():
            await actor.announce_send.send(job)
            announced = await actor.finalize_recv.receive()
        assert trio.current_time() <= db.back_at + RESUME_WITHIN_S
        assert len(actor.broker.on("onscreen-events")) == 1
        assert announced.step is Step.ANNOUNCED and db.refused["advance"] == 0
        assert actor.db.row(job.id)["step"] == "announced"
        assert len(actor.pipeline.confirms) == 0


async def test_an_alert_confirmed_while_the_database_is_down_is_held_until_it_is_back(
        autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer()
        db = flaky(actor)
        job = await actor.job(step=Step.STORED)
        published = actor.broker.published

        async def outage_after_publish():
            await actor.broker.wait_until(lambda: published)
            db.outage(OUTAGE_S)

        async with actor.run(), trio.open_nursery() as nursery:
            # The database goes just after the confirm, before ANNOUNCED is written.
            actor.broker.publish_json = _then(actor.broker.publish_json,
                                              lambda: db.outage(OUTAGE_S))
            nursery.start_soon(outage_after_publish)
            await actor.announce_send.send(job)
            with trio.move_on_after(OUTAGE_S / 2):
                await actor.finalize_recv.receive()
                pytest.fail("announced while the database was down")
            assert actor.pipeline.confirms.confirmed(job.id, ALERT)
            announced = await actor.finalize_recv.receive()
        assert db.refused["advance"] >= 1
        assert len(actor.broker.on("onscreen-events")) == 1
        assert announced.step is Step.ANNOUNCED
        assert len(actor.pipeline.confirms) == 0


def _then(publish, after):
    async def publish_then(*args, **kwargs):
        await publish(*args, **kwargs)
        after()
    return publish_then


async def test_a_result_whose_done_write_failed_is_not_published_again(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Announcer()
        db = flaky(actor)
        job = await actor.job(step=Step.ACCEPTED)
        db.lose_commit_answer("advance", then_down_s=OUTAGE_S)
        async with actor.run():
            await actor.results_send.send(job)
            await actor.discord_recv.receive()
        assert len(actor.broker.on("generation-results")) == 1
        assert actor.db.row(job.id)["step"] == "done"


async def test_a_reserved_flow_id_is_kept_until_the_database_takes_it(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        db = flaky(actor)
        job = await actor.job()
        orphans_before = sample("dynamo_orphan_debits_total")
        db.lose_commit_answer("advance")  # RECEIVED → RESERVING: committed, answer lost

        async def outage_at_reserved():
            await actor.points.wait_until(lambda: actor.points.succeeded("reserve"))
            db.outage(OUTAGE_S)  # RESERVING → RESERVED cannot be written for a while

        async with actor.run(), trio.open_nursery() as nursery:
            nursery.start_soon(outage_at_reserved)
            await actor.reserve_send.send(job)
            scheduled = await actor.schedule_recv.receive()
        assert len(actor.points.succeeded("reserve")) == 1
        assert (scheduled.step, scheduled.flow_id) == (Step.RESERVED, "flow-1")
        row = actor.db.row(job.id)
        assert (row["step"], row["flow_id"], row["orphan_suspected"]) == ("reserved", "flow-1", False)
        assert sample("dynamo_orphan_debits_total") == orphans_before


async def test_a_bought_image_is_not_bought_again_when_the_database_is_down(
        autojump_clock, monkeypatch):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Generator()
        db = flaky(actor)
        job = await actor.job(step=Step.SCREENED)
        bought = actor.openai.image

        async def image_then_outage(order):
            answer = await bought(order)
            db.outage(OUTAGE_S)
            return answer

        actor.openai.image = image_then_outage
        async with actor.run():
            await actor.generate_send.send(job)
            generated = await actor.upload_recv.receive()
        assert actor.openai.count("image") == 1
        assert generated.step is Step.GENERATED and db.refused["save_generated"] >= 1
        assert trio.current_time() <= db.back_at + RESUME_WITHIN_S


class FlakySpend(FakeSpend):
    """The spend port on a FlakyDatabase: `write` is refused while the database is down."""

    def __init__(self, db: FlakyDatabase, memory: MemoryDatabase):
        super().__init__(memory)
        self.flaky = db

    async def write(self, costs) -> None:
        if trio.current_time() < self.flaky.down_until:
            self.flaky.refused["spend.write"] += 1
            raise DatabaseUnavailable("ConnectionRefusedError: [Errno 111] refused")
        await super().write(costs)


async def test_a_bought_image_and_its_cost_are_written_down_after_an_outage_past_the_deadline(
        autojump_clock):
    """Deadlines guard waiting, never work already paid for (style.md 17)."""
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = generator_with_spend(request_timeout_s=60.0)
        db = flaky(actor)
        actor.spend = FlakySpend(db, actor.db)
        job = await actor.job(step=Step.SCREENED)
        bought = actor.openai.image

        async def image_then_long_outage(order):
            answer = await bought(order)
            db.outage(3 * actor.request_timeout_s)  # back well after the request's deadline
            # The mock clock does not move the wall clock: as read after the outage, the
            # stored request has expired.
            actor.db.requests[job.id]["expires_at"] -= datetime.timedelta(hours=1)
            return answer

        actor.openai.image = image_then_long_outage
        async with actor.run():
            await actor.generate_send.send(job)
            generated = await nothing_within(actor.upload_recv, 10 * actor.request_timeout_s)
        with contextlib.suppress(trio.WouldBlock):
            failed = actor.finalize_recv.receive_nowait()
            raise AssertionError(f"failed instead of saved: {failed.failure}")
        assert generated is not None and generated.step is Step.GENERATED
        # The cost goes with the image, in the same statement, once.
        assert trio.current_time() > job.deadline and db.refused["save_generated"] >= 1
        assert actor.db.generated[job.id] == IMAGE
        assert [kind for _, kind, _, _ in actor.spend.calls] == ["image"]
        assert [call["kind"] for call in actor.db.openai_calls] == ["image"]
        assert actor.openai.count("image") == 1


async def test_intake_waits_for_the_database_then_stores_and_routes_the_message(
        autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        intake_setup = _Intake(json.dumps(genreq("a patient seal")).encode())
        intake_setup.db.outage(OUTAGE_S)
        async with intake_setup.run():
            job = await intake_setup.reserve_recv.receive()
        assert intake_setup.db.refused["store_request"] >= 1
        assert trio.current_time() <= intake_setup.db.back_at + RESUME_WITHIN_S
        [row] = intake_setup.memory.requests.values()
        assert job.id == row["id"] and intake_setup.broker.settled_count() == 1


async def test_intake_stores_a_message_once_when_its_commit_answer_was_lost(autojump_clock):
    # No message_id: the body is the only key. Its INSERT committed, the answer was lost;
    # taken again as a redelivery, it is matched to the row stored but never acked.
    with trio.fail_after(TEST_TIMEOUT_S):
        body = json.dumps(genreq("a patient seal")).encode()
        intake_setup = _Intake(body)
        intake_setup.db.lose_commit_answer("store_request", then_down_s=OUTAGE_S)
        async with intake_setup.run():
            await intake_setup.broker.wait_until(lambda: intake_setup.broker.settled_count())
            await trio.sleep(OUTAGE_S)
        [row] = intake_setup.memory.requests.values()
        assert row["body_sha256"] == hashlib.sha256(body).hexdigest() and row["intake_acked"]
        # Not routed here: the resume sweep routes this process's requests not in flight.
        assert row["id"] not in intake_setup.pipeline.inflight


def _Intake(body: bytes) -> Intake:  # noqa: N802
    """The intake harness on a database that can be taken down, whose outage is waited
    out as the service does."""
    memory = MemoryDatabase()
    actor = Intake([body], db=FlakyDatabase(memory))
    actor.memory = memory
    actor.pipeline.dependencies = outages.Dependencies(
        database=outages.Dependency("database", probe=actor.db.ping))
    return actor


# -- the resume sweep ---------------------------------------------------------------------


async def test_the_resume_sweep_waits_out_an_outage_and_sweeps_at_once_when_back(
        autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        memory = WorkerDatabase()
        db = FlakyDatabase(memory)
        pipeline = make_pipeline(db)
        pipeline.dependencies = outages.Dependencies(
            database=outages.Dependency("database", probe=db.ping))
        reserve_send, reserve_recv = channel()
        router = resume.Router(reserve_send=reserve_send, schedule_send=None, upload_send=None,
                               announce_send=None, finalize_send=None, results_send=None)
        async with running(resume.run, pipeline=pipeline, router=router):
            db.outage(OUTAGE_S)
            await trio.sleep(1)
            request_id = memory.add_request()  # comes in while the database is down
            job = await reserve_recv.receive()
            assert job.id == request_id
            assert db.back_at <= trio.current_time() <= db.back_at + RESUME_WITHIN_S
            assert pipeline.worker_id in memory.workers


async def test_a_crashed_resume_actor_does_not_retire_its_worker(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        memory = WorkerDatabase()
        pipeline = make_pipeline(memory)

        async def claim_crashes(*args):
            raise RuntimeError("a bug in the sweep")

        memory.claim_unfinished = claim_crashes
        router = resume.Router(reserve_send=None, schedule_send=None, upload_send=None,
                               announce_send=None, finalize_send=None, results_send=None)
        with pytest.raises(BaseExceptionGroup) as crash:
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: resume.run(
                    pipeline=pipeline, router=router, task_status=task_status))
        assert crash.value.subgroup(RuntimeError) is not None
        assert pipeline.worker_id in memory.workers  # still this process's requests
        await resume.retire_at_shutdown(pipeline)  # the clean shutdown's last word
        assert pipeline.worker_id not in memory.workers


async def test_held_confirmations_are_written_at_shutdown(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        memory = MemoryDatabase()
        request_id = memory.add_request(step=Step.STORED)
        confirms = Confirms()
        confirms.hold(request_id, ALERT, from_step=Step.STORED, to_step=Step.ANNOUNCED)
        assert await confirms.flush(memory) == 0
        assert memory.row(request_id)["step"] == "announced"
