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

from dynamo import broker as topology
from tests.support import checks
from tests.support.checks import genreq

pytestmark = pytest.mark.integration

READY_S = 30
QUIET_S = 0.5
REJECTED_SENTENCE = "Your image request was rejected by the content filter. No points were spent."
# The fake's marker word (tests/fakes/openai_server.py): an image generated from a prompt
# holding it is flagged when it comes back to the moderation endpoint.
IMAGE_MARKER = "gruesome"
CASTER_TOKEN = "caster-token"


async def start(rabbit, dynamo_process, **env):
    await rabbit.collect(topology.ONSCREEN_EXCHANGE)
    await rabbit.collect(topology.RESULTS_EXCHANGE)
    service = dynamo_process(**env)
    service.start()
    with trio.fail_after(READY_S):
        await service.wait_ready()
    return service


async def next_result(rabbit) -> dict:
    """The next result to arrive (results so far are counted in rabbit.collected)."""
    seen = len(rabbit.collected[topology.RESULTS_EXCHANGE])
    results = await rabbit.wait_for(topology.RESULTS_EXCHANGE, seen + 1)
    return json.loads(results[seen].body)


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
    with trio.fail_after(90):
        service = await start(rabbit, dynamo_process, DYNAMO_BLOCKED_TERMS_FILE=str(terms))
        await rabbit.publish(genreq("a CREME BRULEE ghost"))
        [first] = await rabbit.wait_for(topology.RESULTS_EXCHANGE, 1)
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
    with trio.fail_after(30):
        assert await service.wait_exited() == 2
    lines = [line for line in service.logs().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "DYNAMO_BLOCKED_TERMS_FILE" in lines[0] and "nowhere.txt" in lines[0]
