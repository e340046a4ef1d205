"""How fast OpenAI may be called.

Pure logic, driven by trio.current_time() values passed in, so that it is tested
without a clock:

- `SlidingWindow` paces one kind of call under a per-minute limit (the schedule is in
  its docstring).
- `AdaptiveLimit` learns from the API's answers: a 429 pauses the kind and lowers the
  rate, `x-ratelimit-*` headers cap it, clean minutes bring it back.
- `AuthCircuit` stops calls after a 401/403 until a probe call gets through.
- `KindLimiter` puts the three together for one `CallKind`, with its waiting requests.
- `RateLimiterStatus` holds it all across actor restarts and shows it on /status.

The permit protocol is in `dynamo.permits`, the fair queue in `dynamo.fair_queue`.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import random
import re
import time
from collections import deque
from collections.abc import Mapping

import trio

from dynamo.fair_queue import FairQueue
from dynamo.permits import CallKind, CallOutcome, Permit, PermitRequest
from dynamo.retry import backoff_s, retry_after_from_headers

log = logging.getLogger(__name__)

WINDOW_S = 60.0  # limits are per minute, and no minute-long window may exceed them
# The API counts a call when it arrives, a little after we granted it, and not always
# equally late: a call that would fill the window again waits this much longer, so that
# it cannot arrive before the call it replaces has left the API's window. Costs <1% of
# the rate (5/min: 5 calls per 60.5 s).
EDGE_MARGIN_S = 0.5
# A lowered limit never goes below one call a minute (or the configured limit, if lower),
# so that the API keeps telling us how it is doing.
MIN_LIMIT_PER_MINUTE = 1.0
# A 429 although we kept to the known limit (a key shared with another process, clock
# skew): slow down by this factor, then recover.
DECREASE_FACTOR = 0.8
# Recovery: after each clean minute, this share of the ceiling is given back (at least 1).
RECOVERY_FRACTION = 0.1
# A limit learned from the API caps recovery for this long after it was last confirmed, so
# that a key upgraded meanwhile (or a 429 that was a fluke) is eventually probed again.
LEARNED_LIMIT_TTL_S = 600.0
# A refused key is probed after 5 s, then 10, 20, 40, 60, 60 ... s.
PROBE_BASE_S = 5.0
PROBE_CAP_S = 60.0
# A probe whose outcome is never reported (its caller crashed) frees the turn after this.
PROBE_LEASE_S = 120.0

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


class SlidingWindow:
    """Paces calls so that no window (t-60, t] ever holds more than `limit` calls.

    Two rules, both hard. Spacing: a call starts at least 60/limit s after the previous
    one. Count: no window (t-60, t] holds more than max(1, floor(limit)) calls; spacing
    implies it for an integer limit, but not after the limit was lowered (calls made at
    the old pace still count) nor for a fractional one. The first call goes at once and
    a backlog is spread evenly, so there is no burst at start and the limit is reached:
    5/min → 0, 12, 24, 36, 48, 60.5, 72.5 ... (any 60-s window holds 5; EDGE_MARGIN_S
    keeps the sixth call clear of the first one's window); 500/min → every 0.12 s.
    """

    def __init__(self, limit: float):
        self._calls: deque[float] = deque()  # start times within the last WINDOW_S
        self.limit = limit

    @property
    def limit(self) -> float:
        return self._limit

    @limit.setter
    def limit(self, limit: float) -> None:
        if not limit > 0:
            raise ValueError(f"a rate limit must be positive, not {limit!r}")
        self._limit = float(limit)

    @property
    def interval_s(self) -> float:
        return WINDOW_S / self._limit

    def next_allowed(self, now: float) -> float:
        """The earliest time, not before `now`, at which the next call may start."""
        self._forget(now)
        if not self._calls:
            return now
        earliest = max(now, self._calls[-1] + self.interval_s)
        most = max(1, math.floor(self._limit))
        if len(self._calls) >= most:
            oldest_counted = self._calls[-most]
            # The first t with oldest_counted outside (t-60, t], exactly despite rounding.
            leaves_at = oldest_counted + WINDOW_S
            while leaves_at - WINDOW_S < oldest_counted:
                leaves_at = math.nextafter(leaves_at, math.inf)
            earliest = max(earliest, leaves_at + EDGE_MARGIN_S)
        return earliest

    def record(self, now: float) -> None:
        self._calls.append(now)

    def count(self, now: float) -> int:
        """Calls in the window (now-60, now]."""
        self._forget(now)
        return len(self._calls)

    def _forget(self, now: float) -> None:
        while self._calls and self._calls[0] <= now - WINDOW_S:
            self._calls.popleft()


@dataclasses.dataclass(frozen=True)
class RateLimitHeaders:
    limit: float | None = None  # x-ratelimit-limit-requests: calls per minute
    remaining: float | None = None  # x-ratelimit-remaining-requests
    reset_s: float | None = None  # x-ratelimit-reset-requests ("6m0s", "20ms", "1.5s")


def parse_ratelimit_headers(headers: Mapping[str, str] | None) -> RateLimitHeaders:
    if not headers:
        return RateLimitHeaders()
    lowered = {key.lower(): value for key, value in headers.items()}
    limit = _float(lowered.get("x-ratelimit-limit-requests"))
    return RateLimitHeaders(
        limit=limit if limit is not None and limit > 0 else None,
        remaining=_float(lowered.get("x-ratelimit-remaining-requests")),
        reset_s=duration_s(lowered.get("x-ratelimit-reset-requests")),
    )


def duration_s(text: str | None) -> float | None:
    """OpenAI's durations ("1s", "6m0s", "20ms", "1h2m3.5s", or bare seconds) in seconds."""
    if text is None:
        return None
    text = text.strip()
    plain = _float(text)
    if plain is not None:
        return max(0.0, plain)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def _float(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


class AdaptiveLimit:
    """A `SlidingWindow` whose limit follows what the API says.

    A 429 pauses the kind for the answer's retry-after (else, with no requests remaining,
    for x-ratelimit-reset-requests; else a backoff) and lowers
    the rate: to the `x-ratelimit-limit-requests` the answer shows when we were above it;
    without that header, to the calls the server accepted in the last minute (at most
    halving it); when neither explains the 429, by DECREASE_FACTOR. A lowered limit learned
    this way caps recovery for LEARNED_LIMIT_TTL_S, so that 429s stop.
    A limit shown in any answer caps the rate at once. After each minute without a 429
    the rate grows by RECOVERY_FRACTION of the ceiling (at least one call), up to the
    configured limit or the limit the API shows, whichever is lower.
    """

    label = "openai"  # for log lines; KindLimiter names the kind

    def __init__(self, configured: float, *, rng=random):
        self.window = SlidingWindow(configured)
        self._configured = float(configured)
        self.paused_until = -math.inf  # trio time; no call of this kind before it
        self._learned: float | None = None  # the limit the API told us, or we inferred
        self._learned_at = -math.inf
        self._changed_at = -math.inf  # last change of the effective limit
        self._rate_limited_in_a_row = 0
        self._rng = rng

    @property
    def configured(self) -> float:
        return self._configured

    @configured.setter
    def configured(self, configured: float) -> None:
        """A new configured limit caps the rate at once; a higher one is recovered to."""
        if not configured > 0:
            raise ValueError(f"a rate limit must be positive, not {configured!r}")
        self._configured = float(configured)
        self.window.limit = min(self.window.limit, self._configured)

    @property
    def effective_limit(self) -> float:
        return self.window.limit

    def ceiling(self, now: float) -> float:
        if self._learned is not None and now - self._learned_at < LEARNED_LIMIT_TTL_S:
            return min(self._configured, self._learned)
        return self._configured

    def next_allowed(self, now: float) -> float:
        return max(self.window.next_allowed(now), self.paused_until)

    def record(self, now: float) -> None:
        self.window.record(now)

    def on_rate_limited(
        self, now: float, retry_after_s: float | None, headers: Mapping[str, str] | None
    ) -> None:
        self._rate_limited_in_a_row += 1
        # No permit goes out during a pause: a 429 arriving in one is for a call made before
        # it, news already acted on. It may extend the pause but lowers the rate only to a
        # limit the API shows.
        stale = now < self.paused_until
        shown = parse_ratelimit_headers(headers)
        if retry_after_s is None:
            retry_after_s = retry_after_from_headers(headers)
        if retry_after_s is None and shown.remaining == 0:
            retry_after_s = shown.reset_s
        if retry_after_s is None:
            retry_after_s = backoff_s(
                self._rate_limited_in_a_row - 1,
                rng=self._rng,
                base_s=self.window.interval_s,
                cap_s=WINDOW_S,
            )
        self.paused_until = max(self.paused_until, now + retry_after_s)
        before = self.effective_limit
        if shown.limit is not None:
            self._learn(now, shown.limit)
            if before > self.ceiling(now):
                lowered = self.ceiling(now)
            elif stale or retry_after_s <= self.window.interval_s:
                # Within the limit the API shows, and told to wait less than one call's
                # spacing: a race at the window's edge, not a wrong limit. Pause only.
                lowered = before
            else:
                lowered = before * DECREASE_FACTOR
        elif stale:
            lowered = before
        else:
            # Without headers, the calls the server took in the last minute are the best
            # guess of its limit; but other users of the key may have spent some, so one
            # 429 never more than halves the rate.
            accepted = self.window.count(now) - 1  # the refused call was recorded too
            if accepted < before:
                lowered = max(accepted, before / 2)
                self._learn(now, lowered)
            else:
                lowered = before * DECREASE_FACTOR
        self._set_effective(now, lowered)
        log.warning(
            "%s: 429; paused %.1f s, limit %.1f → %.1f/min",
            self.label,
            retry_after_s,
            before,
            self.effective_limit,
        )

    def on_success(self, now: float, headers: Mapping[str, str] | None) -> None:
        self._rate_limited_in_a_row = 0
        shown = parse_ratelimit_headers(headers)
        if shown.limit is not None:
            self._learn(now, shown.limit)
        ceiling = self.ceiling(now)
        before = self.effective_limit
        if before > ceiling:
            self._set_effective(now, ceiling)
            log.warning(
                "%s: the API shows a limit of %.1f/min; pacing at %.1f/min",
                self.label,
                shown.limit or ceiling,
                self.effective_limit,
            )
        elif before < ceiling and now - self._changed_at >= WINDOW_S:
            step = max(1.0, ceiling * RECOVERY_FRACTION)
            self._set_effective(now, min(ceiling, before + step))
            log.info(
                "%s: recovering, limit %.1f → %.1f/min", self.label, before, self.effective_limit
            )

    @property
    def _floor(self) -> float:
        return min(MIN_LIMIT_PER_MINUTE, self._configured)

    def _learn(self, now: float, limit: float) -> None:
        limit = max(self._floor, limit)
        if (
            self._learned is None
            or limit <= self._learned
            or now - self._learned_at >= LEARNED_LIMIT_TTL_S
        ):
            self._learned, self._learned_at = limit, now

    def _set_effective(self, now: float, limit: float) -> None:
        self.window.limit = min(self._configured, max(self._floor, limit))
        self._changed_at = now


class AuthCircuit:
    """Open after a 401/403: only probe permits, one at a time, spaced 5, 10, 20, 40, 60,
    60 ... s after each failed probe, until a probe succeeds."""

    def __init__(self) -> None:
        self.is_open = False
        self._failed_probes = 0
        self._next_probe_at = -math.inf
        self._probe_granted_at: float | None = None

    def open(self, now: float) -> None:
        if not self.is_open:
            self.is_open, self._failed_probes, self._probe_granted_at = True, 0, None
            self._next_probe_at = now + PROBE_BASE_S

    def close(self) -> None:
        self.is_open, self._probe_granted_at = False, None

    def probe_at(self) -> float:
        """When the next probe may go out (while one is out: when its lease ends)."""
        if self._probe_granted_at is not None:
            return max(self._next_probe_at, self._probe_granted_at + PROBE_LEASE_S)
        return self._next_probe_at

    def probe_granted(self, now: float) -> None:
        self._probe_granted_at = now

    def probe_failed(self, now: float) -> None:
        self._failed_probes += 1
        self._schedule_probe(now)

    def probe_inconclusive(self, now: float) -> None:
        """The probe failed for another reason (5xx, network): the key is still unknown."""
        self._schedule_probe(now)

    def _schedule_probe(self, now: float) -> None:
        self._probe_granted_at = None
        self._next_probe_at = now + min(
            PROBE_CAP_S, PROBE_BASE_S * 2.0 ** min(self._failed_probes, 16)
        )


class KindLimiter:
    """Everything the rate limiter knows about one kind of call."""

    def __init__(self, kind: CallKind, configured: float, *, rng=random):
        self.kind = kind
        self.limit = AdaptiveLimit(configured, rng=rng)
        self.limit.label = f"openai {kind.value}"
        self.circuit = AuthCircuit()
        self.waiting: deque[PermitRequest] = deque()  # FIFO

    def next_grant_at(self, now: float) -> float:
        at = self.limit.next_allowed(now)
        if self.circuit.is_open:
            at = max(at, self.circuit.probe_at())
        return at

    def permit(self) -> Permit:
        return Permit(probe=self.circuit.is_open)

    def granted(self, now: float, permit: Permit) -> None:
        """Counts a permit the caller received: it calls the API right away."""
        self.limit.record(now)
        if permit.probe:
            self.circuit.probe_granted(now)

    def on_outcome(self, outcome: CallOutcome, now: float) -> None:
        if outcome.auth_failed:
            if outcome.probe and self.circuit.is_open:
                self.circuit.probe_failed(now)
                log.error(
                    "openai %s: probe refused (401/403); next probe in %.0f s",
                    self.kind.value,
                    self.circuit.probe_at() - now,
                )
            elif not self.circuit.is_open:
                self.circuit.open(now)
                log.error(
                    "openai %s: API key refused (401/403); circuit open, calls stopped",
                    self.kind.value,
                )
            return
        if outcome.probe and self.circuit.is_open:
            if outcome.succeeded or outcome.rate_limited:  # either way, the key was accepted
                self.circuit.close()
                log.warning("openai %s: probe accepted; circuit closed", self.kind.value)
            else:
                self.circuit.probe_inconclusive(now)
        if outcome.rate_limited:
            self.limit.on_rate_limited(now, outcome.retry_after_s, outcome.headers)
        elif outcome.succeeded:
            self.limit.on_success(now, outcome.headers)


@dataclasses.dataclass
class RateLimiterStatus:
    """The rate limiter's state: a live view for GET /status, and its memory across restarts.

    Create one per process and pass the same object to every `rate_limiter.run()`: a
    restarted actor then keeps its windows (the 60-s ceiling holds across the restart),
    its learned limits, its circuits, the permit requests waiting and the queued jobs.
    """

    kinds: dict[CallKind, KindLimiter] = dataclasses.field(default_factory=dict)
    fair_queue: FairQueue = dataclasses.field(default_factory=FairQueue)

    def configure(self, limits: Mapping[CallKind, float]) -> None:
        for kind, per_minute in limits.items():
            if kind in self.kinds:
                self.kinds[kind].limit.configured = per_minute
            else:
                self.kinds[kind] = KindLimiter(kind, per_minute)

    def as_json(self, now: float | None = None) -> dict:
        now = trio.current_time() if now is None else now
        kinds = {}
        for kind, limiter in self.kinds.items():
            limit, circuit = limiter.limit, limiter.circuit
            kinds[kind.value] = {
                "configured_per_minute": limit.configured,
                "effective_per_minute": round(limit.effective_limit, 2),
                "calls_last_60s": limit.window.count(now),
                "paused_until": _wall_clock(limit.paused_until, now),
                "circuit": "open" if circuit.is_open else "closed",
                "circuit_open": circuit.is_open,
                "next_probe_at": _wall_clock(circuit.probe_at(), now) if circuit.is_open else None,
                "permits_waiting": len(limiter.waiting),
            }
        return {
            "kinds": kinds,
            "fair_queue": {
                "depth": len(self.fair_queue),
                "viewers_waiting": self.fair_queue.viewers_waiting,
            },
        }


def _wall_clock(at: float, now: float) -> str | None:
    """A trio-clock time as an ISO 8601 UTC timestamp; None if it is not in the future."""
    if not at > now:
        return None
    wall = time.time() + (at - now)
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(timespec="seconds")
