"""How long to wait before trying again: one `Backoff` policy, parameterised by each
caller, instead of a hand-written doubling per loop.

A `Backoff` is either exponential (`base_s` doubling up to `cap_s`, with jitter: the wait
is drawn between `floor` times the ceiling and the ceiling, after the AWS architecture
blog's "Exponential Backoff And Jitter"; `floor` 0 is full jitter, 0.5 equal jitter, 1 no
jitter) or a fixed schedule (`steps_s`, the last step repeating). A server's
`retry_after_s` is honoured as a floor, even above the cap.

The policies in use, named where they are used:

- external calls (`retry.retrying`): full jitter from 1 s, capped by the caller (5 s for
  the ledger, auth and storage); an OpenAI outage (5xx, no connection) waits
  `retry.OUTAGE_BACKOFF`, equal jitter from 2 s doubling to 32 s;
- Discord posts: full jitter from 1 s to 30 s;
- an outage's probe (`outages`): full jitter from 50 ms to 1 s;
- the supervisor's restarts and the change feed's reconnections: fixed schedules;
- the rate limiter's wait for an unreachable shared budget: 0.5 s doubling to 5 s;
- the auth circuit's probes: 5 s doubling to 60 s.
"""

from __future__ import annotations

import dataclasses
import random

# A server's retry-after is a floor; a little jitter on top keeps the callers it answered
# together from all coming back at the same instant.
RETRY_AFTER_JITTER_S = 0.5
# 2**attempt overflows a float near 1024; the cap is reached long before this anyway.
_MAX_EXPONENT = 32


@dataclasses.dataclass(frozen=True)
class Backoff:
    base_s: float = 1.0
    cap_s: float = 60.0
    floor: float = 0.0  # the least fraction of the ceiling waited: 1 means no jitter
    steps_s: tuple[float, ...] = ()  # a fixed schedule instead of doubling

    def __post_init__(self) -> None:
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError("floor must be between 0 and 1")
        if self.base_s < 0 or self.cap_s < 0 or any(step < 0 for step in self.steps_s):
            raise ValueError("a wait cannot be negative")

    def ceiling_s(self, attempt: int) -> float:
        """The longest wait before retry number `attempt` (0 for the first retry)."""
        attempt = max(attempt, 0)
        if self.steps_s:
            return self.steps_s[min(attempt, len(self.steps_s) - 1)]
        return min(self.cap_s, self.base_s * 2.0 ** min(attempt, _MAX_EXPONENT))

    def delay_s(self, attempt: int, *, retry_after_s: float | None = None, rng=random) -> float:
        """Seconds to wait before retry number `attempt` (0 for the first retry)."""
        if retry_after_s is not None:
            return max(0.0, retry_after_s) + rng.uniform(0.0, RETRY_AFTER_JITTER_S)
        ceiling = self.ceiling_s(attempt)
        if self.steps_s or self.floor == 1.0:
            return ceiling
        return rng.uniform(self.floor * ceiling, ceiling)
