"""Fuzz of the running service's HTTP door (issue 10): `python run.py` on the real
RabbitMQ and PostgreSQL with the fake auth/ledger/OpenAI and moto's S3 gets the known
hostile requests (5,000-deep brackets, bodies not UTF-8, 2 MB bodies, 100 KB headers,
odd paths and methods, bad query parameters and Idempotency-Keys, broken HTTP) and a few
hundred seeded random ones, with valid requests among them. Every answer must be a
status below 500 on a connection that was answered (not dropped); the process never
exits; every valid request succeeds, once."""

from __future__ import annotations

import collections
import random

import httpx
import pytest
import trio

from dynamo.api import early_answers
from tests.support import hostile, kept_alive
from tests.support.timeouts import FUZZ_S as TEST_TIMEOUT_S
from tests.support.timeouts import STARTUP_S as STARTUP_TIMEOUT_S

pytestmark = pytest.mark.integration

RANDOM_CASES = 300
VALID_EVERY = 25  # one valid request among this many hostile ones
SEED = 12
TOKEN = "fuzz-broadcaster"


async def test_hostile_requests_get_4xx_and_the_service_stays_up(
        dynamo_process, fake_auth, fake_ledger):
    fake_auth.add_broadcaster(TOKEN, "42", "GoldenVCR")
    fake_ledger.default_balance = 1_000_000
    service = dynamo_process()
    service.start()
    auth = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    with trio.fail_after(TEST_TIMEOUT_S):
        with trio.fail_after(STARTUP_TIMEOUT_S):
            await service.wait_ready()
        statuses: dict[str, int | None] = {}
        for name, raw in hostile.known_cases(auth).items():
            statuses[name] = await hostile.send(service.port, raw)
        expected = {name: (200 if name in hostile.ANSWERED_NORMALLY else 400) for name in statuses}
        answered = {name: None if status is None else status // 100 * 100
                    for name, status in statuses.items()}
        assert answered == expected  # 4xx: the client's fault; none dropped, none a 5xx

        rng = random.Random(SEED)
        counts: collections.Counter = collections.Counter()
        valid_ids = []
        async with httpx.AsyncClient(base_url=service.url) as client:
            for n in range(RANDOM_CASES):
                raw = hostile.random_case(rng, auth)
                status = await hostile.send(service.port, raw)
                assert status is not None and status < 500, (status, raw[:300])
                counts[f"{status // 100}xx"] += 1
                if n % VALID_EVERY == 0:
                    response = await client.post(
                        "/requests", json={"style": "ghost", "inputs": {"subject": f"seal {n}"}},
                        headers={"Authorization": f"Bearer {TOKEN}"})
                    assert response.status_code == 202, response.text
                    valid_ids.append(response.json()["id"])
            assert service.process.poll() is None, "the service exited"
            assert (await client.get("/healthz")).status_code == 200
            for request_id in valid_ids:
                while True:
                    body = (await client.get(f"/requests/{request_id}",
                                             headers={"Authorization": f"Bearer {TOKEN}"})).json()
                    if body["state"] in ("succeeded", "failed"):
                        break
                    await trio.sleep(0.2)
                assert body["state"] == "succeeded", body
        print(f"fuzz: {len(statuses)} known hostile cases, all 4xx "
              f"({dict(collections.Counter(statuses.values()))}); {RANDOM_CASES} random: "
              f"{dict(counts)}; {len(valid_ids)} valid requests succeeded")
        logs = service.logs()
        assert "Traceback" not in logs and " ERROR " not in logs, logs[-5000:]


KEPT_ALIVE_CASES = 300
MAX_UNANSWERED = 8


async def test_every_request_on_one_kept_alive_connection_is_answered(
        dynamo_process, fake_auth, fake_ledger):
    """Browsers and reverse proxies keep connections alive (issue 19, bug d). Requests the
    service answers before reading their bodies (413 for 100 KB-2 MB, 401, 415, 404,
    405), sent one after the other on one connection: each gets its answer, or the
    connection ends after an answer that said `Connection: close` and the client connects
    again. Before, some got no answer at all (the connection hung after a 413 for a big
    body) or the connection was dropped after an answer that did not say it would be."""
    fake_auth.add_broadcaster(TOKEN, "42", "GoldenVCR")
    service = dynamo_process()
    service.start()
    auth = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    with trio.fail_after(TEST_TIMEOUT_S):
        with trio.fail_after(STARTUP_TIMEOUT_S):
            await service.wait_ready()
        connection = kept_alive.KeptAliveConnection(service.port)
        rng = random.Random(SEED)
        answered: collections.Counter = collections.Counter()
        unanswered = []
        previous = "none"
        for n in range(KEPT_ALIVE_CASES):
            kind, raw = kept_alive.early_answer_case(rng, auth)
            try:
                answer = await connection.exchange(raw, head=raw.startswith(b"HEAD "))
            except kept_alive.Unanswered as exc:
                unanswered.append(f"#{n} {kind} (after {previous}): {exc}")
                previous = f"{kind}: unanswered"
                if len(unanswered) == MAX_UNANSWERED:
                    break  # each took ANSWER_WITHIN_S: enough to tell
                continue
            assert answer.status < 500, (answer, raw[:300])
            answered[f"{kind} {answer.status}{' close' if answer.closes else ''}"] += 1
            previous = f"{kind}: {answer.status}"
        print(f"kept alive: {n + 1} requests on {connection.connections} "
              f"connections: {dict(sorted(answered.items()))}")
        assert not unanswered, "\n".join(unanswered)
        # A body longer than the service reads to keep a connection: the answer says that
        # the connection ends, and the next request goes on a new one.
        too_long = b"x" * (early_answers.DRAIN_LIMIT_BYTES + 1_000_000)
        answer = await connection.exchange(kept_alive.kept_alive(hostile.request(
            b"POST", b"/requests", auth + hostile.JSON, too_long)))
        assert (answer.status, answer.closes) == (413, True)
        healthz = kept_alive.kept_alive(hostile.request(b"GET", b"/healthz"))
        assert (await connection.exchange(healthz)).status == 200
        await connection.close()
        assert service.process.poll() is None, "the service exited"
