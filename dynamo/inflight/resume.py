"""The resume sweep: every unfinished request gets back into the pipeline.

Each process registers itself in `dynamo.worker` and renews its heartbeat every
`SWEEP_INTERVAL_S`. Each sweep claims (atomically, so two processes never share one) the
unfinished requests that no live process owns: those of a process that crashed or was
`kill -9`ed, or stopped; and this process's own requests that are not in flight any more
(an actor crashed holding them). Each claimed request is routed to the actor for its
persisted step, so it resumes where it stopped.

At a clean shutdown the service deletes the worker row (`retire_at_shutdown`), so the
next process takes over at once. Not when this actor merely stops (a crash, an outage):
the process still holds its requests, and another process must not claim them. A process
that died without a word (kill -9) is noticed at once by a process on the same host (its
pid is gone), else when its lease runs out.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

from dynamo.domain.jobs import Job, Step
from dynamo.inflight.pipeline import Pipeline
from dynamo.supervision.pids import process_exists

log = logging.getLogger(__name__)

# How often the sweep runs; also the heartbeat period.
SWEEP_INTERVAL_S = 5.0
# A process whose heartbeat is older than this is taken for dead: three missed beats.
LEASE_S = 15.0
# At shutdown, how long writing the held confirmations and retiring may take.
RETIRE_S = 5.0


class Router:
    """Sends a job to the channel of the actor that carries on from its step."""

    def __init__(
        self,
        *,
        reserve_send,
        schedule_send,
        upload_send,
        announce_send,
        finalize_send,
        results_send,
        screen_send=None,
    ):
        self._channels = {
            Step.RECEIVED: reserve_send,
            Step.RESERVING: reserve_send,
            Step.RESERVED: schedule_send,
            Step.SCREENED: schedule_send,
            Step.GENERATING: schedule_send,
            # Screened (again) before anyone sees it; awaiting_approval goes nowhere: no
            # actor holds a waiting image, a decision routes it (dynamo.safety.approval).
            Step.GENERATED: screen_send or upload_send,
            Step.APPROVED: upload_send,
            Step.STORED: announce_send,
            Step.ANNOUNCED: finalize_send,
            Step.FAILING: finalize_send,
            Step.ACCEPTED: results_send,
            Step.REFUNDED: results_send,
        }

    def channel_for(self, job: Job):
        return self._channels[job.step]


async def reap_dead_neighbours(db, worker_id, hostname: str) -> None:
    """Retires workers of this host whose process is gone: their requests resume now.

    A restarted container keeps its hostname and may get the same pid (often 1), so a
    row with our own pid but another id is an earlier incarnation, dead too.
    """
    for worker in await db.workers_on(hostname):
        if worker["id"] == worker_id or worker["pid"] is None:
            continue
        if worker["pid"] == os.getpid() or not process_exists(worker["pid"]):
            log.info(
                "worker %s (pid %d) on this host is gone; taking over its requests",
                worker["id"],
                worker["pid"],
            )
            await db.retire(worker["id"])


async def _sweep(
    pipeline: Pipeline, router: Router, hostname: str, pid: int, unreadable: set
) -> None:
    db = pipeline.db
    await db.heartbeat(pipeline.worker_id, hostname, pid)
    await reap_dead_neighbours(db, pipeline.worker_id, hostname)
    with pipeline.inflight.watching_finishes() as finished:
        skipped = [*pipeline.inflight.ids(), *pipeline.inflight.set_aside_ids(), *unreadable]
        rows = await db.claim_unfinished(pipeline.worker_id, skipped, LEASE_S)
    for row in rows:
        if row["id"] in finished:
            continue  # went through the pipeline while we read it: the row is stale
        try:
            job = pipeline.job_from_row(row)
        except Exception:
            # One bad row must not stop the sweep (and with it every other request).
            failed = await pipeline.fail_unreadable(row)
            if failed is None:
                unreadable.add(row["id"])
                continue
            job = failed
        if pipeline.inflight.add(job.id):
            log.info("resuming request from step %s", job.step.value, extra=job.log_extra)
            await pipeline.inflight.route(job, router.channel_for(job))


async def run(*, pipeline: Pipeline, router: Router, task_status=trio.TASK_STATUS_IGNORED):
    db = pipeline.db
    hostname, pid = socket.gethostname(), os.getpid()
    await db.heartbeat(pipeline.worker_id, hostname, pid)
    task_status.started()
    unreadable: set = set()  # ids that could be neither read nor failed: not claimed again
    while True:
        try:
            await _sweep(pipeline, router, hostname, pid, unreadable)
        except Exception as exc:
            if not await pipeline.dependencies.ride_out(exc):
                raise
            continue  # the database is back: sweep at once, for what waited
        await trio.sleep(SWEEP_INTERVAL_S)


async def retire_at_shutdown(pipeline: Pipeline) -> None:
    """A clean shutdown's last word: the broker's confirmations still held are written,
    and the worker row is deleted so that the next process resumes our requests at once.
    If the database does not allow it, the lease runs out instead."""
    with trio.move_on_after(RETIRE_S, shield=True):
        try:
            await pipeline.confirms.flush(pipeline.db)
            await pipeline.db.retire(pipeline.worker_id)
        except OSError as exc:  # DatabaseUnavailable
            log.warning("worker not retired at shutdown (%s); its lease runs out instead", exc)
