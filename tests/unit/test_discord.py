"""Discord posts: the original's messages, escaped, to a fake webhook on 127.0.0.1.

The actor is driven by feeding its inbox and closing it: `run` returns once every job in
hand is dealt with. The database is an in-memory stand-in for `mark_discord_posted`;
stored images are served by an httpx mock mounted for their host only, while the
webhook calls go over TCP to `FakeDiscord`.
"""

from __future__ import annotations

import io
import json
import socket
import uuid

import httpx
import pytest
import trio
from PIL import Image

from actors import discord
from dynamo import config, metrics
from dynamo.discord import webhook as discord_post
from dynamo.domain.jobs import Job, Step, Style, Viewer
from dynamo.images import processing as imaging
from dynamo.supervision import retry
from tests.fakes import FakeDiscord, pictures
from tests.support.timeouts import FAKES_S as REAL_TEST_S
from tests.support.timeouts import VIRTUAL_S as AUTOJUMP_TEST_S

# Under the autojump clock these are virtual seconds, far beyond POST_DEADLINE_S.
# Real seconds, for tests that run image processing in a worker thread.
IMAGE_HOST = "http://images.test"
VIEWER = Viewer("90790024", "wasabi_milkshake")
FRIEND_PROMPT = "a yellow caterpillar, with a solid indigo background suitable for chroma keying"


class FakeDb:
    """`mark_discord_posted` as the real one behaves: True once per request id."""

    def __init__(self) -> None:
        self.posted: set[uuid.UUID] = set()
        self.claims: list[uuid.UUID] = []
        self.broken = False

    async def mark_discord_posted(self, request_id: uuid.UUID) -> bool:
        self.claims.append(request_id)
        if self.broken:
            raise OSError("database unreachable")
        if request_id in self.posted:
            return False
        self.posted.add(request_id)
        return True


class ImageHost:
    """Stored images by path; `failures` are statuses answered before the image."""

    def __init__(self) -> None:
        self.images: dict[str, tuple[bytes, str]] = {}
        self.failures: list[int] = []
        self.gets: list[str] = []

    def put(self, key: str, data: bytes, content_type: str) -> str:
        self.images[f"/{key}"] = (data, content_type)
        return f"{IMAGE_HOST}/{key}"

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.gets.append(request.url.path)
        if self.failures:
            return httpx.Response(self.failures.pop(0), text="nope")
        if request.url.path not in self.images:
            return httpx.Response(404, text="NoSuchKey")
        data, content_type = self.images[request.url.path]
        return httpx.Response(200, content=data, headers={"content-type": content_type})


@pytest.fixture
def image_host() -> ImageHost:
    return ImageHost()


def client_for(image_host: ImageHost, *, timeout: float | None = 30.0) -> httpx.AsyncClient:
    """Real HTTP to the webhook; stored images from `image_host`."""
    return httpx.AsyncClient(mounts={IMAGE_HOST: httpx.MockTransport(image_host.handle)},
                             timeout=timeout)


@pytest.fixture
async def http_client(image_host: ImageHost):
    async with client_for(image_host) as client:
        yield client


def settings_for(*, ghosts: str = "", friends: str = "") -> config.Settings:
    return config.load({"DISCORD_GHOSTS_WEBHOOK_URL": ghosts, "DISCORD_FRIENDS_WEBHOOK_URL": friends})


def ghost_jpeg() -> bytes:
    return imaging.to_jpeg(pictures.png_for_prompt("a ghostly seal", size=(64, 64)))


def ghost_job(image_host: ImageHost, *, display_name: str = "wasabi_milkshake",
              description: str = "a seal") -> Job:
    request_id = uuid.uuid4()
    url = image_host.put(f"{request_id}/{request_id}-0.jpg", ghost_jpeg(), "image/jpeg")
    return Job(id=request_id, viewer=Viewer(VIEWER.twitch_user_id, display_name), style=Style.GHOST,
               inputs={"subject": description}, prompt=f"a ghostly image of {description}",
               description=description, deadline=900.0, step=Step.DONE, image_url=url,
               image_color="#000000")


def friend_job(image_host: ImageHost) -> tuple[Job, bytes, str]:
    """A friend as the uploader stores it: (job, keyed-out WEBP, background color)."""
    request_id = uuid.uuid4()
    webp, color = imaging.key_out_background(pictures.png_for_prompt(FRIEND_PROMPT, size=(128, 128)))
    url = image_host.put(f"{request_id}/{request_id}-0.webp", webp, "image/webp")
    job = Job(id=request_id, viewer=VIEWER, style=Style.FRIEND,
              inputs={"color": "yellow", "subject": "caterpillar"}, prompt=FRIEND_PROMPT,
              description="a caterpillar", deadline=900.0, step=Step.DONE, name="Sir Wiggles",
              image_url=url, image_color=color)
    return job, webp, color


async def run_actor(settings, db, http_client, jobs: list[Job]) -> None:
    """Runs the actor over `jobs` until its inbox is empty and closed."""
    send, recv = trio.open_memory_channel(len(jobs))
    with send:
        for job in jobs:
            send.send_nowait(job)
    await discord.run(settings=settings, db=db, http_client=http_client, discord_recv=recv)


def posts(outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("dynamo_discord_posts_total", {"outcome": outcome}) or 0.0


def expected_body(boundary: str, payload_json: str, filename: str, image: bytes) -> bytes:
    return (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="payload_json"\r\n'
        "Content-Type: application/json\r\n\r\n"
        f"{payload_json}\r\n"
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="files[0]"; filename="{filename}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + image + f"\r\n--{boundary}--\r\n".encode()


def boundary_of(content_type: str) -> str:
    kind, _, boundary = content_type.partition("; boundary=")
    assert kind == "multipart/form-data"
    return boundary


# ---- formatting ------------------------------------------------------------------------


def test_escape_markdown():
    assert discord_post.escape_markdown("a *b* _c_ ~~d~~ `e` ||f|| > g") == (
        r"a \*b\* \_c\_ \~\~d\~\~ \`e\` \|\|f\|\| \> g")
    # A viewer's backslash cannot cancel our escape of the character after it.
    assert discord_post.escape_markdown(r"\*x") == r"\\\*x"
    assert discord_post.escape_markdown("one\ntwo\r\n# three") == "one two # three"
    assert discord_post.escape_markdown("plain text, @here") == "plain text, @here"


def test_contents_are_the_originals():
    assert discord_post.ghost_content("wasabimilkshake", "a seal") == (
        "Ghost from **wasabimilkshake**: _a seal_")
    assert discord_post.friend_content("Sir Hatsworth", "wasabimilkshake", "a caterpillar") == (
        "**Sir Hatsworth**, friend of **wasabimilkshake**: _a caterpillar_")
    assert discord_post.ghost_content("wasabi_milkshake", "a *seal*") == (
        r"Ghost from **wasabi\_milkshake**: _a \*seal\*_")


def test_build_payload():
    assert discord_post.build_payload("hi", "a seal", "x-0.jpg") == {
        "content": "hi",
        "allowed_mentions": {"parse": []},
        "attachments": [{"id": 0, "description": "a seal", "filename": "x-0.jpg"}],
    }


def test_flatten_to_jpeg_restores_the_background():
    webp, color = imaging.key_out_background(pictures.png_for_prompt(FRIEND_PROMPT, size=(128, 128)))
    image = Image.open(io.BytesIO(discord_post.flatten_to_jpeg(webp, color)))
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (128, 128)
    background = pictures.CHROMA_RGB["indigo"]
    figure = tuple(255 - channel for channel in background)
    for point, expected in [((2, 2), background), ((125, 125), background), ((64, 64), figure)]:
        assert all(abs(a - b) <= 6 for a, b in zip(image.getpixel(point), expected)), point
    with pytest.raises(ValueError):
        discord_post.flatten_to_jpeg(webp, "indigo")
    with pytest.raises(ValueError):
        discord_post.flatten_to_jpeg(b"<html>not an image</html>", color)


@pytest.mark.parametrize(("headers", "body", "expected_s"), [
    ({"retry-after": "3"}, {"message": "You are being rate limited.", "retry_after": 0.42}, 0.42),
    ({"retry-after": "3"}, None, 3.0),  # Cloudflare's HTML 429: the header only
    ({}, None, discord_post.DEFAULT_RETRY_AFTER_S),
])
async def test_rate_limit_is_classified_with_its_wait(headers, body, expected_s):
    def answer(request: httpx.Request) -> httpx.Response:
        if body is None:
            return httpx.Response(429, headers=headers, text="<html>slow down</html>")
        return httpx.Response(429, headers=headers, json=body)

    with trio.fail_after(REAL_TEST_S):
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            with pytest.raises(retry.Transient) as caught:
                await discord_post.post_webhook(client, "https://discord.test/api/webhooks/1/t",
                                                {"content": "x"}, "x.jpg", b"\xff\xd8\xff", "image/jpeg")
    assert caught.value.rate_limited
    assert caught.value.retry_after_s == expected_s
    assert "/1/t" not in str(caught.value)  # the token never reaches a message


@pytest.mark.parametrize(("status", "kind"), [
    (500, retry.Transient), (502, retry.Transient), (404, retry.Permanent), (400, retry.Permanent),
])
async def test_other_failures_are_classified(status, kind):
    with trio.fail_after(REAL_TEST_S):
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(lambda request: httpx.Response(status, json={"code": 0}))
        ) as client:
            with pytest.raises(kind):
                await discord_post.post_webhook(client, "https://discord.test/api/webhooks/1/t",
                                                {"content": "x"}, "x.jpg", b"\xff\xd8\xff", "image/jpeg")


# ---- the actor against the fake webhook -------------------------------------------------


async def test_ghost_post_exact_body(fake_discord: FakeDiscord, image_host, http_client, autojump_clock):
    with trio.fail_after(AUTOJUMP_TEST_S):
        job = ghost_job(image_host)
        posted_before = posts("posted")
        await run_actor(settings_for(ghosts=fake_discord.webhook_url("1001", "ghosts-token")),
                        FakeDb(), http_client, [job])
    [call] = fake_discord.calls_to("webhook")
    assert call.path == "/api/webhooks/1001/ghosts-token"
    filename = f"{job.id}-0.jpg"
    payload_json = json.dumps({
        "content": "Ghost from **wasabi\\_milkshake**: _a seal_",
        "allowed_mentions": {"parse": []},
        "attachments": [{"id": 0, "description": "a seal", "filename": filename}],
    }, separators=(",", ":"))
    boundary = boundary_of(call.headers["content-type"])
    assert call.raw == expected_body(boundary, payload_json, filename, ghost_jpeg())
    [message] = fake_discord.messages
    assert [(f.field, f.filename, f.content_type) for f in message.files] == [
        ("files[0]", filename, "image/jpeg")]
    assert message.files[0].data == ghost_jpeg()  # the stored JPEG, as it is
    assert posts("posted") == posted_before + 1


async def test_friend_post_exact_body(fake_discord: FakeDiscord, image_host, http_client):
    # Real clock: the JPEG is made in a worker thread, which the autojump clock would skip past.
    with trio.fail_after(REAL_TEST_S):
        job, webp, color = friend_job(image_host)
        await run_actor(settings_for(friends=fake_discord.webhook_url("1002", "friends-token")),
                        FakeDb(), http_client, [job])
    [call] = fake_discord.calls_to("webhook")
    assert call.path == "/api/webhooks/1002/friends-token"
    filename = f"{job.id}-0.jpg"
    payload_json = json.dumps({
        "content": "**Sir Wiggles**, friend of **wasabi\\_milkshake**: _a caterpillar_",
        "allowed_mentions": {"parse": []},
        "attachments": [{"id": 0, "description": "a caterpillar", "filename": filename}],
    }, separators=(",", ":"))
    jpeg = discord_post.flatten_to_jpeg(webp, color)
    assert call.raw == expected_body(boundary_of(call.headers["content-type"]), payload_json,
                                     filename, jpeg)
    image = Image.open(io.BytesIO(fake_discord.messages[0].files[0].data))
    assert image.format == "JPEG"
    # The background is back in place: the corners are the generated background color.
    assert all(abs(a - b) <= 6 for a, b in zip(image.getpixel((0, 0)), pictures.CHROMA_RGB["indigo"]))


async def test_user_text_is_escaped_and_pings_nobody(fake_discord: FakeDiscord, image_host,
                                                     http_client, autojump_clock):
    with trio.fail_after(AUTOJUMP_TEST_S):
        job = ghost_job(image_host, display_name="__x__",
                        description="a *seal* ~~with~~ `code` ||spoiler|| > @everyone <@123> @here")
        await run_actor(settings_for(ghosts=fake_discord.webhook_url()), FakeDb(), http_client, [job])
    [message] = fake_discord.messages
    assert message.payload["content"] == (
        r"Ghost from **\_\_x\_\_**: _a \*seal\* \~\~with\~\~ \`code\` \|\|spoiler\|\| \> "
        r"@everyone <@123\> @here_")
    assert message.payload["allowed_mentions"] == {"parse": []}
    # Alt text is not markdown: it stays as the viewer wrote it.
    assert message.payload["attachments"][0]["description"] == job.description


async def test_rate_limit_is_retried_after_retry_after(fake_discord: FakeDiscord, image_host,
                                                       http_client, autojump_clock):
    fake_discord.retry_after_s = 2.5
    fake_discord.script([429])
    with trio.fail_after(AUTOJUMP_TEST_S):
        posted_before, failed_before = posts("posted"), posts("failed")
        await run_actor(settings_for(ghosts=fake_discord.webhook_url()), FakeDb(), http_client,
                        [ghost_job(image_host)])
    first, second = fake_discord.calls_to("webhook")
    assert (first.status, second.status) == (429, 204)
    assert 2.5 <= second.time - first.time < 3.0
    assert len(fake_discord.messages) == 1
    assert (posts("posted"), posts("failed")) == (posted_before + 1, failed_before)


async def test_failing_webhook_gives_up_and_the_actor_goes_on(fake_discord: FakeDiscord, image_host,
                                                              http_client, autojump_clock):
    fake_discord.script([500] * discord.MAX_ATTEMPTS)
    jobs = [ghost_job(image_host), ghost_job(image_host)]
    with trio.fail_after(AUTOJUMP_TEST_S):
        posted_before, failed_before = posts("posted"), posts("failed")
        await run_actor(settings_for(ghosts=fake_discord.webhook_url()), FakeDb(), http_client, jobs)
    assert fake_discord.statuses("webhook") == [500] * discord.MAX_ATTEMPTS + [204]
    assert [m.payload["attachments"][0]["filename"] for m in fake_discord.messages] == [
        f"{jobs[1].id}-0.jpg"]
    assert (posts("posted"), posts("failed")) == (posted_before + 1, failed_before + 1)


async def test_webhook_down_is_still_fine(fake_discord: FakeDiscord, image_host, http_client,
                                          autojump_clock):
    fake_discord.down = True
    with socket.socket() as unused:  # a port nobody listens on: connection refused
        unused.bind(("127.0.0.1", 0))
        refused_url = f"http://127.0.0.1:{unused.getsockname()[1]}/api/webhooks/1/token"
    with trio.fail_after(AUTOJUMP_TEST_S):
        failed_before = posts("failed")
        await run_actor(settings_for(ghosts=fake_discord.webhook_url()), FakeDb(), http_client,
                        [ghost_job(image_host)])
        await run_actor(settings_for(ghosts=refused_url), FakeDb(), http_client,
                        [ghost_job(image_host)])
    assert fake_discord.statuses("webhook") == [503] * discord.MAX_ATTEMPTS
    assert fake_discord.messages == []
    assert posts("failed") == failed_before + 2


async def test_unanswered_webhook_gives_up_at_the_deadline(fake_discord: FakeDiscord, image_host,
                                                           autojump_clock):
    fake_discord.hold("webhook")
    async with client_for(image_host, timeout=None) as client:  # only the actor's deadline
        with trio.fail_after(AUTOJUMP_TEST_S):
            failed_before = posts("failed")
            started = trio.current_time()
            await run_actor(settings_for(ghosts=fake_discord.webhook_url()), FakeDb(), client,
                            [ghost_job(image_host)])
            assert trio.current_time() - started == pytest.approx(discord.POST_DEADLINE_S)
    fake_discord.release()
    assert posts("failed") == failed_before + 1


async def test_restart_after_a_post_does_not_post_again(fake_discord: FakeDiscord, image_host,
                                                        http_client, autojump_clock):
    db = FakeDb()
    job = ghost_job(image_host)
    settings = settings_for(ghosts=fake_discord.webhook_url())
    with trio.fail_after(AUTOJUMP_TEST_S):
        await run_actor(settings, db, http_client, [job])
        # The same request again, as a resumed or redelivered one would come, to a new actor.
        await run_actor(settings, db, http_client, [job])
    assert db.claims == [job.id, job.id]
    assert fake_discord.count("webhook") == 1
    assert len(fake_discord.messages) == 1


async def test_unset_webhook_posts_nothing(fake_discord: FakeDiscord, image_host, http_client,
                                           autojump_clock):
    db = FakeDb()
    friend, _, _ = friend_job(image_host)
    with trio.fail_after(AUTOJUMP_TEST_S):
        posted_before, failed_before = posts("posted"), posts("failed")
        await run_actor(settings_for(ghosts=fake_discord.webhook_url()), db, http_client, [friend])
        await run_actor(settings_for(ghosts=" ", friends=""), db, http_client, [ghost_job(image_host)])
    assert db.claims == []
    assert fake_discord.calls == [] and image_host.gets == []
    assert (posts("posted"), posts("failed")) == (posted_before, failed_before)


async def test_image_download_is_retried_then_given_up(fake_discord: FakeDiscord, image_host,
                                                       http_client, autojump_clock):
    image_host.failures = [503]
    missing = ghost_job(image_host)
    del image_host.images[f"/{missing.id}/{missing.id}-0.jpg"]
    with trio.fail_after(AUTOJUMP_TEST_S):
        failed_before = posts("failed")
        await run_actor(settings_for(ghosts=fake_discord.webhook_url()), FakeDb(), http_client,
                        [ghost_job(image_host), missing])
    assert len(fake_discord.messages) == 1  # the first after one retry; the missing one never
    assert image_host.gets[-1] == f"/{missing.id}/{missing.id}-0.jpg"
    assert posts("failed") == failed_before + 1


async def test_database_error_skips_the_post(fake_discord: FakeDiscord, image_host, http_client,
                                             autojump_clock):
    db = FakeDb()
    db.broken = True
    with trio.fail_after(AUTOJUMP_TEST_S):
        failed_before = posts("failed")
        await run_actor(settings_for(ghosts=fake_discord.webhook_url()), db, http_client,
                        [ghost_job(image_host)])
    assert fake_discord.calls == []
    assert posts("failed") == failed_before + 1


async def test_cancellation_is_not_swallowed(fake_discord: FakeDiscord, image_host, http_client):
    fake_discord.hold("webhook")
    with trio.fail_after(REAL_TEST_S):
        failed_before = posts("failed")
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_actor, settings_for(ghosts=fake_discord.webhook_url()),
                                   FakeDb(), http_client, [ghost_job(image_host)])
                await fake_discord.wait_until(lambda: fake_discord.held_count("webhook") == 1)
                scope.cancel()
    fake_discord.release()
    assert scope.cancelled_caught
    assert posts("failed") == failed_before  # a cancelled post is neither failed nor posted
