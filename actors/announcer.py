"""The announcer actor: the alert on stream, then the viewer's result.

Receives jobs on `announce_recv` at step STORED: publishes the onscreen event (persistent,
`message_id` = the request id, publisher-confirmed), persists ANNOUNCED and sends the job
on `finalize_send` so the ledger actor accepts the debit. A request whose deadline passed
before its alert went out fails as expired instead (refunded).

Receives jobs on `results_recv` once their debit is accepted or refunded: publishes the
result (`message_id` = `{id}:result`) and persists DONE. Successful requests then go on
`discord_send` without waiting (a full channel skips the post rather than delay).

The two loops run as separate tasks, so a slow ledger never holds up results, and the
channel cycle announcer → ledger → announcer cannot deadlock.

The one window where a duplicate is unavoidable: a crash after the broker confirmed the
alert and before ANNOUNCED is committed publishes the alert again on resume, with the
same `message_id`, so consumers can drop it.
"""

from __future__ import annotations

import datetime
import functools
import logging
import math

import trio

from dynamo import events, metrics, retry
from dynamo.broker import ONSCREEN_EXCHANGE, RESULTS_EXCHANGE
from dynamo.jobs import Job, Reason, Step
from dynamo.messages import failure
from dynamo.pipeline import Pipeline, serve_jobs

log = logging.getLogger(__name__)

ACTOR = "announcer"
# Results must go out even after a long broker outage; cap the backoff so a recovered
# broker is used within a few seconds.
RESULT_BACKOFF_CAP_S = 10.0


def _classify(exc: Exception) -> Exception:
    # The broker port's errors are connection trouble: aio-pika reconnects by itself.
    return retry.classify_port_error(exc, unknown=retry.Transient)


async def run(
    *,
    broker,
    pipeline: Pipeline,
    announce_recv,
    results_recv,
    finalize_send,
    discord_send,
    task_status=trio.TASK_STATUS_IGNORED,
):
    async with trio.open_nursery() as nursery:
        # One alert at a time, in order: the overlay shows them as they come.
        nursery.start_soon(
            functools.partial(
                serve_jobs,
                announce_recv,
                actor=ACTOR,
                inflight=pipeline.inflight,
                concurrency=1,
                step=functools.partial(_announce, broker, pipeline),
                outboxes={True: finalize_send, False: finalize_send},
            )
        )
        nursery.start_soon(_results_loop, broker, pipeline, results_recv, discord_send)
        task_status.started()


async def _announce(broker, pipeline: Pipeline, job: Job) -> bool | None:
    """True once announced, False if failed instead, None if dropped."""
    if job.step is Step.ANNOUNCED:
        return True
    started = trio.current_time()
    try:
        await retry.retrying(
            functools.partial(
                broker.publish_json,
                ONSCREEN_EXCHANGE,
                events.onscreen_event(job),
                message_id=str(job.id),
            ),
            system="broker",
            log_extra=job.log_extra,
            deadline=job.deadline,
            max_attempts=None,
            classify=_classify,
        )
    except (retry.GaveUp, retry.Permanent) as exc:
        if await pipeline.fail(job, failure(Reason.EXPIRED, f"alert not published: {exc}")):
            return False
        return None
    if not await pipeline.db.advance(
        job.id,
        [Step.STORED],
        Step.ANNOUNCED,
        announced_at=datetime.datetime.now(datetime.UTC),
    ):
        return None
    metrics.STEP_SECONDS.labels("announce").observe(trio.current_time() - started)
    job.step = Step.ANNOUNCED
    log.info("alert published to %s", ONSCREEN_EXCHANGE, extra=job.log_extra)
    return True


async def _results_loop(broker, pipeline: Pipeline, results_recv, discord_send):
    async for job in results_recv:
        with pipeline.inflight.holding(ACTOR, job.id):
            done = await _publish_result(broker, pipeline, job)
        if not done:
            continue
        pipeline.inflight.finish(job.id)
        if job.failure is None and discord_send is not None:
            try:
                discord_send.send_nowait(job)
            except trio.WouldBlock:
                log.warning("discord queue full; post skipped", extra=job.log_extra)
                metrics.DISCORD_POSTS.labels("skipped").inc()


async def _publish_result(broker, pipeline: Pipeline, job: Job) -> bool:
    if job.failure is None:
        body = events.success_result(job)
    elif job.style is None:
        body = events.result_for_invalid(
            job.id, job.viewer, job.raw_style or None, job.description, job.failure
        )
    else:
        body = events.failure_result(job)
    await retry.retrying(
        functools.partial(
            broker.publish_json, RESULTS_EXCHANGE, body, message_id=f"{job.id}:result"
        ),
        system="broker",
        log_extra=job.log_extra,
        deadline=math.inf,
        max_attempts=None,
        classify=_classify,
        backoff_cap_s=RESULT_BACKOFF_CAP_S,
    )
    if not await pipeline.db.advance(job.id, [job.step], Step.DONE):
        return False
    outcome = "success" if job.failure is None else "failure"
    reason = "" if job.failure is None else job.failure.reason.value
    metrics.REQUESTS_FINISHED.labels(outcome, reason).inc()
    job.step = Step.DONE
    log.info(
        "result published: %s%s", outcome, f" ({reason})" if reason else "", extra=job.log_extra
    )
    return True
