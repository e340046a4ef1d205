"""The broadcaster's safety net end to end, without approval: blocked terms and the
screening of generated images (contract §4, issue 17).

dynamo runs as `python run.py` against the real RabbitMQ and PostgreSQL, with the fake
OpenAI (which counts every call), auth, ledger and moto's S3; each test looks at what the
rest of golden-vcr would see: results, alerts, the ledger's flows, the bucket.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
import trio

from dynamo.rabbitmq import broker as topology
from tests.support import checks
from tests.support.checks import genreq
from tests.support.service import started
from tests.support.timeouts import SERVICE_S as TEST_TIMEOUT_S
from tests.support.timeouts import STARTUP_S

pytestmark = pytest.mark.integration

QUIET_S = 0.5
REJECTED_SENTENCE = "Your image request was rejected by the content filter. No points were spent."
# The fake's marker word (tests/fakes/openai_server.py): an image generated from a prompt
# holding it is flagged when it comes back to the moderation endpoint.
IMAGE_MARKER = "gruesome"
CASTER_TOKEN = "caster-token"


async def start(rabbit, dynamo_process, **env):
    return await started(dynamo_process, rabbit=rabbit, **env)


async def next_message(rabbit):
    """The next result message not yet taken (counted on `rabbit`)."""
    taken = getattr(rabbit, "results_taken", 0)
    results = await rabbit.wait_for(topology.RESULTS_EXCHANGE, taken + 1)
    rabbit.results_taken = taken + 1
    return results[taken]


async def next_result(rabbit) -> dict:
    return json.loads((await next_message(rabbit)).body)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_blocked_term_is_rejected_before_any_call_and_the_list_follows_the_file(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database, tmp_path):
    terms = tmp_path / "blocked.txt"
    terms.write_text("# the broadcaster's list\ncrème brûlée\n")
    fake_auth.add_broadcaster(CASTER_TOKEN, "42", "GoldenVCR")
    with trio.fail_after(TEST_TIMEOUT_S):
        service = await start(rabbit, dynamo_process, DYNAMO_BLOCKED_TERMS_FILE=str(terms))
        await rabbit.publish(genreq("a CREME BRULEE ghost"))
        first = await next_message(rabbit)
        result = checks.check_failure_result(
            first, reason="rejected", style="ghost", description="a CREME BRULEE ghost")
        assert result["message"] == REJECTED_SENTENCE
        await checks.check_failed_row(pg_database, result["request_id"], reason="rejected",
                                      message=REJECTED_SENTENCE)
        # Before any call: not one to OpenAI, auth or the ledger.
        assert checks.paid_openai_calls(fake_openai) == []
        checks.check_no_points_moved(fake_auth, fake_ledger)

        # The file changes while dynamo runs: the new list is in force within seconds.
        terms.write_text("crème brûlée\nscunt\n")
        os.utime(terms, ns=(1, 2_000_000_000))
        while True:  # soon a request holding the new term is rejected
            await rabbit.publish(genreq("a scunt"))
            if (await next_result(rabbit))["outcome"] == "failure":
                break
            await trio.sleep(0.5)
        # Whole words only: a word holding a term is not that term.
        await rabbit.publish(genreq("Scunthorpe"))
        assert (await next_result(rabbit))["outcome"] == "success"

        # A bad change keeps the last good list.
        terms.write_bytes(b"\xff\xfe\x00 not text")
        await trio.sleep(2.5)
        await rabbit.publish(genreq("a scunt again"))
        assert (await next_result(rabbit))["outcome"] == "failure"
        assert "keeping the last good list" in service.logs()

        assert metric(await service.metrics(), "dynamo_blocked_subjects_total") >= 2
        async with httpx.AsyncClient() as client:
            status = (await client.get(f"{service.url}/status", headers={
                "Authorization": f"Bearer {CASTER_TOKEN}"})).json()
        blocked = status["safety"]["blocked_terms"]
        assert blocked["terms"] == 2 and blocked["loaded_at"] and "not UTF-8" in blocked["error"]
        assert "scunt" not in json.dumps(status) and "brûlée" not in json.dumps(status)
        assert "brûlée" not in service.logs() and "scunt\n" not in service.logs()


async def test_an_unreadable_blocked_terms_file_stops_the_start_with_one_line(
        dynamo_process, tmp_path):
    service = dynamo_process(DYNAMO_BLOCKED_TERMS_FILE=str(tmp_path / "nowhere.txt"))
    service.start()
    with trio.fail_after(STARTUP_S):
        assert await service.wait_exited() == 2
    lines = [line for line in service.logs().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "DYNAMO_BLOCKED_TERMS_FILE" in lines[0] and "nowhere.txt" in lines[0]


async def test_a_flagged_image_is_refunded_never_stored_nor_published(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, fake_s3, pg_database):
    with trio.fail_after(TEST_TIMEOUT_S):
        service = await start(rabbit, dynamo_process)
        await rabbit.publish(genreq(f"a {IMAGE_MARKER} seal"))
        await rabbit.publish(genreq("a friendly seal", style="friend", color="yellow"))
        results = [await next_result(rabbit), await next_result(rabbit)]
        by_outcome = {result["outcome"]: result for result in results}
        flagged, passed = by_outcome["failure"], by_outcome["success"]
        assert flagged["reason"] == "rejected" and flagged["message"] == REJECTED_SENTENCE
        row = await checks.check_failed_row(pg_database, flagged["request_id"], reason="rejected",
                                            message=REJECTED_SENTENCE)
        assert row["image_flagged"] and "violence" in row["failure_detail"]
        checks.check_refunded(fake_ledger, flagged["request_id"], alone=False)
        # Nothing public: not in the bucket, no alert; its bytes are gone from the database.
        assert not [key for key in await bucket_keys(fake_s3) if flagged["request_id"] in key]
        await trio.sleep(QUIET_S)
        alerts = [json.loads(m.body) for m in await rabbit.drain(topology.ONSCREEN_EXCHANGE)]
        assert len(alerts) == 1 and alerts[0]["payload"]["details"]["image_url"] == passed["image_url"]
        assert await checks.fetch_rows(
            pg_database, "select 1 from dynamo.generated_image") == []
        # Each image went to the moderation endpoint as one image_url part, a data URL.
        image_checks = [call.body for call in fake_openai.calls_to("moderations")
                        if isinstance(call.body["input"], list)]
        assert len(image_checks) == 2
        for body in image_checks:
            assert body["model"] == "omni-moderation-latest"
            [part] = body["input"]
            assert part["type"] == "image_url"
            assert part["image_url"]["url"].startswith(("data:image/jpeg;base64,",
                                                        "data:image/webp;base64,"))
        # Recorded as free calls, and counted.
        calls = await checks.fetch_rows(
            pg_database, "select kind, cost_usd from dynamo.openai_call where kind = $1",
            "image_moderation")
        assert len(calls) == 2 and all(call["cost_usd"] == 0 for call in calls)
        assert metric(await service.metrics(), "dynamo_images_flagged_total") == 1
        status = await caster_status(service, fake_auth)
        assert status["safety"]["images_flagged"] == 1 and status["safety"]["image_moderation"]


async def test_with_image_moderation_off_no_image_is_sent_to_moderation(
        rabbit, dynamo_process, fake_openai, pg_database):
    with trio.fail_after(TEST_TIMEOUT_S):
        await start(rabbit, dynamo_process, DYNAMO_IMAGE_MODERATION="off")
        await rabbit.publish(genreq(f"a {IMAGE_MARKER} seal"))
        assert (await next_result(rabbit))["outcome"] == "success"
        assert all(isinstance(call.body["input"], str)
                   for call in fake_openai.calls_to("moderations"))


async def caster_status(service, fake_auth) -> dict:
    fake_auth.add_broadcaster(CASTER_TOKEN, "42", "GoldenVCR")
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{service.url}/status",
                                    headers={"Authorization": f"Bearer {CASTER_TOKEN}"})
    assert response.status_code == 200, response.text
    return response.json()


async def bucket_keys(fake_s3) -> list[str]:
    listing = await trio.to_thread.run_sync(
        lambda: fake_s3.client().list_objects_v2(Bucket=fake_s3.bucket).get("Contents", []))
    return [entry["Key"] for entry in listing]
