"""The ledger actor: reserves points before any paid call, and finalizes the debit.

Receives jobs on `reserve_recv` (new or resumed requests). A subject holding a blocked
term (DYNAMO_BLOCKED_TERMS_FILE) fails as rejected here, before any call: no point is
reserved, no OpenAI call made. Otherwise it makes sure the viewer's service token is at
hand (kept by the port per viewer, asked of the auth service when there is none),
reserves the debit (`POST /outflow`), persists the flow id at once, and sends the job on
`schedule_send`. A 409 means insufficient points: the request fails without any OpenAI
call. An auth or ledger outage is retried until the request's deadline (then it fails as
expired), never failed early. Tokens stay inside the port (`dynamo.viewer_points.port`),
which replaces one the ledger refuses (a 401: a new token and one more try, at once); a
refusal that remains is `Permanent`, like any other 4xx: a reservation fails as `error`.

Receives jobs on `finalize_recv`: an announced job's debit is accepted; a failed job's is
refunded. Both are retried until they succeed (a debit is never left pending); a 409
means already finalized, which counts as done. Persists ACCEPTED / REFUNDED, then sends
the job on `results_send`.

The window in which a debit can be orphaned (the ledger answered, the flow id is not yet
stored) is the one UPDATE after the answer. A request found at step RESERVING on resume
first looks at the viewer's ledger history: a pending image-alert debit of its cost,
made since its reservation began (less `CLOCK_SKEW_S`) and whose flow id no request
holds, is adopted as its own (the oldest such); if there is none, it reserves afresh.
Only when the history cannot be read is the request logged as a WARNING, flagged
`orphan_suspected` and counted on /status, and then it reserves afresh.

On shutdown, operations in flight are cancelled; each resumes from its persisted step.
"""

from __future__ import annotations

import datetime
import functools
import logging
import math

import trio

from dynamo import metrics
from dynamo.domain.jobs import Job, Reason, Step
from dynamo.domain.viewer_messages import failure
from dynamo.inflight.pipeline import Pipeline, serve_jobs
from dynamo.supervision import outages, retry
from dynamo.viewer_points.gate import ViewerGate
from dynamo.viewer_points.port import AlreadyFinalized, InsufficientPoints, PointsPort

log = logging.getLogger(__name__)

ACTOR = "ledger"
# Reservations at once: each is one short HTTP call (two when the viewer's token is asked
# for); more only queue at the ledger.
RESERVE_CONCURRENCY = 8
# Finalizations at once. They never block on anything downstream but the results
# channel, and an outage keeps them retrying, so allow more.
FINALIZE_CONCURRENCY = 32
# Finalizing must not give up: a pending debit is a viewer's points in limbo. The
# backoff is capped so that a recovered ledger is noticed within a few seconds.
FINALIZE_BACKOFF_CAP_S = 5.0
# Reserving (the token, then the debit) retries until the request's deadline; capped
# likewise, so that requests go on within seconds of the ledger's or auth's return.
RESERVE_BACKOFF_CAP_S = 5.0
# The ledger stamps a debit with its own clock, the reservation's start is stamped with
# ours: a debit made up to this long "before" the reservation began is still a candidate.
CLOCK_SKEW_S = 30.0
# Tries at reading the history before a resumed reservation gives up on it: it is worth
# a few seconds, not the request's whole deadline.
HISTORY_ATTEMPTS = 4


def _classify(exc: Exception) -> Exception:
    return retry.classify_port_error(exc, passthrough=(InsufficientPoints,))


async def run(
    *,
    points: PointsPort,
    pipeline: Pipeline,
    reserve_recv,
    finalize_recv,
    schedule_send,
    finalize_send,
    results_send,
    task_status=trio.TASK_STATUS_IGNORED,
):
    serve = functools.partial(
        serve_jobs, actor=ACTOR, inflight=pipeline.inflight, pipeline=pipeline
    )
    reserve = functools.partial(_reserve, points, pipeline, ViewerGate())
    async with trio.open_nursery() as nursery:
        task_status.started()
        nursery.start_soon(
            functools.partial(
                serve,
                reserve_recv,
                concurrency=RESERVE_CONCURRENCY,
                step=outages.patient_step(
                    pipeline.dependencies, pipeline, reserve
                ),
                outboxes={"reserved": schedule_send, "failed": finalize_send},
            )
        )
        nursery.start_soon(
            functools.partial(
                serve,
                finalize_recv,
                concurrency=FINALIZE_CONCURRENCY,
                step=outages.patient_step(
                    pipeline.dependencies, pipeline, functools.partial(_finalize, points, pipeline)
                ),
                outboxes={True: results_send},
            )
        )


async def _reserve(points: PointsPort, pipeline: Pipeline, gate: ViewerGate, job: Job) -> str:
    """Returns "reserved", "failed" or "dropped" (another copy owns the request)."""
    if job.step in (Step.RESERVED, Step.SCREENED):
        return "reserved"
    if job.step not in (Step.RECEIVED, Step.RESERVING):
        return "dropped"
    if job.step is Step.RECEIVED and (blocked := await pipeline.reject_if_blocked(job)):
        return blocked  # before any call, and before any point is reserved
    started = trio.current_time()
    try:
        # The token first, as a step of its own: an auth outage is waited out (and told
        # apart from the ledger's) before a debit can exist. The ledger calls below reuse
        # it from the port's cache.
        await retry.retrying(
            functools.partial(points.service_token, job),
            system="auth",
            log_extra=job.log_extra,
            deadline=job.deadline,
            max_attempts=None,
            classify=_classify,
            backoff_cap_s=RESERVE_BACKOFF_CAP_S,
        )
        if job.step is Step.RESERVING:
            async with gate.looking_for_lost_debit(job.viewer.twitch_user_id):
                adopted = await _adopt_orphan(points, pipeline, job)
            if adopted is not None:
                return adopted
        # RESERVING is persisted only now, right before the debit can exist, so that a
        # crash while asking for the token is not taken for a possible orphan.
        if job.step is Step.RECEIVED:
            reserving = functools.partial(
                pipeline.db.advance, job.id, [Step.RECEIVED], Step.RESERVING,
                reserving_since=_now(),
            )
            if not await outages.patient_write(
                pipeline.dependencies, pipeline, job.id, reserving, done_at=(Step.RESERVING,)
            ):
                return "dropped"
            job.step = Step.RESERVING
        async with gate.making_debit(job.viewer.twitch_user_id):
            while True:
                flow_id = await retry.retrying(
                    functools.partial(points.reserve, job),
                    system="ledger",
                    log_extra=job.log_extra,
                    deadline=job.deadline,
                    max_attempts=None,
                    classify=_classify,
                    backoff_cap_s=RESERVE_BACKOFF_CAP_S,
                )
                # The orphan window: the ledger holds a debit whose id is only in memory
                # until this UPDATE commits; a database outage keeps the id in hand until
                # then.
                if flow_id is None:
                    reserved = functools.partial(
                        pipeline.db.advance, job.id, [Step.RESERVING], Step.RESERVED
                    )
                    moved = await outages.patient_write(
                        pipeline.dependencies, pipeline, job.id, reserved, done_at=(Step.RESERVED,)
                    )
                    stored = "stored" if moved else "moved"
                else:
                    stored = await outages.patiently(
                        pipeline.dependencies,
                        functools.partial(pipeline.db.store_flow, job.id, flow_id),
                    )
                if stored != "taken":
                    break
                # A resumed request of the same viewer took this debit for its lost one: it is
                # that request's now, and this one needs its own.
                log.warning("flow %s was adopted by another request; reserving again", flow_id,
                            extra=job.log_extra)
    except InsufficientPoints:
        await pipeline.fail(job, failure(Reason.INSUFFICIENT_POINTS, "ledger answered 409"))
        return "failed"
    except retry.GaveUp as exc:
        await pipeline.fail(job, failure(Reason.EXPIRED, f"points not reserved: {exc}"))
        return "failed"
    except retry.Permanent as exc:
        await pipeline.fail(job, failure(Reason.ERROR, f"points not reserved: {exc}"))
        return "failed"
    if stored == "moved":
        # Cancelled meanwhile: whoever failed it could not know this flow, so refund here.
        log.warning(
            "request moved on while its points were reserved; refunding flow %s",
            flow_id,
            extra=job.log_extra,
        )
        job.flow_id = flow_id
        if flow_id is not None and await pipeline.db.record_late_flow(job.id, flow_id):
            await _settle(points, points.refund, job)
        return "dropped"
    metrics.STEP_SECONDS.labels("reserve").observe(trio.current_time() - started)
    job.flow_id, job.step = flow_id, Step.RESERVED
    if flow_id is None:
        log.info("no points charged (no auth service configured)", extra=job.log_extra)
    else:
        log.info("points reserved (flow %s)", flow_id, extra=job.log_extra)
    return "reserved"


async def _adopt_orphan(points: PointsPort, pipeline: Pipeline, job: Job) -> str | None:
    """For a request found at RESERVING: adopts the debit the ledger made for it before a
    crash. Returns "reserved" (adopted) or "dropped" (the request moved on), or None when
    there is nothing to adopt and a fresh reservation is due."""
    since = await pipeline.db.reserving_since(job.id)
    if since is None:
        return "dropped"
    since -= datetime.timedelta(seconds=CLOCK_SKEW_S)
    try:
        candidates = await retry.retrying(
            functools.partial(points.pending_redemptions, job, since),
            system="ledger",
            log_extra=job.log_extra,
            deadline=job.deadline,
            max_attempts=HISTORY_ATTEMPTS,
            classify=_classify,
        )
    except (retry.GaveUp, retry.Permanent) as exc:
        log.warning(
            "request was interrupted while reserving points and the ledger's history "
            "cannot be read (%s): a debit may be pending at the ledger without its flow "
            "id (reconcile by imageRequestId)",
            exc,
            extra=job.log_extra,
        )
        metrics.ORPHAN_DEBITS.inc()
        moved = await pipeline.db.advance(
            job.id, [Step.RESERVING], Step.RESERVING, orphan_suspected=True
        )
        return None if moved else "dropped"
    # Another request's lost debit may be a candidate too (the history does not say
    # whose a debit is): the one made closest to this reservation's start is tried
    # first, and is this request's own unless two reservations began within moments.
    began = since + datetime.timedelta(seconds=CLOCK_SKEW_S)
    for _, flow_id in sorted(candidates, key=lambda made: abs(made[0] - began)):
        stored = await pipeline.db.adopt_flow(job.id, flow_id)
        if stored == "moved":
            return "dropped"
        if stored == "stored":
            metrics.ADOPTED_DEBITS.inc()
            log.info(
                "the ledger's pending debit %s, made before an interruption, adopted",
                flow_id,
                extra=job.log_extra,
            )
            job.flow_id, job.step = flow_id, Step.RESERVED
            return "reserved"
    log.info("no debit was made before the interruption; reserving", extra=job.log_extra)
    return None


async def _finalize(points: PointsPort, pipeline: Pipeline, job: Job) -> bool:
    if job.failure is not None and job.step not in (Step.FAILING, Step.REFUNDED):
        # Failed by an actor without database access (the rate limiter, on expiry):
        # persist the failure first, unless the request moved on meanwhile.
        if not await pipeline.fail(job, job.failure):
            return False
    if job.step in (Step.ACCEPTED, Step.REFUNDED):
        return True
    if job.step is Step.ANNOUNCED:
        operation, to_step, stamp = points.accept, Step.ACCEPTED, "accepted_at"
    elif job.step is Step.FAILING:
        operation, to_step, stamp = points.refund, Step.REFUNDED, "refunded_at"
    else:
        log.error("finalize got a job at step %s; dropped", job.step.value, extra=job.log_extra)
        return False
    started = trio.current_time()
    if job.flow_id is not None:
        await _settle(points, operation, job)
    if not await pipeline.db.advance(job.id, [job.step], to_step, **{stamp: _now()}):
        return False
    metrics.STEP_SECONDS.labels(to_step.value).observe(trio.current_time() - started)
    job.step = to_step
    log.info(
        "debit %s", "accepted" if to_step is Step.ACCEPTED else "refunded", extra=job.log_extra
    )
    return True


async def _settle(points, operation, job: Job) -> None:
    """Accepts or refunds the job's flow, retrying until the ledger has done it."""
    await retry.retrying(
        functools.partial(_finalize_flow, points, operation, job),
        system="ledger",
        log_extra=job.log_extra,
        deadline=math.inf,
        max_attempts=None,
        classify=_classify,
        backoff_cap_s=FINALIZE_BACKOFF_CAP_S,
    )


async def _finalize_flow(points, operation, job: Job) -> None:
    try:
        await operation(job, job.flow_id)
    except AlreadyFinalized:
        log.info("flow %s was already finalized", job.flow_id, extra=job.log_extra)
    except retry.Permanent as exc:
        # A refusal to finalize cannot be left alone: keep trying, loudly, so an operator
        # sees it; the viewer's points stay reserved until then.
        log.error("ledger refused to finalize flow %s: %s", job.flow_id, exc, extra=job.log_extra)
        raise retry.Transient(str(exc)) from exc


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
