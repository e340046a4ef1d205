"""dynamo against an OpenAI API that behaves as today's (2026-12-01), end to end: `python
run.py` with the real RabbitMQ and PostgreSQL, the fake OpenAI of tests/fakes spoken to by
the real SDK. (The golden ghost and friend with the default models: tests/integration/test_e2e.py.)

- a shut-down model stops a production start, in one line naming the variable, the model
  and what the API said;
- a model with a shutdown date ten days ahead logs the warning, shows it on /status and in
  the gauge, and still works; what each call cost is kept with its request;
- a reasoning text model names a friend, with more room when it needs it, and with a name
  made from the subject when it never answers;
- once the daily budget is reached the next request fails as stated and is refunded.
"""

from __future__ import annotations

import datetime
import json
import re
import uuid

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from dynamo.openai_port import pricing
from dynamo.rabbitmq import broker as topology
from tests.support import checks
from tests.support.amqp import bodies
from tests.support.service import started
from tests.support.timeouts import SDK_S as TEST_TIMEOUT_S

pytestmark = pytest.mark.integration

BROADCASTER_TOKEN = "broadcaster-token-for-openai-tests"
FRIEND_SUBJECT = "caterpillar in a top hat"


async def get_json(service, path: str, fake_auth) -> dict:
    fake_auth.add_broadcaster(BROADCASTER_TOKEN, "42", "GoldenVCR")
    async with httpx.AsyncClient() as client:
        answer = await client.get(service.url + path,
                                  headers={"authorization": f"Bearer {BROADCASTER_TOKEN}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


async def metric_samples(service) -> dict:
    async with httpx.AsyncClient() as client:
        scrape = await client.get(f"{service.url}/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(scrape.text) for s in family.samples}


def log_lines(service, pattern: str) -> list[str]:
    return [line for line in service.logs().splitlines() if re.search(pattern, line)]


async def wait_exit(service) -> int:
    while service.process.poll() is None:
        await trio.sleep(0.1)
    return service.process.returncode


async def results_for(rabbit, count: int) -> list[dict]:
    return bodies(await rabbit.wait_for(topology.RESULTS_EXCHANGE, count))


async def test_a_shut_down_model_stops_a_production_start_in_one_line(dynamo_process, fake_openai):
    with trio.fail_after(TEST_TIMEOUT_S):
        service = dynamo_process(DYNAMO_IMAGE_MODEL="dall-e-3")
        service.start()
        assert await wait_exit(service) == 2
    [line] = log_lines(service, "dall-e-3")
    assert line.endswith(
        "CRITICAL dynamo: refusing to start: DYNAMO_IMAGE_MODEL=dall-e-3 cannot be used: the "
        "OpenAI API answered 404 model_not_found: The model `dall-e-3` does not exist or you do "
        "not have access to it."), line
    assert "dynamo is running" not in service.logs()
    assert [call.path for call in fake_openai.calls] == [
        "/v1/models/dall-e-3", "/v1/models/gpt-6-luna"]
    print(line)  # the exact line, for the record


async def test_a_shutdown_ten_days_ahead_warns_and_still_works(
        rabbit, dynamo_process, fake_openai, fake_auth, pg_database):
    in_ten_days = fake_openai.today + datetime.timedelta(days=10)
    fake_openai.add_model("gpt-image-2.6-flare", shutdown_date=in_ten_days)
    with trio.fail_after(TEST_TIMEOUT_S):
        await rabbit.collect(topology.RESULTS_EXCHANGE)
        service = await started(dynamo_process)
        await rabbit.publish(checks.genreq("a seal"))
        [result] = await results_for(rabbit, 1)
        status = await get_json(service, "/status", fake_auth)
        request = await get_json(service, f"/requests/{result['request_id']}", fake_auth)
        samples = await metric_samples(service)
        assert await service.terminate() == 0
    assert result["outcome"] == "success", result
    [warning] = log_lines(service, "shuts down on")
    assert warning.endswith(
        f"WARNING dynamo.openai_port.catalogue: DYNAMO_IMAGE_MODEL=gpt-image-2.6-flare shuts down on "
        f"{in_ten_days.isoformat()} (10 days left, says the OpenAI API): choose another model "
        "before then"), warning
    print(warning)  # the exact line, for the record
    image = status["models"]["image"]
    assert (image["id"], image["state"], image["shutdown_date"], image["days_left"]) == (
        "gpt-image-2.6-flare", "retiring", in_ten_days.isoformat(), 10)
    assert status["models"]["text"]["id"] == "gpt-6-luna"
    assert status["models"]["text"]["days_left"] is None
    assert samples[("dynamo_model_shutdown_days", (("model", "gpt-image-2.6-flare"),))] == 10

    # What it cost: each call's model and usage kept with the request, priced (the image's
    # own screening is recorded too, at no cost).
    rows = await checks.fetch_rows(
        pg_database, "select * from dynamo.openai_call where image_request_id = $1 order by id",
        uuid.UUID(result["request_id"]))
    assert [(row["kind"], row["model"]) for row in rows] == [
        ("moderation", "omni-moderation-latest"), ("image", "gpt-image-2.6-flare"),
        ("image_moderation", "omni-moderation-latest")]
    image_row = rows[1]
    assert float(rows[2]["cost_usd"]) == 0
    usage = json.loads(image_row["usage"]) if isinstance(image_row["usage"], str) else image_row["usage"]
    [image_call] = fake_openai.calls_to("images")
    assert usage == fake_openai.image_usage(image_call.body)
    expected = pricing.PriceTable().cost_usd("gpt-image-2.6-flare", usage)
    assert float(image_row["cost_usd"]) == pytest.approx(expected) and expected > 0.01
    assert request["cost_usd"] == pytest.approx(expected)
    assert [call["kind"] for call in request["openai_calls"]] == [
        "moderation", "image", "image_moderation"]
    assert request["openai_calls"][1]["usage"] == usage
    assert status["spend"]["today_usd"] == pytest.approx(expected)
    assert status["spend"]["month_usd"] >= status["spend"]["today_usd"]
    assert status["spend"]["daily_budget_usd"] is None and status["spend"]["paused"] is False
    assert samples[("dynamo_openai_spend_usd_total",
                    (("kind", "image"), ("model", "gpt-image-2.6-flare")))] == pytest.approx(expected)


async def test_a_reasoning_text_model_names_a_friend(rabbit, dynamo_process, fake_openai, pg_database):
    fake_openai.reasoning_tokens = 1000  # more than the first room: "" with finish length
    with trio.fail_after(TEST_TIMEOUT_S):
        await rabbit.collect(topology.ONSCREEN_EXCHANGE)
        service = await started(dynamo_process)
        await rabbit.publish(checks.genreq(FRIEND_SUBJECT, style="friend", color="yellow"))
        [first] = bodies(await rabbit.wait_for(topology.ONSCREEN_EXCHANGE, 1))
        fake_openai.reasoning_tokens = 10_000  # never room enough: named after the subject
        await rabbit.publish(checks.genreq(FRIEND_SUBJECT, style="friend", color="blue"))
        _, second = bodies(await rabbit.wait_for(topology.ONSCREEN_EXCHANGE, 2))
        assert await service.terminate() == 0
    assert first["payload"]["details"]["name"] == "Sir Hatsworth"
    assert second["payload"]["details"]["name"] == "Caterpillar in a Top Hat"
    asked = [call.body for call in fake_openai.calls_to("chat")]
    assert [body["model"] for body in asked] == ["gpt-6-luna"] * 4
    assert [body["max_completion_tokens"] for body in asked] == [256, 4096, 256, 4096]
    assert all("max_tokens" not in body and "temperature" not in body for body in asked)
    answers = await checks.fetch_rows(pg_database, "select value from dynamo.answer")
    assert sorted(row["value"] for row in answers) == ["Caterpillar in a Top Hat", "Sir Hatsworth"]
    assert len(log_lines(service, "after its subject")) == 1


async def test_a_reached_budget_fails_the_next_request_and_refunds_it(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database):
    with trio.fail_after(TEST_TIMEOUT_S):
        await rabbit.collect(topology.RESULTS_EXCHANGE)
        # One medium image of gpt-image-2.6-flare costs about $0.0135: over this at once.
        service = await started(dynamo_process, DYNAMO_DAILY_BUDGET_USD="0.01")
        await rabbit.publish(checks.genreq("a seal"))
        [bought] = await results_for(rabbit, 1)
        await rabbit.publish(checks.genreq("another seal"))
        await rabbit.publish(checks.genreq("a third seal"))
        messages = (await rabbit.wait_for(topology.RESULTS_EXCHANGE, 3))[1:]
        status = await get_json(service, "/status", fake_auth)
        assert await service.terminate() == 0
    assert bought["outcome"] == "success"
    # The two fail side by side: their results may come in either order.
    messages.sort(key=lambda message: json.loads(message.body)["description"])
    for message, subject in zip(messages, ("a third seal", "another seal"), strict=True):
        result = checks.check_failure_result(message, reason="error", style="ghost",
                                             description=subject)
        assert result["message"] == "Image alerts are paused for today. No points were spent."
        await checks.check_failed_row(pg_database, result["request_id"], reason="error",
                                      message=result["message"])
        checks.check_refunded(fake_ledger, result["request_id"], alone=False)
    assert len(fake_openai.calls_to("images")) == 1  # no new image bought
    # One WARNING announces the pause (each failed request has its own line, as any failure).
    assert len(log_lines(service, "WARNING dynamo.openai_port.spend: daily OpenAI budget reached")) == 1
    spend = status["spend"]
    tomorrow = datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1)
    assert spend["paused"] is True and spend["daily_budget_usd"] == 0.01
    assert spend["paused_until"] == f"{tomorrow.isoformat()}T00:00:00Z"
    assert spend["today_usd"] >= 0.01
