"""Every way a request can fail, end to end: one test per failure reason (contract §3).

Each test publishes to RabbitMQ as dispatch does, with dynamo running as `python run.py`
against the real RabbitMQ and PostgreSQL and the fake OpenAI, auth and ledger, and checks
what the rest of golden-vcr sees: the failure result on `generation-results` (reason,
viewer sentence, message_id), the request's row, the dead letter where there is one, the
ledger's flows (a failure is never charged: refunded, or never reserved), and that no
alert went on stream. The last tests check that an auth or ledger outage delays a
request without failing it (contract §5).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import uuid

import httpx
import pytest
import trio

from dynamo.database.port import open_database
from dynamo.domain.jobs import Step
from dynamo.inflight import resume
from dynamo.rabbitmq import broker as topology
from tests.support import checks, infra
from tests.support.amqp import bodies
from tests.support.checks import VIEWER, genreq
from tests.support.crash import fetch_rows
from tests.support.service import started
from tests.support.timeouts import SERVICE_S

pytestmark = pytest.mark.integration

# After the last expected message, how long a test waits for one that must not come.
QUIET_S = 0.5
# The contract's own example of a viewer's sentence for a rejection (§3).
REJECTED_SENTENCE = "Your image request was rejected by the content filter. No points were spent."


async def one_result(rabbit):
    [result] = await rabbit.wait_for(topology.RESULTS_EXCHANGE, 1)
    return result


async def check_nothing_on_stream(rabbit) -> None:
    await trio.sleep(QUIET_S)
    assert await rabbit.drain(topology.ONSCREEN_EXCHANGE) == []
    assert len(await rabbit.drain(topology.RESULTS_EXCHANGE)) == 1  # no second result


# ---- invalid ---------------------------------------------------------------------------


async def test_unparseable_message_is_dead_lettered_as_it_came(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database):
    with trio.fail_after(SERVICE_S):
        await started(dynamo_process, rabbit=rabbit)
        poison = b'{"type": "image", "viewer": {"twitch_user_id": "90790024", '
        sent_at = datetime.datetime(2024, 5, 4, 12, 30, 0, tzinfo=datetime.UTC)
        properties = dict(
            message_id="dispatch-7f9c0e", content_type="application/json",
            correlation_id="corr-42", app_id="dispatch", type="genreq", timestamp=sent_at,
            headers={"x-origin": "dispatch-test"})
        await checks.publish_with_properties(rabbit, poison, **properties)

        [dead] = await checks.wait_for_dead_letters(rabbit, 1)
        reason = checks.check_dead_letter(dead, body=poison, **properties)
        assert "json" in reason.lower(), reason

        # No viewer, so no request and no result: a later good request is the only one
        # (intake takes messages in order, so the poison was fully handled before it).
        await rabbit.publish(genreq("a seal"))
        [result] = await rabbit.wait_for(topology.RESULTS_EXCHANGE, 1)
        good = json.loads(result.body)
        assert good["outcome"] == "success"
        assert [str(row["id"]) for row in await checks.request_rows(pg_database)] == [
            good["request_id"]]
        assert [flow.request_id for flow in fake_ledger.flows.values()] == [good["request_id"]]
        await trio.sleep(QUIET_S)
        assert len(await rabbit.drain(topology.RESULTS_EXCHANGE)) == 1
        assert await checks.queue_depth(rabbit, topology.DEAD_LETTER_QUEUE) == 0


@pytest.mark.parametrize(
    ("message", "style", "description", "problem"),
    [
        pytest.param(genreq("a" * 121), "ghost", "a" * 121, "subject", id="subject-121-chars"),
        pytest.param(genreq("caterpillar in a top hat", style="friend", color="plaid"),
                     "friend", "a caterpillar in a top hat", "color", id="unknown-color"),
        pytest.param(genreq("a seal\x07 ringing a bell"), "ghost", "a seal\x07 ringing a bell",
                     "subject", id="control-character"),
    ],
)
async def test_invalid_request_with_a_viewer_fails_and_is_dead_lettered(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database,
        message, style, description, problem):
    with trio.fail_after(SERVICE_S):
        await started(dynamo_process, rabbit=rabbit)
        body = json.dumps(message).encode()
        await checks.publish_with_properties(
            rabbit, body, message_id="dispatch-invalid-1", content_type="application/json",
            app_id="dispatch", headers={"x-origin": "dispatch-test"})

        result = checks.check_failure_result(
            await one_result(rabbit), reason="invalid", style=style, description=description)
        [dead] = await checks.wait_for_dead_letters(rabbit, 1)
        reason = checks.check_dead_letter(
            dead, body=body, message_id="dispatch-invalid-1", content_type="application/json",
            app_id="dispatch", headers={"x-origin": "dispatch-test"})
        assert problem in reason, reason

        row = await checks.check_failed_row(
            pg_database, result["request_id"], reason="invalid", message=result["message"])
        assert row["flow_id"] is None
        assert len(await checks.request_rows(pg_database)) == 1
        checks.check_no_points_moved(fake_auth, fake_ledger)
        assert checks.paid_openai_calls(fake_openai) == []
        await check_nothing_on_stream(rabbit)


# ---- rejected --------------------------------------------------------------------------


async def test_subject_flagged_by_moderation_is_rejected_without_buying_an_image(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database):
    with trio.fail_after(SERVICE_S):
        await started(dynamo_process, rabbit=rabbit)
        assert "forbidden" in fake_openai.flagged_words
        await rabbit.publish(genreq("  a forbidden seal "))

        result = checks.check_failure_result(
            await one_result(rabbit), reason="rejected", style="ghost",
            description="a forbidden seal")
        assert result["message"] == REJECTED_SENTENCE
        await checks.check_failed_row(
            pg_database, result["request_id"], reason="rejected", message=result["message"])
        checks.check_refunded(fake_ledger, result["request_id"])
        assert fake_openai.count("moderations") == 1
        assert fake_openai.count("images") == 0 and fake_openai.count("chat") == 0
        await check_nothing_on_stream(rabbit)


async def test_image_refused_by_the_content_policy_is_rejected(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database):
    with trio.fail_after(SERVICE_S):
        await started(dynamo_process, rabbit=rabbit)
        assert "nsfw" in fake_openai.policy_words and "nsfw" not in fake_openai.flagged_words
        await rabbit.publish(genreq("caterpillar in an nsfw hat", style="friend", color="yellow"))

        result = checks.check_failure_result(
            await one_result(rabbit), reason="rejected", style="friend",
            description="a caterpillar in an nsfw hat")
        assert result["message"] == REJECTED_SENTENCE
        await checks.check_failed_row(
            pg_database, result["request_id"], reason="rejected", message=result["message"])
        checks.check_refunded(fake_ledger, result["request_id"])
        # Moderation passed; the image API's 400 is final: not retried.
        assert fake_openai.count("moderations") == 1
        assert fake_openai.statuses("images") == [400]
        await check_nothing_on_stream(rabbit)


# ---- insufficient points ---------------------------------------------------------------


async def test_viewer_without_enough_points_gets_no_image_call(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database):
    with trio.fail_after(SERVICE_S):
        fake_ledger.balances[VIEWER["twitch_user_id"]] = checks.POINTS_COST - 1
        await started(dynamo_process, rabbit=rabbit)
        await rabbit.publish(genreq("a seal"))

        result = checks.check_failure_result(
            await one_result(rabbit), reason="insufficient-points", style="ghost",
            description="a seal")
        await checks.check_failed_row(
            pg_database, result["request_id"], reason="insufficient-points",
            message=result["message"])
        # The ledger refused the debit (409): nothing reserved, so nothing to refund.
        assert fake_ledger.statuses("outflow") == [409]
        assert fake_ledger.count("accept") == 0 and fake_ledger.count("refund") == 0
        assert fake_ledger.flows == {}
        assert checks.paid_openai_calls(fake_openai) == []
        await check_nothing_on_stream(rabbit)


# ---- expired ---------------------------------------------------------------------------


async def check_failed_at_its_deadline(database: str, request_id: str) -> None:
    """The request ended after its deadline, both read on the database's one clock (the
    result goes out before `done` is stored: waited for)."""
    while True:
        [row] = await fetch_rows(database, "select expires_at, finished_at from "
                                 "dynamo.image_request where id = $1", uuid.UUID(request_id))
        if row["finished_at"] is not None:
            break
        await trio.sleep(0.02)
    assert row["finished_at"] >= row["expires_at"], dict(row)


async def test_request_still_generating_at_its_deadline_expires_refunded(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database):
    with trio.fail_after(SERVICE_S):
        await started(dynamo_process, rabbit=rabbit, DYNAMO_REQUEST_TIMEOUT_S="3")
        fake_openai.hold("images")
        published_at = trio.current_time()
        await rabbit.publish(genreq("a very slow seal"))

        result = checks.check_failure_result(
            await one_result(rabbit), reason="expired", style="ghost",
            description="a very slow seal")
        # Failed at its deadline, not before (how promptly after is no guarantee: the
        # test's own deadline bounds it).
        assert trio.current_time() - published_at >= 2.5
        await check_failed_at_its_deadline(pg_database, result["request_id"])
        await checks.check_failed_row(
            pg_database, result["request_id"], reason="expired", message=result["message"])
        checks.check_refunded(fake_ledger, result["request_id"])
        assert fake_openai.count("images") == 1  # the call that was still in flight
        fake_openai.release("images")
        await check_nothing_on_stream(rabbit)


async def test_request_waiting_for_a_generator_worker_at_its_deadline_expires_refunded(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database):
    """A request that expires in the rate limiter's queue, its worker busy with an older
    request whose deadline is later: it must get its result and its refund all the same.

    The only way for the busy request to have the later deadline is to come from a
    process with a longer timeout: the first dynamo is killed while generating it, and
    the second (timeout 3 s, one worker) resumes it, its deadline unchanged."""
    with trio.fail_after(SERVICE_S):
        first = await started(dynamo_process, rabbit=rabbit, DYNAMO_REQUEST_TIMEOUT_S="60",
                            DYNAMO_GENERATOR_WORKERS="1")
        fake_openai.hold("images")
        await rabbit.publish(genreq("a long-lived seal"))
        await fake_openai.wait_for_calls("images", 1)
        first.kill()
        second = dynamo_process(DYNAMO_REQUEST_TIMEOUT_S="3", DYNAMO_GENERATOR_WORKERS="1")
        second.start()
        await second.wait_ready()
        await fake_openai.wait_for_calls("images", 2)  # the one worker holds the old request

        published_at = trio.current_time()
        await rabbit.publish(genreq("a short-lived seal"))
        result = checks.check_failure_result(
            await one_result(rabbit), reason="expired", style="ghost",
            description="a short-lived seal")
        assert trio.current_time() - published_at >= 2.5
        await check_failed_at_its_deadline(pg_database, result["request_id"])
        await checks.check_failed_row(
            pg_database, result["request_id"], reason="expired", message=result["message"])
        checks.check_refunded(fake_ledger, result["request_id"], alone=False)
        assert fake_openai.count("images") == 2  # it never reached the image API
        [old] = [f for f in fake_ledger.pending() if f.request_id != result["request_id"]]
        assert fake_ledger.accepted() == [] and old.metadata["style"] == "ghost"
        await trio.sleep(QUIET_S)
        assert await rabbit.drain(topology.ONSCREEN_EXCHANGE) == []
        assert len(await rabbit.drain(topology.RESULTS_EXCHANGE)) == 1
        fake_openai.release("images")


# ---- error -----------------------------------------------------------------------------


async def test_image_api_failing_more_times_than_allowed_is_an_error_refunded(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database):
    with trio.fail_after(SERVICE_S):
        await started(dynamo_process, rabbit=rabbit, DYNAMO_MAX_ATTEMPTS="2")
        # Contract §1: every attempt counts, an outage's (5xx) too.
        fake_openai.script("images", [500, 500, 500])
        await rabbit.publish(genreq("a seal"))

        result = checks.check_failure_result(
            await one_result(rabbit), reason="error", style="ghost", description="a seal")
        await checks.check_failed_row(
            pg_database, result["request_id"], reason="error", message=result["message"])
        checks.check_refunded(fake_ledger, result["request_id"])
        # Exactly DYNAMO_MAX_ATTEMPTS image calls, then no more.
        assert fake_openai.statuses("images") == [500, 500]
        await check_nothing_on_stream(rabbit)


# ---- outages delay, they do not fail ---------------------------------------------------


@pytest.mark.parametrize("system", ["ledger", "auth"])
async def test_points_outage_delays_a_request_without_failing_it(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database, system):
    fake, endpoint = {"ledger": (fake_ledger, "outflow"),
                      "auth": (fake_auth, "service-token")}[system]
    with trio.fail_after(SERVICE_S):
        await started(dynamo_process, rabbit=rabbit, DYNAMO_REQUEST_TIMEOUT_S="40")
        fake.down = True
        await rabbit.publish(genreq("a patient seal"))
        # The outage is met, and met again: dynamo keeps trying.
        await fake.wait_until(lambda: fake.statuses(endpoint).count(503) >= 2)
        await trio.sleep(1)
        assert await rabbit.drain(topology.RESULTS_EXCHANGE) == []
        fake.down = False
        back_at = trio.current_time()

        [result] = await rabbit.wait_for(topology.RESULTS_EXCHANGE, 1)
        [alert] = await rabbit.wait_for(topology.ONSCREEN_EXCHANGE, 1)
        body = json.loads(result.body)
        assert body["outcome"] == "success", body
        assert alert.message_id == body["request_id"]
        assert bodies([alert])[0]["payload"]["details"]["description"] == "a patient seal"
        [row] = await checks.request_rows(pg_database)
        assert (row["state"], row["failure_reason"], row["error_message"]) == (
            "succeeded", None, None)
        [flow] = fake_ledger.flows_for(body["request_id"])
        assert flow.state == "accepted" and fake_ledger.pending() == []
        # The debit was reserved before any paid call, so no OpenAI call during the outage.
        paid = checks.paid_openai_calls(fake_openai)
        assert paid and min(call.time for call in paid) >= back_at
        # Refused while down, answered since (the accept reuses the viewer's kept token).
        statuses = fake.statuses(endpoint)
        back = statuses.index(200)
        assert set(statuses[:back]) == {503} and set(statuses[back:]) == {200}, statuses


# ---- a bug in one request's result ------------------------------------------------------


async def test_a_result_that_cannot_be_made_does_not_bring_the_process_down(
        rabbit, dynamo_process, pg_database):
    """An accepted request whose image row is missing (success_result raises). Before, the
    announcer crashed on it, the resume sweep routed it again, and after 5 crashes in 60 s
    the process exited (at every start). Now it is one error, and the process stays up."""
    with trio.fail_after(SERVICE_S):
        service = await started(dynamo_process, rabbit=rabbit)
        async with open_database(infra.pg_dsn(pg_database)) as db:
            request_id, _ = await db.insert_request(
                viewer_id="1001", display_name="GhostFan", broadcast_id=None,
                screening_id=None, style="ghost", inputs={"subject": "a seal"},
                prompt="a seal", source="broker", owner=None, timeout_s=900, points_cost=200)
            assert await db.advance(request_id, [Step.RECEIVED], Step.ACCEPTED,
                                    flow_id="flow-without-image")
        errors = 'dynamo_job_errors_total{actor="announcer"} '
        while True:
            assert service.process.poll() is None, service.logs()[-2000:]
            with contextlib.suppress(httpx.TransportError):  # going down: polled above
                if errors + "1.0" in await service.metrics():
                    break
            await trio.sleep(0.2)
        await trio.sleep(4 * resume.SWEEP_INTERVAL_S)  # routed again (and crashing) before
        assert service.process.poll() is None, service.logs()[-2000:]
        assert errors + "1.0" in await service.metrics()
        assert str(request_id) in service.logs()  # logged with its request id
        [row] = await fetch_rows(pg_database, "select step from dynamo.image_request")
        assert row["step"] == "accepted"
