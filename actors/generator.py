"""The generator pool: moderation, a friend's name, and the image, for reserved requests.

Receives jobs on `generate_recv` (from the rate limiter, one per free worker). For each,
a worker screens the subject with the moderation endpoint (flagged: the request fails as
rejected, no image bought), asks a friend's name (stored in `dynamo.answer`), persists
SCREENED, claims the request (SCREENED → GENERATING: from here on it cannot be cancelled),
generates the image and persists its raw bytes (GENERATED) before sending the job on
`upload_send`. Failures go on `finalize_send` for a refund.

Every OpenAI call first takes a permit from the rate limiter and reports its outcome
back (`permits_send`), so the limiter paces calls and learns from 429s. Transient errors
are retried up to `max_attempts` within the request's deadline; a 401/403 (a bad key)
does not fail requests: the call waits for the limiter's circuit to close.

On shutdown or crash, a job in hand is resumed from its persisted step: a screened
request is not moderated again, a generated image is not bought again.
"""

from __future__ import annotations

import functools
import logging

import trio

from dynamo import metrics, prompts, retry
from dynamo.jobs import Job, Reason, Step, Style
from dynamo.messages import failure
from dynamo.permits import CallKind, CallOutcome, acquire_permit, report_outcome
from dynamo.pipeline import Pipeline, serve_jobs

log = logging.getLogger(__name__)

ACTOR = "generator"


async def run(
    *,
    generator,
    pipeline: Pipeline,
    generate_recv,
    permits_send,
    upload_send,
    finalize_send,
    workers: int,
    max_attempts: int,
    moderation: bool,
    task_status=trio.TASK_STATUS_IGNORED,
):
    task_status.started()
    # One slot per worker: the rate limiter's send completes only when a slot is free.
    await serve_jobs(
        generate_recv,
        actor=ACTOR,
        inflight=pipeline.inflight,
        concurrency=workers,
        step=functools.partial(
            _generate,
            generator,
            pipeline,
            permits_send,
            max_attempts=max_attempts,
            moderation=moderation,
        ),
        outboxes={"generated": upload_send, "failed": finalize_send},
    )


async def _generate(
    generator, pipeline: Pipeline, permits_send, job: Job, *, max_attempts: int, moderation: bool
) -> str:
    """Returns "generated", "failed" or "dropped" (cancelled meanwhile)."""
    call = functools.partial(_call_openai, permits_send, job, max_attempts)
    with trio.move_on_at(job.deadline):
        try:
            if job.step is Step.RESERVED:
                if not await _screen(generator, pipeline, call, job, moderation):
                    return "failed" if job.failure else "dropped"
            started = trio.current_time()
            answer = await call(
                CallKind.IMAGE,
                functools.partial(generator.image, job.prompt, user=job.viewer.twitch_user_id),
                before_call=functools.partial(_claim, pipeline, job),
            )
            metrics.STEP_SECONDS.labels("generate").observe(trio.current_time() - started)
        except _Dropped:
            return "dropped"
        except retry.ContentRejected as exc:
            await pipeline.fail(job, failure(Reason.REJECTED, f"image API refused: {exc}"))
            return "failed"
        except retry.GaveUp as exc:
            reason = Reason.EXPIRED if exc.reason == "deadline" else Reason.ERROR
            await pipeline.fail(job, failure(reason, f"OpenAI: {exc}"))
            return "failed"
        except retry.Permanent as exc:
            await pipeline.fail(job, failure(Reason.ERROR, f"OpenAI: {exc}"))
            return "failed"
        if not await pipeline.db.save_generated(job.id, answer.value):
            return "dropped"
        job.step = Step.GENERATED
        log.info("image generated (%d bytes)", len(answer.value), extra=job.log_extra)
        return "generated"
    await pipeline.fail(job, failure(Reason.EXPIRED, "deadline passed while generating"))
    return "failed"


async def _screen(generator, pipeline: Pipeline, call, job: Job, moderation: bool) -> bool:
    """Moderation, then a friend's name; persists SCREENED. False if the job stops here."""
    started = trio.current_time()
    if moderation:
        subject = job.inputs.get("subject", "")
        flagged = await call(CallKind.TEXT, functools.partial(generator.moderate, subject))
        if flagged.value:
            await pipeline.fail(job, failure(Reason.REJECTED, "moderation flagged the subject"))
            return False
    if job.style is Style.FRIEND and not job.name:
        name_prompt = prompts.name_prompt(job.description)
        answer = await call(CallKind.TEXT, functools.partial(generator.name, name_prompt))
        job.name = prompts.clean_name(answer.value)
        await pipeline.db.save_name(job.id, name_prompt, job.name)
    if not await pipeline.db.advance(job.id, [Step.RESERVED], Step.SCREENED):
        return False
    metrics.STEP_SECONDS.labels("screen").observe(trio.current_time() - started)
    job.step = Step.SCREENED
    return True


async def _claim(pipeline: Pipeline, job: Job) -> None:
    """SCREENED → GENERATING, just before the image is paid for; until then the request
    can be cancelled, also while it waits for its permit."""
    if job.step is Step.SCREENED:
        if not await pipeline.db.advance(job.id, [Step.SCREENED], Step.GENERATING):
            raise _Dropped()
        job.step = Step.GENERATING


async def _call_openai(
    permits_send, job: Job, max_attempts: int, kind: CallKind, fn, before_call=None
):
    """One OpenAI call under the rate limiter and the retry policy."""

    async def attempt():
        permit = await acquire_permit(permits_send, kind)
        if before_call is not None:
            await before_call()
        try:
            answer = await fn()
        except Exception as exc:
            classified = retry.classify_openai(exc, image_call=kind is CallKind.IMAGE)
            status = getattr(exc, "status_code", None) or type(exc).__name__
            metrics.OPENAI_CALLS.labels(kind.value, str(status)).inc()
            headers = getattr(getattr(exc, "response", None), "headers", None)
            if isinstance(classified, retry.AuthFailure):
                log.error(
                    "OpenAI refused the API key (%s); generation paused",
                    status,
                    extra=job.log_extra,
                )
                await report_outcome(
                    permits_send, CallOutcome(kind, auth_failed=True, probe=permit.probe)
                )
                # Not the request's fault: wait for the circuit to close, without
                # spending one of its attempts.
                raise _AuthPaused() from exc
            if getattr(exc, "status_code", None) == 429:
                metrics.OPENAI_RATE_LIMITED.labels(kind.value).inc()
                await report_outcome(
                    permits_send,
                    CallOutcome(
                        kind,
                        rate_limited=True,
                        headers=dict(headers or {}),
                        retry_after_s=getattr(classified, "retry_after_s", None),
                        probe=permit.probe,
                    ),
                )
            else:
                # Reported too, so that a probe's slot is freed at once.
                await report_outcome(permits_send, CallOutcome(kind, probe=permit.probe))
            raise classified from exc
        metrics.OPENAI_CALLS.labels(kind.value, "200").inc()
        await report_outcome(
            permits_send,
            CallOutcome(
                kind,
                succeeded=True,
                headers=answer.headers,
                probe=permit.probe,
                tokens_used=getattr(answer, "tokens_used", None),
                permit=permit,
            ),
        )
        return answer

    while True:
        try:
            return await retry.retrying(
                attempt,
                system="openai",
                log_extra=job.log_extra,
                deadline=job.deadline,
                max_attempts=max_attempts,
                classify=_pass_through,
            )
        except _AuthPaused:
            continue


class _AuthPaused(Exception):
    pass


class _Dropped(Exception):
    """The request moved on (cancelled) before its image was paid for."""


def _pass_through(exc: Exception) -> Exception:
    """`attempt()` raises errors already classified; _AuthPaused goes straight out."""
    if isinstance(exc, (retry.CallError, _AuthPaused, _Dropped)):
        return exc
    return retry.classify_openai(exc)
