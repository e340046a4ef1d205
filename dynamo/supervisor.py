"""One-for-one supervision of actors, after Erlang/OTP.

Each actor runs in its own supervised task. When it raises, that actor alone is started
again after a short backoff; the others keep running, and the channels (owned by the
graph, not the actor) keep their contents. More than `max_restarts` crashes of one actor
within `window_s` seconds is escalated: `TooManyRestarts` propagates, the process's
nursery is cancelled and `run.py` exits non-zero so that the container runtime restarts
the process.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from dynamo import metrics

log = logging.getLogger(__name__)

# OTP's default intensity is 1 restart in 5 s; actors here crash on lost connections, which
# come in bursts during an outage, so a wider window with more restarts is allowed.
MAX_RESTARTS = 5
WINDOW_S = 60.0
# The first restart is quick, later ones back off so a flapping dependency is not hammered.
RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class TooManyRestarts(Exception):
    pass


@dataclasses.dataclass
class ActorStatus:
    name: str
    state: str = "starting"  # starting | running | restarting | stopped
    restarts: int = 0
    last_error: str | None = None

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


ActorFn = Callable[..., Awaitable[None]]


class Supervisor:
    def __init__(
        self,
        *,
        max_restarts: int = MAX_RESTARTS,
        window_s: float = WINDOW_S,
        on_restart: Callable[[str], None] | None = None,
    ):
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.on_restart = on_restart
        self.actors: dict[str, ActorStatus] = {}

    async def start(self, nursery: trio.Nursery, name: str, actor: ActorFn):
        """Starts `actor` under supervision; returns once it called task_status.started().

        Setup errors of the first start propagate from here, so a misconfigured service
        fails at startup instead of restarting in a loop.
        """
        self.actors[name] = ActorStatus(name)
        return await nursery.start(self._supervise, name, actor)

    async def _supervise(self, name: str, actor: ActorFn, task_status=trio.TASK_STATUS_IGNORED):
        status = self.actors[name]
        crashes: deque[float] = deque()
        first = True
        while True:
            try:
                if first:
                    await actor(task_status=_Started(status, task_status))
                else:
                    await actor(task_status=_Started(status, trio.TASK_STATUS_IGNORED))
                status.state = "stopped"
                log.info("actor %s stopped", name)
                return
            except Exception as exc:
                if first and status.state == "starting":
                    raise  # setup failed: report it from nursery.start()
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
                delay = RESTART_BACKOFF_S[min(len(crashes), len(RESTART_BACKOFF_S)) - 1]
                log.error("actor %s crashed; restarting in %.1f s", name, delay, exc_info=exc)
                first = False
                await trio.sleep(delay)
                if self.on_restart is not None:
                    self.on_restart(name)


class _Started:
    """Marks the actor as running when it reports ready, then passes the report on."""

    def __init__(self, status: ActorStatus, task_status):
        self._status = status
        self._task_status = task_status

    def started(self, value=None) -> None:
        self._status.state = "running"
        self._task_status.started(value)
