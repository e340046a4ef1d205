"""The announcer actor: the alert on stream, then the viewer's result.

Receives jobs on `announce_recv` at step STORED: publishes the onscreen event (persistent,
`message_id` = the request id, publisher-confirmed), persists ANNOUNCED and sends the job
on `finalize_send` so the ledger actor accepts the debit. A request whose deadline passed
before its alert went out fails as expired instead (refunded).

Receives jobs on `results_recv` once their debit is accepted or refunded: publishes the
result (`message_id` = `{id}:result`) and persists DONE. Successful requests then go on
`discord_send` without waiting (a full channel skips the post rather than delay).

The two loops run as separate tasks, so a slow ledger never holds up results, and the
channel cycle announcer → ledger → announcer cannot deadlock. In both, one job's bug is
its own (`serve_jobs`): a result that cannot be made (an accepted request whose image row
is gone) is logged with its request id and counted, and the request is set aside: this
process's resume sweep does not route it again; the next process to start tries once more.

A confirmation is a fact (`dynamo.inflight.confirms`): once the broker confirmed an alert, it is
held in memory and ANNOUNCED is written again until PostgreSQL takes it; a database
outage never makes it publish the alert again. While RabbitMQ is unreachable, publishing
waits for it (the robust connection reconnects by itself).

The windows where a duplicate remains, both with the same `message_id` so that consumers
can drop it: the process dies (kill -9) after the confirm and before ANNOUNCED is stored
(the alert goes out again on resume); the connection to RabbitMQ breaks after the publish
and before its confirm (the alert is published again on the new connection, counted in
`dynamo_alerts_republished_total`; likewise results in `dynamo_results_republished_total`).
"""

from __future__ import annotations

import datetime
import functools
import logging
import math

import trio

from dynamo import metrics
from dynamo.domain import published as events
from dynamo.domain.jobs import Job, Reason, Step
from dynamo.domain.viewer_messages import failure
from dynamo.inflight.confirms import ALERT, RESULT
from dynamo.inflight.pipeline import Pipeline, serve_jobs
from dynamo.rabbitmq.broker import ONSCREEN_EXCHANGE, RESULTS_EXCHANGE, BrokerPort
from dynamo.supervision import outages, retry

log = logging.getLogger(__name__)

ACTOR = "announcer"
# Alerts and results must go out as soon as a broker outage ends: the backoff between
# publishes is capped so that a recovered broker is used within about a second.
PUBLISH_BACKOFF_CAP_S = 1.0
# The steps at or after ANNOUNCED: finding one of them means ANNOUNCED was stored.
_ANNOUNCED_OR_LATER = (Step.ANNOUNCED, Step.ACCEPTED, Step.DONE)


def _classify(exc: Exception) -> Exception:
    # The broker port's errors are connection trouble: aio-pika reconnects by itself.
    return retry.classify_port_error(exc, unknown=retry.Transient)


async def run(
    *,
    broker: BrokerPort,
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
                pipeline=pipeline,
                failed_outcome=False,
                concurrency=1,
                step=outages.patient_step(
                    pipeline.dependencies, pipeline, functools.partial(_announce, broker, pipeline)
                ),
                outboxes={True: finalize_send, False: finalize_send},
            )
        )
        # Results in order too. A result that cannot be made (a bug) is that request's
        # alone: serve_jobs logs and counts it, and sets the request aside.
        nursery.start_soon(
            functools.partial(
                serve_jobs,
                results_recv,
                actor=ACTOR,
                inflight=pipeline.inflight,
                pipeline=pipeline,
                concurrency=1,
                step=outages.patient_step(
                    pipeline.dependencies,
                    pipeline,
                    functools.partial(_finish_request, broker, pipeline, discord_send),
                ),
                outboxes={},
            )
        )
        task_status.started()


async def _announce(broker: BrokerPort, pipeline: Pipeline, job: Job) -> bool | None:
    """True once announced, False if failed instead, None if dropped."""
    if job.step is Step.ANNOUNCED:
        return True
    started = trio.current_time()
    stamp = {"announced_at": datetime.datetime.now(datetime.UTC)}
    if not pipeline.confirms.confirmed(job.id, ALERT):
        try:
            await _publish(
                broker,
                ONSCREEN_EXCHANGE,
                events.onscreen_event(job),
                message_id=str(job.id),
                deadline=job.deadline,
                republished=metrics.ALERTS_REPUBLISHED,
                log_extra=job.log_extra,
            )
        except (retry.GaveUp, retry.Permanent) as exc:
            if await pipeline.fail(job, failure(Reason.EXPIRED, f"alert not published: {exc}")):
                return False
            return None
        pipeline.confirms.hold(
            job.id, ALERT, from_step=Step.STORED, to_step=Step.ANNOUNCED, **stamp
        )
    moved = await outages.patient_write(
        pipeline.dependencies,
        pipeline,
        job.id,
        functools.partial(pipeline.db.advance, job.id, [Step.STORED], Step.ANNOUNCED, **stamp),
        done_at=_ANNOUNCED_OR_LATER,
    )
    pipeline.confirms.release(job.id, ALERT)
    if not moved:
        return None
    metrics.STEP_SECONDS.labels("announce").observe(trio.current_time() - started)
    job.step = Step.ANNOUNCED
    log.info("alert published to %s", ONSCREEN_EXCHANGE, extra=job.log_extra)
    return True


async def _publish(broker: BrokerPort, exchange, body, *, message_id, deadline, republished, log_extra):
    """Publishes until the broker confirms; waits out a broker outage. A publish whose
    connection broke before its confirm may have gone through: the next one is counted
    in `republished`."""
    maybe_sent = False

    async def attempt():
        nonlocal maybe_sent
        if maybe_sent:
            republished.inc()
        try:
            await broker.publish_json(exchange, body, message_id=message_id)
        except outages.BrokerUnavailable as exc:
            maybe_sent = maybe_sent or getattr(exc, "maybe_sent", False)
            raise

    await retry.retrying(
        attempt,
        system="broker",
        log_extra=log_extra,
        deadline=deadline,
        max_attempts=None,
        classify=_classify,
        backoff_cap_s=PUBLISH_BACKOFF_CAP_S,
    )
    if maybe_sent:
        log.warning(
            "published again to %s after the connection broke before the broker's "
            "confirm: the first copy may also have gone out",
            exchange,
            extra=log_extra,
        )


async def _finish_request(broker: BrokerPort, pipeline: Pipeline, discord_send, job: Job) -> None:
    """The result, DONE, then the request leaves the pipeline (a success goes on to
    Discord, if its queue has room)."""
    if not await _publish_result(broker, pipeline, job):
        return
    pipeline.inflight.finish(job.id)
    if job.failure is None and discord_send is not None:
        try:
            discord_send.send_nowait(job)
        except trio.WouldBlock:
            log.warning("discord queue full; post skipped", extra=job.log_extra)
            metrics.DISCORD_POSTS.labels("skipped").inc()


async def _publish_result(broker: BrokerPort, pipeline: Pipeline, job: Job) -> bool:
    if job.failure is None:
        body = events.success_result(job)
    elif job.style is None:
        body = events.result_for_invalid(
            job.id, job.viewer, job.raw_style or None, job.description, job.failure
        )
    else:
        body = events.failure_result(job)
    if job.step is Step.DONE:
        return True
    if not pipeline.confirms.confirmed(job.id, RESULT):
        await _publish(
            broker,
            RESULTS_EXCHANGE,
            body,
            message_id=f"{job.id}:result",
            deadline=math.inf,
            republished=metrics.RESULTS_REPUBLISHED,
            log_extra=job.log_extra,
        )
        pipeline.confirms.hold(job.id, RESULT, from_step=job.step, to_step=Step.DONE)
    moved = await outages.patient_write(
        pipeline.dependencies,
        pipeline,
        job.id,
        functools.partial(pipeline.db.advance, job.id, [job.step], Step.DONE),
        done_at=(Step.DONE,),
    )
    pipeline.confirms.release(job.id, RESULT)
    if not moved:
        return False
    outcome = "success" if job.failure is None else "failure"
    reason = "" if job.failure is None else job.failure.reason.value
    metrics.REQUESTS_FINISHED.labels(outcome, reason).inc()
    job.step = Step.DONE
    log.info(
        "result published: %s%s", outcome, f" ({reason})" if reason else "", extra=job.log_extra
    )
    return True
