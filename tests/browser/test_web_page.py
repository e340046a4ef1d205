"""The live page in a real browser (headless Debian Chromium driven by Playwright) against
the real service: `python run.py` on the real RabbitMQ and PostgreSQL, with the fake
OpenAI, auth and ledger services and moto's S3 (tests/conftest.py).

Each test saves a screenshot of its end state under its temporary directory (`*.png`).
Nothing here measures speed: every wait has a generous deadline, and
`bench/live_page.py` measures how long a change takes to reach the page."""

from __future__ import annotations

import functools

import httpx
import pytest
import trio

from actors import http
from tests.integration.test_http_api import api, http_database  # noqa: F401  (fixtures)
from tests.support.browser import PHONE, in_browser, require_browser, sign_in
from tests.support.service import started
from tests.support.timeouts import SERVICE_S as TEST_TIMEOUT_S
from tests.support.timeouts import STARTUP_S as STARTUP_TIMEOUT_S

pytestmark = pytest.mark.integration

CASTER_TOKEN, ALICE_TOKEN, BOB_TOKEN = "caster-token", "alice-token", "bob-token"
CASTER, ALICE, BOB = ("42", "GoldenVCR"), ("1001", "Alice"), ("1002", "Bob")
PIPELINE = ["received", "reserving", "reserved", "screened", "generating", "generated",
            "stored", "announced", "accepted", "failing", "refunded", "done"]
# Records, for each request the page shows, the steps it showed, in order.
RECORD_STEPS = """() => {
  window.__steps = {};
  const note = () => {
    for (const item of document.querySelectorAll("[data-id][data-step]")) {
      const seen = (window.__steps[item.dataset.id] ||= []);
      if (seen[seen.length - 1] !== item.dataset.step) seen.push(item.dataset.step);
    }
  };
  new MutationObserver(note).observe(document.body, { subtree: true, childList: true });
  note();
}"""


@pytest.fixture
async def live(dynamo_process, fake_auth, fake_ledger):
    require_browser()
    fake_auth.add_broadcaster(CASTER_TOKEN, *CASTER)
    fake_auth.add_viewer(ALICE_TOKEN, *ALICE)
    fake_auth.add_viewer(BOB_TOKEN, *BOB)
    fake_ledger.default_balance = 1_000_000
    service = await started(dynamo_process, within_s=STARTUP_TIMEOUT_S)
    return service


async def submit(url: str, token: str, body: dict) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{url}/requests", json=body,
                                     headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 202, response.text
        return response.json()["id"]


async def wait_finished(url: str, request_id: str) -> dict:
    async with httpx.AsyncClient() as client:
        while True:
            response = await client.get(f"{url}/requests/{request_id}",
                                        headers={"Authorization": f"Bearer {CASTER_TOKEN}"})
            body = response.json()
            if body["state"] in ("succeeded", "failed"):
                return body
            await trio.sleep(0.1)


def ghost(subject: str) -> dict:
    return {"style": "ghost", "inputs": {"subject": subject}}


def for_viewer(viewer: tuple[str, str], subject: str) -> dict:
    return {"type": "image", "payload": ghost(subject),
            "viewer": {"twitch_user_id": viewer[0], "twitch_display_name": viewer[1]}}


async def test_submit_and_watch_the_steps_and_the_thumbnails_without_a_reload(
        live, fake_openai, tmp_path):
    fake_openai.hold("images")  # so the page shows the requests in flight

    def steps(page):
        from playwright.sync_api import expect

        urls: list[str] = []
        page.on("request", lambda request: urls.append(request.url))
        sign_in(page, live.url, CASTER_TOKEN)
        page.evaluate(RECORD_STEPS)
        page.evaluate("window.__same_document = true")  # gone if the page reloads

        page.get_by_label("Subject").fill("a seal on the page")
        page.get_by_role("button", name="Submit").click()
        expect(page.locator("#submit-result")).to_contain_text("Queued")
        page.get_by_label("Friend").check()
        page.get_by_label("Color").select_option("yellow")
        page.get_by_label("Subject").fill("caterpillar in a top hat")
        page.get_by_role("button", name="Submit").click()

        seal = page.locator("#in-flight-body li", has_text="a seal on the page")
        expect(seal).to_have_attribute("data-step", "generating")
        friend = page.locator("#in-flight-body li", has_text="caterpillar in a top hat")
        expect(friend).to_be_visible()
        trio.from_thread.run_sync(fake_openai.release, "images")

        done = page.locator("#finished-list li.succeeded", has_text="a seal on the page")
        expect(done.locator("img")).to_be_visible()
        friend_done = page.locator("#finished-list li.succeeded", has_text="caterpillar")
        expect(friend_done.locator(".thumb.friend img")).to_be_visible()
        expect(friend_done.locator(".name")).to_contain_text("Sir Hatsworth")
        # What each cost, by the price table, and today's spend on the status panel.
        expect(done.locator(".cost")).to_contain_text("$0.0")
        expect(page.locator("#ops-body table", has_text="Spend")).to_contain_text("today$0.0")
        for image in (done.locator("img"), friend_done.locator("img")):
            page.wait_for_function("image => image.complete && image.naturalWidth > 0",
                                   arg=image.element_handle())
        # The friend's transparent WEBP is shown over a checkerboard.
        background = friend_done.locator(".thumb").evaluate(
            "thumb => getComputedStyle(thumb).backgroundImage")
        assert "conic-gradient" in background
        assert friend_done.locator("img").get_attribute("src").endswith(".webp")

        assert page.evaluate("window.__same_document") is True
        seen = page.evaluate("window.__steps")[done.get_attribute("data-id")]
        assert "generating" in seen and seen[-1] == "done", seen
        assert len(seen) >= 3 and seen == sorted(seen, key=PIPELINE.index), seen
        # The token went in headers only: in no URL, kept in this tab's sessionStorage.
        assert not any(CASTER_TOKEN in url for url in urls)
        assert any("/events?ticket=" in url for url in urls)
        assert page.evaluate("sessionStorage.getItem('dynamo.token')") == CASTER_TOKEN

    with trio.fail_after(TEST_TIMEOUT_S):
        await in_browser(steps, screenshot=tmp_path / "watch-steps.png")


async def test_cancel_a_queued_request(live, fake_openai, fake_ledger, tmp_path):
    fake_openai.hold("moderations")  # the request waits, queued, at step `reserved`

    def steps(page):
        from playwright.sync_api import expect

        sign_in(page, live.url, CASTER_TOKEN)
        page.get_by_label("Subject").fill("a seal to cancel")
        page.get_by_role("button", name="Submit").click()
        queued = page.locator("#in-flight-body li.queued", has_text="a seal to cancel")
        expect(queued).to_have_attribute("data-step", "reserved")
        queued.get_by_role("button", name="Cancel").click()
        cancelled = page.locator("#finished-list li.failed", has_text="a seal to cancel")
        expect(cancelled.locator(".reason")).to_have_text("cancelled")
        expect(page.locator("#in-flight-body li", has_text="a seal to cancel")).to_have_count(0)

    try:
        with trio.fail_after(TEST_TIMEOUT_S):
            await in_browser(steps, screenshot=tmp_path / "cancel.png")
            await fake_ledger.wait_until(lambda: len(fake_ledger.rejected()) == 1)  # refunded
    finally:
        fake_openai.release("moderations")


async def test_a_late_answer_does_not_undo_what_the_stream_showed(
        live, fake_openai, fake_ledger, tmp_path):
    """The cancel's 202 carries the request at step `failing`; held back here until the
    stream has shown the request finished, it must not move it back in flight (the race
    that once made the cancel test fail in CI)."""
    fake_openai.hold("moderations")
    finished = {}

    def steps(page):
        from playwright.sync_api import expect

        sign_in(page, live.url, CASTER_TOKEN)
        page.get_by_label("Subject").fill("a seal answered late")
        page.get_by_role("button", name="Submit").click()
        queued = page.locator("#in-flight-body li.queued", has_text="a seal answered late")
        expect(queued).to_have_attribute("data-step", "reserved")

        def hold_the_answer(route):
            if route.request.method != "DELETE":
                return route.continue_()
            response = route.fetch()
            # The request finishes and the stream shows it before the stale answer lands.
            finished.update(trio.from_thread.run(wait_finished, live.url, response.json()["id"]))
            page.locator("#finished-list li.failed", has_text="a seal answered late").wait_for()
            route.fulfill(response=response)

        page.route("**/requests/*", hold_the_answer)
        with page.expect_request_finished(lambda r: r.method == "DELETE"):
            queued.get_by_role("button", name="Cancel").click()
        expect(page.locator("#finished-list li.failed", has_text="a seal answered late")
               .locator(".reason")).to_have_text("cancelled")
        expect(page.locator("#in-flight-body li", has_text="a seal answered late")).to_have_count(0)
        # And the rule itself, on copies a page can receive in either order.
        newer = page.evaluate("""async () => {
          const { newer } = await import("/web/render.js");
          const failing = { id: "x", step: "failing", state: "processing" };
          const done = { id: "x", step: "done", state: "failed" };
          const later = { id: "x", step: "a-step-from-the-future", state: "processing" };
          return [newer(done, failing).step, newer(failing, done).step, newer(undefined, failing).step,
                  newer(done, later).step];
        }""")
        assert newer == ["done", "done", "failing", "a-step-from-the-future"], newer

    try:
        with trio.fail_after(TEST_TIMEOUT_S):
            await in_browser(steps, screenshot=tmp_path / "late-answer.png")
        assert finished["state"] == "failed" and finished["failure"]["reason"] == "cancelled"
    finally:
        fake_openai.release("moderations")


async def test_a_wrong_token_shows_an_error_and_nothing_else(live, tmp_path):
    await submit(live.url, CASTER_TOKEN, ghost("a secret seal"))

    def steps(page):
        from playwright.sync_api import expect

        page.goto(live.url + "/")
        # By keyboard alone: the token field has the focus, Enter submits.
        page.keyboard.type("not-a-valid-token")
        page.keyboard.press("Enter")
        expect(page.locator("#sign-in-error")).to_have_text("That token was refused.")
        expect(page.locator("#dashboard")).to_be_hidden()
        expect(page.locator("#sign-out")).to_be_hidden()
        assert "a secret seal" not in page.content()
        assert page.evaluate("sessionStorage.getItem('dynamo.token')") is None

    with trio.fail_after(TEST_TIMEOUT_S):
        await in_browser(steps, screenshot=tmp_path / "wrong-token.png")


async def test_a_subject_holding_markup_is_shown_as_text_and_runs_nothing(live, tmp_path):
    """Every value goes in as text (render.js `el`): markup in a subject is shown as it
    was typed, makes no element, and its script never runs."""
    subject = '<img src=x onerror="window.__ran = true"><b>bold</b> seal'
    with trio.fail_after(TEST_TIMEOUT_S):
        request_id = await submit(live.url, CASTER_TOKEN, ghost(subject))
        await wait_finished(live.url, request_id)

    def steps(page):
        from playwright.sync_api import expect

        sign_in(page, live.url, CASTER_TOKEN)
        item = page.locator(f'#finished-list li[data-id="{request_id}"]')
        expect(item.locator(".subject")).to_have_text(subject)
        assert item.locator("b, img[src='x']").count() == 0
        # Were there an <img src=x>, it would have failed to load (and run its onerror).
        page.wait_for_function("[...document.images].every(image => image.complete)")
        assert page.evaluate("window.__ran") is None
        assert page.locator("b", has_text="bold").count() == 0

    with trio.fail_after(TEST_TIMEOUT_S):
        await in_browser(steps, screenshot=tmp_path / "markup-as-text.png")


async def test_a_viewer_sees_only_their_own_requests(live, tmp_path):
    with trio.fail_after(TEST_TIMEOUT_S):
        for request_id in (await submit(live.url, ALICE_TOKEN, ghost("alice's own seal")),
                           await submit(live.url, CASTER_TOKEN, for_viewer(BOB, "bob's walrus"))):
            await wait_finished(live.url, request_id)

        def steps(page):
            from playwright.sync_api import expect

            sign_in(page, live.url, ALICE_TOKEN)
            expect(page.locator("#who")).to_have_text("Alice (viewer)")
            # The API's validation error appears next to its field.
            page.get_by_label("Subject").fill("   ")
            page.get_by_role("button", name="Submit").click()
            expect(page.locator("#subject-error")).to_contain_text("inputs.subject: must be 1 to 120")
            expect(page.get_by_label("Subject")).to_have_attribute("aria-invalid", "true")
            expect(page.locator("#finished-list li", has_text="alice's own seal")).to_be_visible()
            expect(page.locator("#ops")).to_be_hidden()  # the service's state is not hers
            # While the page is open: Bob's new request first, then hers.
            trio.from_thread.run(submit, live.url, CASTER_TOKEN, for_viewer(BOB, "bob's otter"))
            trio.from_thread.run(submit, live.url, ALICE_TOKEN, ghost("alice's second seal"))
            expect(page.locator("[data-id]", has_text="alice's second seal")).to_be_visible()
            expect(page.locator("#finished-list li", has_text="alice's second seal")).to_be_visible()
            text = page.locator("#dashboard").inner_text()
            assert "bob" not in text.lower() and "otter" not in text and "walrus" not in text

        await in_browser(steps, screenshot=tmp_path / "viewer.png")


async def test_the_page_at_phone_width_with_a_failure_sent_again(live, tmp_path):
    with trio.fail_after(TEST_TIMEOUT_S):
        for request_id in (await submit(live.url, CASTER_TOKEN, ghost("a friendly seal")),
                           await submit(live.url, CASTER_TOKEN, for_viewer(BOB, "a forbidden seal"))):
            await wait_finished(live.url, request_id)

        def steps(page):
            from playwright.sync_api import expect

            sign_in(page, live.url, CASTER_TOKEN)
            failed = page.locator("#finished-list li.failed", has_text="a forbidden seal")
            expect(failed.locator(".reason")).to_have_text("rejected")
            expect(failed.locator(".message")).not_to_be_empty()
            expect(page.locator("#finished-list li.succeeded img")).to_be_visible()
            # Nothing wider than the phone: no sideways scrolling.
            assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            failed.get_by_role("button", name="Send").click()
            # A new request for the same viewer and subject (it fails again: rejected).
            expect(page.locator("[data-id]", has_text="a forbidden seal")).to_have_count(2)
            expect(page.locator("#finished-list li.failed", has_text="a forbidden seal")
                   ).to_have_count(2)
            assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            page.evaluate("window.scrollTo(0, 0)")

        await in_browser(steps, screenshot=tmp_path / "phone.png", viewport=PHONE)


async def test_the_stream_reconnects_by_itself_after_the_service_restarts(live, tmp_path):
    def steps(page):
        from playwright.sync_api import expect

        sign_in(page, live.url, CASTER_TOKEN)
        page.evaluate("window.__same_document = true")
        trio.from_thread.run(live.terminate)
        expect(page.locator("#live")).to_have_attribute("data-state", "wait")
        live.start()
        trio.from_thread.run(live.wait_ready)
        expect(page.locator("#live")).to_have_attribute("data-state", "on")
        trio.from_thread.run(submit, live.url, CASTER_TOKEN, ghost("a seal after the restart"))
        expect(page.locator("#finished-list li.succeeded", has_text="a seal after the restart")
               ).to_be_visible()
        assert page.evaluate("window.__same_document") is True

    with trio.fail_after(TEST_TIMEOUT_S):
        await in_browser(steps, screenshot=tmp_path / "reconnected.png")


async def test_status_keys_are_rendered_whether_known_or_not(api, tmp_path):  # noqa: F811
    """/status keys other branches add (models, spend, fleet) and keys nobody has named
    yet all reach the page: render.js is data-driven. The page's own module, on the
    in-process app."""
    require_browser()
    status = {
        "actors": {"http": {"name": "http", "state": "restarting", "restarts": 2,
                            "last_error": "OSError: down"}},
        "rate_limiter": {"kinds": {"image": {"configured_per_minute": 5, "effective_per_minute": 5,
                                             "calls_last_60s": 4, "paused_until": None,
                                             "circuit": "open", "circuit_open": True,
                                             "permits_waiting": 1}}},
        "models": {"image": {"id": "gpt-image-1", "shutdown_date": "2027-01-15", "days_left": 45}},
        "spend": {"today_usd": 1.25, "month_usd": 12.5, "daily_budget_usd": 5.0, "paused": True,
                  "paused_until": "2026-12-02T00:00:00Z"},
        "fleet": {"this_process": "6aabd15d-6fcd-4826-b1c6-5d80ab6c4c35", "processes": [
            {"id": "6aabd15d-6fcd-4826-b1c6-5d80ab6c4c35", "this": True, "host": "a", "pid": 10,
             "http_addr": "127.0.0.1:5008", "started_at": "2026-12-01T21:00:00Z",
             "heartbeat_age_s": 1.25, "requests_in_hand": 3,
             "budget_last_60s": {"image": {"calls": 6, "tokens": 0, "share": 0.75}}},
            {"id": "0b1c2d3e-6fcd-4826-b1c6-5d80ab6c4c35", "this": False, "host": "b", "pid": 11,
             "http_addr": "127.0.0.1:5009", "started_at": "2026-12-01T21:00:00Z",
             "heartbeat_age_s": 4.0, "requests_in_hand": 1,
             "budget_last_60s": {"image": {"calls": 2, "tokens": 0, "share": 0.25}}}],
            "budget_last_60s": {"image": {"calls": 8, "tokens": 0}}},
        "brand_new_key": {"answer": 42},
    }

    def steps(page):
        page.goto(url + "/")
        shown = page.evaluate("""async status => {
            const render = await import("/web/render.js");
            document.body.replaceChildren(
                ...render.warnings(status).map(text => render.el("p", {class: "warning"}, text)),
                ...render.ops(status),
                render.finishedItem({id: "x", state: "succeeded", step: "done", style: "ghost",
                                     inputs: {subject: "a costed seal"}, viewer: {}, images: [],
                                     cost_usd: 0.042}, {onRetry: () => {}, errorFor: () => ""}));
            return document.body.innerText;
        }""", status)
        for text in ("shuts down on 2027-01-15 (45 days left)", "circuit is open",
                     "paused: today's budget is spent", "Actor http is restarting: OSError: down",
                     "$1.25 of $5.00", "$12.50", "gpt-image-1", "brand_new_key",
                     "42", "$0.0420", "4", "Fleet (2 processes)", "6aabd15d (this)", "b · 11",
                     "1.3 s ago", "image 6 (75 %)", "image 2 (25 %)"):
            assert text.lower() in shown.lower(), (text, shown)  # captions are upper-cased

    async with trio.open_nursery() as nursery:
        url = await nursery.start(functools.partial(
            http.run, api=api.context, host="127.0.0.1", port=0))
        with trio.fail_after(TEST_TIMEOUT_S):
            await in_browser(steps, screenshot=tmp_path / "status-keys.png")
        nursery.cancel_scope.cancel()
