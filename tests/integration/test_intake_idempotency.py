"""Intake under at-least-once delivery (contract §2): a message_id is one request however
often it arrives, identical bodies without one are separate requests, and a poison
message is dead-lettered without blocking the queue. dynamo runs as `python run.py`
against the real RabbitMQ and PostgreSQL, with the fake OpenAI, auth and ledger.

Intake takes the input queue's messages one at a time, in order, so a message whose
effect is seen (its dead letter, its result) proves every message before it was taken:
the tests publish such a message last, as a barrier, before counting.
"""

from __future__ import annotations

import json

import pytest
import trio

from dynamo.rabbitmq import broker as topology
from tests.support import checks
from tests.support.amqp import bodies
from tests.support.checks import genreq
from tests.support.service import started
from tests.support.timeouts import SERVICE_S

pytestmark = pytest.mark.integration

# After the last expected message, how long a test waits for one that must not come.
QUIET_S = 0.5
POISON = b'{"type": "image", "viewer": '


async def check_input_queue_drained(rabbit, vhost) -> None:
    """Nothing waits in the input queue and nothing is held unacked: no message is stuck."""
    assert await checks.queue_depth(rabbit, topology.REQUESTS_QUEUE) == 0
    counts = await checks.queue_counts(vhost, topology.REQUESTS_QUEUE)
    assert counts == {"ready": 0, "unacked": 0, "consumers": 1}, counts


async def test_one_message_id_delivered_four_times_is_one_request(
        rabbit, dynamo_process, fake_openai, fake_ledger, pg_database, vhost):
    with trio.fail_after(SERVICE_S):
        await started(dynamo_process, rabbit=rabbit)
        message = genreq("a seal")
        for _ in range(3):
            await rabbit.publish(message, message_id="dispatch-msg-1")
        await rabbit.publish(POISON, message_id="barrier")
        await checks.wait_for_dead_letters(rabbit, 1)

        [alert] = await rabbit.wait_for(topology.ONSCREEN_EXCHANGE, 1)
        [result] = await rabbit.wait_for(topology.RESULTS_EXCHANGE, 1)
        body = json.loads(result.body)
        assert body["outcome"] == "success"
        # Once more after the request is done: still the same request.
        await rabbit.publish(message, message_id="dispatch-msg-1")
        await rabbit.publish(POISON, message_id="barrier-2")
        await checks.wait_for_dead_letters(rabbit, 1)
        await trio.sleep(QUIET_S)

        [row] = await checks.request_rows(pg_database)
        request_id = str(row["id"])
        assert body["request_id"] == request_id and alert.message_id == request_id
        assert (row["state"], row["step"]) == ("succeeded", "done")
        assert len(await rabbit.drain(topology.ONSCREEN_EXCHANGE)) == 1
        assert len(await rabbit.drain(topology.RESULTS_EXCHANGE)) == 1
        [flow] = fake_ledger.flows.values()
        assert flow.request_id == request_id and flow.state == "accepted"
        assert fake_ledger.count("outflow") == 1 and fake_ledger.count("accept") == 1
        assert fake_openai.count("images") == 1
        await check_input_queue_drained(rabbit, vhost)


async def test_identical_bodies_without_a_message_id_are_separate_requests(
        rabbit, dynamo_process, fake_openai, fake_ledger, pg_database, vhost):
    with trio.fail_after(SERVICE_S):
        await started(dynamo_process, rabbit=rabbit)
        message = genreq("a seal")
        for _ in range(3):
            await rabbit.publish(message)

        alerts = await rabbit.wait_for(topology.ONSCREEN_EXCHANGE, 3)
        results = await rabbit.wait_for(topology.RESULTS_EXCHANGE, 3)
        await trio.sleep(QUIET_S)
        assert len(await rabbit.drain(topology.ONSCREEN_EXCHANGE)) == 3
        assert len(await rabbit.drain(topology.RESULTS_EXCHANGE)) == 3

        rows = await checks.request_rows(pg_database)
        ids = {str(row["id"]) for row in rows}
        assert len(rows) == 3 and len(ids) == 3
        assert all((row["state"], row["step"]) == ("succeeded", "done") for row in rows)
        assert {alert.message_id for alert in alerts} == ids
        assert {r["request_id"] for r in bodies(results)} == ids
        assert all(r["outcome"] == "success" and r["description"] == "a seal"
                   for r in bodies(results))
        accepted = fake_ledger.accepted()
        assert sorted(f.request_id for f in accepted) == sorted(ids)
        assert fake_ledger.pending() == [] and fake_ledger.rejected() == []
        assert fake_openai.count("images") == 3
        await check_input_queue_drained(rabbit, vhost)


async def test_poison_message_between_two_good_ones_blocks_nothing(
        rabbit, dynamo_process, fake_openai, fake_ledger, pg_database, vhost):
    with trio.fail_after(SERVICE_S):
        await started(dynamo_process, rabbit=rabbit)
        await rabbit.publish(genreq("a seal"), message_id="good-1")
        await rabbit.publish(POISON, message_id="poison-1")
        await rabbit.publish(genreq("caterpillar in a top hat", style="friend", color="yellow"),
                             message_id="good-2")

        results = await rabbit.wait_for(topology.RESULTS_EXCHANGE, 2)
        alerts = await rabbit.wait_for(topology.ONSCREEN_EXCHANGE, 2)
        [dead] = await checks.wait_for_dead_letters(rabbit, 1)
        checks.check_dead_letter(dead, body=POISON, message_id="poison-1",
                                 content_type="application/json")
        await trio.sleep(QUIET_S)
        assert len(await rabbit.drain(topology.RESULTS_EXCHANGE)) == 2
        assert len(await rabbit.drain(topology.ONSCREEN_EXCHANGE)) == 2

        assert all(r["outcome"] == "success" for r in bodies(results))
        assert {r["description"] for r in bodies(results)} == {
            "a seal", "a caterpillar in a top hat"}
        rows = await checks.request_rows(pg_database)
        ids = {str(row["id"]) for row in rows}
        assert len(rows) == 2 and {alert.message_id for alert in alerts} == ids
        assert all(row["state"] == "succeeded" for row in rows)
        assert sorted(f.request_id for f in fake_ledger.accepted()) == sorted(ids)
        assert fake_ledger.pending() == []
        # The poison was not requeued: one dead letter, nothing left behind it.
        assert await checks.queue_depth(rabbit, topology.DEAD_LETTER_QUEUE) == 0
        await check_input_queue_drained(rabbit, vhost)
