"""The HTTP API actor's app alone (contract §7), through `app.test_client()` without a
server, on the real PostgreSQL (one throwaway database for this module, emptied before
each test) and the fake auth service; the pipeline's channels are read by the test."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import json
import logging
import re
import types
import urllib.parse
import uuid

import asyncpg
import httpx
import pytest
import trio
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from actors import http
from dynamo import config, metrics
from dynamo.api import create_app, openapi_document
from dynamo.database.port import open_database
from dynamo.domain import genreq
from dynamo.domain.jobs import Reason, Step, Viewer
from dynamo.images.storage import LocalStorage
from dynamo.inflight.pipeline import Pipeline
from dynamo.limits.permits import CallKind
from dynamo.limits.state import RateLimiterStatus
from dynamo.rabbitmq import broker
from dynamo.supervision.readiness import Readiness
from dynamo.supervision.supervisor import ActorStatus, Supervisor
from tests.support import infra
from tests.support.outage import Proxy
from tests.support.timeouts import PORT_S as TEST_TIMEOUT_S

CHANNEL_CAPACITY = 8  # as the service's reserve channel: room for every test's requests
VIEWER_TOKEN, OTHER_TOKEN, BROADCASTER_TOKEN = "viewer-token", "other-token", "broadcaster-token"
ALICE, BOB, CASTER = ("1001", "Alice"), ("1002", "Bob"), ("42", "GoldenVCR")
ADMIN_TOKEN = "admin-token-for-tests"
TABLES = ("dynamo.idempotency_key, dynamo.generated_image, dynamo.answer, dynamo.image, "
          "dynamo.openai_call, "
          "dynamo.image_request")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ghost(subject: str = "a seal") -> dict:
    return {"style": "ghost", "inputs": {"subject": subject}}


def message(viewer: tuple[str, str], subject: str = "a seal") -> dict:
    return {
        "type": "image",
        "viewer": {"twitch_user_id": viewer[0], "twitch_display_name": viewer[1]},
        "state": {"broadcast_id": 13, "screening_id": "96d1ca5c-7658-48c9-8193-9d1739854467",
                  "tape_id": 124},
        "payload": {"style": "friend", "inputs": {"color": "yellow", "subject": subject}},
    }


@pytest.fixture(scope="module")
def http_database():
    """One database for this module's tests (CI=true: PostgreSQL missing fails, not skips)."""
    name = f"dynamo_test_http_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(infra.PG_ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'create database "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        infra.unavailable("PostgreSQL at 127.0.0.1:5432", exc)
    yield infra.pg_dsn(name)
    asyncio.run(admin(f'drop database if exists "{name}" with (force)'))


@dataclasses.dataclass
class Api:
    """The app with its context, and what a test needs around it."""

    context: http.ApiContext
    db: object
    reserve_recv: trio.MemoryReceiveChannel
    finalize_recv: trio.MemoryReceiveChannel
    images_dir: object

    def client(self, **changes):
        """A test client of an app built from this context with `changes`."""
        return create_app(dataclasses.replace(self.context, **changes)).test_client()

    async def store(self, viewer: tuple[str, str], subject: str = "a seal", *,
                    style: str = "ghost", state: str | None = None) -> uuid.UUID:
        """A request stored as intake would, without going through the API."""
        inputs = {"subject": subject} if style == "ghost" else {"subject": subject, "color": "red"}
        parsed = genreq.parse_inputs(Viewer(*viewer), style, inputs)
        request_id, _ = await self.db.insert_request(
            **self.context.pipeline.request_fields(parsed, source="broker"))
        if state is not None:
            await self.db.execute("update dynamo.image_request set state = $2 where id = $1",
                                  request_id, state)
        return request_id


@pytest.fixture
async def api(aio_loop, http_database, fake_auth, tmp_path):
    fake_auth.add_viewer(VIEWER_TOKEN, *ALICE)
    fake_auth.add_viewer(OTHER_TOKEN, *BOB)
    fake_auth.add_broadcaster(BROADCASTER_TOKEN, *CASTER)
    settings = config.load(env={"DATABASE_URL": http_database, "AUTH_URL": fake_auth.url,
                                "AUTH_SHARED_SECRET": fake_auth.secret})
    async with open_database(http_database) as db, httpx.AsyncClient() as http_client:
        await db.apply_schema()
        await db.execute(f"truncate {TABLES}")
        pipeline = Pipeline(db, worker_id=uuid.uuid4(), request_timeout_s=900, points_cost=200)
        reserve_send, reserve_recv = trio.open_memory_channel(CHANNEL_CAPACITY)
        finalize_send, finalize_recv = trio.open_memory_channel(CHANNEL_CAPACITY)
        supervisor = Supervisor()
        supervisor.actors = {"intake": ActorStatus("intake", "running"),
                             "ledger": ActorStatus("ledger", "restarting", 2, "OSError: down")}
        limiter_status = RateLimiterStatus()
        limiter_status.configure({CallKind.IMAGE: 5, CallKind.TEXT: 500})
        images_dir = tmp_path / "images"
        context = http.ApiContext(
            settings=settings, pipeline=pipeline, reserve_send=reserve_send,
            finalize_send=finalize_send,
            readiness=Readiness(db=db, broker=types.SimpleNamespace(configured=False),
                                limiter_status=limiter_status),
            supervisor=supervisor, channels={"reserve": reserve_send, "finalize": finalize_send},
            limiter_status=limiter_status,
            local_storage=LocalStorage(images_dir, "http://127.0.0.1:5008/images"),
            http_client=http_client, admin_token=None, auth_configured=True)
        yield Api(context, db, reserve_recv, finalize_recv, images_dir)


# -- health, readiness, tokens ------------------------------------------------------------


async def test_healthz_and_readyz(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        response = await client.get("/healthz")
        assert response.status_code == 200 and await response.get_json() == {"status": "ok"}
        response = await client.get("/readyz")
        assert response.status_code == 200
        body = await response.get_json()
        assert body["ready"] is True and body["checks"]["database"] == "ok"

        broker_down = types.SimpleNamespace(configured=True, connected=False)
        readiness = Readiness(db=api.db, broker=broker_down, consuming=False)
        response = await api.client(readiness=readiness).get("/readyz")
        assert response.status_code == 503
        body = await response.get_json()
        assert body["ready"] is False
        assert body["checks"]["broker"] == "unreachable"
        assert body["checks"]["input_queue"] == "not consumed"
        assert "broker" in body["error"] and "input_queue" in body["error"]


async def test_missing_or_refused_token_is_401(api, fake_auth):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "},
                        bearer("not-a-token")):
            response = await client.get("/requests", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert set(await response.get_json()) == {"error"}
        # Only the one token that reached auth was checked there; none was sent for the rest.
        assert fake_auth.count("access") == 1


async def test_auth_outage_is_503_never_an_open_door(api, fake_auth):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        fake_auth.down = True
        response = await client.get("/requests", headers=bearer(VIEWER_TOKEN))
        assert response.status_code == 503
        assert "auth" in (await response.get_json())["error"]

        unreachable = dataclasses.replace(api.context.settings, auth_url="http://127.0.0.1:9")
        response = await api.client(settings=unreachable).get(
            "/requests", headers=bearer(VIEWER_TOKEN))
        assert response.status_code == 503


async def test_auth_answers_are_cached_by_token_digest(api, fake_auth):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        for _ in range(3):
            response = await client.get("/requests", headers=bearer(VIEWER_TOKEN))
            assert response.status_code == 200
        assert fake_auth.count("access") == 1
        # The auth service sees the caller's own header; its answer was text/plain JSON.
        assert fake_auth.calls_to("access")[0].headers["authorization"] == f"Bearer {VIEWER_TOKEN}"
        fake_auth.down = True  # within the cache's lifetime, an outage does not matter
        response = await client.get("/requests", headers=bearer(VIEWER_TOKEN))
        assert response.status_code == 200


async def test_admin_token_is_the_broadcaster_without_auth_service(api, fake_auth):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client(auth_configured=False, admin_token=ADMIN_TOKEN)
        response = await client.post("/requests", json=ghost(), headers=bearer(ADMIN_TOKEN))
        assert response.status_code == 202
        job = api.reserve_recv.receive_nowait()
        assert (job.viewer.twitch_user_id, job.viewer.twitch_display_name) == ("0", "broadcaster")
        assert (await client.get("/status", headers=bearer(ADMIN_TOKEN))).status_code == 200
        response = await client.get("/status", headers=bearer(VIEWER_TOKEN))
        assert response.status_code == 401
        assert fake_auth.count("access") == 0


# -- submitting ----------------------------------------------------------------------------


def received_over_http() -> float:
    return metrics.REGISTRY.get_sample_value(
        "dynamo_requests_received_total", {"source": "http"}) or 0.0


async def test_viewer_submits_the_short_form(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        before = received_over_http()
        response = await api.client().post("/requests", json=ghost(" a seal "),
                                           headers=bearer(VIEWER_TOKEN))
        assert response.status_code == 202
        body = await response.get_json()
        assert body == {"id": body["id"], "state": "queued", "url": f"/requests/{body['id']}"}
        assert response.headers["Location"] == body["url"]
        job = api.reserve_recv.receive_nowait()
        assert str(job.id) == body["id"] and job.step is Step.RECEIVED
        assert job.viewer == Viewer(*ALICE) and job.inputs == {"subject": "a seal"}
        assert job.id in api.context.pipeline.inflight
        row = await api.db.load_request(job.id)
        assert row["source"] == "http" and row["points_cost"] == 200
        assert received_over_http() == before + 1


async def test_invalid_request_is_400_with_the_reason(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        response = await client.post("/requests", json=ghost("x" * 121), headers=bearer(VIEWER_TOKEN))
        assert response.status_code == 400
        error = (await response.get_json())["error"]
        assert "inputs.subject" in error and "120" in error
        for body in ([1, 2], "a seal", {"style": "dragon", "inputs": {}}):
            response = await client.post("/requests", json=body, headers=bearer(VIEWER_TOKEN))
            assert response.status_code == 400, body
        too_big = message(ALICE)
        too_big["state"]["broadcast_id"] = 2**40  # beyond the database's integer column
        response = await client.post("/requests", json=too_big, headers=bearer(VIEWER_TOKEN))
        assert response.status_code == 400
        response = await client.post("/requests", data=b"{not json",
                                     headers={**bearer(VIEWER_TOKEN), "Content-Type": "application/json"})
        assert response.status_code == 400
        assert await api.db.fetchval("select count(*) from dynamo.image_request") == 0


async def test_full_message_for_oneself_or_by_the_broadcaster(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        response = await client.post("/requests", json=message(BOB), headers=bearer(VIEWER_TOKEN))
        assert response.status_code == 403
        response = await client.post("/requests", json=message(ALICE), headers=bearer(VIEWER_TOKEN))
        assert response.status_code == 202
        response = await client.post("/requests", json=message(BOB), headers=bearer(BROADCASTER_TOKEN))
        assert response.status_code == 202
        jobs = [api.reserve_recv.receive_nowait() for _ in range(2)]
        assert [job.viewer.twitch_user_id for job in jobs] == [ALICE[0], BOB[0]]
        row = await api.db.load_request(jobs[1].id)
        assert row["broadcast_id"] == 13 and row["style"] == "friend"


async def test_body_too_large_is_413_and_not_json_is_415(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        big = json.dumps({**ghost(), "padding": "x" * 17_000}).encode()
        response = await client.post("/requests", data=big,
                                     headers={**bearer(VIEWER_TOKEN), "Content-Type": "application/json"})
        assert response.status_code == 413 and "error" in await response.get_json()
        response = await client.post("/requests", data=json.dumps(ghost()).encode(),
                                     headers={**bearer(VIEWER_TOKEN), "Content-Type": "text/plain"})
        assert response.status_code == 415 and "error" in await response.get_json()
        response = await client.post("/requests", form={"style": "ghost"}, headers=bearer(VIEWER_TOKEN))
        assert response.status_code == 415


async def test_idempotency_key_returns_the_first_answer(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        headers = {**bearer(VIEWER_TOKEN), "Idempotency-Key": "retry-1"}
        first = await client.post("/requests", json=ghost(), headers=headers)
        # The same body, its fields in another order, is the same request.
        again = await client.post("/requests", json={"inputs": {"subject": "a seal"}, "style": "ghost"},
                                  headers=headers)
        assert first.status_code == again.status_code == 202
        assert (await first.get_json())["id"] == (await again.get_json())["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first.headers
        # A replay is the first answer, even once the request has moved on.
        first_body = await first.get_json()
        await api.db.execute("update dynamo.image_request set step = 'done', state = 'succeeded' "
                             "where id = $1", uuid.UUID(first_body["id"]))
        later = await client.post("/requests", json=ghost(), headers=headers)
        assert later.status_code == 202 and await later.get_json() == first_body
        assert first_body == {"id": first_body["id"], "state": "queued",
                              "url": f"/requests/{first_body['id']}"}
        assert later.headers["Location"] == first.headers["Location"] == first_body["url"]
        assert later.headers["Idempotent-Replayed"] == "true"
        api.reserve_recv.receive_nowait()
        with pytest.raises(trio.WouldBlock):
            api.reserve_recv.receive_nowait()  # routed once

        other = await client.post("/requests", json=ghost("a walrus"), headers=headers)
        assert other.status_code == 409
        # Keys are per caller: Bob's "retry-1" is his own.
        bobs = await client.post("/requests", json=ghost(),
                                 headers={**bearer(OTHER_TOKEN), "Idempotency-Key": "retry-1"})
        assert bobs.status_code == 202
        assert (await bobs.get_json())["id"] != (await first.get_json())["id"]
        assert await api.db.fetchval("select count(*) from dynamo.image_request") == 2
        assert await api.db.fetchval("select count(*) from dynamo.idempotency_key") == 2
        bad = await client.post("/requests", json=ghost(),
                                headers={**bearer(VIEWER_TOKEN), "Idempotency-Key": "x" * 256})
        assert bad.status_code == 400


# -- reading and listing ---------------------------------------------------------------------


async def test_viewers_read_their_own_requests_and_the_broadcaster_any(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        request_id = await api.store(BOB, style="friend", subject="caterpillar in a top hat")
        await api.db.save_name(request_id, "prompt", "Sir Hatsworth")
        path = f"/requests/{request_id}"
        response = await client.get(path, headers=bearer(VIEWER_TOKEN))
        assert response.status_code == 404  # another viewer's: its existence is not revealed
        for token in (OTHER_TOKEN, BROADCASTER_TOKEN):
            response = await client.get(path, headers=bearer(token))
            assert response.status_code == 200
        body = await response.get_json()
        created_at = body.pop("created_at")
        assert created_at.endswith("Z") and "T" in created_at
        assert body == {
            "id": str(request_id), "state": "queued", "step": "received", "style": "friend",
            "inputs": {"color": "red", "subject": "caterpillar in a top hat"},
            "prompt": body["prompt"],
            "viewer": {"twitch_user_id": BOB[0], "twitch_display_name": BOB[1]},
            "finished_at": None, "images": [], "name": "Sir Hatsworth", "failure": None,
            "cost_usd": 0.0,
        }
        assert body["prompt"].startswith("a red caterpillar in a top hat")
        for bad in ("not-a-uuid", str(uuid.uuid4())):
            response = await client.get(f"/requests/{bad}", headers=bearer(BROADCASTER_TOKEN))
            assert response.status_code == 404 and "error" in await response.get_json()


async def test_listing_filters_and_pages(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        alices = [await api.store(ALICE, f"seal {i}") for i in range(5)]
        bobs = [await api.store(BOB, "walrus", style="friend", state="failed") for _ in range(2)]

        async def page(token, **params):
            response = await client.get("/requests", headers=bearer(token), query_string=params)
            assert response.status_code == 200, await response.get_json()
            return await response.get_json()

        newest_first = await api.db.fetch(
            "select id from dynamo.image_request where twitch_user_id = $1 "
            "order by created_at desc, id desc", ALICE[0])
        assert {row["id"] for row in newest_first} == set(alices)
        mine = await page(VIEWER_TOKEN)
        assert [r["id"] for r in mine["requests"]] == [str(row["id"]) for row in newest_first]
        assert mine["next"] is None
        assert len((await page(VIEWER_TOKEN, viewer=ALICE[0]))["requests"]) == 5
        response = await client.get("/requests", headers=bearer(VIEWER_TOKEN),
                                    query_string={"viewer": BOB[0]})
        assert response.status_code == 403

        everyone = await page(BROADCASTER_TOKEN)
        assert len(everyone["requests"]) == 7
        assert {r["id"] for r in (await page(BROADCASTER_TOKEN, viewer=BOB[0]))["requests"]} == {
            str(i) for i in bobs}
        assert len((await page(BROADCASTER_TOKEN, state="failed"))["requests"]) == 2
        assert len((await page(BROADCASTER_TOKEN, state="queued", style="ghost"))["requests"]) == 5
        assert (await page(BROADCASTER_TOKEN, style="friend", state="queued"))["requests"] == []

        # Pages of 2 walk the whole listing once, newest first.
        seen, cursor = [], None
        while True:
            params = {"limit": "2", **({"before": cursor} if cursor else {})}
            body = await page(BROADCASTER_TOKEN, **params)
            assert len(body["requests"]) <= 2
            seen += [r["id"] for r in body["requests"]]
            cursor = body["next"]
            if cursor is None:
                break
        assert seen == [r["id"] for r in everyone["requests"]]
        assert len(set(seen)) == 7

        for params in ({"limit": "0"}, {"limit": "abc"}, {"limit": "-1"}, {"state": "bogus"},
                       {"style": "dragon"}, {"before": "garbage"}, {"viewer": "a\x00b"}):
            response = await client.get("/requests", headers=bearer(BROADCASTER_TOKEN),
                                        query_string=params)
            assert response.status_code == 400, params
            assert "error" in await response.get_json()


async def test_listing_before_a_request_id_or_a_time(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        alices = [await api.store(ALICE, f"seal {i}") for i in range(4)]
        bobs = [await api.store(BOB, "walrus")]
        rows = await api.db.fetch("select id, created_at from dynamo.image_request "
                                  "order by created_at desc, id desc")
        newest_first = [str(row["id"]) for row in rows]

        async def listed(token, before):
            response = await client.get("/requests", headers=bearer(token),
                                        query_string={"before": before})
            assert response.status_code == 200, await response.get_json()
            return [r["id"] for r in (await response.get_json())["requests"]]

        # A request id: the requests after it, newest first (hex without dashes too).
        third = rows[2]["id"]
        assert await listed(BROADCASTER_TOKEN, str(third)) == newest_first[3:]
        assert await listed(BROADCASTER_TOKEN, third.hex) == newest_first[3:]
        # An RFC 3339 time: the requests created strictly before it, whatever its offset.
        moment = rows[1]["created_at"]
        for spelled in (moment.isoformat(), moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                        moment.astimezone(datetime.timezone(datetime.timedelta(hours=2)))
                        .isoformat()):
            assert await listed(BROADCASTER_TOKEN, spelled) == newest_first[2:], spelled
        assert await listed(BROADCASTER_TOKEN, "2000-01-01T00:00:00Z") == []
        # A `+` left unencoded in the query string arrives as a space: still the offset.
        unencoded = moment.astimezone(datetime.timezone(datetime.timedelta(hours=2))).isoformat()
        response = await client.get(f"/requests?before={unencoded}",
                                    headers=bearer(BROADCASTER_TOKEN))
        assert "+02:00" in unencoded and response.status_code == 200
        assert [r["id"] for r in (await response.get_json())["requests"]] == newest_first[2:]
        # A viewer's listing stays their own; another viewer's request id is not a cursor.
        assert await listed(VIEWER_TOKEN, str(alices[-1])) == [str(i) for i in alices[-2::-1]]
        for before in (str(bobs[0]), str(uuid.uuid4()), "2026-13-01T00:00:00Z"):
            response = await client.get("/requests", headers=bearer(VIEWER_TOKEN),
                                        query_string={"before": before})
            assert response.status_code == 400, before
            assert "before" in (await response.get_json())["error"]


async def test_listing_limit_is_capped(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        await api.db.execute(
            "insert into dynamo.image_request (id, twitch_user_id, style, inputs, prompt, step, state) "
            "select gen_random_uuid(), '7', 'ghost', '{}'::jsonb, 'p', 'done', 'succeeded' "
            "from generate_series(1, 105)")
        response = await api.client().get("/requests", headers=bearer(BROADCASTER_TOKEN),
                                          query_string={"limit": "1000"})
        body = await response.get_json()
        assert len(body["requests"]) == 100 and body["next"] is not None


# -- cancelling ------------------------------------------------------------------------------


async def test_cancel_before_generation(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        request_id = await api.store(ALICE)
        path = f"/requests/{request_id}"
        assert (await client.delete(path, headers=bearer(VIEWER_TOKEN))).status_code == 403
        response = await client.delete(path, headers=bearer(BROADCASTER_TOKEN))
        assert response.status_code == 202
        body = await response.get_json()
        assert body["step"] == "failing" and body["failure"]["reason"] == "cancelled"
        job = api.finalize_recv.receive_nowait()
        assert job.id == request_id and job.step is Step.FAILING
        assert job.failure.reason is Reason.CANCELLED
        row = await api.db.load_request(request_id)
        assert (row["step"], row["failure_reason"]) == ("failing", "cancelled")
        assert "cancelled by the broadcaster" in row["failure_detail"]
        # Already failing: not again.
        assert (await client.delete(path, headers=bearer(BROADCASTER_TOKEN))).status_code == 409
        missing = await client.delete(f"/requests/{uuid.uuid4()}", headers=bearer(BROADCASTER_TOKEN))
        assert missing.status_code == 404


async def test_cancel_after_generation_started_is_409(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await api.store(ALICE)
        await api.db.execute("update dynamo.image_request set step = 'generating', "
                             "state = 'processing' where id = $1", request_id)
        response = await api.client().delete(f"/requests/{request_id}",
                                             headers=bearer(BROADCASTER_TOKEN))
        assert response.status_code == 409
        assert "generat" in (await response.get_json())["error"]
        with pytest.raises(trio.WouldBlock):
            api.finalize_recv.receive_nowait()
        assert (await api.db.load_request(request_id))["step"] == "generating"


# -- operators -------------------------------------------------------------------------------


async def test_status(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        await api.store(ALICE)
        await api.store(BOB, state="failed")
        assert (await client.get("/status", headers=bearer(VIEWER_TOKEN))).status_code == 403
        response = await client.get("/status", headers=bearer(BROADCASTER_TOKEN))
        assert response.status_code == 200
        body = await response.get_json()
        assert body["actors"]["ledger"] == {"name": "ledger", "state": "restarting",
                                            "restarts": 2, "last_error": "OSError: down",
                                            "outage_restarts": 0}
        assert body["queues"]["reserve"] == {"depth": 0, "capacity": CHANNEL_CAPACITY}
        assert "dynamo.generation-requests" not in body["queues"]  # no broker configured
        assert set(body["rate_limiter"]["kinds"]) == {"image", "text"}
        assert body["requests"] == {"queued": 1, "processing": 0, "succeeded": 0, "failed": 1}
        assert body["orphan_debits"] == 0 and body["in_flight"] == 0


async def test_status_shows_the_input_queue_and_answers_through_a_broker_outage(
        api, vhost, nursery):
    direct = urllib.parse.urlsplit(infra.amqp_url(vhost))
    proxy = await nursery.start(Proxy(direct.port or 5672).serve)
    through_proxy = direct._replace(netloc=direct.netloc.replace(f":{direct.port}", "")
                                    + f":{proxy.port}").geturl()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with broker.open_broker(through_proxy) as rabbit:
            for n in range(3):  # nobody consumes here: they wait in the input queue
                await rabbit.publish_json(broker.REQUESTS_EXCHANGE, {"n": n}, message_id=str(n))
            client = api.client(broker=rabbit)
            response = await client.get("/status", headers=bearer(BROADCASTER_TOKEN))
            assert response.status_code == 200
            queues = (await response.get_json())["queues"]
            assert queues[broker.REQUESTS_QUEUE] == {"depth": 3, "capacity": None}
            assert queues["reserve"] == {"depth": 0, "capacity": CHANNEL_CAPACITY}
            proxy.cut()  # the broker is gone: refused, or silent until the 1 s cap
            response = await client.get("/status", headers=bearer(BROADCASTER_TOKEN))
            assert response.status_code == 200
            entry = (await response.get_json())["queues"][broker.REQUESTS_QUEUE]
            assert entry["depth"] is None and entry["error"], entry
            proxy.restore()


async def test_metrics(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        await api.context.reserve_send.send("a job")  # one buffered item
        response = await api.client().get("/metrics")
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(await response.get_data(as_text=True))}
        used = {s.labels["channel"]: s.value for s in families["dynamo_channel_used"].samples}
        capacity = {s.labels["channel"]: s.value for s in families["dynamo_channel_capacity"].samples}
        assert used["reserve"] == 1 and capacity["reserve"] == CHANNEL_CAPACITY
        assert "dynamo_requests_received" in families


async def test_images_are_served_from_local_storage(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        request_id = uuid.uuid4()
        key = f"{request_id}/{request_id}-0.webp"
        await api.context.local_storage.upload(key, b"RIFF....WEBP", "image/webp")
        (api.images_dir / "secret.txt").write_text("no")
        response = await client.get(f"/images/{key}")
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "image/webp"
        assert await response.get_data() == b"RIFF....WEBP"
        for missing in (f"{request_id}/other.jpg", "secret.txt", "../../etc/passwd.png",
                        f"{request_id}/{request_id}-0.webp.partial"):
            response = await client.get(f"/images/{missing}")
            assert response.status_code == 404, missing
            assert "error" in await response.get_json()
        response = await api.client(local_storage=None).get(f"/images/{key}")
        assert response.status_code == 404


async def test_openapi_document_is_valid_and_covers_every_route(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        client = api.client()
        response = await client.get("/openapi.json")
        assert response.status_code == 200
        document = await response.get_json()
        validate(document)
        app = create_app(api.context)
        served = {
            (re.sub(r"<(?:[^:>]*:)?([^>]+)>", r"{\1}", rule.rule), method.lower())
            for rule in app.url_map.iter_rules() if rule.endpoint != "openapi"
            for method in rule.methods - {"HEAD", "OPTIONS"}
        }
        documented = {(path, method) for path, item in openapi_document()["paths"].items()
                      for method in item if method != "parameters"}
        assert served == documented
        assert document == openapi_document()  # what is served is what tools read


async def test_one_log_line_per_request_without_the_token(api, caplog):
    with trio.fail_after(TEST_TIMEOUT_S):
        caplog.set_level(logging.INFO)
        client = api.client()
        await client.get("/requests", headers=bearer(VIEWER_TOKEN))
        await client.get("/requests/nope", headers=bearer(VIEWER_TOKEN))
        lines = [r.getMessage() for r in caplog.records if r.name == "dynamo.api.app"]
        assert lines[0].startswith("GET /requests 200 ") and lines[1].startswith("GET /requests/nope 404 ")
        assert all(VIEWER_TOKEN not in r.getMessage() for r in caplog.records)


# -- the actor -------------------------------------------------------------------------------


async def test_actor_serves_on_the_port_it_reports(api):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(functools.partial(
                http.run, api=api.context, host="127.0.0.1", port=0))
            assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
            async with httpx.AsyncClient() as client:
                response = await client.get(f"{url}/healthz")
                assert response.status_code == 200 and response.json() == {"status": "ok"}
                response = await client.post(f"{url}/requests", json=ghost(),
                                             headers=bearer(VIEWER_TOKEN))
                assert response.status_code == 202

                async def chunks():  # no Content-Length: the limit holds while reading
                    yield b'{"style": "ghost", "inputs": {"subject": "'
                    for _ in range(20):
                        yield b"x" * 1024
                    yield b'"}}'

                response = await client.post(f"{url}/requests", content=chunks(), headers={
                    **bearer(VIEWER_TOKEN), "Content-Type": "application/json"})
                assert response.status_code == 413 and "error" in response.json()
            assert api.reserve_recv.receive_nowait().viewer == Viewer(*ALICE)
            nursery.cancel_scope.cancel()
