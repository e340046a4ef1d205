"""The approval clock: applies DYNAMO_APPROVAL_TIMEOUT_ACTION to images whose wait for the
broadcaster is over.

Receives nothing; every `TIMEOUT_POLL_S` it asks the database for waits past their
deadline (`approval_deadline`, persisted when the wait began, so a restart or a kill -9
changes nothing) and decides each through `Approvals.decide_timed_out`, which routes the
ones it took into this process's pipeline (approved: `upload_send`; rejected:
`finalize_send`). Every process of a fleet runs one: a decision is an atomic
compare-and-set, so each timeout is applied once, by whichever process looks first. A
database outage is waited out; on cancellation it just stops.
"""

from __future__ import annotations

import trio

from dynamo.domain.jobs import Job
from dynamo.inflight.pipeline import Pipeline
from dynamo.safety.approval import TIMEOUT_POLL_S, Approvals


async def run(
    *,
    pipeline: Pipeline,
    upload_send: trio.MemorySendChannel[Job],
    finalize_send: trio.MemorySendChannel[Job],
    timeout_s: float,
    timeout_action: str,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    approvals = Approvals(
        pipeline,
        upload_send=upload_send,
        finalize_send=finalize_send,
        timeout_s=timeout_s,
        timeout_action=timeout_action,
    )
    task_status.started()
    dependencies = pipeline.dependencies
    while True:
        try:
            await approvals.decide_timed_out()
        except Exception as exc:
            if not await dependencies.ride_out(exc):
                raise
            continue
        await trio.sleep(TIMEOUT_POLL_S)
