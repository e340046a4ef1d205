"""The live page's event stream (contract §7): the HTTP actor served on 127.0.0.1 port 0
on the real PostgreSQL, with the fake auth service; changes are made the way another
dynamo process makes them (through its own database connection), and arrive because
PostgreSQL NOTIFYs them (the trigger of schema.sql and the port's change feed).

No wall-clock bound is asserted here (the machine is shared): every wait has a generous
deadline, and `bench/live_page.py` measures how long a change takes to arrive."""

from __future__ import annotations

import functools

import asyncpg
import httpx
import pytest
import trio
from trio_asyncio import aio_as_trio

from actors import http
from dynamo.api import tickets
from dynamo.api.access import Caller
from dynamo.database import changes as db_events
from tests.integration.test_http_api import (  # noqa: F401  (fixtures)
    ALICE,
    BOB,
    BROADCASTER_TOKEN,
    VIEWER_TOKEN,
    api,
    bearer,
    http_database,
)
from tests.support import sse
from tests.support.timeouts import SLOW_S as TEST_TIMEOUT_S

pytestmark = pytest.mark.integration



@pytest.fixture
async def served(api, nursery):  # noqa: F811
    return await nursery.start(functools.partial(
        http.run, api=api.context, host="127.0.0.1", port=0))


async def set_step_elsewhere(dsn: str, request_id, step: str, state: str) -> None:
    """Moves a request as another process would: its own connection, its own commit."""
    conn = await aio_as_trio(asyncpg.connect)(dsn)
    try:
        await aio_as_trio(conn.execute)(
            "update dynamo.image_request set step = $2, state = $3 where id = $1",
            request_id, step, state)
    finally:
        await aio_as_trio(conn.close)()


class Stream:
    """One open event stream, its events collected in the background."""

    def __init__(self):
        self.received: list[tuple[str, dict]] = []
        self._changed = trio.Event()

    async def run(self, client, url, token, *, task_status=trio.TASK_STATUS_IGNORED):
        ticket = await sse.ticket(client, url, token)
        async with client.stream("GET", f"{url}/events", params={"ticket": ticket}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            task_status.started()
            async for event in sse.events(response):
                self.received.append(event)
                self._changed.set()
                self._changed = trio.Event()

    async def wait_for(self, predicate):
        while True:
            for name, data in self.received:
                if predicate(name, data):
                    return name, data
            await self._changed.wait()

    def request_events(self) -> list[dict]:
        return [data for name, data in self.received if name == "request"]


async def test_the_stream_needs_a_ticket_used_once(served):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{served}/events/tickets")
            assert response.status_code == 401 and set(response.json()) == {"error"}
            for params in ({}, {"ticket": "not-a-ticket"}, {"ticket": ""}):
                response = await client.get(f"{served}/events", params=params)
                assert response.status_code == 401, params
                assert "ticket" in response.json()["error"]

            response = await client.post(f"{served}/events/tickets", headers=bearer(VIEWER_TOKEN))
            assert response.status_code == 201
            body = response.json()
            assert body["caller"] == {"twitch_user_id": ALICE[0], "twitch_display_name": ALICE[1],
                                      "role": "viewer"}
            assert response.headers["Cache-Control"] == "no-store"
            async with client.stream("GET", f"{served}/events",
                                     params={"ticket": body["ticket"]}) as first:
                assert first.status_code == 200
                name, data = await anext(sse.events(first))
                assert (name, data["caller"]["role"]) == ("hello", "viewer")
                # The same ticket a second time, while the first stream is open: refused.
                again = await client.get(f"{served}/events", params={"ticket": body["ticket"]})
                assert again.status_code == 401


async def test_a_client_with_headers_may_open_the_stream_with_its_bearer_token(served, fake_auth):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with httpx.AsyncClient() as client:
            for token, role in ((VIEWER_TOKEN, "viewer"), (BROADCASTER_TOKEN, "broadcaster")):
                async with client.stream("GET", f"{served}/events",
                                         headers=bearer(token)) as response:
                    assert response.status_code == 200
                    assert response.headers["content-type"].startswith("text/event-stream")
                    name, data = await anext(sse.events(response))
                    assert (name, data["caller"]["role"]) == ("hello", role)
            # A refused token is refused here too, even with a ticket beside it.
            ticket = await sse.ticket(client, served, VIEWER_TOKEN)
            response = await client.get(f"{served}/events", params={"ticket": ticket},
                                        headers=bearer("not-a-token"))
            assert response.status_code == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_changes_by_any_process_reach_the_broadcaster_and_the_viewer_their_own(
        api, served, http_database):  # noqa: F811
    with trio.fail_after(TEST_TIMEOUT_S):
        async with httpx.AsyncClient(timeout=None) as client, trio.open_nursery() as nursery:
            caster, alice = Stream(), Stream()
            await nursery.start(caster.run, client, served, BROADCASTER_TOKEN)
            await nursery.start(alice.run, client, served, VIEWER_TOKEN)
            await caster.wait_for(lambda name, _: name == "hello")
            await alice.wait_for(lambda name, _: name == "hello")

            alices = await api.store(ALICE, "a seal on the stream")
            bobs = await api.store(BOB, "a walrus on the stream")
            await set_step_elsewhere(http_database, bobs, "generating", "processing")
            await set_step_elsewhere(http_database, alices, "screened", "queued")

            def step_of(request_id, step):
                return lambda name, data: (name == "request" and data["id"] == str(request_id)
                                           and data["step"] == step)

            _, body = await caster.wait_for(step_of(bobs, "generating"))
            assert body["state"] == "processing" and body["viewer"]["twitch_user_id"] == BOB[0]
            assert body["inputs"] == {"subject": "a walrus on the stream"}  # GET /requests/{id}'s body
            await caster.wait_for(step_of(alices, "screened"))
            await alice.wait_for(step_of(alices, "screened"))
            # Alice's stream saw her request's changes, and nothing of Bob's.
            assert {data["id"] for data in alice.request_events()} == {str(alices)}
            assert not any(name == "status" for name, _ in alice.received)
            # The broadcaster gets the status panel's data too.
            _, status = await caster.wait_for(lambda name, _: name == "status")
            assert {"actors", "rate_limiter", "requests"} <= set(status)
            nursery.cancel_scope.cancel()


async def test_the_feed_reconnects_after_its_connection_is_dropped(api, http_database):  # noqa: F811
    """The database port's change feed itself: subscribed before it starts, so that every
    RESYNC it sends is seen."""
    changes = api.db.request_changes()

    async def next_item(receive, predicate):
        async for item in receive:
            if predicate(item):
                return item

    with trio.fail_after(TEST_TIMEOUT_S), changes.subscribe() as receive:
        async with trio.open_nursery() as nursery:
            await nursery.start(changes.run)
            await next_item(receive, lambda item: item == db_events.RESYNC)  # listening
            conn = await aio_as_trio(asyncpg.connect)(http_database)
            try:
                killed = await aio_as_trio(conn.fetchval)(
                    "select count(pg_terminate_backend(pid)) from pg_stat_activity "
                    "where application_name = $1 and datname = current_database()",
                    db_events.APPLICATION_NAME)
            finally:
                await aio_as_trio(conn.close)()
            assert killed == 1
            # Listening again, the feed says changes may have been missed...
            await next_item(receive, lambda item: item == db_events.RESYNC)
            # ...and changes flow again.
            request_id = await api.store(ALICE, "after the drop")
            change = await next_item(receive, lambda item: item != db_events.RESYNC)
            assert (change.request_id, change.viewer_id, change.step) == (
                request_id, ALICE[0], "received")
            nursery.cancel_scope.cancel()


async def test_tickets_are_one_use_and_expire(autojump_clock):
    issued = tickets.Tickets()
    caller = Caller("1001", "Alice", "viewer")
    first, second = issued.issue(caller), issued.issue(caller)
    assert first != second
    assert issued.redeem(first) == caller
    assert issued.redeem(first) is None  # used
    await trio.sleep(tickets.TICKET_TTL_S + 1)
    assert issued.redeem(second) is None  # expired
    assert issued.redeem(None) is None and issued.redeem("") is None


def test_notifications_are_parsed_or_ignored():
    change = db_events.parse_notification(
        '{"id": "96d1ca5c-7658-48c9-8193-9d1739854467", "viewer": "1001", '
        '"step": "stored", "state": "processing"}')
    assert change is not None and (change.viewer_id, change.step) == ("1001", "stored")
    for junk in ("", "[]", "{}", '{"id": "x", "viewer": 1, "step": "a", "state": "b"}', "\x00"):
        assert db_events.parse_notification(junk) is None


async def test_a_query_bug_in_the_feed_raises_instead_of_reconnecting(
    api, http_database, monkeypatch  # noqa: F811
):
    """Only a lost connection means reconnect (the database port's mapping decides): a
    query PostgreSQL refuses as wrong is a bug, and comes out of the feed for the
    supervisor to count, rather than a reconnect loop that hides it."""
    monkeypatch.setattr(db_events, "HEALTH_CHECK_S", 0.05)
    monkeypatch.setattr(db_events, "HEALTH_CHECK_QUERY", "select * from no_such_table")
    changes = api.db.request_changes()
    with trio.fail_after(TEST_TIMEOUT_S), changes.subscribe() as receive:
        with pytest.raises(asyncpg.exceptions.UndefinedTableError):
            await changes.run()
        assert receive.receive_nowait() == db_events.RESYNC  # it was listening
