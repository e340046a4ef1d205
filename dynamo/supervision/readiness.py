"""What GET /readyz reports: whether each dependency this process needs is usable now.

While PostgreSQL or RabbitMQ is unreachable the check says so, with how long and why
(`database: unreachable for 12 s: ...`), and the outage is reported to its
`dynamo.supervision.outages.Dependency` (one WARNING when it goes, one INFO when it is back), so it is
noticed even when no request is in flight. /healthz stays 200 all along: the process is
alive and waits."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:  # the ports import dynamo.supervision: no import at run time
    from dynamo.database.port import Database
    from dynamo.rabbitmq.broker import BrokerPort
    from dynamo.supervision.outages import Dependencies

# A readiness probe must answer quickly even when the database hangs.
PING_TIMEOUT_S = 2.0


@dataclasses.dataclass
class Readiness:
    db: Database
    broker: BrokerPort
    limiter_status: Any = None  # dynamo.limits.state.RateLimiterStatus
    # True while intake consumes the input queue; None when there is no broker to consume.
    consuming: bool | None = False
    dependencies: Dependencies | None = None

    async def check(self) -> dict[str, str]:
        """Each dependency with "ok" or why it is not ready."""
        problems: dict[str, str] = {}
        with trio.move_on_after(PING_TIMEOUT_S) as scope:
            try:
                await self.db.ping()
                problems["database"] = "ok"
            except Exception as exc:  # any failure to reach it means not ready
                problems["database"] = f"unreachable: {type(exc).__name__}: {exc}"[:300]
        if scope.cancelled_caught:
            problems["database"] = "unreachable: no answer"
        problems["database"] = self._follow("database", problems["database"])
        if self.broker.configured:
            broker = "ok" if self.broker.connected else "unreachable"
            problems["broker"] = self._follow("broker", broker)
            problems["input_queue"] = "ok" if self.consuming else "not consumed"
        if self.limiter_status is not None and _circuit_open(self.limiter_status):
            problems["openai"] = "circuit open: the API key was refused"
        else:
            problems["openai"] = "ok"
        return problems

    def _follow(self, name: str, result: str) -> str:
        """Tells the dependency's tracker what the check found; the result, with how long
        it has been down when it is."""
        dependency = self.dependencies.get(name) if self.dependencies else None
        if dependency is None:
            return result
        if result == "ok":
            dependency.came_back()
            return result
        dependency.went_down(result.removeprefix("unreachable").lstrip(": ") or "connection lost")
        return f"unreachable for {dependency.down_for_s():.0f} s: {dependency.reason}"[:300]


def _circuit_open(status) -> bool:
    data = status.as_json()
    kinds = data.get("kinds", data)
    return any(isinstance(v, dict) and v.get("circuit_open") for v in kinds.values())
