"""The README's "What dynamo guarantees", each against the real PostgreSQL and RabbitMQ,
each written so that it fails when the guarantee breaks (the README names the test for
each; the database port's own promises are in tests/test_db_contract.py).

- takeover: a dead process's requests are taken over at once on its host, after the
  lease elsewhere, never while it lives;
- cancelling is a compare-and-set that either wins before the image is paid for or
  answers 409, also when it races the generator's claim; end to end, a cancelled
  request is refunded, buys no image and shows no alert;
- the order of a success: the alert confirmed by the broker, then the debit accepted,
  then the result published (publisher confirms are what makes the first a fact);
- a Discord post at most once, on the real database, across a kill between the claim
  and the post;
- the image rate limit holds across a kill -9 and a restart (the grants are in
  PostgreSQL, not in the killed process's memory).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import pytest
import trio

from dynamo import broker as topology
from dynamo import resume
from dynamo.db import open_database
from dynamo.jobs import Step
from tests.support import infra
from tests.test_http_api import (  # noqa: F401  (fixtures)
    ALICE,
    BROADCASTER_TOKEN,
    api,
    bearer,
    http_database,
)

pytestmark = pytest.mark.integration

TEST_TIMEOUT_S = 30
ONSCREEN, RESULTS = topology.ONSCREEN_EXCHANGE, topology.RESULTS_EXCHANGE
HOSTNAME = socket.gethostname()


@pytest.fixture
async def db(pg_database):
    async with open_database(infra.pg_dsn(pg_database)) as db:
        await db.apply_schema()
        yield db


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield child.pid
    child.kill()
    child.wait()


async def owned_request(db, owner: uuid.UUID) -> uuid.UUID:
    request_id, _ = await db.insert_request(
        viewer_id="1001", display_name="GhostFan", broadcast_id=None, screening_id=None,
        style="ghost", inputs={"subject": "a seal"}, prompt="a seal", source="broker",
        owner=owner, timeout_s=900, points_cost=200)
    return request_id


async def sweep(db, me: uuid.UUID, in_flight=()) -> set[uuid.UUID]:
    """One resume sweep's claim, as `dynamo.resume.run` makes it."""
    await db.heartbeat(me, HOSTNAME, os.getpid())
    await resume.reap_dead_neighbours(db, me, HOSTNAME)
    rows = await db.claim_unfinished(me, list(in_flight), resume.LEASE_S)
    return {row["id"] for row in rows}


# -- takeover -----------------------------------------------------------------------------


async def test_a_dead_process_on_this_host_is_taken_over_at_once(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        dead, me = uuid.uuid4(), uuid.uuid4()
        await db.heartbeat(dead, HOSTNAME, dead_pid())  # its lease is fresh
        request_id = await owned_request(db, dead)
        assert await sweep(db, me) == {request_id}
        assert [dict(w) for w in await db.workers_on(HOSTNAME)] == [{"id": me, "pid": os.getpid()}]


async def test_a_process_on_another_host_is_taken_over_after_its_lease(db):
    with trio.fail_after(TEST_TIMEOUT_S):
        elsewhere, me = uuid.uuid4(), uuid.uuid4()
        # Its pid means nothing here (a dead one on this host), only its heartbeat does.
        await db.execute("insert into dynamo.worker (id, hostname, pid) values ($1, $2, $3)",
                         elsewhere, "another-host", dead_pid())
        request_id = await owned_request(db, elsewhere)
        assert await sweep(db, me) == set()
        await db.execute("update dynamo.worker set heartbeat_at = now() - make_interval("
                         "secs => $2) where id = $1", elsewhere, resume.LEASE_S - 1)
        assert await sweep(db, me) == set()
        await db.execute("update dynamo.worker set heartbeat_at = now() - make_interval("
                         "secs => $2) where id = $1", elsewhere, resume.LEASE_S + 1)
        assert await sweep(db, me) == {request_id}


async def test_a_live_process_keeps_its_requests(db, live_pid):
    with trio.fail_after(TEST_TIMEOUT_S):
        neighbour, remote, me = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await db.heartbeat(neighbour, HOSTNAME, live_pid)
        await db.execute("insert into dynamo.worker (id, hostname, pid) values ($1, $2, $3)",
                         remote, "another-host", live_pid)
        ours_in_flight, ours_idle = await owned_request(db, me), await owned_request(db, me)
        theirs = {await owned_request(db, neighbour), await owned_request(db, remote)}
        for _ in range(2):
            claimed = await sweep(db, me, in_flight=[ours_in_flight])
            assert claimed.isdisjoint(theirs) and ours_in_flight not in claimed
        # Our own request no actor holds any more (one crashed holding it) is resumed.
        assert ours_idle in claimed
        assert {w["id"] for w in await db.workers_on(HOSTNAME)} == {neighbour, me}


# -- cancelling ---------------------------------------------------------------------------


async def test_a_cancel_that_read_the_request_before_the_generators_claim_is_409(api):  # noqa: F811
    """The interleaving that matters, made to happen every time: the cancel reads the
    request at `screened`, the generator claims it (screened → generating) before the
    cancel's own compare-and-set. The cancel must lose (409), not fail a request whose
    image is being paid for."""
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await api.store(ALICE)
        for old, new in [(Step.RECEIVED, Step.RESERVING), (Step.RESERVING, Step.RESERVED),
                         (Step.RESERVED, Step.SCREENED)]:
            assert await api.db.advance(request_id, [old], new)
        read = api.db.load_request
        claimed = []

        async def read_then_claim(rid):
            row = await read(rid)
            if not claimed:
                claimed.append(await api.db.advance(rid, [Step.SCREENED], Step.GENERATING))
            return row

        api.db.load_request = read_then_claim
        try:
            response = await api.client().delete(f"/requests/{request_id}",
                                                  headers=bearer(BROADCASTER_TOKEN))
        finally:
            api.db.load_request = read
        assert claimed == [True]
        assert response.status_code == 409, await response.get_json()
        row = await api.db.load_request(request_id)
        assert (row["step"], row["failure_reason"]) == ("generating", None)
        with pytest.raises(trio.WouldBlock):
            api.finalize_recv.receive_nowait()


async def test_a_cancel_before_the_generators_claim_wins_and_the_claim_fails(api):  # noqa: F811
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await api.store(ALICE)
        for old, new in [(Step.RECEIVED, Step.RESERVING), (Step.RESERVING, Step.RESERVED),
                         (Step.RESERVED, Step.SCREENED)]:
            assert await api.db.advance(request_id, [old], new)
        response = await api.client().delete(f"/requests/{request_id}",
                                              headers=bearer(BROADCASTER_TOKEN))
        assert response.status_code == 202
        assert not await api.db.advance(request_id, [Step.SCREENED], Step.GENERATING)
        assert api.finalize_recv.receive_nowait().id == request_id
