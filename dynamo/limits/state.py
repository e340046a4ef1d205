"""How fast OpenAI may be called: the rate limiter's state, and where its parts live.

- `dynamo.limits.window`: `SlidingWindow`, the 60-s window of calls and tokens.
- `dynamo.openai_port.rate_headers`: what the API's `x-ratelimit-*` headers say.
- `dynamo.limits.adaptive`: `AdaptiveLimit`, a limit that follows the API's answers.
- `dynamo.limits.kind`: `KindLimiter` (one kind of call) and `AuthCircuit`.
- `dynamo.limits.budget`: `Budget`, the account's budget shared by every process of a fleet.
- `dynamo.limits.permits`: the permit protocol; `dynamo.inflight.fair_queue`: the fair queue.

`RateLimiterStatus` holds what the rate limiter actor keeps across its restarts and what
GET /status shows of it.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from collections import deque
from collections.abc import Mapping

import trio

from dynamo.inflight.fair_queue import FairQueue
from dynamo.limits.adaptive import AdaptiveLimit
from dynamo.limits.budget import Budget, KindConfig
from dynamo.limits.kind import PROBE_LEASE_S, AuthCircuit, KindLimiter
from dynamo.limits.permits import CallKind, PermitRequest
from dynamo.limits.window import EDGE_MARGIN_S, WINDOW_S, Grant, SlidingWindow
from dynamo.openai_port.rate_headers import RateLimitHeaders, duration_s, parse_ratelimit_headers

__all__ = [
    "EDGE_MARGIN_S",
    "PROBE_LEASE_S",
    "WINDOW_S",
    "AdaptiveLimit",
    "AuthCircuit",
    "Budget",
    "Grant",
    "KindConfig",
    "KindLimiter",
    "RateLimitHeaders",
    "RateLimiterStatus",
    "SlidingWindow",
    "duration_s",
    "parse_ratelimit_headers",
]


@dataclasses.dataclass
class RateLimiterStatus:
    """The rate limiter's state: a live view for GET /status, and its memory across restarts.

    Create one per process and pass the same object to every `rate_limiter.run()`: a
    restarted actor then keeps its budget (whose windows, learned limits and circuits
    outlive it, in memory or in the fleet's database), the permit requests waiting and the
    queued jobs.
    """

    budget: Budget = dataclasses.field(default_factory=Budget)
    waiting: dict[CallKind, deque[PermitRequest]] = dataclasses.field(default_factory=dict)
    fair_queue: FairQueue = dataclasses.field(default_factory=FairQueue)

    @property
    def kinds(self) -> list[CallKind]:
        return list(self.budget.configs)

    def configure(self, limits: Mapping[CallKind, float | KindConfig]) -> None:
        configs = {
            kind: limit if isinstance(limit, KindConfig) else KindConfig(limit)
            for kind, limit in limits.items()
        }
        self.budget.configure(configs)
        for kind in configs:
            self.waiting.setdefault(kind, deque())

    def limiter(self, kind: CallKind) -> KindLimiter | None:
        """The kind's limiter as the budget last saw it (None before its first step)."""
        seen = self.budget.view(kind, 0.0)
        return None if seen is None else seen[0]

    def as_json(self, now: float | None = None) -> dict:
        """`now`: trio's clock (the budget's own may be the database's)."""
        now = trio.current_time() if now is None else now
        kinds = {}
        for kind, config in self.budget.configs.items():
            kinds[kind.value] = {
                "configured_per_minute": config.per_minute,
                "configured_tokens_per_minute": config.tokens_per_minute,
                "permits_waiting": len(self.waiting.get(kind, ())),
                **_limiter_json(self.budget.view(kind, now), config),
            }
        return {
            "scope": "fleet" if self.budget.shared else "process",
            "kinds": kinds,
            "fair_queue": {
                "depth": len(self.fair_queue),
                "viewers_waiting": self.fair_queue.viewers_waiting,
            },
        }


def _limiter_json(seen: tuple[KindLimiter, float] | None, config: KindConfig) -> dict:
    if seen is None:  # no call of this kind yet
        return {
            "effective_per_minute": config.per_minute,
            "tokens_per_minute": config.tokens_per_minute,
            "calls_last_60s": 0,
            "tokens_last_60s": 0,
            "paused_until": None,
            "circuit": "closed",
            "circuit_open": False,
            "next_probe_at": None,
        }
    limiter, now = seen
    limit, circuit = limiter.limit, limiter.circuit
    return {
        "effective_per_minute": round(limit.effective_limit, 2),
        "tokens_per_minute": limit.token_ceiling(now),
        "calls_last_60s": limit.window.count(now),
        "tokens_last_60s": limit.window.tokens(now),
        "paused_until": _wall_clock(limit.paused_until, now),
        "circuit": "open" if circuit.is_open else "closed",
        "circuit_open": circuit.is_open,
        "next_probe_at": _wall_clock(circuit.probe_at(), now) if circuit.is_open else None,
    }


def _wall_clock(at: float, now: float) -> str | None:
    """A time of the budget's clock as an ISO 8601 UTC timestamp; None if not in the future."""
    if not at > now or not math.isfinite(at):
        return None
    wall = time.time() + (at - now)
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(timespec="seconds")
