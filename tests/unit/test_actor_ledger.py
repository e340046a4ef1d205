"""The ledger actor alone: reservations before any paid call, and finalizing the debit
(contract §5), with the auth + ledger port faked."""

import datetime

import trio

from actors import ledger
from dynamo import metrics
from dynamo.domain.jobs import Reason, Step
from tests.fakes.ports import (
    FakePoints,
    _utcnow,
    channel,
    nothing_within,
)
from tests.support.actor import ActorHarness
from tests.support.timeouts import VIRTUAL_HOURS_S as TEST_TIMEOUT_S

QUIET_S = 60


class Ledger(ActorHarness):
    """The ledger actor with its fakes. `finalize_out` is what it sends to be finalized;
    `finalize_in` feeds its finalize loop (the same channel in the service, two here so
    that each side is seen alone)."""

    CHANNELS = ("reserve", "schedule", "results")

    def __init__(self, *, request_timeout_s: float = 900.0):
        super().__init__(request_timeout_s=request_timeout_s)
        self.points = FakePoints()
        self.finalize_out_send, self.finalize_out = channel()
        self.finalize_in, self.finalize_in_recv = channel()

    def run(self):
        return self.running(ledger.run, points=self.points,
                            reserve_recv=self.reserve_recv, finalize_recv=self.finalize_in_recv,
                            schedule_send=self.schedule_send, finalize_send=self.finalize_out_send,
                            results_send=self.results_send)


def orphan_debits() -> float:
    return metrics.REGISTRY.get_sample_value("dynamo_orphan_debits_total") or 0.0


# -- reserving ------------------------------------------------------------------------


async def test_reservation_persists_the_flow_id_and_schedules_the_job(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        job = await actor.job()
        async with actor.run():
            await actor.reserve_send.send(job)
            scheduled = await actor.schedule_recv.receive()
            assert await nothing_within(actor.finalize_out, QUIET_S) is None
        assert scheduled.id == job.id
        assert (scheduled.step, scheduled.flow_id) == (Step.RESERVED, "flow-1")
        row = actor.db.row(job.id)
        assert (row["step"], row["flow_id"], row["state"]) == ("reserved", "flow-1", "queued")
        assert row["orphan_suspected"] is False
        assert actor.points.calls == [("service_token", job.id, "ok"), ("reserve", job.id, "ok")]
        assert actor.points.flows == {"flow-1": "pending"}
        # RESERVING is persisted before the ledger is asked (the orphan window's start).
        assert [(old, new, moved) for _, old, new, moved in actor.db.advances] == [
            (Step.RECEIVED, Step.RESERVING, True), (Step.RESERVING, Step.RESERVED, True)]


async def test_insufficient_points_fails_the_request_without_further_calls(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        actor.points.insufficient_points = True
        job = await actor.job()
        async with actor.run():
            await actor.reserve_send.send(job)
            failed = await actor.finalize_out.receive()
            assert await nothing_within(actor.schedule_recv, QUIET_S) is None
        assert failed.id == job.id and failed.step is Step.FAILING
        assert failed.failure.reason is Reason.INSUFFICIENT_POINTS and failed.flow_id is None
        row = actor.db.row(job.id)
        assert (row["step"], row["failure_reason"], row["flow_id"]) == (
            "failing", "insufficient-points", None)
        assert row["error_message"] == "You don't have enough Golden VCR Fun Points for an image alert."
        assert actor.points.calls == [("service_token", job.id, "ok"),
                                      ("reserve", job.id, "InsufficientPoints")]


async def test_ledger_outage_delays_the_reservation_until_it_is_back(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        job = await actor.job()
        outage_ends = trio.current_time() + 300
        actor.points.outage("reserve", until=outage_ends)
        async with actor.run():
            await actor.reserve_send.send(job)
            scheduled = await actor.schedule_recv.receive()
            reserved_at = trio.current_time()
        assert outage_ends <= reserved_at < job.deadline
        assert scheduled.step is Step.RESERVED and scheduled.flow_id == "flow-1"
        assert actor.db.row(job.id)["step"] == "reserved"
        failed_attempts = [call for call in actor.points.attempts("reserve") if call[2] != "ok"]
        assert len(failed_attempts) >= 3
        assert {outcome for _, _, outcome in failed_attempts} == {"Transient"}
        assert actor.points.succeeded("reserve") == [job.id]


async def test_auth_outage_delays_the_reservation_too(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        job = await actor.job()
        outage_ends = trio.current_time() + 120
        actor.points.outage("service_token", until=outage_ends)
        async with actor.run():
            await actor.reserve_send.send(job)
            scheduled = await actor.schedule_recv.receive()
        assert outage_ends <= trio.current_time() < job.deadline
        assert scheduled.flow_id == "flow-1"
        assert actor.points.attempts("reserve") == [("reserve", job.id, "ok")]


async def test_outage_past_the_deadline_expires_the_request(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger(request_timeout_s=300)
        job = await actor.job()
        actor.points.outage()  # for good
        async with actor.run():
            await actor.reserve_send.send(job)
            failed = await actor.finalize_out.receive()
            failed_at = trio.current_time()
        assert failed_at <= job.deadline
        assert failed_at >= job.deadline - 120  # tried for (nearly) the whole time
        assert failed.failure.reason is Reason.EXPIRED and failed.step is Step.FAILING
        row = actor.db.row(job.id)
        assert (row["step"], row["failure_reason"], row["flow_id"]) == ("failing", "expired", None)
        assert actor.points.succeeded("reserve") == []
        assert await nothing_within(actor.schedule_recv, 0) is None


def adopted_debits() -> float:
    return metrics.REGISTRY.get_sample_value("dynamo_adopted_debits_total") or 0.0


async def test_resume_at_reserving_without_a_debit_in_the_history_reserves_afresh(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        job = await actor.job(step=Step.RESERVING)
        orphans_before, adopted_before = orphan_debits(), adopted_debits()
        async with actor.run():
            await actor.reserve_send.send(job)
            scheduled = await actor.schedule_recv.receive()
        row = actor.db.row(job.id)
        assert row["orphan_suspected"] is False
        assert (row["step"], row["flow_id"]) == ("reserved", "flow-1")
        assert scheduled.flow_id == "flow-1"
        assert actor.points.succeeded("history") == [job.id]
        assert actor.points.succeeded("reserve") == [job.id]
        assert (orphan_debits(), adopted_debits()) == (orphans_before, adopted_before)


async def test_resume_at_reserving_adopts_the_debit_the_ledger_made_before_the_crash(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        job = await actor.job()
        # The crash: the ledger made the debit, its id never reached the database.
        assert await actor.db.advance(job.id, [Step.RECEIVED], Step.RESERVING,
                                      reserving_since=_utcnow())
        orphan = await actor.points.reserve(job)
        job.step = Step.RESERVING
        orphans_before, adopted_before = orphan_debits(), adopted_debits()
        async with actor.run():
            await actor.reserve_send.send(job)
            scheduled = await actor.schedule_recv.receive()
        assert scheduled.flow_id == orphan and scheduled.step is Step.RESERVED
        row = actor.db.row(job.id)
        assert (row["step"], row["flow_id"], row["orphan_suspected"]) == ("reserved", orphan, False)
        assert actor.points.succeeded("reserve") == [job.id]  # the one before the crash
        assert actor.points.flows == {orphan: "pending"}
        assert (orphan_debits(), adopted_debits()) == (orphans_before, adopted_before + 1)


async def test_a_debit_older_than_the_reservation_or_held_by_a_request_is_not_adopted(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        other = await actor.job(step=Step.RESERVED)
        job = await actor.job()
        held = await actor.points.reserve(other)
        actor.db.requests[other.id]["flow_id"] = held
        old = await actor.points.reserve(job)
        # made well before this reservation began (clock skew allowed for)
        actor.points.pending_made[-1] = (old, "90790024", _utcnow() - datetime.timedelta(
            seconds=ledger.CLOCK_SKEW_S + 5))
        assert await actor.db.advance(job.id, [Step.RECEIVED], Step.RESERVING,
                                      reserving_since=_utcnow())
        job.step = Step.RESERVING
        async with actor.run():
            await actor.reserve_send.send(job)
            scheduled = await actor.schedule_recv.receive()
        assert scheduled.flow_id not in (held, old)
        assert actor.db.row(job.id)["flow_id"] == scheduled.flow_id
        assert actor.db.row(other.id)["flow_id"] == held


async def test_history_unreadable_flags_a_possible_orphan_and_reserves_afresh(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        job = await actor.job(step=Step.RESERVING)
        actor.points.outage("history")
        orphans_before = orphan_debits()
        async with actor.run():
            await actor.reserve_send.send(job)
            scheduled = await actor.schedule_recv.receive()
        row = actor.db.row(job.id)
        assert row["orphan_suspected"] is True
        assert (row["step"], row["flow_id"]) == ("reserved", "flow-1")
        assert scheduled.flow_id == "flow-1"
        assert len(actor.points.attempts("history")) == ledger.HISTORY_ATTEMPTS
        assert orphan_debits() == orphans_before + 1


async def test_a_new_debit_adopted_by_a_resumed_request_is_left_to_it(autojump_clock):
    """Two requests of one viewer: one reserving now, one resumed at `reserving` whose
    lookup finds the first one's debit before its id is stored, and adopts it. The first
    then has no debit of its own and reserves again; nothing is refunded."""
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        live = await actor.job()
        resumed = await actor.job()
        assert await actor.db.advance(resumed.id, [Step.RECEIVED], Step.RESERVING,
                                      reserving_since=_utcnow())
        original_store = actor.db.store_flow

        async def adopted_first(request_id, flow_id):
            if request_id == live.id and not actor.db.row(resumed.id)["flow_id"]:
                assert await actor.db.adopt_flow(resumed.id, flow_id) == "stored"
            return await original_store(request_id, flow_id)

        actor.db.store_flow = adopted_first
        async with actor.run():
            await actor.reserve_send.send(live)
            scheduled = await actor.schedule_recv.receive()
        assert scheduled.id == live.id and scheduled.flow_id == "flow-2"
        assert actor.db.row(resumed.id)["flow_id"] == "flow-1"
        assert actor.db.row(live.id)["flow_id"] == "flow-2"
        assert actor.points.flows == {"flow-1": "pending", "flow-2": "pending"}


async def test_a_job_already_reserved_goes_on_without_a_call(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        job = await actor.job(step=Step.RESERVED, flow_id="flow-9")
        async with actor.run():
            await actor.reserve_send.send(job)
            scheduled = await actor.schedule_recv.receive()
        assert scheduled.flow_id == "flow-9"
        assert actor.points.calls == []


async def test_request_cancelled_while_reserving_gets_its_new_debit_refunded(autojump_clock):
    """The request moved on (cancelled) while the ledger was answering: the debit the
    ledger made must not be left pending (contract §5: every failure after a reservation
    refunds it)."""
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        job = await actor.job()
        actor.points.outage("reserve", until=trio.current_time() + 60)
        async with actor.run():
            await actor.reserve_send.send(job)
            await actor.db.wait_until(lambda: actor.db.row(job.id)["step"] == "reserving")
            # The broadcaster cancels it meanwhile (as DELETE /requests/{id} does).
            assert await actor.db.advance(job.id, [Step.RESERVING], Step.FAILING,
                                          failure_reason="cancelled")
            # The ledger actor refunds the flow it alone knows of, and records its id.
            with trio.move_on_after(3600):
                await actor.points.wait_until(lambda: actor.points.flows.get("flow-1", "pending") != "pending")
            assert await nothing_within(actor.finalize_out, 60) is None
            assert await nothing_within(actor.schedule_recv, 1) is None
        assert actor.points.flows["flow-1"] == "refunded"
        assert actor.db.requests[job.id]["flow_id"] == "flow-1"


# -- finalizing -----------------------------------------------------------------------


async def test_announced_job_is_accepted_then_sent_to_results(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        job = await actor.job(step=Step.ANNOUNCED, flow_id="flow-7")
        actor.points.flows["flow-7"] = "pending"
        async with actor.run():
            await actor.finalize_in.send(job)
            done = await actor.results_recv.receive()
        assert done.id == job.id and done.step is Step.ACCEPTED and done.failure is None
        row = actor.db.row(job.id)
        assert row["step"] == "accepted" and row["failure_reason"] is None
        assert actor.db.requests[job.id]["accepted_at"] is not None
        assert actor.points.succeeded("accept") == ["flow-7"]
        assert actor.points.attempts("refund") == []
        assert actor.points.flows["flow-7"] == "accepted"


async def test_failing_job_with_a_flow_is_refunded(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        job = await actor.job(step=Step.FAILING, flow_id="flow-3", failure_reason="rejected",
                              error_message="rejected")
        actor.points.flows["flow-3"] = "pending"
        async with actor.run():
            await actor.finalize_in.send(job)
            done = await actor.results_recv.receive()
        assert done.step is Step.REFUNDED and done.failure.reason is Reason.REJECTED
        row = actor.db.row(job.id)
        assert (row["step"], row["failure_reason"]) == ("refunded", "rejected")
        assert actor.db.requests[job.id]["refunded_at"] is not None
        assert actor.points.succeeded("refund") == ["flow-3"]
        assert actor.points.attempts("accept") == []
        assert actor.points.flows["flow-3"] == "refunded"


async def test_failing_job_without_a_flow_is_refunded_without_a_call(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        job = await actor.job(step=Step.FAILING, failure_reason="insufficient-points")
        async with actor.run():
            await actor.finalize_in.send(job)
            done = await actor.results_recv.receive()
        assert done.step is Step.REFUNDED
        assert actor.db.row(job.id)["step"] == "refunded"
        assert actor.points.calls == []


async def test_409_on_accept_counts_as_done(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        actor.points.already_finalized = True
        job = await actor.job(step=Step.ANNOUNCED, flow_id="flow-7")
        async with actor.run():
            await actor.finalize_in.send(job)
            done = await actor.results_recv.receive()
        assert done.step is Step.ACCEPTED and actor.db.row(job.id)["step"] == "accepted"
        assert actor.points.attempts("accept") == [("accept", "flow-7", "AlreadyFinalized")]


async def test_409_on_refund_counts_as_done(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        actor.points.already_finalized = True
        job = await actor.job(step=Step.FAILING, flow_id="flow-3", failure_reason="error")
        async with actor.run():
            await actor.finalize_in.send(job)
            done = await actor.results_recv.receive()
        assert done.step is Step.REFUNDED and actor.db.row(job.id)["step"] == "refunded"
        assert actor.points.attempts("refund") == [("refund", "flow-3", "AlreadyFinalized")]


async def test_refund_outage_is_retried_until_the_ledger_is_back(autojump_clock):
    """Long past the request's own deadline: a refund is never given up."""
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger(request_timeout_s=900)
        job = await actor.job(step=Step.FAILING, flow_id="flow-3", failure_reason="error")
        actor.points.flows["flow-3"] = "pending"
        outage_ends = trio.current_time() + 3 * 3600
        actor.points.outage("refund", until=outage_ends)
        async with actor.run():
            await actor.finalize_in.send(job)
            done = await actor.results_recv.receive()
            refunded_at = trio.current_time()
        assert outage_ends <= refunded_at <= outage_ends + ledger.FINALIZE_BACKOFF_CAP_S
        assert done.step is Step.REFUNDED
        assert actor.points.flows["flow-3"] == "refunded"
        failed_attempts = [call for call in actor.points.attempts("refund") if call[2] != "ok"]
        # Backoff capped at a minute: the ledger is asked again and again for three hours.
        assert len(failed_attempts) >= 3 * 3600 / ledger.FINALIZE_BACKOFF_CAP_S
        assert actor.db.row(job.id)["step"] == "refunded"


async def test_accept_outage_is_retried_until_the_ledger_is_back(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        job = await actor.job(step=Step.ANNOUNCED, flow_id="flow-7")
        outage_ends = trio.current_time() + 1800
        actor.points.outage("accept", until=outage_ends)
        async with actor.run():
            await actor.finalize_in.send(job)
            done = await actor.results_recv.receive()
        assert trio.current_time() >= outage_ends
        assert done.step is Step.ACCEPTED
        assert actor.points.succeeded("accept") == ["flow-7"]


async def test_a_lookup_waits_for_the_viewers_reservation_in_flight(autojump_clock):
    """In one process a resumed request never sees the debit of a reservation of the same
    viewer whose flow id is on its way to the database: it looks once that is stored."""
    with trio.fail_after(TEST_TIMEOUT_S):
        actor = Ledger()
        live = await actor.job()
        resumed = await actor.job()
        assert await actor.db.advance(resumed.id, [Step.RECEIVED], Step.RESERVING,
                                      reserving_since=_utcnow())
        resumed.step = Step.RESERVING
        store_flow, storing, go_on = actor.db.store_flow, trio.Event(), trio.Event()

        async def slow_store(request_id, flow_id):
            if request_id == live.id:
                storing.set()
                await go_on.wait()
            return await store_flow(request_id, flow_id)

        actor.db.store_flow = slow_store
        async with actor.run():
            await actor.reserve_send.send(live)
            await storing.wait()
            await actor.reserve_send.send(resumed)
            assert await nothing_within(actor.schedule_recv, QUIET_S) is None
            assert actor.points.attempts("history") == []  # waiting for the store
            go_on.set()
            scheduled = {(await actor.schedule_recv.receive()).id for _ in range(2)}
        assert scheduled == {live.id, resumed.id}
        assert actor.db.row(live.id)["flow_id"] == "flow-1"
        assert actor.db.row(resumed.id)["flow_id"] == "flow-2"  # its own, reserved afresh
