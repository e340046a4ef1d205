"""Live page latency: from a request's state change, committed by another process, to
(1) its event on the stream (`GET /events`) and (2) the page in headless Chromium
showing it.

dynamo runs as `python run.py` (production profile, the harness's systems). The change
is made the way another dynamo process makes it: an UPDATE on its own PostgreSQL
connection; the clock starts just before that UPDATE is sent, so the figures include the
commit, the NOTIFY, the HTTP actor's read of the row, the stream and (for the page) the
browser's rendering. The request is a finished one whose state is flipped between
`succeeded` and `failed`, so that the pipeline leaves it alone.

    python -m bench.live_page [--changes 30]
"""

from __future__ import annotations

import argparse
import time
import uuid

import asyncpg
import httpx
import trio
from trio_asyncio import aio_as_trio

from bench import harness
from tests.support import browser, infra, sse

TOKEN = "bench-broadcaster"
PAUSE_S = 0.2  # between changes: one at a time
INSERT_FINISHED = """
    insert into dynamo.image_request (id, twitch_user_id, twitch_display_name, style, inputs,
        prompt, step, state, finished_at)
    values ($1, '7', 'bench', 'ghost', '{"subject": "a benchmarked seal"}'::jsonb,
            'a ghostly image of a benchmarked seal', 'done', 'succeeded', now())
"""


class Changer:
    """Flips one finished request's state from its own connection ("another process")."""

    def __init__(self, conn, request_id: uuid.UUID):
        self.conn, self.request_id, self.state = conn, request_id, "succeeded"

    async def flip(self) -> tuple[str, float]:
        self.state = "failed" if self.state == "succeeded" else "succeeded"
        started = time.time()
        await aio_as_trio(self.conn.execute)(
            "update dynamo.image_request set state = $2 where id = $1", self.request_id, self.state)
        return self.state, started


async def stream_latencies(url: str, changer: Changer, count: int) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(timeout=None) as client:
        ticket = await sse.ticket(client, url, TOKEN)
        async with client.stream("GET", f"{url}/events", params={"ticket": ticket}) as response:
            events = sse.events(response)
            await anext(events)  # hello
            for _ in range(count):
                state, started = await changer.flip()
                async for name, data in events:
                    if name == "request" and data["id"] == str(changer.request_id) \
                            and data["state"] == state:
                        latencies.append(time.time() - started)
                        break
                await trio.sleep(PAUSE_S)
    return latencies


WATCH = """id => {
  window.__shown = [];
  const note = () => {
    const item = document.querySelector(`[data-id="${id}"]`);
    const state = item && (item.classList.contains("failed") ? "failed" : "succeeded");
    const last = window.__shown[window.__shown.length - 1];
    if (state && (!last || last.state !== state)) window.__shown.push({ state, at: Date.now() });
  };
  new MutationObserver(note).observe(document.body, { subtree: true, childList: true });
  note();
}"""


def page_latencies(url: str, changer: Changer, count: int) -> list[float]:
    """In a worker thread (see tests/support/browser.py): the page's own timestamps."""
    latencies: list[float] = []

    def steps(page) -> None:
        browser.sign_in(page, url, TOKEN)
        page.locator(f'[data-id="{changer.request_id}"]').wait_for()
        page.evaluate(WATCH, str(changer.request_id))
        for n in range(count):
            state, started = trio.from_thread.run(changer.flip)
            page.wait_for_function("([n, state]) => window.__shown.length > n + 1 "
                                   "&& window.__shown[n + 1].state === state", arg=[n, state])
            shown_at = page.evaluate(f"window.__shown[{n + 1}].at") / 1000
            latencies.append(shown_at - started)
            time.sleep(PAUSE_S)

    return latencies, steps


async def main(args) -> None:
    async with harness.open_environment() as env:
        env.auth.add_broadcaster(TOKEN, "42", "GoldenVCR")
        service = await env.start_service()
        conn = await aio_as_trio(asyncpg.connect)(infra.pg_dsn(env.database))
        try:
            request_id = uuid.uuid4()
            await aio_as_trio(conn.execute)(INSERT_FINISHED, request_id)
            changer = Changer(conn, request_id)
            on_stream = await stream_latencies(service.url, changer, args.changes)
            on_page, steps = page_latencies(service.url, changer, args.changes)
            await browser.in_browser(steps, screenshot=env.workdir / "bench.png")
        finally:
            await aio_as_trio(conn.close)()
    rows = [(label, *(harness.ms(harness.percentile(values, q)) for q in (50, 90, 100)))
            for label, values in (("change committed → stream event", on_stream),
                                  ("change committed → page shows it", on_page))]
    harness.print_table(f"live page latency ({args.changes} changes each)",
                        ("", "median", "p90", "max"), rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=30)
    harness.run(main, parser.parse_args())
