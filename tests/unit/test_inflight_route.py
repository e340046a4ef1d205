"""`InFlight.route`, the one way a job is sent into the pipeline: a send that fails
takes the job out of the pipeline again (the resume sweep routes it), unless the job was
in flight before (a cancelled request sent on to its refund while its copy is in
flight): that copy still owns it."""

from __future__ import annotations

import types
import uuid

import pytest
import trio

from dynamo.inflight.pipeline import InFlight
from tests.support.timeouts import VIRTUAL_S as TEST_TIMEOUT_S


def a_job():
    return types.SimpleNamespace(id=uuid.uuid4())


async def test_a_routed_job_is_sent_and_stays_in_flight(autojump_clock):
    inflight, job = InFlight(), a_job()
    send, receive = trio.open_memory_channel(1)
    with trio.fail_after(TEST_TIMEOUT_S):
        assert inflight.add(job.id)
        await inflight.route(job, send)
        assert receive.receive_nowait() is job
    assert job.id in inflight


async def test_a_job_not_sent_leaves_the_pipeline(autojump_clock):
    inflight, job = InFlight(), a_job()
    send, receive = trio.open_memory_channel(0)
    receive.close()  # the stage is gone: shutting down
    with trio.fail_after(TEST_TIMEOUT_S):
        assert inflight.add(job.id)
        with pytest.raises(trio.BrokenResourceError):
            await inflight.route(job, send)
    assert job.id not in inflight


async def test_a_job_not_sent_that_was_in_flight_already_stays_in_flight(autojump_clock):
    inflight, job = InFlight(), a_job()
    send, receive = trio.open_memory_channel(0)
    receive.close()
    with trio.fail_after(TEST_TIMEOUT_S):
        assert inflight.add(job.id)
        added = inflight.add(job.id)  # the cancel route's second add
        assert not added
        with pytest.raises(trio.BrokenResourceError):
            await inflight.route(job, send, added=added)
    assert job.id in inflight


async def test_a_cancelled_send_leaves_the_pipeline(autojump_clock):
    inflight, job = InFlight(), a_job()
    send, _receive = trio.open_memory_channel(0)  # nobody receives: the send waits
    with trio.fail_after(TEST_TIMEOUT_S):
        assert inflight.add(job.id)
        with trio.move_on_after(1):
            await inflight.route(job, send)
    assert job.id not in inflight
