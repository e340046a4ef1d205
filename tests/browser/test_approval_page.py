"""The "Awaiting approval" panel of the live page in a real browser (headless Chromium,
Playwright) against `python run.py` with DYNAMO_APPROVAL=on on the real RabbitMQ and
PostgreSQL, the fake OpenAI, auth, ledger and moto's S3 (issue 17).

The broadcaster approves and rejects with the buttons and with the keys on a focused
image; the count shows in the tab's title; a decision taken elsewhere (the API, another
process) and a timeout leave the panel live; a viewer sees "waiting for the broadcaster".
Each test saves a screenshot of its end state in its temporary directory."""

from __future__ import annotations

import re

import httpx
import pytest
import trio

from tests.support.browser import in_browser, require_browser, sign_in
from tests.support.service import started
from tests.support.timeouts import SERVICE_S as TEST_TIMEOUT_S
from tests.support.timeouts import STARTUP_S as STARTUP_TIMEOUT_S

pytestmark = pytest.mark.integration

CASTER_TOKEN, ALICE_TOKEN = "caster-token", "alice-token"
CASTER, ALICE = ("42", "GoldenVCR"), ("1001", "Alice")
REJECTED_BY_CASTER = "The broadcaster turned this image down. No points were spent."


@pytest.fixture
async def live(dynamo_process, fake_auth, fake_ledger):
    require_browser()
    fake_auth.add_broadcaster(CASTER_TOKEN, *CASTER)
    fake_auth.add_viewer(ALICE_TOKEN, *ALICE)
    fake_ledger.default_balance = 1_000_000
    return await started(dynamo_process, within_s=STARTUP_TIMEOUT_S,
                         DYNAMO_APPROVAL="on", DYNAMO_APPROVAL_TIMEOUT_S="300")


def for_alice(subject: str, style: str = "ghost") -> dict:
    inputs = {"subject": subject, **({"color": "yellow"} if style == "friend" else {})}
    return {"type": "image", "viewer": {"twitch_user_id": ALICE[0], "twitch_display_name": ALICE[1]},
            "payload": {"style": style, "inputs": inputs}}


async def submit(url: str, body: dict) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{url}/requests", json=body,
                                     headers={"Authorization": f"Bearer {CASTER_TOKEN}"})
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def finished(url: str, request_id: str) -> dict:
    async with httpx.AsyncClient() as client:
        while True:
            body = (await client.get(f"{url}/requests/{request_id}",
                                     headers={"Authorization": f"Bearer {CASTER_TOKEN}"})).json()
            if body["state"] in ("succeeded", "failed"):
                return body
            await trio.sleep(0.1)


async def test_the_broadcaster_approves_and_rejects_with_buttons_and_keys(live, tmp_path):
    url = live.url
    ids = {subject: await submit(url, for_alice(subject, style))
           for subject, style in [("a clicked seal", "ghost"), ("a clicked crab", "friend"),
                                  ("a keyed seal", "ghost"), ("a keyed crab", "ghost")]}

    def steps(page):
        from playwright.sync_api import expect

        sign_in(page, url, CASTER_TOKEN)
        panel = page.locator("#approvals")
        expect(panel).to_be_visible()
        items = page.locator("#approvals-list .approval-item")
        expect(items).to_have_count(4)
        expect(page).to_have_title("(4) awaiting approval · dynamo")
        safety = page.locator("#ops-body table", has_text="Safety")
        expect(safety).to_contain_text("on: reject after 300 s")
        expect(safety).to_contain_text("image screeningon")
        crab = items.filter(has_text="a clicked crab")
        expect(crab.locator(".name")).to_contain_text("Sir Hatsworth")
        expect(crab.locator(".viewer")).to_have_text("Alice")
        expect(crab.locator(".time-left")).to_have_text(
            re.compile(r"^[45]:\d\d left$"))
        # Each image large, loaded through the broadcaster's token (a blob: URL).
        for image in items.locator("img").all():
            expect(image).to_have_attribute("src", re.compile("^blob:"))
            page.wait_for_function("i => i.complete && i.naturalWidth >= 256", arg=image.element_handle())
        assert items.first.locator("img").bounding_box()["width"] >= 256
        page.screenshot(path=str(tmp_path / "panel.png"), full_page=True)

        # The countdown moves by itself.
        before = crab.locator(".time-left").inner_text()
        page.wait_for_function(
            "([el, was]) => el.textContent !== was",
            arg=[crab.locator(".time-left").element_handle(), before])

        # The buttons.
        items.filter(has_text="a clicked seal").get_by_role("button", name="Approve").click()
        crab.get_by_role("button", name="Reject").click()
        expect(items).to_have_count(2)
        expect(page).to_have_title("(2) awaiting approval · dynamo")

        # The keys, on the focused item: A approves, R rejects, and the focus stays
        # on the panel for the next one.
        keyed_seal = items.filter(has_text="a keyed seal")
        keyed_seal.focus()
        page.keyboard.press("a")
        expect(items).to_have_count(1)
        expect(items.first).to_be_focused()
        expect(items.first).to_contain_text("a keyed crab")
        page.keyboard.press("r")
        expect(panel).to_be_hidden()
        expect(page).to_have_title("dynamo · live")

        rejected = page.locator("#finished-list li.failed", has_text="a clicked crab")
        expect(rejected.locator(".message")).to_have_text(REJECTED_BY_CASTER)
        expect(page.locator("#finished-list li.succeeded", has_text="a clicked seal")
               .locator("img")).to_be_visible()

    with trio.fail_after(TEST_TIMEOUT_S):
        await in_browser(steps, screenshot=tmp_path / "approve-reject.png")
        outcomes = {subject: (await finished(url, rid))["state"] for subject, rid in ids.items()}
    assert outcomes == {"a clicked seal": "succeeded", "a clicked crab": "failed",
                        "a keyed seal": "succeeded", "a keyed crab": "failed"}


async def test_decisions_taken_elsewhere_update_the_page_and_a_viewer_sees_waiting(
        live, tmp_path):
    url = live.url
    first = await submit(url, for_alice("a seal decided elsewhere"))
    second = await submit(url, for_alice("a seal for the other tab"))

    def steps(page):
        from playwright.sync_api import expect

        sign_in(page, url, CASTER_TOKEN)
        items = page.locator("#approvals-list .approval-item")
        expect(items).to_have_count(2)
        # The API decides (as another tab or process would): the page follows live.
        trio.from_thread.run(decide, url, first, "approve")
        expect(items).to_have_count(1)
        expect(page).to_have_title("(1) awaiting approval · dynamo")
        # A click on an image another tab has just decided: told, and the panel follows.
        trio.from_thread.run(decide, url, second, "reject")
        expect(items).to_have_count(0)
        expect(page.locator("#approvals")).to_be_hidden()

    def viewer_steps(page):
        from playwright.sync_api import expect

        sign_in(page, url, ALICE_TOKEN)
        waiting = page.locator("#in-flight-body li", has_text="a seal Alice waits for")
        expect(waiting.locator(".waiting")).to_have_text("waiting for the broadcaster")
        expect(page.locator("#approvals")).to_be_hidden()  # the panel is the broadcaster's

    with trio.fail_after(TEST_TIMEOUT_S):
        await in_browser(steps, screenshot=tmp_path / "decided-elsewhere.png")
        await finished(url, first)
        await submit(url, for_alice("a seal Alice waits for"))
        await in_browser(viewer_steps, screenshot=tmp_path / "viewer-waiting.png")


async def decide(url: str, request_id: str, decision: str) -> None:
    async with httpx.AsyncClient() as client:
        while True:  # once it waits
            response = await client.post(f"{url}/requests/{request_id}/{decision}",
                                         headers={"Authorization": f"Bearer {CASTER_TOKEN}"})
            if response.status_code == 202:
                return
            await trio.sleep(0.1)
