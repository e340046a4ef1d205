"""The auth + ledger port (`dynamo.viewer_points.port.Points`) through its real HTTP client against
the fakes of tests/fakes, which answer as the Go services do: the 409s that count as
done, and the ledger's history that a reservation cut off by a crash is looked up in."""

from __future__ import annotations

import datetime
import uuid

import httpx
import pytest
import trio

from dynamo.domain.jobs import Job, Style, Viewer
from dynamo.supervision.retry import Permanent
from dynamo.viewer_points.port import AlreadyFinalized, InsufficientPoints, Points
from tests.support.timeouts import PORT_S as TEST_TIMEOUT_S

COST = 200


def a_job(user_id: str = "1001", name: str = "GhostFan") -> Job:
    return Job(id=uuid.uuid4(), viewer=Viewer(user_id, name), style=Style.GHOST,
               inputs={"subject": "a seal"}, prompt="a seal", description="a seal",
               deadline=trio.current_time() + 600)


@pytest.fixture
async def points(fake_auth, fake_ledger):
    async with httpx.AsyncClient() as client:
        yield Points(client, auth_url=fake_auth.url, ledger_url=fake_ledger.url,
                     shared_secret=fake_auth.secret, points_cost=COST)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def flows_since(points, job, token, since) -> list[str]:
    found = await points.pending_redemptions(job, token, since)
    assert [at for at, _ in found] == sorted(at for at, _ in found)
    assert all(at >= since for at, _ in found)
    return [flow_id for _, flow_id in found]


async def test_409_on_accept_and_refund_is_already_finalized(points, fake_ledger):
    with trio.fail_after(TEST_TIMEOUT_S):
        job = a_job()
        token = await points.service_token(job)
        accepted, refunded = await points.reserve(job, token), await points.reserve(job, token)
        await points.accept(accepted, token)
        await points.refund(refunded, token)
        with pytest.raises(AlreadyFinalized):
            await points.accept(accepted, token)
        with pytest.raises(AlreadyFinalized):
            await points.refund(accepted, token)
        with pytest.raises(AlreadyFinalized):
            await points.refund(refunded, token)
        assert fake_ledger.statuses("accept") == [204, 409]
        assert fake_ledger.statuses("refund") == [204, 409, 409]
        # Anything else is not taken for "done": an unknown flow is a refusal.
        with pytest.raises(Permanent):
            await points.accept(str(uuid.uuid4()), token)


async def test_409_on_reserve_is_insufficient_points(points, fake_ledger):
    with trio.fail_after(TEST_TIMEOUT_S):
        fake_ledger.balances["1001"] = COST - 1
        job = a_job()
        with pytest.raises(InsufficientPoints):
            await points.reserve(job, await points.service_token(job))


async def test_history_finds_the_viewers_pending_image_debits_since_a_time(points, fake_ledger):
    with trio.fail_after(TEST_TIMEOUT_S):
        job, other = a_job(), a_job("1002", "FriendFan")
        token = await points.service_token(job)
        before = await points.reserve(job, token)
        await trio.sleep(0.01)
        since = _now()
        accepted = await points.reserve(job, token)
        await points.accept(accepted, token)
        first, second = await points.reserve(job, token), await points.reserve(job, token)
        await points.reserve(other, await points.service_token(other))
        assert await flows_since(points, job, token, since) == [first, second]
        assert await flows_since(points, job, token, since - datetime.timedelta(seconds=5)) == [
            before, first, second]
        assert await points.pending_redemptions(job, token, _now()) == []
        call = fake_ledger.calls_to("history")[0]
        assert call.path.startswith("/history?max=100") and call.status == 200


async def test_history_is_read_page_by_page(points, fake_ledger, monkeypatch):
    with trio.fail_after(TEST_TIMEOUT_S):
        monkeypatch.setattr("dynamo.viewer_points.port.HISTORY_PAGE_MAX", 2)
        job = a_job()
        token = await points.service_token(job)
        since = _now()
        flows = [await points.reserve(job, token) for _ in range(5)]
        assert await flows_since(points, job, token, since) == flows
        paths = [call.path for call in fake_ledger.calls_to("history")]
        assert len(paths) == 3 and all("from=" in path for path in paths[1:])


async def test_history_refused_or_down_raises_the_ports_errors(points, fake_ledger):
    from dynamo.supervision.retry import Transient
    with trio.fail_after(TEST_TIMEOUT_S):
        job = a_job()
        token = await points.service_token(job)
        fake_ledger.script("history", [503, 403])
        with pytest.raises(Transient):
            await points.pending_redemptions(job, token, _now())
        with pytest.raises(Permanent):
            await points.pending_redemptions(job, token, _now())


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
