"""The intake actor: input messages from RabbitMQ become stored requests.

Receives deliveries from the broker port's input queue. For each: parse and validate
(contract §3); store the request in PostgreSQL; only then ack; then send the job on
`reserve_send`. An invalid message is dead-lettered with its reason (never requeued), and
when a viewer could be read it is also stored as a failed request whose result goes out
on `results_send`.

Idempotent (contract §2): a message_id maps to one request however often it arrives; a
redelivered message without one is matched to the identical body stored but never acked.

A delivery whose handling crashes (a bug, not an invalid message) is requeued and tried
again; after `attempts.MAX_ATTEMPTS` crashes it is dead-lettered with the error, so that
one message can never crash intake in a loop. An outage (PostgreSQL or RabbitMQ
unreachable, below) is not the message's fault and is never counted against it.

Backpressure: `reserve_send` blocks while the pipeline is full, so this actor stops
taking messages and the backlog stays in RabbitMQ (bounded prefetch).

An outage is waited out: while PostgreSQL is unreachable the delivery in hand waits and is
taken again once it is back (a store whose COMMIT was cut off is found by its key); when
RabbitMQ's connection breaks, the broker puts unacked deliveries back, the consumer is
registered again once it reconnects, and an ack lost with the connection only means the
message comes again and is recognised.

On shutdown it stops consuming: unacked deliveries go back to RabbitMQ, and a request
stored before the crash is found again by its key. On restart it simply consumes again.
"""

from __future__ import annotations

import hashlib
import logging

import trio

from dynamo import metrics
from dynamo.database.port import DataRejected
from dynamo.domain import genreq
from dynamo.domain.jobs import Reason, Step
from dynamo.domain.viewer_messages import failure
from dynamo.inflight.attempts import CrashedAttempts, message_key
from dynamo.inflight.pipeline import Pipeline
from dynamo.rabbitmq.broker import BrokerPort
from dynamo.supervision import outages

log = logging.getLogger(__name__)


async def run(
    *,
    broker: BrokerPort,
    pipeline: Pipeline,
    reserve_send,
    results_send,
    readiness,
    task_status=trio.TASK_STATUS_IGNORED,
):
    if not broker.configured:
        readiness.consuming = None  # nothing to consume: readiness does not wait for it
        task_status.started()
        await trio.sleep_forever()
    deliveries = broker.deliveries()
    crashed = CrashedAttempts()
    try:
        readiness.consuming = True
        task_status.started()
        async for delivery in deliveries:
            try:
                await _take_patiently(delivery, pipeline, reserve_send, results_send)
            except Exception as exc:
                if outages.outage_of(exc) is not None:
                    raise  # waited out below it already; not this message's fault
                key = message_key(delivery.message_id, delivery.body)
                await _after_crash(delivery, key, exc, crashed)
            else:
                if crashed:  # a message that crashed before went through this time
                    crashed.forget(message_key(delivery.message_id, delivery.body))
    finally:
        readiness.consuming = False
        with trio.move_on_after(1, shield=True):
            await deliveries.aclose()


async def _take_patiently(delivery, pipeline: Pipeline, reserve_send, results_send) -> None:
    """Takes the delivery, waiting out a database outage; a broker outage drops it here
    (RabbitMQ delivers it again once the connection is back)."""
    while True:
        try:
            return await _take(delivery, pipeline, reserve_send, results_send)
        except Exception as exc:
            if outages.outage_of(exc) == "broker":
                log.info("delivery lost with the broker connection; it comes again: %s", exc)
                return
            if not await pipeline.dependencies.ride_out(exc):
                raise
        # Taken again as a redelivery: a body stored by a COMMIT whose answer was lost is
        # then found (a message_id finds its request anyway).
        delivery.redelivered = True


async def _take(delivery, pipeline: Pipeline, reserve_send, results_send) -> None:
    try:
        request = genreq.parse_message(delivery.body)
    except genreq.InvalidRequest as exc:
        await _refuse(delivery, exc, pipeline, results_send)
        return
    body_sha256 = hashlib.sha256(delivery.body).hexdigest()
    request_id = None
    if delivery.message_id is None and delivery.redelivered:
        # Possibly stored before a crash that came before the ack: take that one.
        request_id = await pipeline.db.claim_unacked_by_body(body_sha256)
    created, row = False, None
    if request_id is None:
        try:
            row, created = await pipeline.db.store_request(
                **pipeline.request_fields(request, source="broker"),
                message_key=f"message-id:{delivery.message_id}" if delivery.message_id else None,
                body_sha256=None if delivery.message_id else body_sha256,
                intake_acked=delivery.message_id is not None,
                load_existing=False,
            )
            request_id = None if row is None else row["id"]
        except DataRejected as exc:
            # Valid JSON the database cannot hold: never retried, never blocking the queue.
            metrics.DEAD_LETTERS.inc()
            log.warning("message refused by the database, dead-lettered: %s", exc)
            await delivery.dead_letter(f"unstorable: {exc}")
            return
    try:
        await delivery.ack()
    except outages.BrokerUnavailable as exc:
        # The message comes again (redelivered): its key, or its body still marked
        # unacked, maps it to this request.
        log.info("ack lost with the broker connection: %s", exc)
    else:
        if delivery.message_id is None:
            await pipeline.db.mark_acked(request_id)
    extra = {"request_id": str(request_id)}
    if not created:
        log.info("duplicate delivery of a stored request; acked", extra=extra)
        return
    metrics.REQUESTS_RECEIVED.labels("broker").inc()
    log.info("request received from the broker", extra=extra)
    job = pipeline.job_from_row(row)  # as stored: no need to read it back
    if job is not None and pipeline.inflight.add(job.id):
        await pipeline.inflight.route(job, reserve_send)


async def _refuse(delivery, exc: genreq.InvalidRequest, pipeline: Pipeline, results_send) -> None:
    """Dead-letters an invalid message; a readable viewer also gets a failure result."""
    metrics.DEAD_LETTERS.inc()
    if exc.viewer is None:
        log.warning("invalid message without a viewer dead-lettered: %s", exc.reason_text)
        await delivery.dead_letter(exc.reason_text)
        return
    message_key = f"message-id:{delivery.message_id}" if delivery.message_id else None
    invalid = failure(Reason.INVALID, exc.reason_text)
    try:
        request_id, created = await pipeline.db.insert_request(
            **pipeline.invalid_fields(exc, delivery.body),
            message_key=message_key,
            failure_reason=Reason.INVALID.value,
            failure_message=invalid.message,
        )
    except DataRejected as rejected:  # what was kept of it still cannot be stored
        log.warning("invalid message dead-lettered, not stored (%s): %s", rejected, exc.reason_text)
        await delivery.dead_letter(exc.reason_text)
        return
    extra = {"request_id": str(request_id)}
    log.warning("invalid request dead-lettered: %s", exc.reason_text, extra=extra)
    await delivery.dead_letter(exc.reason_text)
    if created:
        job = await pipeline.job(request_id)
        if job is not None and job.step is Step.REFUNDED and pipeline.inflight.add(job.id):
            await pipeline.inflight.route(job, results_send)


async def _after_crash(delivery, key: str, exc: Exception, crashed: CrashedAttempts) -> None:
    """Requeues a delivery whose handling crashed, or dead-letters it after the last try."""
    if delivery.settled:
        # Stored and acked already: the resume sweep routes the request from its row.
        log.error("intake crashed after settling delivery %s", key, exc_info=exc)
        return
    count = crashed.crashed(key)
    if not crashed.exhausted(count):
        log.error(
            "intake crashed on delivery %s (attempt %d of %d); requeued",
            key,
            count,
            crashed.max_attempts,
            exc_info=exc,
        )
        await _settle(delivery.requeue())
        return
    metrics.DEAD_LETTERS.inc()
    log.error("intake crashed on delivery %s %d times; dead-lettered", key, count, exc_info=exc)
    crashed.forget(key)
    await _settle(
        delivery.dead_letter(f"crashed intake {count} times: {type(exc).__name__}: {exc}"[:1000])
    )


async def _settle(settling) -> None:
    """Awaits a requeue or dead-letter; with the broker gone the message comes again anyway."""
    try:
        await settling
    except Exception as exc:
        if outages.outage_of(exc) != "broker":
            raise
        log.info("delivery lost with the broker connection; it comes again: %s", exc)
