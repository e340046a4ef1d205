"""The discord actor: each new ghost and friend posted to its webhook, as the original did.

Receives successful jobs on `discord_recv`, sent by the announcer after the result went
out (so a post never delays the alert or the debit, and cannot change an outcome). Sends
nothing. For a style whose webhook URL is empty, it does nothing at all.

A ghost's post attaches its stored JPEG. A friend's raw generated PNG is deleted from the
database once stored, so its post attaches the stored WEBP laid back onto its detected
background color (`job.image_color`) as a JPEG: the generated image with its background,
up to rounding, which shows better in Discord than the keyed-out WEBP.

Persists one thing: `discord_posted_at`, claimed with `db.mark_discord_posted` *before*
the post. A request is thus posted at most once across restarts and across several
dynamo processes; the price is that a crash between the claim and the post loses that
post. Posts run one at a time, as Discord rate-limits each webhook. A 429 is retried after
its `retry_after`; 5xx, 408 and connection errors up to `MAX_ATTEMPTS` times with backoff,
all within `POST_DEADLINE_S`; another 4xx (a deleted webhook) is not retried. A post given
up is logged with its request id and counted (`dynamo_discord_posts_total{outcome="failed"}`).
No failure of one post leaves this actor.

On shutdown the post in hand is abandoned and jobs still in the channel are dropped:
posts are a courtesy, and the claim already made keeps them from being posted twice.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from dynamo import metrics
from dynamo.discord import webhook as discord_post
from dynamo.domain.jobs import Job, Style
from dynamo.images import processing as imaging
from dynamo.supervision import retry

log = logging.getLogger(__name__)

T = TypeVar("T")

# Attempts at each call of a post (the image download, the webhook) that fail with
# anything but a 429; 429s are waited out as Discord says, within POST_DEADLINE_S.
MAX_ATTEMPTS = 4
# Backoff between those attempts: up to 1, 2, 4 s (full jitter); a 5xx outage at Discord
# is usually short, and a longer one is not worth holding up the posts behind it.
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0
BACKOFF = retry.Backoff(base_s=BACKOFF_BASE_S, cap_s=BACKOFF_CAP_S)
# The whole of one post, rate-limit waits included: posts queue behind the one in hand,
# and the announcer skips posts when the channel is full.
POST_DEADLINE_S = 120.0
# Every post attaches a JPEG, named after the request as the stored image is.
ATTACHMENT_TYPE = "image/jpeg"


async def run(*, settings, db, http_client, discord_recv, task_status=trio.TASK_STATUS_IGNORED):
    webhooks = {
        Style.GHOST: (settings.discord_ghosts_webhook_url or "").strip(),
        Style.FRIEND: (settings.discord_friends_webhook_url or "").strip(),
    }
    log.info(
        "discord posts: ghosts %s, friends %s",
        "on" if webhooks[Style.GHOST] else "off",
        "on" if webhooks[Style.FRIEND] else "off",
    )
    task_status.started()
    async for job in discord_recv:
        url = webhooks.get(job.style)
        if url:
            await _post_once(db, http_client, url, job)


async def _post_once(db, http_client, url: str, job: Job) -> None:
    """Claims the post, then posts; never raises but for cancellation."""
    extra = job.log_extra
    try:
        claimed = await db.mark_discord_posted(job.id)
    except Exception:
        log.warning("discord post not made: could not record it", exc_info=True, extra=extra)
        metrics.DISCORD_POSTS.labels("failed").inc()
        return
    if not claimed:
        log.info("discord post already made (or claimed); skipped", extra=extra)
        return
    outcome = "failed"
    with trio.move_on_after(POST_DEADLINE_S) as deadline:
        try:
            await _post(http_client, url, job)
            outcome = "posted"
        except (retry.CallError, ValueError) as exc:  # given up, or an unreadable image
            log.warning("discord post failed: %s", exc, extra=extra)
        except Exception:  # a bug; trio.Cancelled is a BaseException and goes through
            log.error("discord post failed", exc_info=True, extra=extra)
    if deadline.cancelled_caught:
        log.warning("discord post failed: not done within %.0f s", POST_DEADLINE_S, extra=extra)
    elif outcome == "posted":
        log.info("posted to discord", extra=extra)
    metrics.DISCORD_POSTS.labels(outcome).inc()


async def _post(http_client, url: str, job: Job) -> None:
    if not job.image_url:
        raise ValueError("the request has no stored image")
    stored = await _retrying(
        functools.partial(discord_post.fetch_image, http_client, job.image_url), job
    )
    if job.style is Style.FRIEND:
        image = await trio.to_thread.run_sync(discord_post.flatten_to_jpeg, stored, job.image_color)
        content = discord_post.friend_content(
            job.name or "A new friend", job.viewer.twitch_display_name, job.description
        )
    else:
        # Stored ghosts are JPEGs already; anything else (an older image) is converted.
        image = (
            stored
            if discord_post.is_jpeg(stored)
            else await trio.to_thread.run_sync(imaging.to_jpeg, stored)
        )
        content = discord_post.ghost_content(job.viewer.twitch_display_name, job.description)
    filename = f"{job.id}-0.jpg"
    payload = discord_post.build_payload(content, job.description, filename)
    await _retrying(
        functools.partial(
            discord_post.post_webhook, http_client, url, payload, filename, image, ATTACHMENT_TYPE
        ),
        job,
    )


async def _retrying(call: Callable[[], Awaitable[T]], job: Job) -> T:
    """`await call()`, after each 429 as told, after other transient failures with backoff."""
    failures = 0
    while True:
        try:
            return await call()
        except retry.Transient as exc:
            error = exc  # `exc` is unbound once the except clause ends
            if error.rate_limited and error.retry_after_s is not None:
                delay_s = error.retry_after_s
            else:
                failures += 1
                if failures >= MAX_ATTEMPTS:
                    raise
                delay_s = BACKOFF.delay_s(failures - 1, retry_after_s=error.retry_after_s)
        metrics.RETRIES.labels("discord").inc()
        log.info("%s; retrying in %.2f s", error, delay_s, extra=job.log_extra)
        await trio.sleep(delay_s)
