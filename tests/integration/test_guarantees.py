"""The README's "What dynamo guarantees", each against the real PostgreSQL and RabbitMQ,
each written so that it fails when the guarantee breaks (the README names the test for
each; the database port's own promises are in tests/integration/test_db_contract.py).

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

import json
import os
import socket
import subprocess
import sys
import uuid

import httpx
import pytest
import trio

from dynamo.database.port import open_database
from dynamo.domain.jobs import Step
from dynamo.inflight import resume
from dynamo.rabbitmq import broker as topology
from tests.integration.test_http_api import (  # noqa: F401  (fixtures)
    ALICE,
    BROADCASTER_TOKEN,
    api,
    bearer,
    http_database,
)
from tests.support import infra
from tests.support.crash import PublishBlocker, fetch_rows, request_rows
from tests.support.service import started
from tests.support.timeouts import PORT_S as TEST_TIMEOUT_S

pytestmark = pytest.mark.integration

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
    """One resume sweep's claim, as `dynamo.inflight.resume.run` makes it."""
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


# -- the running service ------------------------------------------------------------------

SERVICE_TIMEOUT_S = 120
NO_STATE = {"broadcast_id": 0, "screening_id": "00000000-0000-0000-0000-000000000000",
            "tape_id": 0}


def ghost(subject: str = "a seal", viewer=("1001", "GhostFan")) -> dict:
    return {"type": "image", "state": NO_STATE,
            "viewer": {"twitch_user_id": viewer[0], "twitch_display_name": viewer[1]},
            "payload": {"style": "ghost", "inputs": {"subject": subject}}}


async def the_request(database: str):
    [(request_id, row)] = (await request_rows(database)).items()
    return request_id, row


async def test_a_success_is_alert_confirmed_then_debit_accepted_then_result_published(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, fake_s3, pg_database):
    """While the broker refuses the alert (nacks it), the debit is not accepted and the
    request stays `stored`: dynamo retries the alert, because only a confirmed alert
    counts. Without publisher confirms the refused alert would count as shown and the
    debit would be accepted at once. Once the alert is confirmed the debit is accepted,
    and the result is published only after the ledger answered."""
    with trio.fail_after(SERVICE_TIMEOUT_S):
        await rabbit.collect(ONSCREEN)
        await rabbit.collect(RESULTS)
        blocker = PublishBlocker(rabbit, ONSCREEN)
        await blocker.block()
        service = await started(dynamo_process)
        await rabbit.publish(ghost())
        # Each refused alert still reaches the test's own queue: a second copy means the
        # first was refused and dynamo knew it. Or the debit was accepted: the failure.
        refused_copies = 0
        while refused_copies < 2 and fake_ledger.count("accept") == 0:
            refused_copies = len(await rabbit.drain(ONSCREEN))
            await trio.sleep(0.05)
        assert fake_ledger.count("accept") == 0, "debit accepted for an alert the broker refused"
        request_id, row = await the_request(pg_database)
        assert row["step"] == "stored"

        fake_ledger.hold("accept")
        await blocker.unblock()
        [accept] = await fake_ledger.wait_for_calls("accept", 1)
        # The ledger is asked to accept: the alert is confirmed, the result not yet sent.
        request_id, row = await the_request(pg_database)
        assert row["step"] == "announced" and row["announced_at"] is not None
        assert await rabbit.drain(RESULTS) == []
        fake_ledger.release("accept")
        [result] = await rabbit.wait_for(RESULTS, 1)
        assert json.loads(result.body)["outcome"] == "success"
        assert await service.terminate() == 0
        [flow] = fake_ledger.flows_for(request_id)
        assert flow.state == "accepted" and fake_ledger.statuses("accept") == [204]
        assert {m.message_id for m in await rabbit.drain(ONSCREEN)} == {request_id}


async def test_a_cancelled_request_is_refunded_buys_no_image_and_shows_no_alert(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, fake_s3, pg_database):
    with trio.fail_after(SERVICE_TIMEOUT_S):
        await rabbit.collect(ONSCREEN)
        await rabbit.collect(RESULTS)
        fake_auth.add_broadcaster("broadcaster-token", "42", "GoldenVCR")
        fake_openai.hold("moderations")  # reserved, being screened: still cancellable
        service = await started(dynamo_process)
        await rabbit.publish(ghost())
        await fake_openai.wait_for_calls("moderations", 1)
        request_id, row = await the_request(pg_database)
        assert row["step"] == "reserved" and row["flow_id"] is not None
        async with httpx.AsyncClient() as client:
            response = await client.delete(f"{service.url}/requests/{request_id}",
                                           headers={"authorization": "Bearer broadcaster-token"})
        assert response.status_code == 202, response.text
        fake_openai.release("moderations")
        [result] = await rabbit.wait_for(RESULTS, 1)
        body = json.loads(result.body)
        assert (body["outcome"], body["reason"]) == ("failure", "cancelled")
        assert await service.terminate() == 0
        [flow] = fake_ledger.flows_for(request_id)
        assert flow.state == "rejected" and fake_ledger.count("accept") == 0
        assert fake_openai.count("images") == 0
        assert await rabbit.drain(ONSCREEN) == []
        request_id, row = await the_request(pg_database)
        assert (row["step"], row["state"], row["failure_reason"]) == ("done", "failed", "cancelled")


async def test_a_discord_post_claimed_before_a_kill_is_not_posted_again(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, fake_s3, fake_discord,
        pg_database):
    """The post is claimed in PostgreSQL before it is sent; the process is killed while
    the webhook has it. The request is put back to `accepted`, as if the kill had come
    before `done` was stored, so that the restarted process publishes the result again
    and hands the request to its Discord actor again: the claim must keep it from a
    second post (one lost post is the documented price)."""
    with trio.fail_after(SERVICE_TIMEOUT_S):
        await rabbit.collect(RESULTS)
        fake_discord.hold("webhook")
        service = await started(dynamo_process, **fake_discord.env())
        await rabbit.publish(ghost())
        await fake_discord.wait_for_calls("webhook", 1)
        service.kill()
        await fake_discord.wait_until(lambda: fake_discord.in_flight["webhook"] == 0)
        fake_discord.release("webhook")
        request_id, row = await the_request(pg_database)
        assert row["discord_posted_at"] is not None and row["step"] == "done"
        conn_sql = ("update dynamo.image_request set step = 'accepted', state = 'processing', "
                    "finished_at = null where id = $1")
        await fetch_rows(pg_database, conn_sql, uuid.UUID(request_id))

        service.start()
        await service.wait_ready()
        await rabbit.wait_for(RESULTS, 2)  # the result again: the request went round again
        skipped = "discord post already made (or claimed); skipped"
        while not any(skipped in line and request_id in line
                      for line in service.logs().splitlines()):
            assert fake_discord.count("webhook") == 1, "posted again"
            await trio.sleep(0.05)
        assert await service.terminate() == 0
        assert fake_discord.count("webhook") == 1 and fake_discord.messages == []


RATE_PER_MINUTE = 6  # 10 s apart: longer than a restart takes
ARRIVAL_JITTER_S = 0.25


async def test_the_image_rate_limit_holds_across_a_kill_and_a_restart(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, fake_s3, pg_database):
    """Image permits are granted from PostgreSQL (`dynamo.permit_grant`): a process
    started right after one was killed knows the killed one's grants and waits its turn
    (60/limit s after the last call), instead of starting afresh with a call at once."""
    with trio.fail_after(SERVICE_TIMEOUT_S):
        await rabbit.collect(RESULTS)
        fake_openai.images_per_minute = RATE_PER_MINUTE
        env = {"DYNAMO_IMAGES_PER_MINUTE": str(RATE_PER_MINUTE)}
        service = await started(dynamo_process, **env)
        for number in range(3):
            await rabbit.publish(ghost(f"a seal number {number}"))
        # Killed as soon as the second image call was answered: the next is due 60/limit
        # s after it, and a restart takes less.
        await fake_openai.wait_for_answers("images", 2)
        service.kill()
        calls_before = fake_openai.count("images")
        last_before = max(call.time for call in fake_openai.calls_to("images"))
        grants = await fetch_rows(pg_database, "select worker_id from dynamo.permit_grant "
                                  "where kind = 'image' and is_call")
        assert len(grants) >= calls_before

        restarted_at = trio.current_time()
        service.start()
        await service.wait_ready()
        print(f"restart to ready: {trio.current_time() - restarted_at:.1f} s; "
              f"since the last call: {trio.current_time() - last_before:.1f} s")
        [first_after] = (await fake_openai.wait_for_calls("images", calls_before + 1))[-1:]
        spacing_s = 60 / RATE_PER_MINUTE
        print(f"first call after the restart: {first_after.time - last_before:.1f} s after "
              "the last before the kill")
        assert first_after.time - last_before >= spacing_s - ARRIVAL_JITTER_S, (
            first_after.time - last_before)
        await rabbit.wait_for(RESULTS, 3)
        assert await service.terminate() == 0
        assert 429 not in fake_openai.statuses("images")
