"""Outages during a run of requests, end to end: PostgreSQL, RabbitMQ, the ledger, auth,
storage and the image API each go away and come back while requests are in flight.

dynamo runs as `python run.py` against the real PostgreSQL and RabbitMQ, reached through
a TCP proxy the test cuts (tests/support/outage.py: the shared servers are never stopped),
and the fakes (ledger, auth, OpenAI) told to answer 503; S3 (moto) is reached through a
proxy too, cut or answering 503. Every outage is undone in a `finally`.

Each test ends with: every request succeeded, once; one result each; no alert twice (for
RabbitMQ: no more copies than dynamo counted in dynamo_alerts_republished_total, the one
window the README describes); no debit left pending at the ledger; the process never
exited and no actor crashed (an outage is waited out, not restarted through).
"""

from __future__ import annotations

import collections
import json
import re
import uuid

import httpx
import pytest
import trio

from dynamo.rabbitmq import broker as topology
from tests.support import checks, infra
from tests.support.checks import genreq
from tests.support.outage import Proxy
from tests.support.service import started

pytestmark = pytest.mark.integration

# Requests published before the outage, and as many again while it lasts.
BATCH = 4
# The image API takes this long per image, so that requests are at every step when the
# outage begins.
IMAGE_LATENCY_S = 1.0
# Generous bounds for conditions (never an assertion about speed).
READY_S = 30
SETTLE_S = 120
POLL_S = 0.1
# Outage lengths: the (PostgreSQL 20 s, RabbitMQ 15 s, ledger 20 s, image API
# 15 s); auth and storage shorter, to keep the file's run time reasonable.
DATABASE_DOWN_S = 20
BROKER_DOWN_S = 15
LEDGER_DOWN_S = 20
AUTH_DOWN_S = 10
STORAGE_DOWN_S = 16  # 503 for half of it, unreachable for the other half
OPENAI_DOWN_S = 15


@pytest.fixture
async def pg_proxy(nursery):
    return await nursery.start(Proxy(5432).serve)


@pytest.fixture
async def amqp_proxy(nursery):
    return await nursery.start(Proxy(5672).serve)


@pytest.fixture
async def s3_proxy(nursery, fake_s3):
    return await nursery.start(Proxy(int(fake_s3.endpoint_url.rsplit(":", 1)[1])).serve)


@pytest.fixture
async def service(rabbit, dynamo_process, pg_database, vhost, fake_openai, fake_s3,
                  fake_ledger, pg_proxy, amqp_proxy, s3_proxy):
    """dynamo, ready, reaching PostgreSQL, RabbitMQ and S3 through the proxies."""
    fake_ledger.default_balance = 100 * checks.POINTS_COST  # enough for every request
    fake_openai.latency_s = {"images": IMAGE_LATENCY_S}
    return await started(
        dynamo_process, rabbit=rabbit, within_s=READY_S,
        DATABASE_URL=infra.pg_dsn(pg_database).replace("127.0.0.1:5432", pg_proxy.address),
        AMQP_URL=infra.amqp_url(vhost).replace("127.0.0.1:5672", amqp_proxy.address),
        SPACES_ENDPOINT_URL=f"http://{s3_proxy.address}",
        DYNAMO_GENERATOR_WORKERS="4",
    )


class Run:
    """Requests published around an outage, and the checks of how they ended."""

    def __init__(self, rabbit, service):
        self.rabbit, self.service = rabbit, service
        self.published = 0

    async def publish(self, count: int) -> None:
        for _ in range(count):
            self.published += 1
            # Half with a message_id, half without (matched by body on redelivery).
            message_id = f"outage-{uuid.uuid4().hex[:8]}" if self.published % 2 else None
            await self.rabbit.publish(
                genreq(f"a seal number {self.published} {uuid.uuid4().hex[:6]}"),
                message_id=message_id)

    async def start(self) -> None:
        """The first batch, until its first alert: requests are now at every step."""
        await self.publish(BATCH)
        with trio.fail_after(SETTLE_S):
            await self.rabbit.wait_for(topology.ONSCREEN_EXCHANGE, 1, poll_s=0.02)

    async def readyz(self) -> tuple[int, dict]:
        async with httpx.AsyncClient() as client:
            response = await client.get(self.service.url + "/readyz")
            health = await client.get(self.service.url + "/healthz")
        assert health.status_code == 200
        return response.status_code, response.json()

    async def wait_not_ready(self, dependency: str) -> str:
        """Waits for /readyz to say `dependency` is unreachable; returns what it says."""
        with trio.fail_after(SETTLE_S):
            while True:
                status, body = await self.readyz()
                said = body["checks"].get(dependency, "")
                if status == 503 and said.startswith("unreachable"):
                    return said
                await trio.sleep(POLL_S)

    async def metric(self, name: str) -> float:
        async with httpx.AsyncClient() as client:
            text = (await client.get(self.service.url + "/metrics")).text
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    async def check_all_succeeded_once(self, pg_database, fake_ledger) -> None:
        with trio.fail_after(SETTLE_S):
            while len({json.loads(m.body)["request_id"] for m in
                       await self.rabbit.drain(topology.RESULTS_EXCHANGE)}) < self.published:
                await trio.sleep(POLL_S)
            rows = await checks.request_rows(pg_database)
            while fake_ledger.pending():
                await trio.sleep(POLL_S)
        await trio.sleep(1)  # a late copy would come now
        results = await self.rabbit.drain(topology.RESULTS_EXCHANGE)
        alerts = await self.rabbit.drain(topology.ONSCREEN_EXCHANGE)
        rows = await checks.request_rows(pg_database)
        assert len(rows) == self.published, [dict(r) for r in rows]
        assert {r["state"] for r in rows} == {"succeeded"}, [dict(r) for r in rows]
        ids = {str(r["id"]) for r in rows}
        outcomes = [json.loads(m.body) for m in results]
        assert {o["request_id"] for o in outcomes} == ids
        assert {o["outcome"] for o in outcomes} == {"success"}
        result_copies = len(results) - len(ids)
        alert_copies = collections.Counter(m.message_id for m in alerts)
        assert set(alert_copies) == ids
        extra_alerts = sum(n - 1 for n in alert_copies.values())
        self.duplicates = (extra_alerts, result_copies)
        assert extra_alerts <= await self.metric("dynamo_alerts_republished_total")
        assert result_copies <= await self.metric("dynamo_results_republished_total")
        for request_id in ids:
            [flow] = fake_ledger.flows_for(request_id)
            assert flow.state == "accepted"
        assert fake_ledger.pending() == []
        assert self.service.process.poll() is None, "dynamo exited"
        logs = self.service.logs()
        assert "crashed" not in logs and "CRITICAL" not in logs, logs[-5000:]

    def check_no_duplicates(self) -> None:
        assert self.duplicates == (0, 0)


async def test_postgresql_outage(rabbit, service, pg_proxy, pg_database, fake_ledger):
    run = Run(rabbit, service)
    await run.start()
    pg_proxy.cut()
    try:
        said = await run.wait_not_ready("database")
        await run.publish(BATCH)  # taken by intake, which waits for the database
        await trio.sleep(DATABASE_DOWN_S)
        assert service.process.poll() is None
    finally:
        pg_proxy.restore()
    assert said.startswith("unreachable")
    await run.check_all_succeeded_once(pg_database, fake_ledger)
    run.check_no_duplicates()
    with trio.fail_after(READY_S):
        await service.wait_ready()
    logs = service.logs()
    assert logs.count("database unreachable") == 1 and "database is back after" in logs


async def test_rabbitmq_outage(rabbit, service, amqp_proxy, pg_database, fake_ledger):
    run = Run(rabbit, service)
    await run.start()
    amqp_proxy.cut()
    try:
        said = await run.wait_not_ready("broker")
        await run.publish(BATCH)  # waits in RabbitMQ for dynamo's return
        await trio.sleep(BROKER_DOWN_S)
        assert service.process.poll() is None
    finally:
        amqp_proxy.restore()
    assert said.startswith("unreachable")
    await run.check_all_succeeded_once(pg_database, fake_ledger)
    logs = service.logs()
    assert "broker unreachable" in logs and "broker is back after" in logs


@pytest.mark.parametrize("system", ["ledger", "auth", "openai"])
async def test_http_dependency_outage(rabbit, service, pg_database, fake_ledger, fake_auth,
                                      fake_openai, system):
    fake, down_s = {"ledger": (fake_ledger, LEDGER_DOWN_S), "auth": (fake_auth, AUTH_DOWN_S),
                    "openai": (fake_openai, OPENAI_DOWN_S)}[system]
    run = Run(rabbit, service)
    await run.start()
    fake.down = True
    try:
        await run.publish(BATCH)
        await trio.sleep(down_s)
        assert service.process.poll() is None
    finally:
        fake.down = False
    await run.check_all_succeeded_once(pg_database, fake_ledger)
    run.check_no_duplicates()


async def test_storage_outage(rabbit, service, s3_proxy, pg_database, fake_ledger):
    # S3 first answers 503, then cannot be reached at all; then it is back.
    run = Run(rabbit, service)
    await run.start()
    s3_proxy.answer_503()
    try:
        await run.publish(BATCH)
        await trio.sleep(STORAGE_DOWN_S / 2)
        s3_proxy.cut()
        await trio.sleep(STORAGE_DOWN_S / 2)
        assert service.process.poll() is None
    finally:
        s3_proxy.restore()
    assert s3_proxy.connections > 0
    await run.check_all_succeeded_once(pg_database, fake_ledger)
    run.check_no_duplicates()
