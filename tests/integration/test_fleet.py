"""Several dynamo processes on one RabbitMQ vhost, one PostgreSQL database and one OpenAI
account (contract §8): they share the work, stay together under the account's limits,
and lose nothing when one dies or when each is restarted in turn.

Each process is `python run.py` with the same production environment (a distinct
DYNAMO_HTTP_ADDR each), against the real RabbitMQ and PostgreSQL and the fakes. The fake
OpenAI enforces the account's image limit as the real API does (a sliding 60-s window,
429 with retry-after and x-ratelimit-* headers), and every process is told that limit.

These are minutes long by nature (60 images at 30 a minute take two): the two here are
the ones issue 11 asks for, and they check everything else they can on the way (the fleet
view, fair share, the ledger).
"""

from __future__ import annotations

import collections
import json
import signal

import httpx
import pytest
import trio

from dynamo.rabbitmq import broker as topology
from tests.support.crash import by_message_id, check_outcomes, request_rows, stop_with_signal
from tests.support.service import started_fleet
from tests.support.timeouts import SERVICE_S

pytestmark = pytest.mark.integration

ONSCREEN, RESULTS = topology.ONSCREEN_EXCHANGE, topology.RESULTS_EXCHANGE
NO_STATE = {"broadcast_id": 0, "screening_id": "00000000-0000-0000-0000-000000000000", "tape_id": 0}
FLOODER = {"twitch_user_id": "2001", "twitch_display_name": "Flooder"}
NEWCOMER = {"twitch_user_id": "2002", "twitch_display_name": "Newcomer"}
BROADCASTER_TOKEN = "fleet-broadcaster-token"
PLENTY_OF_POINTS = 10**6
IMAGE_LATENCY_S = 1.0  # so that a kill finds an image call in flight
WINDOW_S = 60.0
# What a restarted or surviving process may still publish after the last result.
SETTLE_S = 2.0


def ghost(viewer: dict, subject: str) -> dict:
    return {"type": "image", "viewer": viewer, "state": NO_STATE,
            "payload": {"style": "ghost", "inputs": {"subject": subject}}}


def most_in_any_window(times: list[float]) -> int:
    times, most, first = sorted(times), 0, 0
    for last, at in enumerate(times):
        while times[first] <= at - WINDOW_S:
            first += 1
        most = max(most, last - first + 1)
    return most


async def get_json(service, path: str) -> dict:
    async with httpx.AsyncClient() as client:
        answer = await client.get(service.url + path,
                                  headers={"authorization": f"Bearer {BROADCASTER_TOKEN}"})
    answer.raise_for_status()
    return answer.json()


async def fleet_metric(service) -> str | None:
    """The dynamo_fleet_processes line of a process's /metrics, if it exports one."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(service.url + "/metrics")).text
    return next((line for line in text.splitlines()
                 if line.startswith("dynamo_fleet_processes ")), None)


async def wait_for_fleet(services, live) -> dict:
    """Until /status (asked of the first live process) lists exactly the `live` pids and
    exactly one of them exports the fleet-wide metrics. Returns that status."""
    pids = sorted(service.process.pid for service in live)
    while True:
        status = await get_json(live[0], "/status")
        listed = sorted(process["pid"] for process in status["fleet"]["processes"])
        exporters = [line for service in live if (line := await fleet_metric(service))]
        if listed == pids and exporters == [f"dynamo_fleet_processes {len(live)}.0"]:
            return status
        await trio.sleep(0.5)


async def wait_for_results(rabbit, count: int) -> None:
    while len(by_message_id(await rabbit.drain(RESULTS))) < count:
        await trio.sleep(0.1)


def image_calls(fake_openai):
    """Every image call that reached the fake: answered, refused, or cut off by a kill."""
    return fake_openai.calls_to("images")


async def check_every_request_succeeded_once(rabbit, database, fake_ledger, count: int):
    await trio.sleep(SETTLE_S)
    alerts, results = await rabbit.drain(ONSCREEN), await rabbit.drain(RESULTS)
    outcomes = await check_outcomes(database, alerts, results, fake_ledger,
                                    allow_reported_orphans=True)
    assert len(outcomes) == count, "one request per published message"
    failed = [o.result for o in outcomes.values() if o.result["outcome"] != "success"]
    assert failed == []
    # No duplicate: one alert and one result message per request, one accepted debit.
    assert collections.Counter(m.message_id for m in alerts).most_common(1)[0][1] == 1
    assert collections.Counter(m.message_id for m in results).most_common(1)[0][1] == 1
    assert all(o.accepted == 1 for o in outcomes.values())
    orphans = [o.request_id for o in outcomes.values() if o.orphans]
    if orphans:
        print(f"reported orphan debits (kill inside the reservation window): {orphans}")
    return outcomes


async def test_three_processes_share_30_a_minute_and_survive_a_kill(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database):
    """60 ghosts, 3 processes each told the account's 30 images/min; one killed with
    SIGKILL 20 s in and not restarted. The others finish its requests; each succeeds once,
    the account's limit holds (no 429), 95 % of it is used; a newcomer's one request,
    published after a flooder's 59, is not starved."""
    requests = 60
    with trio.fail_after(3 * SERVICE_S):
        await rabbit.collect(ONSCREEN)
        await rabbit.collect(RESULTS)
        fake_ledger.default_balance = PLENTY_OF_POINTS
        fake_auth.add_broadcaster(BROADCASTER_TOKEN, "1000", "broadcaster")
        fake_openai.images_per_minute = 30
        fake_openai.latency_s = {"images": IMAGE_LATENCY_S}
        services = await started_fleet(dynamo_process, 3, DYNAMO_IMAGES_PER_MINUTE="30")
        status = await wait_for_fleet(services, services)
        assert status["rate_limiter"]["scope"] == "fleet"
        for process in status["fleet"]["processes"]:
            assert process["heartbeat_age_s"] < 15 and process["requests_in_hand"] == 0
        assert sum(process["this"] for process in status["fleet"]["processes"]) == 1

        for number in range(requests - 1):
            await rabbit.publish(ghost(FLOODER, f"a seal number {number}"))
        await rabbit.publish(ghost(NEWCOMER, "a lonely walrus"))
        await trio.sleep(20)
        # Under load, the fleet view shows each process's share of the budget.
        status = await get_json(services[2], "/status")
        shares = [p["budget_last_60s"].get("image", {}).get("share", 0)
                  for p in status["fleet"]["processes"]]
        assert sum(shares) == pytest.approx(1, abs=0.01) and sum(s > 0 for s in shares) >= 2
        services[1].kill()
        survivors = [services[0], services[2]]
        await wait_for_fleet(services, survivors)  # the dead one drops out of the view
        await wait_for_results(rabbit, requests)

        outcomes = await check_every_request_succeeded_once(
            rabbit, pg_database, fake_ledger, requests)
        calls = image_calls(fake_openai)
        statuses = collections.Counter(call.status for call in calls)
        made = [call.time for call in calls]  # 200s, 429s, and calls cut off by the kill
        answered = sorted(call.time for call in calls if call.status == 200)
        rate = (len(answered) - 1) / (answered[-1] - answered[0]) * 60
        print(f"image calls: {dict(statuses)}; most made in any 60 s: "
              f"{most_in_any_window(made)}; {rate:.2f}/min = {rate / 30:.1%} of the limit")
        assert statuses[429] <= 1
        assert most_in_any_window(made) <= 30 + statuses[429]
        assert rate >= 0.95 * 30
        # The newcomer's image came long before the flood was through.
        rows = await request_rows(pg_database)
        newcomer = next(rid for rid, row in rows.items()
                        if row["twitch_user_id"] == NEWCOMER["twitch_user_id"])
        order = [call.body["prompt"] for call in calls if call.status == 200]
        position = order.index(rows[newcomer]["prompt"])
        print(f"the newcomer's image was call {position + 1} of {len(order)}")
        assert position < requests // 2
        assert outcomes[newcomer].result["outcome"] == "success"
        for survivor in survivors:
            assert await survivor.terminate() == 0


async def test_a_rolling_restart_under_load_loses_nothing_and_doubles_nothing(
        rabbit, dynamo_process, fake_openai, fake_auth, fake_ledger, pg_database):
    """Three processes, 45 ghosts; each process in turn gets SIGTERM, exits 0 and is
    started again (a rolling deploy) while the others carry on."""
    requests = 45
    with trio.fail_after(3 * SERVICE_S):
        await rabbit.collect(ONSCREEN)
        await rabbit.collect(RESULTS)
        fake_ledger.default_balance = PLENTY_OF_POINTS
        fake_auth.add_broadcaster(BROADCASTER_TOKEN, "1000", "broadcaster")
        fake_openai.images_per_minute = 60
        fake_openai.latency_s = {"images": IMAGE_LATENCY_S}
        services = await started_fleet(dynamo_process, 3, DYNAMO_IMAGES_PER_MINUTE="60")
        for number in range(requests):
            await rabbit.publish(ghost(FLOODER, f"a seal number {number}"))
        await fake_openai.wait_for_answers("images", 3)
        for service in services:
            done = len(by_message_id(await rabbit.drain(RESULTS)))
            assert done < requests, "the deploy must happen under load"
            assert await stop_with_signal(service, signal.SIGTERM) == 0
            await service.start_ready()
            print(f"restarted {service.url} with {done} results so far")
        await wait_for_fleet(services, services)
        await wait_for_results(rabbit, requests)

        await check_every_request_succeeded_once(rabbit, pg_database, fake_ledger, requests)
        calls = image_calls(fake_openai)
        refused = collections.Counter(call.status for call in calls)[429]
        assert refused <= 1
        assert most_in_any_window([call.time for call in calls]) <= 60 + refused
        # Each published message became one request, whoever took it.
        rows = await request_rows(pg_database)
        subjects = sorted(json.loads(row["inputs"])["subject"] for row in rows.values())
        assert subjects == sorted(f"a seal number {n}" for n in range(requests))
        for service in services:
            assert await service.terminate() == 0
