"""Approval before the alert (DYNAMO_APPROVAL=on), end to end: the broadcaster approves or
rejects through the API, the timeout applies its action, the wait survives a kill -9,
any process of a fleet may decide, a decision is taken once, and the preview is the
broadcaster's alone (contract §4, §7; issue 17).

dynamo runs as `python run.py` on the real RabbitMQ and PostgreSQL with the fake OpenAI,
auth, ledger and moto's S3; each test looks at what golden-vcr would see.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
import trio

from dynamo.rabbitmq import broker as topology
from tests.support import checks
from tests.support.checks import VIEWER, genreq
from tests.support.service import started
from tests.support.timeouts import SERVICE_S as TEST_TIMEOUT_S
from tests.support.timeouts import STARTUP_S

pytestmark = pytest.mark.integration

QUIET_S = 0.5
CASTER_TOKEN, VIEWER_TOKEN = "caster-token", "viewer-token"
REJECTED_BY_CASTER = "The broadcaster turned this image down. No points were spent."
TIMED_OUT = "The broadcaster did not review this image in time. No points were spent."
APPROVAL_ENV = {"DYNAMO_APPROVAL": "on", "DYNAMO_APPROVAL_TIMEOUT_S": "120"}


@pytest.fixture
def tokens(fake_auth):
    fake_auth.add_broadcaster(CASTER_TOKEN, "42", "GoldenVCR")
    fake_auth.add_viewer(VIEWER_TOKEN, VIEWER["twitch_user_id"], VIEWER["twitch_display_name"])


async def start(dynamo_process, **env):
    return await started(dynamo_process, **{**APPROVAL_ENV, **env})


def auth(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def submit(service, subject: str = "a seal") -> str:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{service.url}/requests", json=genreq(subject),
                                     headers=auth(CASTER_TOKEN))
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def request_body(service, request_id: str) -> dict:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{service.url}/requests/{request_id}",
                                    headers=auth(CASTER_TOKEN))
    assert response.status_code == 200, response.text
    return response.json()


async def wait_for_step(service, request_id: str, *steps: str) -> dict:
    while True:
        body = await request_body(service, request_id)
        if body["step"] in steps:
            return body
        await trio.sleep(0.05)


async def decide(service, request_id: str, decision: str, token: str | None = CASTER_TOKEN):
    async with httpx.AsyncClient() as client:
        return await client.post(f"{service.url}/requests/{request_id}/{decision}",
                                 headers=auth(token))


async def preview(service, request_id: str, token: str | None = CASTER_TOKEN):
    async with httpx.AsyncClient() as client:
        return await client.get(f"{service.url}/requests/{request_id}/preview",
                                headers=auth(token))


async def bucket_keys(fake_s3) -> list[str]:
    listing = await trio.to_thread.run_sync(
        lambda: fake_s3.client().list_objects_v2(Bucket=fake_s3.bucket).get("Contents", []))
    return [entry["Key"] for entry in listing]


async def alerts(rabbit) -> list[dict]:
    return [json.loads(m.body) for m in await rabbit.drain(topology.ONSCREEN_EXCHANGE)]


async def one_result(rabbit) -> dict:
    [result] = await rabbit.wait_for(topology.RESULTS_EXCHANGE, 1)
    return json.loads(result.body)


async def collect(rabbit) -> None:
    await rabbit.collect(topology.ONSCREEN_EXCHANGE)
    await rabbit.collect(topology.RESULTS_EXCHANGE)


def check_accepted_once(fake_ledger, request_id: str) -> None:
    [flow] = fake_ledger.flows_for(request_id)
    assert flow.state == "accepted", flow
    assert fake_ledger.pending() == []


async def test_an_approved_image_is_private_until_approved_then_shown_and_charged(
        rabbit, dynamo_process, tokens, fake_ledger, fake_s3, pg_database):
    with trio.fail_after(TEST_TIMEOUT_S):
        await collect(rabbit)
        service = await start(dynamo_process)
        request_id = await submit(service)
        waiting = await wait_for_step(service, request_id, "awaiting_approval")
        assert waiting["state"] == "processing"
        assert 100 < waiting["approval"]["seconds_left"] <= 120

        # Waiting: in no public place, no alert, the debit pending.
        shown = await preview(service, request_id)
        assert shown.status_code == 200 and shown.headers["content-type"] == "image/jpeg"
        assert shown.content.startswith(b"\xff\xd8")
        assert "no-store" in shown.headers["cache-control"]
        assert await bucket_keys(fake_s3) == []
        await trio.sleep(QUIET_S)
        assert await alerts(rabbit) == []
        [flow] = fake_ledger.flows_for(request_id)
        assert flow.state == "pending"
        # The preview is the broadcaster's: not a viewer's (their own request), not anyone's.
        assert (await preview(service, request_id, VIEWER_TOKEN)).status_code == 403
        assert (await preview(service, request_id, None)).status_code == 401
        assert (await decide(service, request_id, "approve", VIEWER_TOKEN)).status_code == 403
        assert (await decide(service, request_id, "reject", None)).status_code == 401

        approved = await decide(service, request_id, "approve")
        assert approved.status_code == 202, approved.text
        result = await one_result(rabbit)
        assert result["outcome"] == "success" and result["request_id"] == request_id
        [alert] = await alerts(rabbit)
        assert alert["payload"]["details"]["image_url"] == result["image_url"]
        assert [key for key in await bucket_keys(fake_s3) if request_id in key]
        check_accepted_once(fake_ledger, request_id)
        # Decided: a second decision, either way, is refused; the preview is gone.
        assert (await decide(service, request_id, "approve")).status_code == 409
        assert (await decide(service, request_id, "reject")).status_code == 409
        assert (await preview(service, request_id)).status_code == 404
        body = await request_body(service, request_id)
        assert body["approval"]["decision"] == "approved"
        status = (await httpx.AsyncClient().get(f"{service.url}/status",
                                               headers=auth(CASTER_TOKEN))).json()
        assert status["safety"]["approvals"]["approved"] == 1
        assert status["safety"]["approvals"]["waiting"] == 0
        assert 'dynamo_approvals_total{decision="approved"} 1.0' in await service.metrics()


async def test_a_rejected_image_is_refunded_with_the_broadcasters_sentence(
        rabbit, dynamo_process, tokens, fake_ledger, fake_s3, pg_database):
    with trio.fail_after(TEST_TIMEOUT_S):
        await collect(rabbit)
        service = await start(dynamo_process)
        request_id = await submit(service)
        await wait_for_step(service, request_id, "awaiting_approval")
        rejected = await decide(service, request_id, "reject")
        assert rejected.status_code == 202, rejected.text
        result = await one_result(rabbit)
        assert result["outcome"] == "failure" and result["reason"] == "rejected"
        assert result["message"] == REJECTED_BY_CASTER
        await checks.check_failed_row(pg_database, request_id, reason="rejected",
                                      message=REJECTED_BY_CASTER)
        checks.check_refunded(fake_ledger, request_id)
        await trio.sleep(QUIET_S)
        assert await alerts(rabbit) == [] and await bucket_keys(fake_s3) == []
        assert await checks.fetch_rows(pg_database, "select 1 from dynamo.generated_image") == []
        assert (await decide(service, request_id, "approve")).status_code == 409
        assert 'dynamo_approvals_total{decision="rejected"} 1.0' in await service.metrics()


@pytest.mark.parametrize("action", ["reject", "approve"])
async def test_no_decision_in_time_applies_the_configured_action(
        rabbit, dynamo_process, tokens, fake_ledger, fake_s3, pg_database, action):
    with trio.fail_after(TEST_TIMEOUT_S):
        await collect(rabbit)
        service = await start(dynamo_process, DYNAMO_APPROVAL_TIMEOUT_S="3",
                              DYNAMO_APPROVAL_TIMEOUT_ACTION=action)
        request_id = await submit(service)
        await wait_for_step(service, request_id, "awaiting_approval")
        result = await one_result(rabbit)
        if action == "approve":
            assert result["outcome"] == "success"
            check_accepted_once(fake_ledger, request_id)
            assert len(await alerts(rabbit)) == 1
        else:
            assert (result["outcome"], result["reason"]) == ("failure", "rejected")
            assert result["message"] == TIMED_OUT
            checks.check_refunded(fake_ledger, request_id)
            await trio.sleep(QUIET_S)
            assert await alerts(rabbit) == [] and await bucket_keys(fake_s3) == []
        assert (await decide(service, request_id, "approve")).status_code == 409
        assert (await request_body(service, request_id))["approval"]["decision"] == "timeout"
        assert 'dynamo_approvals_total{decision="timeout"} 1.0' in await service.metrics()


async def test_a_wait_survives_a_kill_and_its_timeout_still_applies(
        rabbit, dynamo_process, tokens, fake_ledger, fake_s3, pg_database):
    with trio.fail_after(TEST_TIMEOUT_S):
        await collect(rabbit)
        # Each wait keeps the deadline it began with, whatever the next process says.
        first = await start(dynamo_process, DYNAMO_APPROVAL_TIMEOUT_S="90")
        kept = await submit(first, "a kept seal")
        await wait_for_step(first, kept, "awaiting_approval")
        first.kill()  # kill -9 while it waits
        second = await start(dynamo_process, DYNAMO_APPROVAL_TIMEOUT_S="2")
        late = await submit(second, "a late seal")
        await wait_for_step(second, late, "awaiting_approval")
        second.kill()
        await trio.sleep(2.5)  # the late one's wait ends while no process runs

        third = await start(dynamo_process, DYNAMO_APPROVAL_TIMEOUT_S="2")
        late_result = await one_result(rabbit)  # its timeout applied at the start
        assert late_result["request_id"] == late and late_result["message"] == TIMED_OUT
        checks.check_refunded(fake_ledger, late, alone=False)
        body = await request_body(third, kept)
        assert body["step"] == "awaiting_approval" and body["approval"]["seconds_left"] > 60
        assert (await decide(third, kept, "approve")).status_code == 202
        kept_result = await one_result_after(rabbit, 1)
        assert kept_result["request_id"] == kept and kept_result["outcome"] == "success"
        check_accepted_once(fake_ledger, kept)
        [alert] = await alerts(rabbit)
        assert alert["payload"]["details"]["image_url"] == kept_result["image_url"]


async def one_result_after(rabbit, taken: int) -> dict:
    results = await rabbit.wait_for(topology.RESULTS_EXCHANGE, taken + 1)
    return json.loads(results[taken].body)


async def test_another_process_takes_the_decision_and_two_racing_decisions_end_once(
        rabbit, dynamo_process, tokens, fake_ledger, fake_s3, pg_database):
    with trio.fail_after(TEST_TIMEOUT_S):
        await collect(rabbit)
        first = await start(dynamo_process)
        second = await start(dynamo_process)
        decided_elsewhere, raced = await submit(first, "a seal"), await submit(first, "a crab")
        for request_id in (decided_elsewhere, raced):
            await wait_for_step(first, request_id, "awaiting_approval")

        # Made through the first process's API, approved through the second's.
        assert (await decide(second, decided_elsewhere, "approve")).status_code == 202

        # Approve on one process and reject on the other at once: exactly one wins.
        answers = {}

        async def race(service, decision):
            answers[decision] = (await decide(service, raced, decision)).status_code

        async with trio.open_nursery() as nursery:
            nursery.start_soon(race, first, "approve")
            nursery.start_soon(race, second, "reject")
        assert sorted(answers.values()) == [202, 409], answers
        winner = "approve" if answers["approve"] == 202 else "reject"

        results = {}
        while len(results) < 2:
            result = await one_result_after(rabbit, len(results))
            results[result["request_id"]] = result
        await trio.sleep(QUIET_S)
        assert len(await rabbit.drain(topology.RESULTS_EXCHANGE)) == 2  # one result each
        assert results[decided_elsewhere]["outcome"] == "success"
        assert [flow.state for flow in fake_ledger.flows_for(decided_elsewhere)] == ["accepted"]
        shown = [alert["payload"]["details"]["image_url"] for alert in await alerts(rabbit)]
        if winner == "approve":
            assert results[raced]["outcome"] == "success" and len(shown) == 2
            assert [flow.state for flow in fake_ledger.flows_for(raced)] == ["accepted"]
        else:
            assert results[raced]["message"] == REJECTED_BY_CASTER and len(shown) == 1
            assert [flow.state for flow in fake_ledger.flows_for(raced)] == ["rejected"]
        rows = await checks.fetch_rows(
            pg_database, "select approval_decision from dynamo.image_request where id = any($1)",
            [uuid.UUID(raced)])
        assert [row["approval_decision"] for row in rows] == [
            "approved" if winner == "approve" else "rejected"]


async def test_a_clean_stop_does_not_wait_for_images_awaiting_a_decision(
        rabbit, dynamo_process, tokens, fake_ledger, pg_database):
    with trio.fail_after(TEST_TIMEOUT_S):
        await collect(rabbit)
        service = await start(dynamo_process)
        request_id = await submit(service)
        await wait_for_step(service, request_id, "awaiting_approval")
        stopping = trio.current_time()
        assert await service.terminate() == 0
        # Nothing in hand: the drain's grace period (10 s) is not waited out.
        assert trio.current_time() - stopping < 8
        restarted = await start(dynamo_process)
        assert (await decide(restarted, request_id, "approve")).status_code == 202
        assert (await one_result(rabbit))["outcome"] == "success"
        check_accepted_once(fake_ledger, request_id)


async def test_an_approval_timeout_not_shorter_than_the_request_timeout_stops_the_start(
        dynamo_process):
    service = dynamo_process(DYNAMO_APPROVAL="on", DYNAMO_APPROVAL_TIMEOUT_S="60",
                             DYNAMO_REQUEST_TIMEOUT_S="60")
    service.start()
    with trio.fail_after(STARTUP_S):
        assert await service.wait_exited() == 2
    lines = [line for line in service.logs().splitlines() if line.strip()]
    assert len(lines) == 1 and "DYNAMO_APPROVAL_TIMEOUT_S" in lines[0], lines
