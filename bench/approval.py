"""The safety net's latencies (issue 17), against the fakes of tests/fakes:

1. what screening the generated image adds to a request: golden ghosts published one at
   a time, end to end (publish → alert on `onscreen-events`), with
   DYNAMO_IMAGE_MODERATION on and off, and the screening step itself (the image's answer
   → the moderation call answered);
2. with DYNAMO_APPROVAL=on and the broadcaster's page open in headless Chromium: from the
   image being ready (its screening answered) to the "Awaiting approval" panel showing
   the item, and showing its image (fetched through the preview route);
3. from the click on Approve in the page to the alert on `onscreen-events`.

The fakes stamp calls with this process's Trio clock, the page with the browser's wall
clock: they are put on one time base by the offset between the two, read once.

    python -m bench.approval [--requests 20] [--realistic-images]
"""

from __future__ import annotations

import argparse
import time

import trio

from bench import harness
from dynamo.rabbitmq import broker as topology
from tests.support import browser

TOKEN = "bench-broadcaster"
UNLIMITED = {"DYNAMO_IMAGES_PER_MINUTE": harness.UNLIMITED_PER_MINUTE,
             "DYNAMO_TEXT_REQUESTS_PER_MINUTE": harness.UNLIMITED_PER_MINUTE}
PAUSE_S = 0.2  # between requests: one at a time

# For each approval item, when the page first showed it, and its image loaded.
WATCH = """() => {
  window.__seen = {};
  const note = () => {
    for (const item of document.querySelectorAll("#approvals-list .approval-item")) {
      const seen = (window.__seen[item.dataset.id] ||= { item: Date.now() });
      const image = item.querySelector("img");
      if (!seen.image && image && image.complete && image.naturalWidth > 0) seen.image = Date.now();
    }
  };
  new MutationObserver(note).observe(document.body, { subtree: true, childList: true, attributes: true });
  const frame = () => { note(); requestAnimationFrame(frame); };
  frame();
}"""
CLICK_APPROVE = """id => {
  window.__clicked = Date.now();
  document.querySelector(`#approvals-list [data-id="${id}"] .approve`).click();
  return window.__clicked;
}"""


def image_screenings(env) -> list:
    return [call for call in env.openai.calls_to("moderations")
            if isinstance(call.body, dict) and isinstance(call.body.get("input"), list)]


async def sequential(env, alerts, count: int, label: str) -> dict[str, list[float]]:
    totals, screening = [], []
    for n in range(count + 1):  # the first warms the connections
        seen = len(alerts.arrived)
        published = await env.publish(harness.ghost(f"a {label} seal {n}"))
        [(alert_at, _)] = (await alerts.wait_for(seen + 1))[seen:]
        if n == 0:
            continue
        totals.append(alert_at - published)
        image = next(c for c in env.openai.calls_to("images") if c.time >= published)
        screened = [c for c in image_screenings(env) if c.time >= published]
        if screened:
            screening.append(screened[0].extra["answered_at"] - image.extra["answered_at"])
        await trio.sleep(PAUSE_S)
    return {"total": totals, "screening": screening}


def page_steps(url: str, count: int, results: dict, offset_s: float):
    """The browser's part (a worker thread): publish, watch the panel, approve."""

    def steps(page) -> None:
        browser.sign_in(page, url, TOKEN)
        page.evaluate(WATCH)
        for n in range(count + 1):
            subject = f"an approved seal {n}"
            trio.from_thread.run(results["publish"], subject)
            item = page.locator("#approvals-list .approval-item", has_text=subject)
            item.wait_for()
            request_id = item.get_attribute("data-id")
            page.wait_for_function("id => window.__seen[id] && window.__seen[id].image",
                                   arg=request_id)
            seen = page.evaluate("id => window.__seen[id]", request_id)
            ready = trio.from_thread.run_sync(results["screened_at"]) + offset_s
            clicked = page.evaluate(CLICK_APPROVE, request_id) / 1000
            alert_at = trio.from_thread.run(results["alert"]) + offset_s
            if n == 0:
                continue  # warm-up
            results["to_item"].append(seen["item"] / 1000 - ready)
            results["to_image"].append(seen["image"] / 1000 - ready)
            results["to_alert"].append(alert_at - clicked)
            time.sleep(PAUSE_S)

    return steps


async def main(args) -> None:
    async with harness.open_environment() as env:
        env.auth.add_broadcaster(TOKEN, "42", "GoldenVCR")
        if args.realistic_images:  # real-sized images: a longer data URL to send
            harness.use_realistic_images(env.openai)
        alerts = await env.watch(topology.ONSCREEN_EXCHANGE)
        screened_runs = {}
        for moderation in ("on", "off"):
            service = await env.start_service(DYNAMO_IMAGE_MODERATION=moderation, **UNLIMITED)
            screened_runs[moderation] = await sequential(env, alerts, args.requests, moderation)
            await service.stop()

        service = await env.start_service(DYNAMO_APPROVAL="on", **UNLIMITED)
        offset_s = time.time() - trio.current_time()

        async def publish(subject: str) -> None:
            results["seen"] = len(alerts.arrived)
            results["published"] = await env.publish(harness.ghost(subject))

        def screened_at() -> float:
            return image_screenings(env)[-1].extra["answered_at"]

        async def alert() -> float:
            seen = results["seen"]
            [(alert_at, _)] = (await alerts.wait_for(seen + 1))[seen:]
            return alert_at

        results = {"publish": publish, "screened_at": screened_at, "alert": alert,
                   "to_item": [], "to_image": [], "to_alert": []}
        await browser.in_browser(page_steps(service.url, args.requests, results, offset_s),
                                 screenshot=env.workdir / "bench.png")

    def row(label, values):
        return (label, *(harness.ms(harness.percentile(values, q)) for q in (50, 90, 100)))

    on, off = screened_runs["on"], screened_runs["off"]
    harness.print_table(
        f"image screening, golden ghosts publish → alert ({args.requests} sequential each)",
        ("", "median", "p90", "max"),
        [row("DYNAMO_IMAGE_MODERATION=off", off["total"]),
         row("DYNAMO_IMAGE_MODERATION=on", on["total"]),
         row("  of which: image answered → screened", on["screening"])])
    added = harness.percentile(on["total"], 50) - harness.percentile(off["total"], 50)
    print(f"screening adds {harness.ms(added)} to the median request")
    harness.print_table(
        f"approval with the page open ({args.requests} sequential requests)",
        ("", "median", "p90", "max"),
        [row("image ready (screened) → panel shows the item", results["to_item"]),
         row("image ready (screened) → panel shows its image", results["to_image"]),
         row("click on Approve → alert on onscreen-events", results["to_alert"])])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--realistic-images", action="store_true",
                        help="noisy, real-sized pictures from the fake image model")
    harness.run(main, parser.parse_args())
