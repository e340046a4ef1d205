"""The approval clock: applies DYNAMO_APPROVAL_TIMEOUT_ACTION to images whose wait for the
broadcaster is over.

Receives nothing; every `TIMEOUT_POLL_S` it asks the database for waits past their
deadline (`approval_deadline`, persisted when the wait began, so a restart or a kill -9
changes nothing) and decides each through `Approvals.decide_timed_out`, which routes the
ones it took into this process's pipeline. Every process of a fleet runs one: a decision
is an atomic compare-and-set, so each timeout is applied once, by whichever process
looks first. A database outage is waited out; on cancellation it just stops.
"""

from __future__ import annotations

import trio

from dynamo.approval import TIMEOUT_POLL_S, Approvals


async def run(*, approvals: Approvals, task_status=trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    dependencies = approvals.pipeline.dependencies
    while True:
        try:
            await approvals.decide_timed_out()
        except Exception as exc:
            if not await dependencies.ride_out(exc):
                raise
            continue
        await trio.sleep(TIMEOUT_POLL_S)
