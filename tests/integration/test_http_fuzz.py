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

from tests.support import hostile
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
