"""The fleet actor: keeps this process's place in the fleet view current.

Receives and sends nothing. Every heartbeat (`dynamo.inflight.resume.SWEEP_INTERVAL_S`) it writes
how many requests this process holds into its `dynamo.worker` row (the resume sweep's
heartbeat creates and renews that row, and retires it at shutdown) and takes a snapshot of
the fleet for the fleet-wide metrics, which this process exports only while it is the
oldest live process. While the database is unreachable it keeps trying, quietly after
the first warning. On restart it starts over; on shutdown it just stops.
"""

from __future__ import annotations

import logging

import trio

from dynamo.database.fleet_store import FleetUnavailable
from dynamo.inflight.resume import SWEEP_INTERVAL_S
from dynamo.limits.fleet_view import FLEET_COLLECTOR, Fleet

log = logging.getLogger(__name__)


async def run(*, fleet: Fleet, task_status=trio.TASK_STATUS_IGNORED) -> None:
    FLEET_COLLECTOR.fleet = fleet
    task_status.started()
    unreachable = False
    while True:
        try:
            await fleet.beat()
        except FleetUnavailable as exc:
            if not unreachable:
                log.warning("fleet view not updated: %s", exc)
            unreachable, fleet.reporter = True, False
        else:
            unreachable = False
        await trio.sleep(SWEEP_INTERVAL_S)
