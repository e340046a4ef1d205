"""One-for-one supervision of actors, after Erlang/OTP.

Each actor runs in its own supervised task. When it raises, that actor alone is started
again after a short backoff; the others keep running, and the channels (owned by the
graph, not the actor) keep their contents. More than `max_restarts` crashes of one actor
within `window_s` seconds is escalated: `TooManyRestarts` propagates, the process's
nursery is cancelled and `run.py` exits non-zero so that the container runtime restarts
the process.

An outage is not a crash. An actor that stopped because a dependency (PostgreSQL,
RabbitMQ: `dynamo.supervision.outages`) is unreachable is `waiting` until that dependency answers
again, then started again without counting against the intensity (`outage_restarts`).
Only when a dependency stays down longer than `OUTAGE_LIMIT_S` does `watch_outages` give
up with one CRITICAL line (`OutageTooLong`, exit 1): nothing is lost either way, every
request resumes from its persisted step on the next start.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import trio

from dynamo import metrics
from dynamo.supervision import outages
from dynamo.supervision.backoff import Backoff

log = logging.getLogger(__name__)

# OTP's default intensity is 1 restart in 5 s; actors here crash on lost connections, which
# come in bursts during an outage, so a wider window with more restarts is allowed.
MAX_RESTARTS = 5
WINDOW_S = 60.0
# The first restart is quick, later ones back off so a flapping dependency is not hammered.
RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
RESTART_BACKOFF = Backoff(steps_s=RESTART_BACKOFF_S)
# A dependency down for longer than this ends the process (exit 1): an outage this long
# is not a blip, and the orchestrator's restart (and its alerting) should take over.
OUTAGE_LIMIT_S = 15 * 60.0
# How often `watch_outages` looks.
OUTAGE_WATCH_S = 1.0


# OTP's restart types: a `transient` actor is started again after a crash and stays
# stopped once it returns; a `permanent` one is started again after a return too (a
# return counts as a crash: an actor meant to run forever stopped).
Restart = Literal["permanent", "transient"]


class TooManyRestarts(Exception):
    pass


class ActorReturned(Exception):
    """A permanent actor returned: restarted as after a crash."""


class OutageTooLong(Exception):
    """A dependency stayed unreachable for longer than the limit."""


@dataclasses.dataclass
class ActorStatus:
    name: str
    state: str = "starting"  # starting | running | restarting | waiting | stopped
    restarts: int = 0  # after crashes (bugs), counted against the intensity
    last_error: str | None = None
    outage_restarts: int = 0  # after a dependency's outage, not counted

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


ActorFn = Callable[..., Awaitable[None]]


class Supervisor:
    def __init__(
        self,
        *,
        max_restarts: int = MAX_RESTARTS,
        window_s: float = WINDOW_S,
        on_restart: Callable[[str], object] | None = None,  # its return value is not used
        dependencies: outages.Dependencies | None = None,
    ):
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.on_restart = on_restart
        self.dependencies = dependencies or outages.Dependencies()
        self.actors: dict[str, ActorStatus] = {}

    async def watch_outages(self, *, limit_s: float = OUTAGE_LIMIT_S) -> None:
        """Raises OutageTooLong once a dependency has been down for `limit_s` on end."""
        while True:
            for dependency in self.dependencies:
                if dependency.down_for_s() > limit_s:
                    # run.py logs it, the one CRITICAL line, and exits 1.
                    raise OutageTooLong(
                        f"{dependency.name} unreachable for {dependency.down_for_s():.0f} s "
                        f"(limit {limit_s:.0f} s; {dependency.reason}); every request resumes "
                        "from its persisted step on the next start"
                    )
            await trio.sleep(OUTAGE_WATCH_S)

    async def start(
        self, nursery: trio.Nursery, name: str, actor: ActorFn, *, restart: Restart = "transient"
    ) -> Any:
        """Starts `actor` under supervision; returns once it called task_status.started().

        Setup errors of the first start propagate from here, so a misconfigured service
        fails at startup instead of restarting in a loop.
        """
        self.actors[name] = ActorStatus(name)
        return await nursery.start(self._supervise, name, actor, restart)

    async def _supervise(
        self,
        name: str,
        actor: ActorFn,
        restart: Restart,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        status = self.actors[name]
        crashes: deque[float] = deque()
        first = True
        while True:
            try:
                if first:
                    await actor(task_status=_Started(status, task_status))
                else:
                    await actor(task_status=_Started(status, trio.TASK_STATUS_IGNORED))
                if restart == "permanent" and status.state != "starting":
                    raise ActorReturned(f"actor {name} returned")
                status.state = "stopped"
                log.info("actor %s stopped", name)
                return
            except Exception as exc:
                if first and status.state == "starting":
                    raise  # setup failed: report it from nursery.start()
                dependency = self.dependencies.get(outages.outage_of(exc) or "")
                if dependency is not None:
                    await self._wait_out(status, dependency, exc)
                    first = False
                    continue
                now = trio.current_time()
                crashes.append(now)
                while crashes and crashes[0] < now - self.window_s:
                    crashes.popleft()
                status.restarts += 1
                status.last_error = f"{type(exc).__name__}: {exc}"[:500]
                metrics.ACTOR_RESTARTS.labels(name).inc()
                if len(crashes) > self.max_restarts:
                    status.state = "stopped"
                    log.critical(
                        "actor %s crashed %d times in %.0f s; giving up",
                        name,
                        len(crashes),
                        self.window_s,
                        exc_info=exc,
                    )
                    raise TooManyRestarts(
                        f"actor {name} crashed too often: {status.last_error}"
                    ) from exc
                status.state = "restarting"
                delay = RESTART_BACKOFF.delay_s(len(crashes) - 1)
                log.error("actor %s crashed; restarting in %.1f s", name, delay, exc_info=exc)
                first = False
                await trio.sleep(delay)
                if self.on_restart is not None:
                    self.on_restart(name)

    async def _wait_out(self, status: ActorStatus, dependency, exc: Exception) -> None:
        """The actor stopped because `dependency` is unreachable: not a crash. Waits for
        it to answer again; the restart that follows is not counted as a crash."""
        status.state = "waiting"
        status.outage_restarts += 1
        status.last_error = f"{type(exc).__name__}: {exc}"[:500]
        metrics.OUTAGE_RESTARTS.labels(status.name).inc()
        dependency.went_down(status.last_error[:200])
        log.info("actor %s waits for %s to come back", status.name, dependency.name)
        await dependency.wait_until_up()
        if self.on_restart is not None:
            self.on_restart(status.name)


class _Started:
    """Marks the actor as running when it reports ready, then passes the report on."""

    def __init__(self, status: ActorStatus, task_status):
        self._status = status
        self._task_status = task_status

    def started(self, value=None) -> None:
        self._status.state = "running"
        self._task_status.started(value)
