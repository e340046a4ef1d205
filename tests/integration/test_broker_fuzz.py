"""Fuzz of the running service's broker door (issue 10): `python run.py` on the real
RabbitMQ and PostgreSQL, with the fake auth/ledger/OpenAI and moto's S3, gets ~210
hostile or invalid messages on `generation-requests` (nesting bombs, bytes that are not
UTF-8, huge bodies, wrong types, missing fields, bodies that are not JSON, empty ones)
with 10 valid ones among them, published as `dispatch` does, half without a message_id.

Every invalid message is dead-lettered (its body, message_id and delivery mode kept, the
reason in x-dynamo-error); every valid one succeeds, once; no points move and no image is
made for a bad one; the process never exits and logs no error. Before issue 10, the
first nesting bomb crashed intake at every redelivery and the process exited for good."""

from __future__ import annotations

import collections
import json
import random

import asyncpg
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_asyncio import aio_as_trio

from dynamo.domain import genreq
from dynamo.rabbitmq import broker as topology
from tests.support import infra, poison
from tests.support.amqp import RawPublisher, bodies
from tests.support.service import started
from tests.support.timeouts import SERVICE_S as TEST_TIMEOUT_S
from tests.support.timeouts import STARTUP_S as STARTUP_TIMEOUT_S

pytestmark = pytest.mark.integration

RANDOM_CASES = 170
VALID = 10
SEED = 10


def valid_message(n: int) -> bytes:
    message = json.loads(json.dumps(poison.FRIEND if n % 3 == 0 else poison.GHOST))
    message["payload"]["inputs"]["subject"] = f"a fuzzed seal number {n}"
    return json.dumps(message).encode()


async def count_rows(database: str, sql: str):
    conn = await aio_as_trio(asyncpg.connect)(infra.pg_dsn(database))
    try:
        return await aio_as_trio(conn.fetch)(sql)
    finally:
        await aio_as_trio(conn.close)()


async def test_hostile_messages_are_dead_lettered_and_valid_ones_succeed_once(
        rabbit, vhost, dynamo_process, fake_ledger, fake_openai, fake_s3, pg_database):
    fake_ledger.default_balance = 1_000_000
    rng = random.Random(SEED)
    invalid = [*poison.known_cases().values(), *poison.random_cases(rng, RANDOM_CASES)]
    for body in invalid:  # the corpus itself: invalid by construction
        with pytest.raises(genreq.InvalidRequest):
            genreq.parse_message(body)
    # (body, properties): half without a message_id, as dispatch publishes; both delivery modes.
    messages = [(body, {"message_id": f"bad-{n}" if n % 2 else None, "delivery_mode": 1 + n % 2,
                        "content_type": "application/json"}) for n, body in enumerate(invalid)]
    for n in range(VALID):
        at = rng.randrange(len(messages) + 1)
        messages.insert(at, (valid_message(n), {"message_id": f"good-{n}" if n % 2 else None,
                                                "delivery_mode": 2}))

    with trio.fail_after(TEST_TIMEOUT_S):
        await rabbit.collect(topology.ONSCREEN_EXCHANGE)
        await rabbit.collect(topology.RESULTS_EXCHANGE)
        service = await started(dynamo_process, within_s=STARTUP_TIMEOUT_S)
        publisher = await RawPublisher.connect(infra.amqp_url(vhost))
        try:
            for body, properties in messages:
                await publisher.publish(body, **{k: v for k, v in properties.items() if v is not None})
        finally:
            await publisher.aclose()

        dead = []
        while len(dead) < len(invalid):
            dead += await rabbit.queue_messages(topology.DEAD_LETTER_QUEUE)
            assert service.process.poll() is None, "the service exited"
            await trio.sleep(0.2)
        alerts = await rabbit.wait_for(topology.ONSCREEN_EXCHANGE, VALID)
        # A bad message whose viewer could be read is stored (before it is dead-lettered) as
        # a failed request, and answered with a failure result.
        rows = await count_rows(pg_database, "select id, state, failure_reason, flow_id "
                                             "from dynamo.image_request")
        answered_invalid = sum(1 for r in rows if r["failure_reason"] == "invalid")
        results = await rabbit.wait_for(topology.RESULTS_EXCHANGE, VALID + answered_invalid)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{service.url}/healthz")).status_code == 200
            metrics = (await client.get(f"{service.url}/metrics")).text

        # Every invalid message dead-lettered, once, as it came, with its reason.
        # (A message that had no message_id gets a random one in its dead-lettered copy:
        # aiormq, under aio-pika, puts one on every message it publishes.)
        sent = collections.Counter((body, properties["message_id"], properties["delivery_mode"])
                                   for body, properties in messages if body in set(invalid))
        assert collections.Counter(
            (m.body, m.message_id if m.message_id.startswith("bad-") else None, int(m.delivery_mode))
            for m in dead) == sent
        assert all(m.headers[topology.ERROR_HEADER] for m in dead)
        assert await rabbit.queue_messages(topology.DEAD_LETTER_QUEUE) == []

        # Every valid one succeeded once: one alert, one success result, one accepted debit.
        successes = [r for r in bodies(results) if r["outcome"] == "success"]
        assert len(alerts) == VALID and len(successes) == VALID
        assert sorted(r["description"] for r in successes) == sorted(
            f"a fuzzed seal number {n}" for n in range(VALID))
        succeeded = {r["request_id"] for r in successes}
        assert {m.message_id for m in alerts} == succeeded
        rows = await count_rows(pg_database, "select id, state, failure_reason, flow_id "
                                             "from dynamo.image_request")
        assert {str(r["id"]) for r in rows if r["state"] == "succeeded"} == succeeded
        bad_rows = [r for r in rows if str(r["id"]) not in succeeded]
        assert all(r["state"] == "failed" and r["failure_reason"] == "invalid" and r["flow_id"] is None
                   for r in bad_rows)
        failures = [r for r in bodies(results) if r["outcome"] == "failure"]
        assert {r["request_id"] for r in failures} == {str(r["id"]) for r in bad_rows}
        assert all(r["reason"] == "invalid" for r in failures)

        # No points and no image for a bad one.
        assert sorted(f.request_id for f in fake_ledger.accepted()) == sorted(succeeded)
        assert len(fake_ledger.flows) == VALID and fake_ledger.pending() == []
        assert fake_openai.count("images") == VALID
        listed = await trio.to_thread.run_sync(
            lambda: fake_s3.client().list_objects_v2(Bucket=fake_s3.bucket).get("Contents", []))
        assert len(listed) == VALID

        samples = {s.name: s.value for family in text_string_to_metric_families(metrics)
                   for s in family.samples if not s.labels}
        assert samples["dynamo_dead_letters_total"] == len(invalid), samples.get("dynamo_dead_letters_total")
        assert service.process.poll() is None, "the service exited"
        assert await service.terminate() == 0
        assert len(await rabbit.drain(topology.ONSCREEN_EXCHANGE)) == VALID  # none came late
        logs = service.logs()
        assert "Traceback" not in logs and " ERROR " not in logs and "CRITICAL" not in logs, logs[-5000:]
        print(f"broker fuzz: {len(invalid)} invalid messages dead-lettered "
              f"({len(bad_rows)} with a readable viewer answered as invalid), "
              f"{VALID} valid ones succeeded once")
