"""The rate limiter and backpressure seen from outside: dynamo as `python run.py` against
the real RabbitMQ and PostgreSQL, with the fake OpenAI enforcing an image limit the way
the real API does (a sliding 60-s window, 429 with retry-after and x-ratelimit-* headers).

- Configured at the real limit, dynamo never gets a 429 and paces its image calls evenly
  (60/limit s apart), with no burst at start.
- Configured at twice the real limit, an API that shows its limit in x-ratelimit-* headers
  is never exceeded: the first answer caps the rate. One that shows only retry-after on its
  429s is exceeded once; dynamo then pauses for the retry-after, paces at the limit it
  inferred, gets no further 429, and every request still succeeds.
- While the images endpoint is held, most of a backlog stays in RabbitMQ: dynamo takes
  out only what its bounded buffers hold, and all of it completes once released.

The windows are real minutes (neither the fake's nor dynamo's can be scaled from here), so
a test that needs a 429 to age out of the window takes a little over a minute. The
full-length runs (200 requests: when the 429s stop, the rate achieved after them) are
`python -m bench.utilization --configured 2 [--hide-headers]` (bench/README.md).
"""

from __future__ import annotations

import json

import asyncpg
import httpx
import pytest
import trio
from trio_asyncio import aio_as_trio

from dynamo.rabbitmq import broker as topology
from tests.support import infra
from tests.support.amqp import bodies
from tests.support.service import started
from tests.support.timeouts import SERVICE_S

pytestmark = pytest.mark.integration

WINDOW_S = 60.0  # the fake's and dynamo's rate-limit window
# How much earlier than dynamo's pacing an image call may reach the fake: the permit is
# granted on schedule, then a database update (claiming the request) and the HTTP call
# come before the fake stamps its arrival, and those vary by some milliseconds.
ARRIVAL_JITTER_S = 0.25
# Even pacing is checked as at most this many calls (plus one) in any this-many spacings:
# on a loaded machine one call can arrive late and the next one on time, so a single
# gap says little, while a pace twice too fast puts twice as many calls in the window.
PACE_SPACINGS = 5
# Enough points for every request of a test (one viewer, 200 points each).
PLENTY_OF_POINTS = 10**6
BROADCASTER_TOKEN = "broadcaster-access-token"


def ghost(number: int) -> dict:
    """A golden-vcr genreq ghost, its subject unique so that calls can be told apart."""
    return {
        "type": "image",
        "viewer": {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"},
        "state": {"broadcast_id": 0, "screening_id": "00000000-0000-0000-0000-000000000000",
                  "tape_id": 0},
        "payload": {"style": "ghost", "inputs": {"subject": f"a seal number {number}"}},
    }


async def start(rabbit, dynamo_process, fake_ledger, **env):
    fake_ledger.default_balance = PLENTY_OF_POINTS
    return await started(dynamo_process, rabbit=rabbit, **env)


async def publish_ghosts(rabbit, count: int) -> None:
    for number in range(count):
        await rabbit.publish(ghost(number))


def check_all_succeeded(alerts, results, count: int) -> None:
    assert len({m.message_id for m in alerts}) == count
    outcomes = [r["outcome"] for r in bodies(results)]
    assert outcomes == ["success"] * count, [r for r in bodies(results) if r["outcome"] != "success"]
    assert sorted(e["payload"]["details"]["description"] for e in bodies(alerts)) == sorted(
        f"a seal number {n}" for n in range(count))


def most_in_any_window(times: list[float], window_s: float = WINDOW_S) -> int:
    """The most calls any window (t - window_s, t] holds."""
    times = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(times):
        while times[first] <= at - window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def gaps(times: list[float]) -> list[float]:
    times = sorted(times)
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def hide_rate_limit_headers(fake_openai) -> None:
    """The fake answers like an API that shows no x-ratelimit-* headers, only the
    retry-after of its 429s: dynamo must infer the limit from its own calls."""
    check_rate = fake_openai.check_rate

    def without_limit_headers(call):
        refusal = check_rate(call)
        headers = call.extra.get("headers", {})
        call.extra["headers"] = {
            name: value for name, value in headers.items() if not name.startswith("x-ratelimit-")}
        return refusal

    fake_openai.check_rate = without_limit_headers


async def test_configured_at_the_real_limit_paces_evenly_without_a_429(
        rabbit, dynamo_process, fake_openai, fake_ledger):
    with trio.fail_after(SERVICE_S):
        fake_openai.images_per_minute = 60
        await start(rabbit, dynamo_process, fake_ledger, DYNAMO_IMAGES_PER_MINUTE="60")
        await publish_ghosts(rabbit, 12)
        alerts = await rabbit.wait_for(topology.ONSCREEN_EXCHANGE, 12)
        results = await rabbit.wait_for(topology.RESULTS_EXCHANGE, 12)

        check_all_succeeded(alerts, results, 12)
        # Even pacing, 60/60 = 1 s apart, from the very first call: no burst at start,
        # though twelve requests were waiting at once. (Twelve calls cannot reach the
        # fake's 60 a minute, so a "no 429" check here could not fail: the spacing can.)
        times = [call.time for call in fake_openai.calls_to("images")]
        spacing = gaps(times)
        assert len(times) == 12, spacing
        assert most_in_any_window(times, PACE_SPACINGS * 1.0) <= PACE_SPACINGS + 1, spacing
        assert times[-1] - times[0] >= 11 * 1.0 - ARRIVAL_JITTER_S, spacing
        # ... and not much slower than that either.
        assert times[-1] - times[0] <= 11 * 1.0 + 5.0, spacing


async def test_configured_above_a_limit_the_api_shows_is_capped_by_its_first_answer(
        rabbit, dynamo_process, fake_openai, fake_ledger):
    with trio.fail_after(SERVICE_S):
        fake_openai.images_per_minute = 60
        await start(rabbit, dynamo_process, fake_ledger, DYNAMO_IMAGES_PER_MINUTE="120")
        await publish_ghosts(rabbit, 12)
        alerts = await rabbit.wait_for(topology.ONSCREEN_EXCHANGE, 12)
        results = await rabbit.wait_for(topology.RESULTS_EXCHANGE, 12)

        check_all_succeeded(alerts, results, 12)
        # Every answer says x-ratelimit-limit-requests: 60, so the configured 120/min
        # (0.5 s apart) is never used: the real limit is kept from the second call on.
        times = [call.time for call in fake_openai.calls_to("images")]
        assert most_in_any_window(times, PACE_SPACINGS * 1.0) <= PACE_SPACINGS + 1, gaps(times)
        assert times[-1] - times[0] >= 11 * 1.0 - ARRIVAL_JITTER_S, gaps(times)


async def test_configured_at_twice_a_limit_the_api_hides_429s_once_then_paces_under_it(
        rabbit, dynamo_process, fake_openai, fake_ledger):
    # A real minute has to pass before the refused call's window has room again.
    with trio.fail_after(SERVICE_S):
        real_limit, configured = 20, 40  # 3 s and 1.5 s apart
        fake_openai.images_per_minute = real_limit
        hide_rate_limit_headers(fake_openai)
        count = real_limit + 2
        await start(rabbit, dynamo_process, fake_ledger, DYNAMO_IMAGES_PER_MINUTE=str(configured))
        await publish_ghosts(rabbit, count)
        alerts = await rabbit.wait_for(topology.ONSCREEN_EXCHANGE, count)
        results = await rabbit.wait_for(topology.RESULTS_EXCHANGE, count)

        check_all_succeeded(alerts, results, count)
        calls = fake_openai.calls_to("images")
        statuses = [call.status for call in calls]
        print("image calls (s after the first, status):",
              [(round(call.time - calls[0].time, 2), call.status) for call in calls])
        assert statuses.count(200) == count
        refused = [call for call in calls if call.status == 429]
        # At the configured 40/min the window fills after 20 calls in 30 s: the next one
        # is refused. That 429 teaches dynamo the limit (the calls accepted in the last
        # minute), so it is the only one; the 429s have stopped.
        assert 1 <= len(refused) <= 2, statuses
        last_refused = refused[-1]
        assert all(status == 200 for status in statuses[calls.index(last_refused) + 1:]), statuses
        # Nothing is called before the 429's retry-after has passed (the pause holds
        # every image call, the refused request's retry included).
        retry_after_s = int(last_refused.extra["headers"]["retry-after-ms"]) / 1000
        after = [call.time for call in calls[calls.index(last_refused) + 1:]]
        assert min(after) >= last_refused.time + retry_after_s - ARRIVAL_JITTER_S
        # Then the calls are paced at the inferred limit, 60/20 = 3 s apart ...
        pace_s = WINDOW_S / real_limit
        assert most_in_any_window(after, PACE_SPACINGS * pace_s) <= PACE_SPACINGS + 1, gaps(after)
        # ... and the calls the fake accepted never exceeded its limit in any window
        # (it refuses what would; this is what the API's bill would show).
        accepted = [call.time for call in calls if call.status == 200]
        assert most_in_any_window(accepted) <= real_limit


async def test_a_backlog_stays_in_rabbitmq_while_generation_is_held(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database):
    with trio.fail_after(SERVICE_S):
        published = 150
        fake_openai.hold("images")
        # Fast enough that the rate limit is not what holds the backlog once released.
        service = await start(rabbit, dynamo_process, fake_ledger,
                              DYNAMO_IMAGES_PER_MINUTE="6000")
        await publish_ghosts(rabbit, published)

        # Wait until dynamo has taken all it will: every generator worker stuck in the
        # held image call, and the queue and the table unchanged for a while.
        with trio.fail_after(30):
            await fake_openai.wait_until(lambda: fake_openai.held_count("images") >= 4)
            before = None
            while True:
                now = (await ready_in_queue(rabbit), await stored_requests(pg_database))
                if now == before:
                    break
                before = now
                await trio.sleep(1.0)
        ready, stored = before
        print(f"held: {stored} stored by dynamo, {ready} ready in RabbitMQ of {published}")
        status = await fetch_status(service, fake_auth)
        print("held: /status channels", json.dumps(status["queues"]),
              "fair queue", json.dumps(status["rate_limiter"]["fair_queue"]))
        print(f"held: {len(fake_ledger.pending())} debits reserved at the ledger")
        # dynamo holds at most: 4 workers + a fair queue of 64 + the schedule channel (4)
        # + the ledger's 8 reservations and the one waiting for a slot + the reserve
        # channel (8) + the one intake is handing over = 90 stored, and up to 8 more
        # delivered but not yet stored (prefetch). The rest must still be in RabbitMQ.
        assert stored <= 95, stored
        assert ready >= published - stored - 8 - 2, (ready, stored)
        assert ready >= 45, ready
        assert fake_openai.held_count("images") == 4  # DYNAMO_GENERATOR_WORKERS

        fake_openai.release("images")
        alerts = await rabbit.wait_for(topology.ONSCREEN_EXCHANGE, published)
        results = await rabbit.wait_for(topology.RESULTS_EXCHANGE, published)
        check_all_succeeded(alerts, results, published)
        assert await ready_in_queue(rabbit) == 0
        assert fake_openai.statuses("images").count(200) == published


async def ready_in_queue(rabbit) -> int:
    """Messages ready in dynamo's input queue (a passive declare; takes none of them).

    aio-pika's robust channel answers a passive declare of a queue it declared before
    with the cached object, whose `declaration_result` is from that first declare: the
    queue is declared again explicitly for a fresh count."""
    queue = await aio_as_trio(rabbit.channel.declare_queue)(
        topology.REQUESTS_QUEUE, durable=True, passive=True, robust=False)
    declared = await aio_as_trio(queue.declare)()
    return declared.message_count


async def stored_requests(database: str) -> int:
    conn = await aio_as_trio(asyncpg.connect)(infra.pg_dsn(database))
    try:
        return await aio_as_trio(conn.fetchval)("select count(*) from dynamo.image_request")
    finally:
        await aio_as_trio(conn.close)()


async def fetch_status(service, fake_auth) -> dict:
    fake_auth.add_broadcaster(BROADCASTER_TOKEN, "1000", "broadcaster")
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"{service.url}/status",
                                  headers={"authorization": f"Bearer {BROADCASTER_TOKEN}"})
    assert answer.status_code == 200, answer.text
    return answer.json()
