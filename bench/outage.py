"""Outages during a steady stream of requests: does dynamo stay up, what does /readyz say,
how soon does work go on once the dependency is back, and is any alert shown twice?

For each outage, a fresh environment (database, vhost, fakes) and one dynamo process
reaching PostgreSQL, RabbitMQ and S3 through TCP proxies (tests/support/outage.py), so the
shared servers are never stopped. Ghosts are published at `--rate` per second from
`LEAD_S` before the outage to `TAIL_S` after it; the outage is a cut proxy (PostgreSQL,
RabbitMQ, S3 unreachable), S3 answering 503, or a fake answering 503 (ledger, auth,
OpenAI). Printed per outage: whether the process stayed up (and no actor crashed),
what /readyz answered during it, the time from the dependency's return to the first
request completed after it (its result on `generation-results`), the requests that
failed, and alerts (and results) seen twice, with dynamo's own count of the broker window.

    .venv/bin/python -m bench.outage [--only database,broker] [--auth-s 60 --storage-s 60]
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import httpx
import trio

from bench import harness
from dynamo.rabbitmq import broker as topology
from tests.support import infra
from tests.support.outage import Proxy

# Requests published before the outage begins, and for this long after it ends.
LEAD_S = 4.0
TAIL_S = 4.0
# /readyz is asked this often during the outage.
READYZ_POLL_S = 0.5
# After the last publish, how long to wait for every result.
SETTLE_S = 60.0
IMAGE_LATENCY_S = 0.5


async def measure(name: str, down_s: float, rate: float) -> list:
    async with harness.open_environment() as env:
        env.openai.latency_s = {"images": IMAGE_LATENCY_S}
        proxies = {port: await env.nursery.start(Proxy(port).serve)
                   for port in (5432, 5672, int(env.s3.endpoint_url.rsplit(":", 1)[1]))}
        pg, amqp, s3 = proxies.values()
        alerts = await env.watch(topology.ONSCREEN_EXCHANGE)
        results = await env.watch(topology.RESULTS_EXCHANGE)
        service = await env.start_service(
            DATABASE_URL=infra.pg_dsn(env.database).replace("127.0.0.1:5432", pg.address),
            AMQP_URL=infra.amqp_url(env.vhost).replace("127.0.0.1:5672", amqp.address),
            SPACES_ENDPOINT_URL=f"http://{s3.address}",
            DYNAMO_IMAGES_PER_MINUTE=harness.UNLIMITED_PER_MINUTE,
            DYNAMO_TEXT_REQUESTS_PER_MINUTE=harness.UNLIMITED_PER_MINUTE,
        )
        down, up = {
            "database": (pg.cut, pg.restore),
            "broker": (amqp.cut, amqp.restore),
            "storage-unreachable": (s3.cut, s3.restore),
            "storage-503": (s3.answer_503, s3.restore),
            "ledger": (lambda: setattr(env.ledger, "down", True),
                       lambda: setattr(env.ledger, "down", False)),
            "auth": (lambda: setattr(env.auth, "down", True),
                     lambda: setattr(env.auth, "down", False)),
            "openai": (lambda: setattr(env.openai, "down", True),
                       lambda: setattr(env.openai, "down", False)),
        }[name]
        published = 0
        readyz: collections.Counter[str] = collections.Counter()
        alive = True

        async def publish_steadily(until: float):
            nonlocal published
            while trio.current_time() < until:
                published += 1
                await env.publish(harness.ghost(f"a seal number {published}"))
                await trio.sleep(1 / rate)

        async def watch_readyz(stop: trio.Event):
            async with httpx.AsyncClient() as client:
                while not stop.is_set():
                    answer = await client.get(f"{service.url}/readyz")
                    body = answer.json()
                    bad = {k: v.split(" for ")[0].split(":")[0]
                           for k, v in body["checks"].items() if v != "ok"}
                    readyz[f"{answer.status_code} {json.dumps(bad) if bad else ''}".strip()] += 1
                    await trio.sleep(READYZ_POLL_S)

        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            back_at = start + LEAD_S + down_s
            nursery.start_soon(publish_steadily, back_at + TAIL_S)
            await trio.sleep(LEAD_S)
            stop = trio.Event()
            down()
            try:
                nursery.start_soon(watch_readyz, stop)
                await trio.sleep(down_s)
                alive = alive and service.process.poll() is None
            finally:
                up()
                back_at = trio.current_time()
                stop.set()
        with trio.move_on_after(SETTLE_S):
            while len({_request_id(m) for _, m in results.arrived}) < published:
                await trio.sleep(0.2)
        await trio.sleep(1)  # a late copy would come now
        alive = alive and service.process.poll() is None
        logs = service.logs()
        if os.environ.get("BENCH_OUTAGE_LOGS"):
            with open(f"{os.environ['BENCH_OUTAGE_LOGS']}-{name}.log", "w") as file:
                file.write(logs)
        crashed = logs.count(" crashed")
        after = [at for at, _ in results.arrived if at >= back_at]
        first_after = min(after) - back_at if after else float("nan")
        outcomes = collections.Counter(json.loads(m.body)["outcome"] for _, m in results.arrived)
        alert_copies = collections.Counter(m.message_id for _, m in alerts.arrived)
        result_copies = collections.Counter(m.message_id for _, m in results.arrived)
        metrics = await env.metrics(service) if alive else {}
        republished = metrics.get(("dynamo_alerts_republished_total", ()), 0)
        pending = len(env.ledger.pending())
        return [
            name,
            f"{down_s:.0f} s",
            "yes" if alive and not crashed else f"NO (alive={alive}, crashes={crashed})",
            "; ".join(f"{k} ×{n}" for k, n in readyz.most_common()),
            f"{first_after:.2f} s",
            f"{outcomes['success']}/{published}",
            f"{sum(n - 1 for n in alert_copies.values())} (counted {republished:.0f})",
            sum(n - 1 for n in result_copies.values()),
            pending,
        ]


def _request_id(message) -> str:
    return json.loads(message.body)["request_id"]


async def main(args) -> None:
    durations = {"database": args.database_s, "broker": args.broker_s, "ledger": args.ledger_s,
                 "openai": args.openai_s, "auth": args.auth_s,
                 "storage-503": args.storage_s, "storage-unreachable": args.storage_s}
    names = args.only.split(",") if args.only else list(durations)
    rows = []
    for name in names:
        rows.append(await measure(name, durations[name], args.rate))
        print(f"done: {rows[-1]}", flush=True)
    harness.print_table(
        f"Outages during a stream of ghosts ({args.rate:g}/s)",
        ["outage", "down", "stayed up", "/readyz during it (status, checks not ok ×polls)",
         "return → first result", "succeeded", "alerts twice", "results twice",
         "pending debits"],
        rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated outages (default: all)")
    parser.add_argument("--rate", type=float, default=2.0, help="ghosts published per second")
    parser.add_argument("--database-s", type=float, default=20.0)
    parser.add_argument("--broker-s", type=float, default=15.0)
    parser.add_argument("--ledger-s", type=float, default=20.0)
    parser.add_argument("--openai-s", type=float, default=15.0)
    parser.add_argument("--auth-s", type=float, default=30.0)
    parser.add_argument("--storage-s", type=float, default=30.0)
    harness.run(main, parser.parse_args())
