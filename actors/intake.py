"""The intake actor: input messages from RabbitMQ become stored requests.

Receives deliveries from the broker port's input queue. For each: parse and validate
(contract §3); store the request in PostgreSQL; only then ack; then send the job on
`reserve_send`. An invalid message is dead-lettered with its reason (never requeued), and
when a viewer could be read it is also stored as a failed request whose result goes out
on `results_send`.

Idempotent (contract §2): a message_id maps to one request however often it arrives; a
redelivered message without one is matched to the identical body stored but never acked.

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

from dynamo import genreq, metrics, outages
from dynamo.db import DataRejected
from dynamo.jobs import Reason, Step
from dynamo.messages import failure
from dynamo.pipeline import Pipeline

log = logging.getLogger(__name__)


async def run(
    *,
    broker,
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
    try:
        readiness.consuming = True
        task_status.started()
        async for delivery in deliveries:
            await _take_patiently(delivery, pipeline, reserve_send, results_send)
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
    created = False
    if request_id is None:
        try:
            request_id, created = await pipeline.db.insert_request(
                **pipeline.request_fields(request, source="broker"),
                message_key=f"message-id:{delivery.message_id}" if delivery.message_id else None,
                body_sha256=None if delivery.message_id else body_sha256,
                intake_acked=delivery.message_id is not None,
            )
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
    job = await pipeline.job(request_id)
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
    request_id, created = await pipeline.db.insert_request(
        **pipeline.invalid_fields(exc, delivery.body),
        message_key=message_key,
        failure_reason=Reason.INVALID.value,
        failure_message=invalid.message,
    )
    extra = {"request_id": str(request_id)}
    log.warning("invalid request dead-lettered: %s", exc.reason_text, extra=extra)
    await delivery.dead_letter(exc.reason_text)
    if created:
        job = await pipeline.job(request_id)
        if job is not None and job.step is Step.REFUNDED and pipeline.inflight.add(job.id):
            await pipeline.inflight.route(job, results_send)
