"""The fakes speak the real protocols: checked with the real clients (openai, httpx, boto3)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime

import httpx
import openai
import pytest
import trio
import trio.testing
from PIL import Image

from tests.fakes import CHROMA_RGB, FakeAuth, FakeLedger, FakeOpenAI, fixtures
from tests.support.timeouts import FAKES_S as TEST_DEADLINE_S

# The fakes' fixtures, until a conftest provides them to every test module.
fake_auth = fixtures.fake_auth
fake_discord = fixtures.fake_discord
fake_ledger = fixtures.fake_ledger
fake_openai = fixtures.fake_openai
fake_s3 = fixtures.fake_s3

# Every test here talks to localhost only: seconds are plenty, and a hang fails fast.

GHOST_PROMPT = "a ghostly image of a seal, with glitchy VHS artifacts, dark background"
FRIEND_PROMPT = (
    "a yellow caterpillar in a top hat, illustrated in the style of 1990s digital clip art images, "
    "with a limited 256-color palette and sharp black outlines, with a solid indigo background "
    "suitable for chroma keying"
)

# A GPT image model the fake serves today (its tokens per image follow its family).
MODEL = "gpt-image-2.6-flare"


@pytest.fixture
def real_speed_clock() -> trio.testing.MockClock:
    """Runs at wall-clock speed (so fail_after and sockets behave) but can jump ahead."""
    return trio.testing.MockClock(rate=1.0)


def openai_client(fake: FakeOpenAI, api_key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{fake.url}/v1", api_key=api_key, max_retries=0)


async def generate(client: openai.AsyncOpenAI, prompt: str = GHOST_PROMPT, **kwargs):
    return await client.images.generate(
        model="gpt-image-2.6-flare", prompt=prompt, size="1024x1024", n=1, user="90790024", **kwargs
    )


def open_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


# ---- OpenAI ---------------------------------------------------------------------------


async def test_moderation_flags_only_listed_words(fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with openai_client(fake_openai) as client:
            flagged = await client.moderations.create(input="a forbidden seal", model="omni-moderation-latest")
            clean = await client.moderations.create(input="a seal")
    assert flagged.results[0].flagged is True
    assert flagged.results[0].categories.violence is True
    assert clean.results[0].flagged is False
    assert flagged.model == "omni-moderation-latest"
    assert [call.body["input"] for call in fake_openai.calls_to("moderations")] == ["a forbidden seal", "a seal"]
    assert fake_openai.statuses("moderations") == [200, 200]


async def test_image_b64_json_draws_the_chroma_background(fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with openai_client(fake_openai) as client:
            answer = await generate(client, FRIEND_PROMPT)
    item = answer.data[0]
    assert item.url is None and item.b64_json
    image = open_png(base64.b64decode(item.b64_json))
    assert image.size == (1024, 1024)
    assert image.getpixel((0, 0)) == image.getpixel((1023, 1023)) == CHROMA_RGB["indigo"]
    assert image.getpixel((512, 512)) != CHROMA_RGB["indigo"]
    assert fake_openai.calls_to("images")[0].body["user"] == "90790024"


async def test_image_url_is_served_by_the_fake(fake_openai: FakeOpenAI) -> None:
    fake_openai.response_format = "url"
    with trio.fail_after(TEST_DEADLINE_S):
        async with openai_client(fake_openai) as client:
            answer = await generate(client)
        async with httpx.AsyncClient() as http:
            download = await http.get(answer.data[0].url)
    assert answer.data[0].b64_json is None
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    image = open_png(download.content)
    assert image.size == (1024, 1024)
    assert max(image.getpixel((0, 0))) < 40 and min(image.getpixel((512, 512))) > 200


async def test_chat_completion_answers_the_friend_name(fake_openai: FakeOpenAI) -> None:
    fake_openai.friend_name = "Sir Hatsworth"
    with trio.fail_after(TEST_DEADLINE_S):
        async with openai_client(fake_openai) as client:
            answer = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Please come up with a name for a friendly mascot"}],
            )
    assert answer.choices[0].message.content == "Sir Hatsworth"
    assert answer.choices[0].finish_reason == "stop"


async def test_image_rate_limit_is_a_sliding_window(
    fake_openai: FakeOpenAI, real_speed_clock: trio.testing.MockClock
) -> None:
    fake_openai.images_per_minute = 2
    jumped_s = 30 + 31
    with trio.fail_after(TEST_DEADLINE_S + jumped_s):
        async with openai_client(fake_openai) as client:
            first = await client.images.with_raw_response.generate(model="gpt-image-2.6-flare", prompt="a seal")
            real_speed_clock.jump(30)
            await generate(client)
            with pytest.raises(openai.RateLimitError) as refused:
                await generate(client)
            real_speed_clock.jump(31)  # the first call has left the window, not the second
            await generate(client)
            with pytest.raises(openai.RateLimitError):
                await generate(client)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "1m0s"
    error = refused.value
    assert error.code == "rate_limit_exceeded" and error.type == "requests"
    assert 29_000 <= int(error.response.headers["retry-after-ms"]) <= 30_000
    assert error.response.headers["retry-after"] == "30"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.response.headers["x-ratelimit-reset-requests"].endswith("s")
    assert fake_openai.statuses("images") == [200, 200, 429, 200, 429]


async def test_image_token_limit_counts_each_answers_usage(
    fake_openai: FakeOpenAI, real_speed_clock: trio.testing.MockClock
) -> None:
    """Tokens per minute bind before images per minute: two 1024x1024 medium images fit,
    the third is refused with the token headers and message the real API sends."""
    usage = fake_openai.image_usage({"model": MODEL, "prompt": "a seal", "quality": "medium"})
    cost = usage["total_tokens"]
    assert cost == usage["output_tokens"] + usage["input_tokens"] and usage["output_tokens"] > 0
    fake_openai.images_per_minute, fake_openai.image_tokens_per_minute = 100, 2 * cost
    with trio.fail_after(TEST_DEADLINE_S + 61):
        async with openai_client(fake_openai) as client:
            first = await client.images.with_raw_response.generate(
                model=MODEL, prompt="a seal", quality="medium")
            real_speed_clock.jump(20)
            await client.images.generate(model=MODEL, prompt="a seal", quality="medium")
            with pytest.raises(openai.RateLimitError) as refused:
                await client.images.generate(model=MODEL, prompt="a seal", quality="medium")
            real_speed_clock.jump(41)  # the first call's tokens have left the window
            await client.images.generate(model=MODEL, prompt="a seal", quality="low")
    assert first.parse().usage.total_tokens == cost
    assert first.headers["x-ratelimit-limit-tokens"] == str(2 * cost)
    assert first.headers["x-ratelimit-remaining-tokens"] == str(cost)
    assert first.headers["x-ratelimit-reset-tokens"] == "1m0s"
    assert first.headers["x-ratelimit-remaining-requests"] == "99"
    error = refused.value
    assert error.code == "rate_limit_exceeded" and error.type == "tokens"
    assert "tokens per min (TPM)" in error.message and f"Requested {cost}" in error.message
    assert 39_000 <= int(error.response.headers["retry-after-ms"]) <= 40_000
    assert error.response.headers["x-ratelimit-remaining-tokens"] == "0"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "98"
    assert fake_openai.statuses("images") == [200, 200, 429, 200]


async def test_text_rate_limit_covers_chat_and_moderation(fake_openai: FakeOpenAI) -> None:
    fake_openai.text_per_minute = 1
    with trio.fail_after(TEST_DEADLINE_S):
        async with openai_client(fake_openai) as client:
            await client.moderations.create(input="a seal")
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])


async def test_content_policy_violation_is_a_bad_request(fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with openai_client(fake_openai) as client:
            with pytest.raises(openai.BadRequestError) as refused:
                await generate(client, "a ghostly image of something nsfw")
    assert refused.value.code == "content_policy_violation"
    assert refused.value.type == "invalid_request_error"
    assert refused.value.param is None


async def test_scripted_failures_then_normal_answers(fake_openai: FakeOpenAI) -> None:
    fake_openai.script("images", [500, 429, 401, 503])
    with trio.fail_after(TEST_DEADLINE_S):
        async with openai_client(fake_openai) as client:
            with pytest.raises(openai.InternalServerError):
                await generate(client)
            with pytest.raises(openai.RateLimitError) as limited:
                await generate(client)
            with pytest.raises(openai.AuthenticationError) as unauthorized:
                await generate(client)
            with pytest.raises(openai.InternalServerError) as overloaded:
                await generate(client)
            await generate(client)
    assert "retry-after-ms" in limited.value.response.headers
    assert unauthorized.value.code == "invalid_api_key"
    assert overloaded.value.status_code == 503
    assert fake_openai.statuses("images") == [500, 429, 401, 503, 200]


async def test_wrong_api_key_and_outage(fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with openai_client(fake_openai, api_key="sk-wrong") as client:
            with pytest.raises(openai.AuthenticationError) as refused:
                await client.moderations.create(input="a seal")
        fake_openai.down = True
        async with openai_client(fake_openai) as client:
            with pytest.raises(openai.InternalServerError) as unavailable:
                await client.moderations.create(input="a seal")
    assert refused.value.code == "invalid_api_key"
    assert unavailable.value.status_code == 503


async def test_hold_wait_and_release(fake_openai: FakeOpenAI) -> None:
    fake_openai.hold("images")
    answers = []
    with trio.fail_after(TEST_DEADLINE_S):
        async with openai_client(fake_openai) as client, trio.open_nursery() as nursery:

            async def ask() -> None:
                answers.append(await generate(client))

            nursery.start_soon(ask)
            nursery.start_soon(ask)
            calls = await fake_openai.wait_for_calls("images", 2)
            await fake_openai.wait_until(lambda: fake_openai.held_count("images") == 2)
            assert [call.status for call in calls] == [None, None] and answers == []
            fake_openai.release("images")
    assert len(answers) == 2
    assert fake_openai.max_in_flight["images"] == 2


async def test_a_client_gone_mid_request_leaves_the_call_unanswered(fake_openai: FakeOpenAI) -> None:
    fake_openai.hold("images")
    with trio.fail_after(TEST_DEADLINE_S):
        async with openai_client(fake_openai) as client, trio.open_nursery() as nursery:
            nursery.start_soon(generate, client)
            await fake_openai.wait_for_calls("images", 1)
            nursery.cancel_scope.cancel()  # as if the service were killed mid-generation
        await fake_openai.wait_until(lambda: fake_openai.in_flight["images"] == 0)
    assert fake_openai.statuses("images") == [None]


async def test_latency_and_async_on_call_hook(fake_openai: FakeOpenAI) -> None:
    fake_openai.latency_s = {"chat": 0.2}
    seen = []

    async def on_call(call) -> None:
        seen.append(call.endpoint)

    fake_openai.on_call = on_call
    with trio.fail_after(TEST_DEADLINE_S):
        async with openai_client(fake_openai) as client:
            started = trio.current_time()
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            assert trio.current_time() - started >= 0.2
    assert seen == ["chat"]


# ---- auth -----------------------------------------------------------------------------


def signed_headers(secret: str, body: bytes, timestamp: str | None = None) -> dict[str, str]:
    """Signed as golden-vcr's server-common/hmac signer does, written out independently."""
    request_id = str(uuid.uuid4())
    timestamp = timestamp or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    digest = hmac.new(secret.encode(), (request_id + timestamp).encode() + body, hashlib.sha256).hexdigest()
    return {
        "content-type": "application/json",
        "x-hmac-request-id": request_id,
        "x-hmac-request-timestamp": timestamp,
        "x-hmac-signature": f"sha256={digest}",
    }


def service_token_body(user_id: str = "90790024", display_name: str = "WasabiMilkshake") -> bytes:
    user = {"id": user_id, "login": display_name.lower(), "displayName": display_name}
    return json.dumps({"service": "dynamo", "user": user}).encode()


async def fetch_token(http: httpx.AsyncClient, auth: FakeAuth, user_id: str = "90790024") -> str:
    body = service_token_body(user_id)
    answer = await http.post(f"{auth.url}/service-token", content=body, headers=signed_headers(auth.secret, body))
    assert answer.status_code == 200, answer.text
    return answer.text


async def test_service_token_needs_a_good_signature(fake_auth: FakeAuth) -> None:
    body = service_token_body()
    with trio.fail_after(TEST_DEADLINE_S):
        async with httpx.AsyncClient() as http:
            good = await http.post(
                f"{fake_auth.url}/service-token", content=body, headers=signed_headers(fake_auth.secret, body)
            )
            forged = await http.post(
                f"{fake_auth.url}/service-token", content=body, headers=signed_headers("not-the-secret", body)
            )
            stale = await http.post(
                f"{fake_auth.url}/service-token",
                content=body,
                headers=signed_headers(fake_auth.secret, body, timestamp="2020-01-01T00:00:00Z"),
            )
            bad_login = service_token_body(display_name="Wasabi").replace(b'"wasabi"', b'"Wasabi"')
            refused_body = await http.post(
                f"{fake_auth.url}/service-token", content=bad_login, headers=signed_headers(fake_auth.secret, bad_login)
            )
    assert good.status_code == 200
    assert good.headers["content-type"] == "application/jwt"
    header, claims = (json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
                      for part in good.text.split(".")[:2])
    # As golden-vcr/auth's handlePostServiceToken issues it: RS256, 15 minutes.
    assert header["alg"] == "RS256" and header["kid"]
    assert claims == {
        "iss": "https://goldenvcr.com/api/auth", "iat": claims["iat"], "exp": claims["iat"] + 15 * 60,
        "gvcr_service": "dynamo", "twitch_user_id": "90790024",
        "twitch_user_login": "wasabimilkshake", "twitch_display_name": "WasabiMilkshake",
    }  # fmt: skip
    assert abs(claims["iat"] - time.time()) < 5
    assert fake_auth.user_for_token(good.text) == {
        "id": "90790024", "login": "wasabimilkshake", "displayName": "WasabiMilkshake"
    }  # fmt: skip
    assert forged.status_code == 401 and forged.text == "access denied\n"
    assert forged.headers["content-type"] == "text/plain; charset=utf-8"
    assert stale.status_code == 401
    assert refused_body.status_code == 400


async def test_access_answers_registered_tokens(fake_auth: FakeAuth) -> None:
    fake_auth.add_viewer("viewer-token", "111", "Viewer")
    fake_auth.add_broadcaster("broadcaster-token", "222", "TheBroadcaster")
    with trio.fail_after(TEST_DEADLINE_S):
        async with httpx.AsyncClient(base_url=fake_auth.url) as http:
            viewer = await http.get("/access", headers={"authorization": "Bearer viewer-token"})
            broadcaster = await http.get("/access", headers={"authorization": "Bearer broadcaster-token"})
            unknown = await http.get("/access", headers={"authorization": "Bearer nope"})
            fake_auth.down = True
            outage = await http.get("/access", headers={"authorization": "Bearer viewer-token"})
    assert viewer.status_code == 200
    assert viewer.headers["content-type"] == "text/plain; charset=utf-8"
    assert viewer.json() == {"user": {"id": "111", "login": "viewer", "displayName": "Viewer"}, "role": "viewer"}
    assert broadcaster.json()["role"] == "broadcaster"
    assert unknown.status_code == 401
    assert outage.status_code == 503
    assert [call.status for call in fake_auth.calls_to("access")] == [200, 200, 401, 503]


# ---- ledger ---------------------------------------------------------------------------


def outflow_body(request_id: str, points: int = 200) -> dict:
    return {
        "type": "alert-redemption",
        "numPointsToDebit": points,
        "alertType": "image-generation",
        "alertMetadata": {"imageRequestId": request_id, "style": "ghost"},
    }


async def test_ledger_reserve_accept_refund_and_conflicts(fake_auth: FakeAuth, fake_ledger: FakeLedger) -> None:
    request_ids = [str(uuid.uuid4()) for _ in range(6)]
    with trio.fail_after(TEST_DEADLINE_S):
        async with httpx.AsyncClient(base_url=fake_ledger.url) as http:
            token = await fetch_token(http, fake_auth)
            bearer = {"authorization": f"Bearer {token}"}
            reserved = [await http.post("/outflow", json=outflow_body(rid), headers=bearer) for rid in request_ids]
            flow_ids = [answer.json()["flowId"] for answer in reserved[:5]]
            accepted = await http.patch(f"/outflow/{flow_ids[0]}", headers=bearer)
            accepted_again = await http.patch(f"/outflow/{flow_ids[0]}", headers=bearer)
            refund_accepted = await http.delete(f"/outflow/{flow_ids[0]}", headers=bearer)
            refunded = await http.delete(f"/outflow/{flow_ids[1]}", headers=bearer)
            after_refund = await http.post("/outflow", json=outflow_body(request_ids[5]), headers=bearer)
            unknown = await http.patch(f"/outflow/{uuid.uuid4()}", headers=bearer)
            await fake_ledger.wait_for_calls("refund", 2)
    assert [answer.status_code for answer in reserved] == [200] * 5 + [409]
    assert reserved[0].headers["content-type"] == "text/plain; charset=utf-8"
    assert reserved[5].text == "not enough points\n"
    assert (accepted.status_code, accepted_again.status_code, refund_accepted.status_code) == (204, 409, 409)
    assert refunded.status_code == 204 and after_refund.status_code == 200
    assert unknown.status_code == 404
    assert [flow.flow_id for flow in fake_ledger.accepted()] == [flow_ids[0]]
    assert len(fake_ledger.pending()) == 4 and len(fake_ledger.rejected()) == 1
    (first,) = fake_ledger.flows_for(request_ids[0])
    assert first.user_id == "90790024" and first.amount == 200 and first.state == "accepted"
    assert [(method, status) for method, status, _ in first.history] == [
        ("POST", 200), ("PATCH", 204), ("PATCH", 409), ("DELETE", 409)
    ]  # fmt: skip
    assert fake_ledger.available("90790024") == 0


async def test_ledger_refuses_bad_bodies_and_tokens(fake_auth: FakeAuth, fake_ledger: FakeLedger) -> None:
    fake_ledger.balances["90790024"] = 100
    good = outflow_body(str(uuid.uuid4()))
    with trio.fail_after(TEST_DEADLINE_S):
        async with httpx.AsyncClient(base_url=fake_ledger.url) as http:
            token = await fetch_token(http, fake_auth)
            bearer = {"authorization": f"Bearer {token}"}
            too_poor = await http.post("/outflow", json=good, headers=bearer)
            bad_bodies = [
                {**good, "type": "manual-credit"},
                {**good, "numPointsToDebit": 0},
                {**good, "alertMetadata": {"imageRequestId": "not-a-uuid", "style": "ghost"}},
                {key: value for key, value in good.items() if key != "alertType"},
            ]
            refused = [await http.post("/outflow", json=body, headers=bearer) for body in bad_bodies]
            no_token = await http.post("/outflow", json=good)
            unknown_token = await http.post("/outflow", json=good, headers={"authorization": "Bearer forged"})
            fake_auth.expire_tokens()
            expired = await http.post("/outflow", json=good, headers=bearer)
            fake_ledger.down = True
            outage = await http.post("/outflow", json=good, headers=bearer)
    assert too_poor.status_code == 409
    assert [answer.status_code for answer in refused] == [400] * 4
    assert (no_token.status_code, unknown_token.status_code, expired.status_code) == (400, 401, 500)
    # What golden-vcr/auth's RequireAccess answers for a service JWT that jwt/v5 finds expired.
    assert expired.text == "token has invalid claims: token is expired\n"
    assert outage.status_code == 503
    assert fake_ledger.flows == {}


# ---- Discord --------------------------------------------------------------------------


async def test_discord_webhook_multipart(fake_discord) -> None:
    jpeg = b"\xff\xd8\xff\xe0fake-jpeg"
    payload = {"content": "a seal", "embeds": [{"title": "A ghost", "image": {"url": "attachment://ghost.jpg"}}]}
    with trio.fail_after(TEST_DEADLINE_S):
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                fake_discord.webhook_url("42", "secret-token") + "?wait=true",
                data={"payload_json": json.dumps(payload)},
                files={"files[0]": ("ghost.jpg", jpeg, "image/jpeg")},
            )
            no_wait = await http.post(fake_discord.webhook_url(), json={"content": "hello"})
            empty = await http.post(fake_discord.webhook_url(), json={})
    assert answer.status_code == 200
    assert answer.json()["attachments"][0]["filename"] == "ghost.jpg"
    assert no_wait.status_code == 204
    assert empty.status_code == 400 and empty.json()["code"] == 50006
    message = fake_discord.messages[0]
    assert (message.webhook_id, message.token, message.payload) == ("42", "secret-token", payload)
    (attached,) = message.files
    assert (attached.field, attached.filename, attached.content_type, attached.data) == (
        "files[0]", "ghost.jpg", "image/jpeg", jpeg
    )  # fmt: skip
    assert len(fake_discord.messages) == 2
    assert fake_discord.calls[0].path == "/api/webhooks/42/secret-token?wait=true"


async def test_discord_scripted_rate_limit_and_error(fake_discord) -> None:
    fake_discord.script([429, 500])
    with trio.fail_after(TEST_DEADLINE_S):
        async with httpx.AsyncClient() as http:
            answers = [await http.post(fake_discord.webhook_url(), json={"content": "hi"}) for _ in range(3)]
    limited, failed, ok = answers
    assert limited.status_code == 429
    assert limited.json() == {"message": "You are being rate limited.", "retry_after": 0.25, "global": False}
    assert float(limited.headers["retry-after"]) == 0.25
    assert failed.status_code == 500
    assert ok.status_code == 204
    assert len(fake_discord.messages) == 1


# ---- S3 -------------------------------------------------------------------------------


async def test_s3_round_trip_with_boto3(fake_s3) -> None:
    def put_and_get() -> bytes:
        client = fake_s3.client()
        client.put_object(
            Bucket=fake_s3.bucket, Key="id/id-0.jpg", Body=b"jpeg-bytes", ContentType="image/jpeg", ACL="public-read"
        )
        return client.get_object(Bucket=fake_s3.bucket, Key="id/id-0.jpg")["Body"].read()

    with trio.fail_after(TEST_DEADLINE_S):
        stored = await trio.to_thread.run_sync(put_and_get)
        async with httpx.AsyncClient() as http:
            public = await http.get(fake_s3.public_url("id/id-0.jpg"))
    assert stored == b"jpeg-bytes"
    assert public.status_code == 200 and public.content == b"jpeg-bytes"
    assert public.headers["content-type"] == "image/jpeg"
    assert fake_s3.env()["SPACES_ENDPOINT_URL"].startswith("http://127.0.0.1:")


# ---- a service in another process -----------------------------------------------------

SUBPROCESS_CLIENT = """
import os, httpx, openai
client = openai.OpenAI(max_retries=0)  # OPENAI_API_KEY and OPENAI_BASE_URL from the environment
assert client.moderations.create(input="a seal").results[0].flagged is False
image = client.images.generate(model="gpt-image-2.6-flare", prompt="a seal", size="1024x1024", n=1)
assert image.data[0].b64_json
ledger = httpx.post(os.environ["LEDGER_URL"] + "/outflow", json={}, headers={"authorization": "Bearer x"})
assert ledger.status_code == 401, ledger.status_code
print("ok")
"""


async def test_fakes_serve_a_subprocess(fake_openai: FakeOpenAI, fake_ledger: FakeLedger) -> None:
    env = {**os.environ, **fake_openai.env(), **fake_ledger.env()}
    with trio.fail_after(TEST_DEADLINE_S):
        finished = await trio.run_process(
            [sys.executable, "-c", SUBPROCESS_CLIENT], env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    assert finished.returncode == 0, finished.stderr.decode()
    assert finished.stdout == b"ok\n"
    assert fake_openai.counts == {"moderations": 1, "images": 1}
