"""The broadcaster's decision on an image awaiting approval (DYNAMO_APPROVAL), however it
comes: POST /requests/{id}/approve or /reject, in any process of the fleet, or the
timeout (DYNAMO_APPROVAL_TIMEOUT_S, then DYNAMO_APPROVAL_TIMEOUT_ACTION).

A decision is taken once: `ApprovalQueries.decide` moves the request on atomically from
`awaiting_approval` and makes this process its owner; a racing or late decision finds it
moved and gets False (the API answers 409). The process that took the decision routes
the request into its own pipeline: approved, to the uploader (stored, alert, debit
accepted, as always); rejected, to the ledger's finalize (refunded), with the sentence
below. If it dies before that, its requests are at `approved` or `failing`, and the
resume sweep of any process carries them on.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import trio

from dynamo import metrics
from dynamo.database.approval import APPROVED, REJECTED, TIMEOUT, ApprovalQueries
from dynamo.domain.jobs import Job
from dynamo.inflight.pipeline import Pipeline

log = logging.getLogger(__name__)

# Contract §4: what the viewer is told when the broadcaster turns the image down.
REJECTED_MESSAGE = "The broadcaster turned this image down. No points were spent."
# ...and when nobody decided in time and the configured action is to reject.
TIMED_OUT_MESSAGE = "The broadcaster did not review this image in time. No points were spent."
# How often each process looks for waits that are over: a timeout acts within this.
TIMEOUT_POLL_S = 0.5


class Approvals:
    def __init__(
        self,
        pipeline: Pipeline,
        *,
        upload_send: trio.MemorySendChannel[Job],
        finalize_send: trio.MemorySendChannel[Job],
        timeout_s: float,
        timeout_action: str,
    ):
        self.pipeline = pipeline
        self.queries = ApprovalQueries(pipeline.db)
        self.upload_send = upload_send
        self.finalize_send = finalize_send
        self.timeout_s = timeout_s
        self.timeout_action = timeout_action

    async def decide(self, request_id: uuid.UUID, *, approve: bool, by: str) -> bool:
        """The broadcaster's decision; False if the request does not await one."""
        decision = APPROVED if approve else REJECTED
        detail = f"the broadcaster ({by}) turned the image down"
        return await self._take(request_id, decision, approve, REJECTED_MESSAGE, detail)

    async def decide_timed_out(self) -> int:
        """Applies the timeout's action to every wait that is over; how many it decided."""
        approve = self.timeout_action == "approve"
        detail = f"no decision within {self.timeout_s:g} s: {self.timeout_action}ed"
        decided = 0
        for request_id in await self.queries.timed_out():
            if await self._take(request_id, TIMEOUT, approve, TIMED_OUT_MESSAGE, detail):
                decided += 1
        return decided

    async def _take(
        self, request_id: uuid.UUID, decision: str, approve: bool, message: str, detail: str
    ) -> bool:
        pipeline = self.pipeline
        taken = await self.queries.decide(
            request_id,
            decision,
            approve=approve,
            owner=pipeline.worker_id,
            message=message,
            detail=detail,
        )
        if not taken:
            return False
        metrics.APPROVALS.labels(decision).inc()
        job = await pipeline.job(request_id)
        if job is None:
            return True
        log.info(
            "image %s (%s)", "approved" if approve else "rejected", decision, extra=job.log_extra
        )
        if pipeline.inflight.add(job.id):  # else this process's resume sweep took it
            channel = self.upload_send if approve else self.finalize_send
            try:
                channel.send_nowait(job)
            except trio.WouldBlock:
                # The next stage is busy: the decision is stored and this process owns the
                # request, so its resume sweep routes it within seconds; the broadcaster's
                # click is not kept waiting for that.
                pipeline.inflight.finish(job.id)
                log.info("decision stored; the request goes on at the next sweep",
                         extra=job.log_extra)
        return True

    async def status_json(self) -> dict[str, Any]:
        return {
            **await self.queries.counts(),
            "timeout_s": self.timeout_s,
            "timeout_action": self.timeout_action,
        }
