"""The image screen: every generated image is judged before anyone can see it.

Receives jobs on `screen_recv` at step GENERATED (the raw image is in the database, and
in hand from the generator: read from the database only for a resumed job). With
DYNAMO_IMAGE_MODERATION on, the image goes to the moderation endpoint as a data URL (a
text permit from the rate limiter first, like any moderation call; its cost recorded, by
itself: no step write follows it at once).
Flagged: the request fails as rejected (`finalize_send`, refunded), its bytes are
dropped, nothing is stored, published or shown. Passed, and with DYNAMO_APPROVAL on: the
request moves to AWAITING_APPROVAL and leaves the pipeline (no worker, no permit held;
`dynamo.safety.approval` routes it once decided). Passed without approval: on to `upload_send`.

The moderation call is bounded by the request's deadline (then: expired, refunded); an
API that keeps failing fails the request as error: an unscreened image is never shown.
On shutdown or crash the job resumes from GENERATED and is screened again (free).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import trio

from dynamo import metrics
from dynamo.database.approval import ApprovalQueries
from dynamo.domain.jobs import Job, Reason, Step
from dynamo.domain.viewer_messages import failure
from dynamo.inflight.pipeline import Pipeline, serve_jobs
from dynamo.limits.permits import CallKind
from dynamo.openai_port.call import call_openai
from dynamo.openai_port.client import GeneratorPort
from dynamo.openai_port.spend import IMAGE_MODERATION, Spend
from dynamo.supervision import outages, retry

log = logging.getLogger(__name__)

ACTOR = "image_screen"
# Screenings at once: each is one short, free call; more only queue for permits.
SCREEN_CONCURRENCY = 4


@dataclasses.dataclass(frozen=True)
class ScreenSettings:
    image_moderation: bool
    approval: bool
    approval_timeout_s: float
    max_attempts: int


async def run(
    *,
    generator: GeneratorPort,
    pipeline: Pipeline,
    screen_recv: trio.MemoryReceiveChannel[Job],
    permits_send: trio.MemorySendChannel[Any],
    upload_send: trio.MemorySendChannel[Job],
    finalize_send: trio.MemorySendChannel[Job],
    settings: ScreenSettings,
    spend: Spend | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
):
    task_status.started()
    screen = functools.partial(
        _screen, _Screen(generator, pipeline, permits_send, spend, settings)
    )
    await serve_jobs(
        screen_recv,
        actor=ACTOR,
        inflight=pipeline.inflight,
        pipeline=pipeline,
        concurrency=SCREEN_CONCURRENCY,
        step=outages.patient_step(pipeline.dependencies, pipeline, screen),
        outboxes={"passed": upload_send, "failed": finalize_send},
    )


@dataclasses.dataclass
class _Screen:
    generator: GeneratorPort
    pipeline: Pipeline
    permits_send: trio.MemorySendChannel[Any]
    spend: Spend | None
    settings: ScreenSettings


async def _screen(screen: _Screen, job: Job) -> str:
    """Returns "passed", "failed", "waiting" (for the broadcaster) or "dropped"."""
    pipeline = screen.pipeline
    if job.step is Step.APPROVED:
        return "passed"  # judged and decided before a restart
    if job.step is not Step.GENERATED:
        return "dropped"
    if screen.settings.image_moderation:
        verdict = await _judge(screen, job)
        if verdict != "passed":
            return verdict
    if not screen.settings.approval:
        return "passed"
    queries = ApprovalQueries(pipeline.db)
    if not await queries.await_approval(job.id, screen.settings.approval_timeout_s):
        return "dropped"
    job.step = Step.AWAITING_APPROVAL
    log.info("image awaits the broadcaster's approval", extra=job.log_extra)
    # Out of the pipeline: nothing holds it while it waits; the decision routes it.
    pipeline.inflight.finish(job.id)
    return "waiting"


async def _judge(screen: _Screen, job: Job) -> str:
    pipeline = screen.pipeline
    # In hand from the generator (left there for the uploader), or stored, if resumed.
    raw = job.generated
    if raw is None:
        raw = await pipeline.db.load_generated(job.id)
    if raw is None:
        await pipeline.fail(job, failure(Reason.ERROR, "generated image missing"))
        return "failed"
    started = trio.current_time()
    answer = None
    with trio.move_on_at(job.deadline):
        try:
            answer = await call_openai(
                screen.permits_send,
                CallKind.TEXT,
                functools.partial(screen.generator.moderate_image, raw),
                deadline=job.deadline,
                max_attempts=screen.settings.max_attempts,
                log_extra=job.log_extra,
            )
        except retry.GaveUp as exc:
            reason = Reason.EXPIRED if exc.reason == "deadline" else Reason.ERROR
            await pipeline.fail(job, failure(reason, f"image not screened: {exc}"))
            return "failed"
        except retry.CallError as exc:
            await pipeline.fail(job, failure(Reason.ERROR, f"image not screened: {exc}"))
            return "failed"
    if answer is None:
        expired = failure(Reason.EXPIRED, "deadline passed while screening the image")
        await pipeline.fail(job, expired)
        return "failed"
    if screen.spend is not None and answer.model is not None:
        # Answered, so written past the deadline too; the row is built once, so a write
        # tried again after an outage writes it once.
        cost = screen.spend.row(job.id, IMAGE_MODERATION, answer)
        write = functools.partial(screen.spend.write, [cost])
        await outages.patiently(pipeline.dependencies, write)
    metrics.STEP_SECONDS.labels("screen_image").observe(trio.current_time() - started)
    if not answer.value.flagged:
        return "passed"
    metrics.IMAGES_FLAGGED.inc()
    job.generated = None  # never to be stored
    detail = f"moderation flagged the generated image: {answer.value.describe()}"
    moved = await pipeline.fail(job, failure(Reason.REJECTED, detail))
    await ApprovalQueries(pipeline.db).flag_image(job.id)
    return "failed" if moved else "dropped"
