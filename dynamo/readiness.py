"""What GET /readyz reports: whether each dependency this process needs is usable now."""

from __future__ import annotations

import dataclasses

import trio

# A readiness probe must answer quickly even when the database hangs.
PING_TIMEOUT_S = 2.0


@dataclasses.dataclass
class Readiness:
    db: object
    broker: object
    limiter_status: object | None = None
    # True while intake consumes the input queue; None when there is no broker to consume.
    consuming: bool | None = False

    async def check(self) -> dict[str, str]:
        """Each dependency with "ok" or why it is not ready."""
        problems: dict[str, str] = {}
        with trio.move_on_after(PING_TIMEOUT_S) as scope:
            try:
                await self.db.ping()
                problems["database"] = "ok"
            except Exception as exc:  # any failure to reach it means not ready
                problems["database"] = f"unreachable: {type(exc).__name__}"
        if scope.cancelled_caught:
            problems["database"] = "unreachable: no answer"
        if getattr(self.broker, "configured", False):
            problems["broker"] = "ok" if self.broker.connected else "unreachable"
            problems["input_queue"] = "ok" if self.consuming else "not consumed"
        if self.limiter_status is not None and _circuit_open(self.limiter_status):
            problems["openai"] = "circuit open: the API key was refused"
        else:
            problems["openai"] = "ok"
        return problems


def _circuit_open(status) -> bool:
    data = status.as_json()
    kinds = data.get("kinds", data)
    return any(isinstance(v, dict) and v.get("circuit_open") for v in kinds.values())
