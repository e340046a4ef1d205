"""The auth + ledger port (`dynamo.viewer_points.port.Points`) through its real HTTP client against
the fakes of tests/fakes, which answer as the Go services do: the 409s that count as
done, the ledger's history that a reservation cut off by a crash is looked up in, and the
service token kept per viewer (one auth call per viewer and token life, a token the
ledger refuses replaced)."""

from __future__ import annotations

import datetime
import logging
import time
import uuid

import httpx
import pytest
import trio
import trio.testing

from dynamo.domain.jobs import Job, Style, Viewer
from dynamo.supervision.retry import Permanent, Transient
from dynamo.viewer_points.port import AlreadyFinalized, InsufficientPoints, Points
from dynamo.viewer_points.token_cache import MARGIN_S, TokenCache, unverified_claims
from tests.support.timeouts import PORT_S as TEST_TIMEOUT_S

COST = 200


def a_job(user_id: str = "1001", name: str = "GhostFan") -> Job:
    return Job(id=uuid.uuid4(), viewer=Viewer(user_id, name), style=Style.GHOST,
               inputs={"subject": "a seal"}, prompt="a seal", description="a seal",
               deadline=trio.current_time() + 600)


class Clock:
    """The token cache's wall clock, moved by hand (the fakes keep the real one)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def points(fake_auth, fake_ledger, clock):
    async with httpx.AsyncClient() as client:
        yield Points(client, auth_url=fake_auth.url, ledger_url=fake_ledger.url,
                     shared_secret=fake_auth.secret, points_cost=COST,
                     tokens=TokenCache(clock=clock))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def flows_since(points, job, since) -> list[str]:
    found = await points.pending_redemptions(job, since)
    assert [at for at, _ in found] == sorted(at for at, _ in found)
    assert all(at >= since for at, _ in found)
    return [flow_id for _, flow_id in found]


async def test_409_on_accept_and_refund_is_already_finalized(points, fake_ledger):
    with trio.fail_after(TEST_TIMEOUT_S):
        job = a_job()
        accepted, refunded = await points.reserve(job), await points.reserve(job)
        await points.accept(job, accepted)
        await points.refund(job, refunded)
        with pytest.raises(AlreadyFinalized):
            await points.accept(job, accepted)
        with pytest.raises(AlreadyFinalized):
            await points.refund(job, accepted)
        with pytest.raises(AlreadyFinalized):
            await points.refund(job, refunded)
        assert fake_ledger.statuses("accept") == [204, 409]
        assert fake_ledger.statuses("refund") == [204, 409, 409]
        # Anything else is not taken for "done": an unknown flow is a refusal.
        with pytest.raises(Permanent):
            await points.accept(job, str(uuid.uuid4()))


async def test_409_on_reserve_is_insufficient_points(points, fake_ledger):
    with trio.fail_after(TEST_TIMEOUT_S):
        fake_ledger.balances["1001"] = COST - 1
        job = a_job()
        with pytest.raises(InsufficientPoints):
            await points.reserve(job)


async def test_history_finds_the_viewers_pending_image_debits_since_a_time(points, fake_ledger):
    with trio.fail_after(TEST_TIMEOUT_S):
        job, other = a_job(), a_job("1002", "FriendFan")
        before = await points.reserve(job)
        await trio.sleep(0.01)
        since = _now()
        accepted = await points.reserve(job)
        await points.accept(job, accepted)
        first, second = await points.reserve(job), await points.reserve(job)
        await points.reserve(other)
        assert await flows_since(points, job, since) == [first, second]
        assert await flows_since(points, job, since - datetime.timedelta(seconds=5)) == [
            before, first, second]
        assert await points.pending_redemptions(job, _now()) == []
        call = fake_ledger.calls_to("history")[0]
        assert call.path.startswith("/history?max=100") and call.status == 200


async def test_history_is_read_page_by_page(points, fake_ledger, monkeypatch):
    with trio.fail_after(TEST_TIMEOUT_S):
        monkeypatch.setattr("dynamo.viewer_points.port.HISTORY_PAGE_MAX", 2)
        job = a_job()
        since = _now()
        flows = [await points.reserve(job) for _ in range(5)]
        assert await flows_since(points, job, since) == flows
        paths = [call.path for call in fake_ledger.calls_to("history")]
        assert len(paths) == 3 and all("from=" in path for path in paths[1:])


async def test_history_refused_or_down_raises_the_ports_errors(points, fake_ledger):
    with trio.fail_after(TEST_TIMEOUT_S):
        job = a_job()
        fake_ledger.script("history", [503, 403])
        with pytest.raises(Transient):
            await points.pending_redemptions(job, _now())
        with pytest.raises(Permanent):
            await points.pending_redemptions(job, _now())


async def test_the_fake_ledgers_history_pages_as_the_go_handler_does(fake_auth, fake_ledger):
    """`?max` clamped to 1..100 (an invalid one ignored), the cursor the first item of the
    next page, newest first, Go's text/plain JSON with a trailing newline."""
    with trio.fail_after(TEST_TIMEOUT_S):
        fake_auth.add_viewer("viewer-token", "1001", "GhostFan")
        async with httpx.AsyncClient(base_url=fake_ledger.url,
                                     headers={"authorization": "Bearer viewer-token"}) as client:
            body = {"type": "alert-redemption", "numPointsToDebit": 5, "alertType": "image-generation",
                    "alertMetadata": {"imageRequestId": str(uuid.uuid4()), "style": "ghost"}}
            ids = [(await client.post("/outflow", json=body)).json()["flowId"] for _ in range(3)]
            page = await client.get("/history", params={"max": "2"})
            assert page.headers["content-type"].startswith("text/plain") and page.text.endswith("\n")
            first = page.json()
            assert [item["id"] for item in first["items"]] == ids[::-1][:2]
            assert first["nextCursor"] == ids[0]
            item = first["items"][0]
            assert set(item) == {"id", "timestamp", "type", "state", "deltaPoints", "description"}
            assert (item["state"], item["deltaPoints"], item["type"]) == ("pending", -5, "alert-redemption")
            assert item["description"] == "Redeemed alert of type 'image-generation'"
            assert item["timestamp"].endswith("Z")
            rest = (await client.get("/history", params={"max": "2", "from": ids[0]})).json()
            assert [item["id"] for item in rest["items"]] == [ids[0]] and "nextCursor" not in rest
            assert len((await client.get("/history", params={"max": "0"})).json()["items"]) == 1
            assert len((await client.get("/history", params={"max": "x"})).json()["items"]) == 3
            assert (await client.get("/history", params={"from": str(uuid.uuid4())})).json() == {"items": []}
            assert (await client.get("/history", headers={"authorization": "Bearer nope"})).status_code == 401


# -- the service token, kept per viewer -------------------------------------------------


def bearers(fake_ledger, endpoint: str | None = None) -> list[str]:
    calls = fake_ledger.calls if endpoint is None else fake_ledger.calls_to(endpoint)
    return [call.headers["authorization"].removeprefix("Bearer ") for call in calls]


def issued(fake_auth) -> list[str]:
    """The service tokens the fake auth issued, oldest first."""
    return list(fake_auth.issued)


async def test_one_token_serves_all_of_a_viewers_ledger_calls(points, fake_auth, fake_ledger):
    """Two requests of one viewer: reserve, accept, refund, history, one auth call."""
    with trio.fail_after(TEST_TIMEOUT_S):
        first, second = a_job(), a_job()
        since = _now()
        accepted, refunded = await points.reserve(first), await points.reserve(second)
        await points.accept(first, accepted)
        await points.refund(second, refunded)
        assert await points.pending_redemptions(first, since) == []
        assert await points.service_token(second) == issued(fake_auth)[0]
        assert fake_auth.count("service-token") == 1
        assert bearers(fake_ledger) == issued(fake_auth) * 5
        # Another viewer, and the same id under another display name (the token carries
        # the name), each get their own.
        await points.reserve(a_job("1002", "FriendFan"))
        await points.reserve(a_job("1001", "GhostFanRenamed"))
        await points.reserve(first)
        assert fake_auth.count("service-token") == 3
        assert [call.body["user"] for call in fake_auth.calls_to("service-token")] == [
            {"id": "1001", "login": "ghostfan", "displayName": "GhostFan"},
            {"id": "1002", "login": "friendfan", "displayName": "FriendFan"},
            {"id": "1001", "login": "ghostfanrenamed", "displayName": "GhostFanRenamed"}]
        assert bearers(fake_ledger)[-3:] == [*issued(fake_auth)[1:], issued(fake_auth)[0]]


async def test_a_viewers_requests_at_once_share_one_token_request(points, fake_auth, fake_ledger):
    with trio.fail_after(TEST_TIMEOUT_S):
        fake_auth.hold("service-token")
        flows: list[str] = []

        async def reserve() -> None:
            flows.append(await points.reserve(a_job()))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(reserve)
            await fake_auth.wait_for_calls("service-token")
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            fake_auth.release("service-token")
        assert fake_auth.count("service-token") == 1
        assert len(set(flows)) == 3 and len(fake_ledger.pending()) == 3
        assert bearers(fake_ledger) == issued(fake_auth) * 3


async def test_a_token_near_its_expiry_is_asked_for_again(points, fake_auth, fake_ledger, clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        job = a_job()
        await points.reserve(job)
        [token] = issued(fake_auth)
        claims = unverified_claims(token)
        assert claims is not None
        # The real auth service's lifetime, which the fake copies.
        assert claims["exp"] - claims["iat"] == 15 * 60
        clock.now = claims["exp"] - MARGIN_S - 1
        await points.reserve(job)
        assert fake_auth.count("service-token") == 1
        clock.now = claims["exp"] - MARGIN_S
        await points.reserve(job)
        assert fake_auth.count("service-token") == 2
        assert bearers(fake_ledger) == [token, token, issued(fake_auth)[1]]


async def test_a_short_lived_token_is_kept_for_most_of_its_life(points, fake_auth, fake_ledger, clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        fake_auth.token_ttl_s = 40  # a quarter of it (10 s) is the margin
        job = a_job()
        await points.reserve(job)
        issued_at = unverified_claims(issued(fake_auth)[0])["iat"]
        clock.now = issued_at + 29
        await points.reserve(job)
        assert fake_auth.count("service-token") == 1
        clock.now = issued_at + 31
        await points.reserve(job)
        assert fake_auth.count("service-token") == 2


async def test_a_kept_token_refused_with_401_is_replaced_and_the_call_made_once_more(
        points, fake_auth, fake_ledger, caplog):
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(TEST_TIMEOUT_S):
        job = a_job()
        first = await points.reserve(job)
        # The ledger refuses the kept token: its middleware answers before the handler.
        fake_ledger.script("outflow", [401])
        second = await points.reserve(job)
        fake_ledger.script("accept", [401])
        await points.accept(job, second)
        assert fake_ledger.statuses("outflow") == [200, 401, 200]
        assert fake_ledger.statuses("accept") == [401, 204]
        # One debit per reservation: the refused call made none, the one made again one.
        assert sorted(fake_ledger.flows) == sorted([first, second])
        assert [flow.state for flow in fake_ledger.flows.values()] == ["pending", "accepted"]
        one, two, three = issued(fake_auth)
        assert bearers(fake_ledger, "outflow") == [one, one, two]
        assert bearers(fake_ledger, "accept") == [two, three]
        # The replacement is kept in turn.
        await points.reserve(job)
        assert fake_auth.count("service-token") == 3
    assert "refused the viewer's kept service token" in caplog.text
    assert not any(token in caplog.text for token in issued(fake_auth))


async def test_a_new_token_refused_or_a_second_refusal_is_not_tried_again(points, fake_auth, fake_ledger):
    with trio.fail_after(TEST_TIMEOUT_S):
        job = a_job()
        fake_ledger.script("outflow", [401])
        with pytest.raises(Permanent):
            await points.reserve(job)
        assert (fake_auth.count("service-token"), fake_ledger.statuses("outflow")) == (1, [401])
        # Not kept: the next call asks for another.
        await points.reserve(job)
        assert fake_auth.count("service-token") == 2
        fake_ledger.script("outflow", [401, 401])
        with pytest.raises(Permanent):
            await points.reserve(job)
        assert fake_auth.count("service-token") == 3
        assert fake_ledger.statuses("outflow") == [401, 200, 401, 401]
        assert len(fake_ledger.flows) == 1


async def test_a_kept_token_the_ledger_finds_expired_is_not_used_again(points, fake_auth, fake_ledger):
    """Our clock says the token has life left, the ledger's says it has none: the real
    ledger answers 500 (an outage to the retry policy); the next try has a new token."""
    with trio.fail_after(TEST_TIMEOUT_S):
        job = a_job()
        flow = await points.reserve(job)
        fake_auth.expire_tokens()
        with pytest.raises(Transient):
            await points.accept(job, flow)
        await points.accept(job, flow)
        assert fake_ledger.statuses("accept") == [500, 204]
        assert fake_auth.count("service-token") == 2
        assert bearers(fake_ledger, "accept") == issued(fake_auth)
