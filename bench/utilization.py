"""Utilization of the image rate limit: how close to the real limit dynamo works through
a backlog, how many 429s it gets, and how long a request spends in dynamo outside the
OpenAI image call.

The fake OpenAI allows `--limit` images per minute (a true sliding 60-s window, 429 with
retry-after and x-ratelimit-* headers) and takes `--latency` s per image. `--requests`
ghosts are published at once. dynamo is configured at `--configured` times the limit
(1: it knows the real limit; 2: it believes in twice the real limit and must learn).
`--hide-headers` makes the fake send no x-ratelimit-* headers (429s keep retry-after), so
that dynamo can only learn from its 429s.

    python -m bench.utilization                                  # 200 requests, ~3.5 min
    python -m bench.utilization --configured 2 --hide-headers    # the 429 learning case
    python -m bench.utilization --requests 60                    # a 1-minute smoke run

Times per request: publish, the fake's start and end of its successful image call, and
the alert's arrival on `onscreen-events`. "outside the image call" is end to end minus
the image call (with a backlog, mostly the wait for its turn under the limit); "after the
image call" is the alert's arrival minus the image call's end (upload and publish).
"""

from __future__ import annotations

import argparse
import json
import math
import re

import trio

from bench import harness
from dynamo import broker as topology

GHOST_PROMPT = re.compile(r"^a ghostly image of (.*), with glitchy VHS artifacts")
PROGRESS_S = 30.0


async def main(args) -> None:
    limit, configured = args.limit, args.limit * args.configured
    subjects = [f"a seal number {n}" for n in range(args.requests)]
    published: dict[str, float] = {}
    async with harness.open_environment() as env:
        env.openai.images_per_minute = limit
        env.openai.latency_s = {"images": args.latency}
        if args.hide_headers:
            harness.hide_rate_limit_headers(env.openai)
        alerts = await env.watch(topology.ONSCREEN_EXCHANGE)
        service = await env.start_service(DYNAMO_IMAGES_PER_MINUTE=f"{configured:g}")
        for subject in subjects:
            published[subject] = await env.publish(harness.ghost(subject))
        print(f"published {args.requests} ghosts in {trio.current_time() - min(published.values()):.1f} s; "
              f"limit {limit}/min, configured {configured:g}/min, image latency {args.latency} s")
        expected_s = args.requests * 60 / limit
        with trio.fail_after(expected_s * 1.5 + 180):
            while len(alerts.arrived) < args.requests:
                with trio.move_on_after(PROGRESS_S):
                    await alerts.wait_for(args.requests)
                print(f"  {len(alerts.arrived)}/{args.requests} alerts, "
                      f"{env.openai.statuses('images').count(429)} 429s so far", flush=True)
        status = await env.status(service)

    report(args, env, alerts, published, status)
    if args.dump:
        dump(args.dump, env, alerts, published)


def dump(path: str, env, alerts, published) -> None:
    """The raw timeline, for a closer look: times in s after the first publish."""
    origin = min(published.values())
    timeline = {
        "image_calls": [{"at": c.time - origin, "status": c.status,
                         "answered_at": c.extra.get("answered_at", c.time) - origin,
                         "headers": c.extra.get("headers", {})}
                        for c in env.openai.calls_to("images")],
        "published": {s: at - origin for s, at in published.items()},
        "alerts": {description(m): at - origin for at, m in alerts.arrived},
    }
    with open(path, "w") as file:
        json.dump(timeline, file, indent=1)
    print(f"\ntimeline written to {path}")


def report(args, env, alerts, published, status) -> None:
    limit = args.limit
    alert_at = {description(m): at for at, m in alerts.arrived}
    calls = env.openai.calls_to("images")
    ok = [c for c in calls if c.status == 200]
    refused = [c for c in calls if c.status == 429]
    start = calls[0].time
    image = {GHOST_PROMPT.match(c.body["prompt"]).group(1): c for c in ok}

    def per_minute(times):
        return (len(times) - 1) / (times[-1] - times[0]) * 60 if len(times) > 1 else math.nan

    starts = [c.time for c in ok]
    rows = [
        ("requests", len(published), ""),
        ("image calls: 200 / 429", f"{len(ok)} / {len(refused)}", ""),
        ("achieved image rate, first to last call", f"{per_minute(starts):.1f}/min",
         f"{per_minute(starts) / limit:.1%} of the limit"),
        ("most calls accepted in any 60 s", harness.most_in_any_window(starts), f"limit {limit}"),
        ("most calls made in any 60 s", harness.most_in_any_window([c.time for c in calls]), ""),
        ("first image call, after the first publish", f"{start - min(published.values()):.3f} s", ""),
        ("wall time, first publish to last alert",
         f"{max(alert_at.values()) - min(published.values()):.1f} s", ""),
    ]
    if refused:
        last = refused[-1].time
        after = [c.time for c in ok if c.time > last]
        rows += [
            ("first / last 429, after the first call",
             f"{refused[0].time - start:.1f} s / {last - start:.1f} s", ""),
            ("rate after the last 429", f"{per_minute(after):.1f}/min",
             f"{per_minute(after) / limit:.1%} of the limit ({len(after)} calls)"),
        ]
    image_kind = status["rate_limiter"]["kinds"]["image"]
    rows.append(("dynamo's image limit at the end",
                 f"{image_kind['effective_per_minute']}/min",
                 f"configured {image_kind['configured_per_minute']:g}/min"))
    harness.print_table(f"image rate limit {limit}/min, {args.latency} s per image", ("", "", ""), rows)

    minutes = {}
    for call in calls:
        minute = int((call.time - start) // 60)
        accepted, rate_limited = minutes.get(minute, (0, 0))
        minutes[minute] = (accepted + (call.status == 200), rate_limited + (call.status == 429))
    harness.print_table("image calls per minute since the first", ("minute", "200", "429"),
                        [(m, *minutes[m]) for m in sorted(minutes)])

    e2e, in_call, outside, after = [], [], [], []
    for subject, sent in published.items():
        call = image[subject]
        e2e.append(alert_at[subject] - sent)
        in_call.append(call.extra["answered_at"] - call.time)
        outside.append(e2e[-1] - in_call[-1])
        after.append(alert_at[subject] - call.extra["answered_at"])
    rows = [(label, *(f"{harness.percentile(values, q):.3f} s" for q in (50, 99)))
            for label, values in (("end to end", e2e), ("image call (fake)", in_call),
                                  ("outside the image call", outside),
                                  ("after the image call", after))]
    harness.print_table("time per request", ("", "p50", "p99"), rows)


def description(message) -> str:
    return json.loads(message.body)["payload"]["details"]["description"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--limit", type=int, default=60, help="the fake's images per minute")
    parser.add_argument("--latency", type=float, default=2.0, help="seconds per image")
    parser.add_argument("--configured", type=float, default=1.0,
                        help="DYNAMO_IMAGES_PER_MINUTE as a multiple of the real limit")
    parser.add_argument("--hide-headers", action="store_true",
                        help="no x-ratelimit-* headers in the fake's answers")
    parser.add_argument("--dump", metavar="FILE", help="write the raw timeline as JSON")
    harness.run(main, parser.parse_args())
