"""Latency: from publishing contract §3's golden ghost to its alert on `onscreen-events`.

The fake OpenAI answers at once and no rate limit applies, so the time is dynamo's own
(and its systems': RabbitMQ, PostgreSQL, auth + ledger, S3). Requests go one at a time;
a first one warms the connections and is shown apart. The stages come from the fakes'
timestamps of each call:

    publish ─▶ POST /outflow (reserve) ─▶ moderation ─▶ image call ─▶ image answered ─▶ alert

    python -m bench.latency [--requests 20]
"""

from __future__ import annotations

import argparse

from bench import harness
from dynamo.rabbitmq import broker as topology

STAGES = (
    ("publish → ledger reserve", "published", "reserve"),
    ("reserve → moderation", "reserve", "moderation"),
    ("moderation → image call", "moderation", "image"),
    ("image call (fake)", "image", "image_answered"),
    ("image answered → alert", "image_answered", "alert"),
)


async def one_request(env: harness.Environment, alerts: harness.Watcher) -> dict[str, float]:
    seen = len(alerts.arrived)
    published = await env.publish(harness.GOLDEN_GHOST)
    [(alert_at, _)] = (await alerts.wait_for(seen + 1))[seen:]

    def first_after(fake, endpoint: str):
        return next(c for c in fake.calls_to(endpoint) if c.time >= published)

    image = first_after(env.openai, "images")
    return {
        "published": published,
        "reserve": first_after(env.ledger, "outflow").time,
        "moderation": first_after(env.openai, "moderations").time,
        "image": image.time,
        "image_answered": image.extra["answered_at"],
        "alert": alert_at,
    }


async def main(args) -> None:
    async with harness.open_environment() as env:
        alerts = await env.watch(topology.ONSCREEN_EXCHANGE)
        await env.start_service(DYNAMO_IMAGES_PER_MINUTE=harness.UNLIMITED_PER_MINUTE,
                                DYNAMO_TEXT_REQUESTS_PER_MINUTE=harness.UNLIMITED_PER_MINUTE)
        warmup = await one_request(env, alerts)
        runs = [await one_request(env, alerts) for _ in range(args.requests)]

    total = [r["alert"] - r["published"] for r in runs]
    rows = [("end to end", *(harness.ms(harness.percentile(total, q)) for q in (50, 90, 100)))]
    for label, start, end in STAGES:
        values = [r[end] - r[start] for r in runs]
        rows.append((f"  {label}", *(harness.ms(harness.percentile(values, q)) for q in (50, 90, 100))))
    harness.print_table(
        f"golden ghost, publish → onscreen event: {args.requests} sequential requests "
        f"(first, warm-up: {harness.ms(warmup['alert'] - warmup['published'])})",
        ("", "median", "p90", "max"), rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    harness.run(main, parser.parse_args())
