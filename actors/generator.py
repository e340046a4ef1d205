"""The generator pool: moderation, a friend's name, and the image, for reserved requests.

Receives jobs on `generate_recv` (from the rate limiter, one per free worker). For each,
a worker screens the subject with the moderation endpoint (flagged: the request fails as
rejected, no image bought), asks a friend's name (stored in `dynamo.answer`), persists
SCREENED, claims the request (SCREENED → GENERATING: from here on it cannot be cancelled),
generates the image and persists its raw bytes (GENERATED) before sending the job on
`upload_send` (the service wires it to the image screen, which judges every image
before it can be stored). Failures go on `finalize_send` for a refund.

Every OpenAI call goes through `openai_call.call_openai` (a permit from the rate limiter
first, its outcome reported after, transient errors retried within the request's
deadline) and is recorded with its model, usage and cost (`spend`): in the same statement
as the step write that follows it (the moderation's and a friend's name's with RESERVED →
SCREENED, the image's with GENERATING → GENERATED), written even if the request moved on
meanwhile; a call that no step write follows (a flagged subject, a name that failed)
has its cost written by itself before the request fails. While today's spend
is at the daily budget, requests fail at once as `error` with a sentence saying image
alerts are paused for today (refunded); the budget is checked again right before the
image is paid for. A reasoning model that leaves no room for the name is asked once more
with more room; then the friend is named after its subject: never an empty or cut-off
name on stream.

The request's deadline bounds the waits (for a permit, for OpenAI's answer), never the
writes of what was already paid for: an image bought before the deadline is stored, and
every answered call's cost recorded, however long the database takes to come back (the
writes wait outages out, so no call is made again for want of a write; a cost is
written once however often its write is tried). On shutdown, costs not written yet get
`LEFT_COSTS_S` more.

On shutdown or crash, a job in hand is resumed from its persisted step: a screened
request is not moderated again, a generated image is not bought again.
"""

from __future__ import annotations

import functools
import logging

import trio

from dynamo import metrics
from dynamo.database.spend_store import CallCost
from dynamo.domain import prompts
from dynamo.domain.jobs import Failure, Job, Reason, Step, Style
from dynamo.domain.viewer_messages import failure
from dynamo.inflight.pipeline import Pipeline, serve_jobs
from dynamo.limits.permits import CallKind
from dynamo.openai_port.call import call_openai
from dynamo.openai_port.client import GeneratorPort
from dynamo.openai_port.dialect import ImageOrder
from dynamo.openai_port.spend import IMAGE, MODERATION, NAME, Spend
from dynamo.supervision import outages, retry

log = logging.getLogger(__name__)

ACTOR = "generator"
# Asks for a friend's name: the first, and one more with more room (dialect.NAME_ROOM).
NAME_ATTEMPTS = 2
BUDGET_PAUSED_MESSAGE = "Image alerts are paused for today. No points were spent."
# How long a job that is going down (shutdown, a bug) still tries to write the costs of
# its answered calls: a row is small, the database is usually there.
LEFT_COSTS_S = 5.0


async def run(
    *,
    generator: GeneratorPort,
    pipeline: Pipeline,
    generate_recv,
    permits_send,
    upload_send,
    finalize_send,
    workers: int,
    max_attempts: int,
    moderation: bool,
    spend: Spend | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
):
    task_status.started()
    # One slot per worker: the rate limiter's send completes only when a slot is free.
    await serve_jobs(
        generate_recv,
        actor=ACTOR,
        inflight=pipeline.inflight,
        pipeline=pipeline,
        concurrency=workers,
        step=outages.patient_step(
            pipeline.dependencies,
            pipeline,
            functools.partial(
                _generate,
                _Worker(generator, pipeline, permits_send, spend, max_attempts),
                moderation=moderation,
            ),
        ),
        outboxes={"generated": upload_send, "failed": finalize_send},
    )


class _Worker:
    """What every job's steps share: the ports, and how one OpenAI call is made."""

    def __init__(self, generator: GeneratorPort, pipeline: Pipeline, permits_send, spend, max_attempts: int):
        self.generator = generator
        self.pipeline = pipeline
        self.permits_send = permits_send
        self.spend = spend
        self.max_attempts = max_attempts

    async def call(self, job: Job, paid: list[CallCost], kind: CallKind, what: str, fn, **kwargs):
        """The call's answer; raises _DeadlinePassed if the request's deadline came first.
        Its cost joins `paid`, for the write that follows, which no deadline bounds."""
        answer = None
        with trio.move_on_at(job.deadline):
            answer = await call_openai(
                self.permits_send,
                kind,
                fn,
                deadline=job.deadline,
                max_attempts=self.max_attempts,
                log_extra=job.log_extra,
                **kwargs,
            )
        if answer is None:
            raise _DeadlinePassed()
        if self.spend is not None and answer.model is not None:
            paid.append(self.spend.row(job.id, what, answer))
        return answer

    async def write_step(self, job: Job, paid: list[CallCost], write, *, done_at) -> bool:
        """`write(costs=...)`, a step's compare-and-set that also writes the costs in
        `paid` (moved or not), until the database takes it: an outage never makes the
        step run, and pay, again. Whether it moved the request (`patient_write`)."""
        costs = list(paid)
        moved = await outages.patient_write(
            self.pipeline.dependencies,
            self.pipeline,
            job.id,
            functools.partial(write, costs=costs),
            done_at=done_at,
        )
        del paid[: len(costs)]
        if self.spend is not None:
            self.spend.counted(costs)
        return moved

    async def write_costs(self, paid: list[CallCost]) -> None:
        """The costs in `paid` written by themselves: no step write follows their calls."""
        if self.spend is None or not paid:
            return
        costs = list(paid)
        await outages.patiently(
            self.pipeline.dependencies, functools.partial(self.spend.write, costs)
        )
        del paid[: len(costs)]

    async def fail(self, job: Job, paid: list[CallCost], failed: Failure) -> bool:
        """The request fails (`Pipeline.fail`) once what its calls cost is written."""
        await self.write_costs(paid)
        return await self.pipeline.fail(job, failed)

    async def budget_reached(self) -> bool:
        return self.spend is not None and await self.spend.paused()


async def _generate(worker: _Worker, job: Job, *, moderation: bool) -> str:
    """Returns "generated", "failed" or "dropped" (cancelled meanwhile)."""
    paid: list[CallCost] = []  # answered calls whose cost no write has taken yet
    try:
        outcome = await _generate_paying(worker, job, paid, moderation)
    except BaseException:
        # Going down (shutdown, a bug): the calls were paid for all the same.
        with trio.move_on_after(LEFT_COSTS_S, shield=True):
            await worker.write_costs(paid)
        raise
    await worker.write_costs(paid)  # every way out wrote them already: this only makes sure
    return outcome


async def _generate_paying(
    worker: _Worker, job: Job, paid: list[CallCost], moderation: bool
) -> str:
    pipeline, generator = worker.pipeline, worker.generator
    try:
        if trio.current_time() >= job.deadline:
            raise _DeadlinePassed()
        if await worker.budget_reached():
            raise _BudgetReached()
        if job.step is Step.RESERVED:
            # The list may have grown since the ledger looked: refunded if so.
            if blocked := await pipeline.reject_if_blocked(job):
                return blocked
            if not await _screen(worker, job, paid, moderation):
                return "failed" if job.failure else "dropped"
        started = trio.current_time()
        answer = await worker.call(
            job,
            paid,
            CallKind.IMAGE,
            IMAGE,
            functools.partial(generator.image, _image_order(job)),
            tokens=generator.expected_image_tokens(),
            before_call=functools.partial(_claim, worker, job),
        )
        metrics.STEP_SECONDS.labels("generate").observe(trio.current_time() - started)
    except _DeadlinePassed:
        await worker.fail(job, paid, failure(Reason.EXPIRED, "deadline passed while generating"))
        return "failed"
    except _Dropped:
        return "dropped"
    except _BudgetReached:
        paused = Failure(Reason.ERROR, BUDGET_PAUSED_MESSAGE, "daily OpenAI budget reached")
        await worker.fail(job, paid, paused)
        return "failed"
    except retry.ContentRejected as exc:
        await worker.fail(job, paid, failure(Reason.REJECTED, f"image API refused: {exc}"))
        return "failed"
    except retry.GaveUp as exc:
        reason = Reason.EXPIRED if exc.reason == "deadline" else Reason.ERROR
        await worker.fail(job, paid, failure(reason, f"OpenAI: {exc}"))
        return "failed"
    except retry.Permanent as exc:
        await worker.fail(job, paid, failure(Reason.ERROR, f"OpenAI: {exc}"))
        return "failed"
    image = answer.value
    # The image is paid for: its bytes are kept in hand until the database takes them,
    # with its cost (written even if the request was cancelled meanwhile).
    saved = await worker.write_step(
        job,
        paid,
        functools.partial(pipeline.db.save_generated, job.id, image.data, image.prompt),
        done_at=(Step.GENERATED,),
    )
    if not saved:
        return "dropped"
    job.step = Step.GENERATED
    job.generated = image.data  # saved: the uploader need not read it back
    log.info(
        "image generated (%d bytes%s)",
        len(image.data),
        ", transparent" if image.transparent else "",
        extra=job.log_extra,
    )
    return "generated"


async def _screen(worker: _Worker, job: Job, paid: list[CallCost], moderation: bool) -> bool:
    """Moderation, then a friend's name; persists SCREENED with what they cost. False if
    the job stops here."""
    pipeline, generator = worker.pipeline, worker.generator
    started = trio.current_time()
    if moderation:
        subject = job.inputs.get("subject", "")
        moderate = functools.partial(generator.moderate, subject)
        flagged = await worker.call(job, paid, CallKind.TEXT, MODERATION, moderate)
        if flagged.value:
            rejected = failure(Reason.REJECTED, "moderation flagged the subject")
            await worker.fail(job, paid, rejected)
            return False
    if job.style is Style.FRIEND and not job.name:
        name_prompt = prompts.name_prompt(job.inputs["subject"])
        job.name = await _name(worker, job, paid, name_prompt)
        # Kept once (insert where none is), so it may be tried again as it is.
        await outages.patiently(
            pipeline.dependencies,
            functools.partial(pipeline.db.save_name, job.id, name_prompt, job.name),
        )
    screened = functools.partial(pipeline.db.advance, job.id, [Step.RESERVED], Step.SCREENED)
    if not await worker.write_step(job, paid, screened, done_at=(Step.SCREENED,)):
        return False
    metrics.STEP_SECONDS.labels("screen").observe(trio.current_time() - started)
    job.step = Step.SCREENED
    return True


async def _name(worker: _Worker, job: Job, paid: list[CallCost], name_prompt: str) -> str:
    """The model's name for the friend; if it gives none (empty, or cut off by the token
    limit) twice, a name made from the subject."""
    from_subject = prompts.name_from_subject(job.inputs.get("subject", ""))
    for attempt in range(NAME_ATTEMPTS):
        ask = functools.partial(worker.generator.name, name_prompt, attempt=attempt)
        answer = await worker.call(job, paid, CallKind.TEXT, NAME, ask)
        if answer.value.complete:
            return prompts.clean_name(answer.value.text, fallback=from_subject)
        log.info(
            "the name model gave %s (attempt %d of %d)",
            "a cut-off name" if answer.value.text.strip() else "no name",
            attempt + 1,
            NAME_ATTEMPTS,
            extra=job.log_extra,
        )
    log.warning(
        "no usable name from %s: the friend is named %r after its subject",
        worker.generator.text_model,
        from_subject,
        extra=job.log_extra,
    )
    return from_subject


def _image_order(job: Job) -> ImageOrder:
    without_background = None
    if job.style is Style.FRIEND:
        without_background = prompts.friend_prompt(
            job.inputs["color"], job.inputs["subject"], chroma_key=False
        )
    return ImageOrder(job.valid_style, job.prompt, job.viewer.twitch_user_id, without_background)


async def _claim(worker: _Worker, job: Job) -> None:
    """Right before the image is paid for: the budget once more, then SCREENED →
    GENERATING; until then the request can be cancelled, also while it waits for its
    permit."""
    if await worker.budget_reached():
        raise _BudgetReached()
    if job.step is Step.SCREENED:
        if not await worker.pipeline.db.advance(job.id, [Step.SCREENED], Step.GENERATING):
            raise _Dropped()
        job.step = Step.GENERATING


class _DeadlinePassed(Exception):
    """The request's deadline came before OpenAI's answer (or before its permit)."""


class _Dropped(Exception):
    """The request moved on (cancelled) before its image was paid for."""


class _BudgetReached(Exception):
    """Today's OpenAI spend is at the daily budget: no new image is bought today."""
