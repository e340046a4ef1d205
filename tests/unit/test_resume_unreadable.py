"""The resume sweep and stored requests it cannot read (issue 10): a row stored before
poison messages were refused (a subject that is a list) crashed the sweep at every start,
so that no unfinished request resumed, ever. Now one bad row is failed (refunded where a
debit was reserved) or, when it cannot even be failed, logged and counted once; the
sweep goes on with the others. The resume actor alone, with a fake database."""

from __future__ import annotations

import logging

import trio

from dynamo import metrics
from dynamo.domain.jobs import Reason, Step
from dynamo.inflight import resume
from tests.fakes.ports import MemoryDatabase, channel, make_pipeline, nothing_within, running
from tests.support.timeouts import VIRTUAL_S as TEST_TIMEOUT_S


class SweptDatabase(MemoryDatabase):
    """The memory database with the worker table the sweep needs: one live process."""

    def __init__(self) -> None:
        super().__init__()
        self.claims = 0

    async def heartbeat(self, worker_id, hostname, pid) -> None:
        await trio.lowlevel.checkpoint()

    async def workers_on(self, hostname):
        await trio.lowlevel.checkpoint()
        return []

    async def retire(self, worker_id) -> None:
        await trio.lowlevel.checkpoint()

    async def claim_unfinished(self, worker_id, in_flight, lease_s):
        await trio.lowlevel.checkpoint()
        self.claims += 1
        self._notify()
        rows = [row for row in self.requests.values()
                if row["step"] != Step.DONE.value and row["id"] not in set(in_flight)]
        return [self._project(row) for row in sorted(rows, key=lambda row: row["created_at"])]


class Sweep:
    def __init__(self, db: SweptDatabase):
        self.db = db
        self.pipeline = make_pipeline(db)
        self.channels = {name: channel() for name in
                         ("reserve", "schedule", "upload", "announce", "finalize", "results")}
        self.router = resume.Router(**{f"{name}_send": pair[0] for name, pair in self.channels.items()})

    def recv(self, name: str):
        return self.channels[name][1]

    def run(self):
        return running(resume.run, pipeline=self.pipeline, router=self.router)


def _unreadable_total() -> float:
    return metrics.REGISTRY.get_sample_value("dynamo_unreadable_requests_total") or 0.0


async def test_an_invalid_request_stored_with_a_list_subject_gets_its_result(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        db = SweptDatabase()
        # As intake stored an invalid message before this fix: the inputs as they came.
        poisoned = db.add_request(step=Step.REFUNDED, inputs={"subject": ["a"]}, prompt="",
                                  failure_reason=Reason.INVALID.value, points_cost=0)
        healthy = db.add_request(step=Step.RESERVED, flow_id="flow-healthy")
        sweep = Sweep(db)
        async with sweep.run():
            answered = await sweep.recv("results").receive()
            resumed = await sweep.recv("schedule").receive()
        assert answered.id == poisoned and answered.description == ""
        assert answered.failure.reason is Reason.INVALID
        assert resumed.id == healthy


async def test_an_unreadable_row_is_failed_and_refunded_and_the_sweep_goes_on(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        db = SweptDatabase()
        # A reason this code does not know (a newer version's, or an operator's edit).
        unreadable = db.add_request(step=Step.RESERVED, flow_id="flow-1", failure_reason="bogus")
        healthy = db.add_request(step=Step.RESERVED, flow_id="flow-2")
        before = _unreadable_total()
        sweep = Sweep(db)
        async with sweep.run():
            refund = await sweep.recv("finalize").receive()
            resumed = await sweep.recv("schedule").receive()
        assert refund.id == unreadable and refund.flow_id == "flow-1"  # the ledger refunds it
        assert refund.step is Step.FAILING and refund.failure.reason is Reason.ERROR
        assert db.row(unreadable)["step"] == Step.FAILING.value
        assert db.row(unreadable)["failure_reason"] == Reason.ERROR.value
        assert resumed.id == healthy
        assert _unreadable_total() == before + 1


async def test_a_row_that_cannot_be_failed_is_logged_once_and_left(autojump_clock, caplog):
    with trio.fail_after(TEST_TIMEOUT_S):
        db = SweptDatabase()
        stuck = db.add_request(step=Step.RESERVED)
        db.requests[stuck]["step"] = "frobbing"  # a step this code does not know
        before = _unreadable_total()
        sweep = Sweep(db)
        with caplog.at_level(logging.ERROR, logger="dynamo.inflight.pipeline"):
            async with sweep.run():
                await db.wait_until(lambda: db.claims >= 4)  # several sweeps
                healthy = db.add_request(step=Step.RESERVED)
                resumed = await sweep.recv("schedule").receive()
                assert await nothing_within(sweep.recv("finalize"), resume.SWEEP_INTERVAL_S * 3) is None
        assert resumed.id == healthy
        assert db.requests[stuck]["step"] == "frobbing"
        assert _unreadable_total() == before + 1
        about_it = [r for r in caplog.records if getattr(r, "request_id", None) == str(stuck)]
        assert about_it and about_it[0].exc_info is not None  # with its traceback
        assert len([r for r in about_it if r.getMessage().startswith("stored request")]) == 1
