"""Memory under a backlog: dynamo's RSS while `--messages` requests are published to
`generation-requests` and the images endpoint is held (nothing can finish), and how many
messages stay in RabbitMQ.

A bounded pipeline takes out only what its buffers hold (prefetch 8, small channels, the
fair queue of 64) and leaves the rest in RabbitMQ, so its RSS stays flat however long the
backlog. RSS is sampled every `SAMPLE_S` s; the table shows it at start (ready, nothing
published), after each checkpoint of published messages, and after `--settle` s more.

    python -m bench.memory [--messages 10000] [--settle 15]
"""

from __future__ import annotations

import argparse

import trio

from bench import harness

SAMPLE_S = 0.25
MIB = 1024 * 1024


async def main(args) -> None:
    checkpoints = sorted({c for c in (1000, 5000, args.messages) if c <= args.messages})
    rows = []
    async with harness.open_environment() as env:
        env.openai.hold("images")
        service = await env.start_service()
        samples: list[tuple[float, int]] = []

        async def sample_rss():
            while True:
                samples.append((trio.current_time(), service.rss_bytes()))
                await trio.sleep(SAMPLE_S)

        async def snapshot(label: str) -> None:
            rows.append((label, f"{service.rss_bytes() / MIB:.1f} MiB",
                         max(rss for _, rss in samples) / MIB,
                         await env.queue_ready(), await env.stored_requests(),
                         len(env.ledger.pending())))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_rss)
            await trio.sleep(1.0)
            await snapshot("ready, nothing published")
            started = trio.current_time()
            for number in range(1, args.messages + 1):
                await env.publish(harness.ghost(f"a seal number {number}"))
                if number in checkpoints:
                    await snapshot(f"{number} published ({trio.current_time() - started:.0f} s)")
            await trio.sleep(args.settle)
            await snapshot(f"{args.settle:g} s later")
            status = await env.status(service)
            nursery.cancel_scope.cancel()
        env.openai.release("images")

    harness.print_table(
        f"dynamo RSS with the images endpoint held, {args.messages} messages published",
        ("", "RSS", "peak so far", "ready in RabbitMQ", "stored", "debits reserved"),
        [(label, rss, f"{peak:.1f} MiB", ready, stored, reserved)
         for label, rss, peak, ready, stored, reserved in rows])
    fair_queue = status["rate_limiter"]["fair_queue"]
    print(f"\n/status at the end: fair queue {fair_queue['depth']}, "
          f"requests {status['requests']}, in flight {status.get('in_flight')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds to wait after the last publish")
    harness.run(main, parser.parse_args())
