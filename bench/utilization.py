"""Utilization of the image rate limit: how close to the real limit dynamo works through
a backlog, how many 429s it gets, and how long a request spends in dynamo outside the
OpenAI image call.

The fake OpenAI allows `--limit` images per minute (a true sliding 60-s window, 429 with
retry-after and x-ratelimit-* headers) and takes `--latency` s per image. `--requests`
ghosts are published at once. dynamo is configured at `--configured` times the limit
(1: it knows the real limit; 2: it believes in twice the real limit and must learn).
`--hide-headers` makes the fake send no x-ratelimit-* headers (429s keep retry-after), so
that dynamo can only learn from its 429s.

`--processes N` runs a fleet: N dynamo processes on the one database, vhost and fake
OpenAI account, each configured the same; the figures are the account's. `--tokens T`
makes the fake limit image tokens to T per minute as well (each image's `usage`, counted
as the real API does); dynamo learns that limit from the headers, or is told it with
`--configure-tokens`. The utilization is then reported against whichever limit binds.
Each process's /metrics gives the database cost of its shared budget
(dynamo_budget_steps_total, dynamo_budget_step_seconds).

    python -m bench.utilization                                  # 200 requests, ~3.5 min
    python -m bench.utilization --configured 2 --hide-headers    # the 429 learning case
    python -m bench.utilization --requests 60                    # a 1-minute smoke run
    python -m bench.utilization --processes 3 --limit 30 --requests 90   # a fleet
    python -m bench.utilization --limit 100 --tokens 21120 --requests 80 # tokens bind
    python -m bench.utilization --limit 100 --tokens 21120 --requests 30 \
        --image-model gpt-image-2 --image-tokens 1056    # issue 18: 20 images a minute

The image calls' start times are printed (s after the first), so that a stall shows, with
the longest gap between two calls and the steady rate over calls 5-24 (the first calls
may go out before the first answer shows the limits).

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
from dynamo.rabbitmq import broker as topology

GHOST_PROMPT = re.compile(r"^a ghostly image of (.*), with glitchy VHS artifacts")
PROGRESS_S = 30.0


async def main(args) -> None:
    limit, configured = args.limit, args.limit * args.configured
    subjects = [f"a seal number {n}" for n in range(args.requests)]
    published: dict[str, float] = {}
    async with harness.open_environment() as env:
        env.openai.images_per_minute = limit
        env.openai.image_tokens_per_minute = args.tokens
        env.openai.latency_s = {"images": args.latency}
        if args.image_tokens:
            fixed_image_cost(env.openai, args.image_tokens)
        if args.hide_headers:
            harness.hide_rate_limit_headers(env.openai)
        alerts = await env.watch(topology.ONSCREEN_EXCHANGE)
        settings = {"DYNAMO_IMAGES_PER_MINUTE": f"{configured:g}"}
        if args.image_model:
            settings["DYNAMO_IMAGE_MODEL"] = args.image_model
        if args.tokens and args.configure_tokens:
            settings["DYNAMO_IMAGE_TOKENS_PER_MINUTE"] = f"{args.tokens * args.configured:g}"
        services = await env.start_services(args.processes, **settings)
        for subject in subjects:
            published[subject] = await env.publish(harness.ghost(subject))
        print(f"published {args.requests} ghosts in {trio.current_time() - min(published.values()):.1f} s; "
              f"limit {limit}/min, {args.tokens or 'no'} tokens/min; {args.processes} process(es) "
              f"configured {settings}; image latency {args.latency} s")
        expected_s = args.requests * 60 / binding_rate(args, env.openai)
        with trio.fail_after(expected_s * 1.5 + 180):
            while len(alerts.arrived) < args.requests:
                with trio.move_on_after(PROGRESS_S):
                    await alerts.wait_for(args.requests)
                print(f"  {len(alerts.arrived)}/{args.requests} alerts, "
                      f"{env.openai.statuses('images').count(429)} 429s so far", flush=True)
        status = await env.status(services[0])
        scraped = [await env.metrics(service) for service in services]

    report(args, env, alerts, published, status)
    report_fleet(env, scraped)
    if args.dump:
        dump(args.dump, env, alerts, published)


def image_cost(fake) -> int:
    """What one of the benchmark's ghosts costs in tokens (the fake's `usage`)."""
    return fake.image_usage({"prompt": "a ghostly image of a seal number 100, with glitchy VHS "
                                       "artifacts, dark background"})["total_tokens"]


def fixed_image_cost(fake, total_tokens: int) -> None:
    """Every image answer's `usage.total_tokens` is `total_tokens` (the prompt's tokens
    and the image's output tokens make it up), whatever the model's table says."""
    usage_of = fake.image_usage

    def fixed(body: dict) -> dict:
        usage = usage_of(body)
        output = max(0, total_tokens - usage["input_tokens"])
        usage["output_tokens"] = usage["output_tokens_details"]["image_tokens"] = output
        usage["total_tokens"] = usage["input_tokens"] + output
        return usage

    fake.image_usage = fixed


def binding_rate(args, fake) -> float:
    """Images per minute the account allows: its image limit, or fewer when tokens bind."""
    return min(args.limit, args.tokens / image_cost(fake)) if args.tokens else args.limit


def report_fleet(env, scraped) -> None:
    """Per process: its image calls, and what the shared budget cost it in the database."""
    rows, steps_total, seconds_total, calls_total = [], 0.0, 0.0, 0.0
    for number, figures in enumerate(scraped):
        calls = figures.get(("dynamo_openai_calls_total", (("kind", "image"), ("status", "200"))), 0)
        steps = {step: figures.get(("dynamo_budget_steps_total", (("kind", "image"), ("step", step))), 0)
                 for step in ("granted", "wait", "outcome", "outcome-skipped", "released")}
        taken = sum(n for step, n in steps.items() if step != "outcome-skipped")
        seconds = figures.get(("dynamo_budget_step_seconds_sum", (("kind", "image"),)), 0.0)
        steps_total, seconds_total, calls_total = steps_total + taken, seconds_total + seconds, calls_total + calls
        rows.append((f"process {number}", f"{calls:g}", " / ".join(f"{steps[s]:g}" for s in steps),
                     f"{taken / calls:.2f}" if calls else "-",
                     f"{seconds / taken * 1000:.2f} ms" if taken else "-"))
    rows.append(("fleet", f"{calls_total:g}", "", f"{steps_total / calls_total:.2f}" if calls_total else "-",
                 f"{seconds_total / steps_total * 1000:.2f} ms" if steps_total else "-"))
    harness.print_table(
        "the shared budget, per process (image kind): a step is one database transaction",
        ("", "image calls", "steps granted / wait / outcome / skipped / released",
         "steps per image call", "mean step"), rows)


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
    binding = binding_rate(args, env.openai)
    rows = [
        ("requests", len(published), ""),
        ("image calls: 200 / 429", f"{len(ok)} / {len(refused)}", ""),
        ("binding limit", f"{binding:.2f} images/min",
         "tokens" if binding < limit else "images per minute"),
        ("achieved image rate, first to last call", f"{per_minute(starts):.2f}/min",
         f"{per_minute(starts) / binding:.1%} of the binding limit"),
        ("most calls accepted in any 60 s", harness.most_in_any_window(starts), f"limit {limit}"),
        ("most calls made in any 60 s", harness.most_in_any_window([c.time for c in calls]), ""),
        ("first image call, after the first publish", f"{start - min(published.values()):.3f} s", ""),
        ("wall time, first publish to last alert",
         f"{max(alert_at.values()) - min(published.values()):.1f} s", ""),
    ]
    if args.tokens:
        cost = image_cost(env.openai)
        tokens_rate = (len(ok) - 1) * cost / (starts[-1] - starts[0]) * 60
        rows += [
            ("tokens per image (the fake's usage)", cost, ""),
            ("achieved token rate, first to last call", f"{tokens_rate:.0f}/min",
             f"{tokens_rate / args.tokens:.1%} of {args.tokens} tokens/min"),
            ("most tokens accepted in any 60 s", harness.most_in_any_window(starts) * cost, ""),
            # A window holds whole calls: with a limit not a multiple of the cost, the rest
            # of it cannot be used by anyone.
            ("whole calls a 60-s window can hold", min(limit, args.tokens // cost),
             f"achieved {per_minute(starts) / min(limit, args.tokens // cost):.1%} of that"),
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
                 f"{image_kind['effective_per_minute']}/min, "
                 f"{image_kind['tokens_per_minute'] or 'no'} tokens/min",
                 f"configured {image_kind['configured_per_minute']:g}/min"))
    harness.print_table(f"image rate limit {limit}/min, {args.tokens or 'no'} tokens/min, "
                        f"{args.processes} process(es), {args.latency} s per image", ("", "", ""), rows)

    minutes = {}
    for call in calls:
        minute = int((call.time - start) // 60)
        accepted, rate_limited = minutes.get(minute, (0, 0))
        minutes[minute] = (accepted + (call.status == 200), rate_limited + (call.status == 429))
    harness.print_table("image calls per minute since the first", ("minute", "200", "429"),
                        [(m, *minutes[m]) for m in sorted(minutes)])
    report_call_times(calls, binding)

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


def report_call_times(calls, binding: float) -> None:
    """Every image call's start (s after the first; a 429 marked), the longest gap, and the
    steady rate over calls 5-24 (1-based, as the issue counts them)."""
    start = calls[0].time
    marks = [f"{c.time - start:.2f}" + ("*" if c.status == 429 else "") for c in calls]
    print("\nimage calls, s after the first (* = 429):")
    for row in range(0, len(marks), 10):
        print("  " + " ".join(mark.rjust(7) for mark in marks[row:row + 10]))
    ok = [c.time for c in calls if c.status == 200]
    gaps = [(later - earlier, earlier - start) for earlier, later in zip(ok, ok[1:], strict=False)]
    if gaps:
        longest, after = max(gaps)
        print(f"  longest gap between two accepted calls: {longest:.2f} s (after the call at "
              f"{after:.2f} s); pacing interval at the binding limit {60 / binding:.2f} s")
    steady = ok[4:24]
    if len(steady) > 1:
        rate = (len(steady) - 1) / (steady[-1] - steady[0]) * 60
        print(f"  steady rate over calls 5-{4 + len(steady)}: {rate:.2f}/min, "
              f"{rate / binding:.1%} of the binding limit")


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
    parser.add_argument("--processes", type=int, default=1, help="dynamo processes sharing the account")
    parser.add_argument("--tokens", type=int, help="the fake's image tokens per minute")
    parser.add_argument("--configure-tokens", action="store_true",
                        help="tell dynamo the token limit (else it learns it from the headers)")
    parser.add_argument("--image-model", help="DYNAMO_IMAGE_MODEL (the fake serves it)")
    parser.add_argument("--image-tokens", type=int,
                        help="every image answer's usage.total_tokens (else the fake's table)")
    parser.add_argument("--dump", metavar="FILE", help="write the raw timeline as JSON")
    harness.run(main, parser.parse_args())
