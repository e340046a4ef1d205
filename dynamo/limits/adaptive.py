"""A rate limit that follows what the API says: `AdaptiveLimit`.

Pure logic on times passed in. Its learned state (`state()` / `restore()`) is plain
JSON, so that the fleet's processes share it through PostgreSQL; the configured limits
are each process's own and are not part of it.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping

from dynamo.limits.window import WINDOW_S, Grant, SlidingWindow
from dynamo.openai_port.rate_headers import RateLimitHeaders
from dynamo.supervision.retry import backoff_s

log = logging.getLogger(__name__)

# A lowered limit never goes below one call a minute (or the configured limit, if lower),
# so that the API keeps telling us how it is doing.
MIN_LIMIT_PER_MINUTE = 1.0
# A 429 although we kept to the known limit (a key shared with another service, clock
# skew): slow down by this factor, then recover.
DECREASE_FACTOR = 0.8
# Recovery: after each clean minute, this share of the ceiling is given back (at least 1).
RECOVERY_FRACTION = 0.1
# A limit learned from the API caps recovery for this long after it was last confirmed, so
# that a key upgraded meanwhile (or a 429 that was a fluke) is eventually probed again.
LEARNED_LIMIT_TTL_S = 600.0
# The same limit shown again confirms it at most this often: a confirmation is a write to
# the shared state, and once a minute keeps it well within its TTL.
LEARNED_LIMIT_REFRESH_S = 60.0


class AdaptiveLimit:
    """A `SlidingWindow` whose limits follow what the API says.

    A 429 pauses the kind for the answer's retry-after (else, with no requests or tokens
    remaining, for the matching x-ratelimit-reset-*; else a backoff). A token limit shown
    in the answer that is below the one we kept to explains the 429: the tokens limit is
    lowered to it and the call rate is kept. Otherwise the call rate is lowered: to the
    `x-ratelimit-limit-requests` the answer shows when we were above it; without that
    header, to the calls the server accepted in the last minute (at most halving it); when
    neither explains the 429, by DECREASE_FACTOR of the pace actually kept. A lowered
    limit learned this way caps recovery for LEARNED_LIMIT_TTL_S, so that 429s stop.
    A limit shown in any answer caps the rate at once. After each minute without a 429
    the call rate grows by RECOVERY_FRACTION of the ceiling (at least one call), up to the
    configured limit or the limit the API shows, whichever is lower. Tokens per minute are
    the configured limit or the one the API shows, whichever is lower (none: unlimited).
    """

    label = "openai"  # for log lines; KindLimiter names the kind

    def __init__(self, configured: float, configured_tokens: float | None = None, *, rng=random):
        self.window = SlidingWindow(configured)
        self._configured = float(configured)
        self._configured_tokens: float | None = None
        self.paused_until = -math.inf  # no call of this kind before it
        self._learned: float | None = None  # the limit the API told us, or we inferred
        self._learned_at = -math.inf
        self._learned_tokens: float | None = None  # x-ratelimit-limit-tokens
        self._learned_tokens_at = -math.inf
        self._changed_at = -math.inf  # last change of the effective limit
        self._rate_limited_in_a_row = 0
        self._answered_at = -math.inf  # last answer that could show a token limit
        self._rng = rng
        self.configured_tokens = configured_tokens

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
    def configured_tokens(self) -> float | None:
        return self._configured_tokens

    @configured_tokens.setter
    def configured_tokens(self, tokens: float | None) -> None:
        if tokens is not None and not tokens > 0:
            raise ValueError(f"a token limit must be positive, not {tokens!r}")
        self._configured_tokens = None if tokens is None else float(tokens)

    @property
    def effective_limit(self) -> float:
        return self.window.limit

    def ceiling(self, now: float) -> float:
        if self._learned is not None and now - self._learned_at < LEARNED_LIMIT_TTL_S:
            return min(self._configured, self._learned)
        return self._configured

    def token_ceiling(self, now: float) -> float | None:
        """Tokens per minute to keep to: configured or shown, the lower; None: no limit."""
        known = [self._configured_tokens]
        if now - self._learned_tokens_at < LEARNED_LIMIT_TTL_S:
            known.append(self._learned_tokens)
        ceilings = [tokens for tokens in known if tokens is not None]
        return min(ceilings) if ceilings else None

    def next_allowed(self, now: float, tokens: int = 0) -> float:
        self.window.token_limit = self.token_ceiling(now)
        return max(self.window.next_allowed(now, tokens), self.paused_until)

    def record(self, grant: Grant) -> None:
        self.window.record(grant)

    def pace_per_minute(self, now: float) -> float:
        """Calls per minute actually allowed: the call limit, or fewer when tokens bind."""
        pace = self.effective_limit
        token_ceiling, mean = self.token_ceiling(now), self.window.mean_tokens(now)
        if token_ceiling is not None and mean > 0:
            pace = min(pace, token_ceiling / mean)
        return pace

    def on_answer(self, now: float) -> None:
        """A success or a 429 (which show the limits) came: the token limit, or that there
        is none, is known for LEARNED_LIMIT_TTL_S (confirmed at most once a minute)."""
        if now - self._answered_at >= LEARNED_LIMIT_REFRESH_S:
            self._answered_at = now

    def answer_changes_nothing(self, now: float) -> bool:
        return now - self._answered_at < LEARNED_LIMIT_REFRESH_S

    def tokens_unknown(self, now: float) -> bool:
        """No token limit configured or shown, and no recent answer showed there is none."""
        return self.token_ceiling(now) is None and now - self._answered_at >= LEARNED_LIMIT_TTL_S

    def on_rate_limited(
        self, now: float, retry_after_s: float | None, shown: RateLimitHeaders
    ) -> None:
        self._rate_limited_in_a_row += 1
        # No permit goes out during a pause: a 429 arriving in one is for a call made before
        # it, news already acted on. It may extend the pause but lowers the rate only to a
        # limit the API shows.
        stale = now < self.paused_until
        interval_s = WINDOW_S / self.pace_per_minute(now)
        if retry_after_s is None and shown.remaining == 0:
            retry_after_s = shown.reset_s
        if retry_after_s is None and shown.remaining_tokens == 0:
            retry_after_s = shown.reset_tokens_s
        if retry_after_s is None:
            retry_after_s = backoff_s(
                self._rate_limited_in_a_row - 1, rng=self._rng, base_s=interval_s, cap_s=WINDOW_S
            )
        self.paused_until = max(self.paused_until, now + retry_after_s)
        before = self.effective_limit
        tokens_before = self.token_ceiling(now)
        if shown.token_limit is not None:
            self._learn_tokens(now, shown.token_limit)
        tokens_after = self.token_ceiling(now)
        explained_by_tokens = tokens_after is not None and (
            tokens_before is None or tokens_after < tokens_before
        )
        if shown.limit is not None:
            self._learn(now, shown.limit)
            if before > self.ceiling(now):
                lowered = self.ceiling(now)
            elif explained_by_tokens or stale or retry_after_s <= interval_s:
                # Within the limit the API shows, and told to wait less than one call's
                # spacing: a race at the window's edge, not a wrong limit. Pause only.
                lowered = before
            else:
                lowered = self.pace_per_minute(now) * DECREASE_FACTOR
        elif explained_by_tokens or stale:
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
                lowered = self.pace_per_minute(now) * DECREASE_FACTOR
        self._set_effective(now, lowered)
        log.warning(
            "%s: 429; paused %.1f s, limit %.1f → %.1f/min, tokens %s/min",
            self.label,
            retry_after_s,
            before,
            self.effective_limit,
            _tokens_text(tokens_after),
        )

    def on_success(self, now: float, shown: RateLimitHeaders) -> None:
        self._rate_limited_in_a_row = 0
        if shown.limit is not None:
            self._learn(now, shown.limit)
        if shown.token_limit is not None:
            tokens_before = self.token_ceiling(now)
            self._learn_tokens(now, shown.token_limit)
            if self.token_ceiling(now) != tokens_before:
                log.warning(
                    "%s: the API shows a limit of %s tokens/min; keeping to %s tokens/min",
                    self.label,
                    _tokens_text(shown.token_limit),
                    _tokens_text(self.token_ceiling(now)),
                )
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

    def success_changes_nothing(self, now: float, shown: RateLimitHeaders) -> bool:
        """Whether `on_success(now, shown)` would leave the state as it is (so that the
        fleet's shared state need not be written)."""
        ceiling = self.ceiling(now)
        return (
            self._rate_limited_in_a_row == 0
            and not self._would_learn(now, shown.limit)
            and not self._would_learn_tokens(now, shown.token_limit)
            and not self.effective_limit > ceiling
            and not (self.effective_limit < ceiling and now - self._changed_at >= WINDOW_S)
        )

    # -- the learned state, as JSON, for the fleet's shared budget ---------------------

    def state(self) -> dict:
        return {
            "effective": self.window.limit,
            "configured": self._configured,
            "paused_until": _finite(self.paused_until),
            "learned": self._learned,
            "learned_at": _finite(self._learned_at),
            "learned_tokens": self._learned_tokens,
            "learned_tokens_at": _finite(self._learned_tokens_at),
            "changed_at": _finite(self._changed_at),
            "rate_limited_in_a_row": self._rate_limited_in_a_row,
            "answered_at": _finite(self._answered_at),
        }

    def restore(self, state: Mapping) -> None:
        """Takes the learned state over; the configured limits stay this process's own.
        An effective limit at its writer's configured one was not lowered by anything the
        API said: this process follows its own configuration (a raised limit applies at
        once); a lowered one holds for every process, under its own configured limit."""
        effective = state["effective"]
        if effective >= state["configured"]:
            effective = self._configured
        self.window.limit = min(self._configured, max(self._floor, effective))
        self.paused_until = _time(state["paused_until"])
        self._learned, self._learned_at = state["learned"], _time(state["learned_at"])
        self._learned_tokens = state["learned_tokens"]
        self._learned_tokens_at = _time(state["learned_tokens_at"])
        self._changed_at = _time(state["changed_at"])
        self._rate_limited_in_a_row = state["rate_limited_in_a_row"]
        # Absent from the state a process before issue 18 wrote.
        self._answered_at = _time(state.get("answered_at"))

    # -- learning ----------------------------------------------------------------------

    @property
    def _floor(self) -> float:
        return min(MIN_LIMIT_PER_MINUTE, self._configured)

    def _would_learn(self, now: float, limit: float | None) -> bool:
        if limit is None:
            return False
        limit = max(self._floor, limit)
        return _news(limit, now, self._learned, self._learned_at)

    def _learn(self, now: float, limit: float) -> None:
        if self._would_learn(now, limit):
            self._learned, self._learned_at = max(self._floor, limit), now

    def _would_learn_tokens(self, now: float, tokens: float | None) -> bool:
        return tokens is not None and _news(
            tokens, now, self._learned_tokens, self._learned_tokens_at
        )

    def _learn_tokens(self, now: float, tokens: float) -> None:
        if self._would_learn_tokens(now, tokens):
            self._learned_tokens, self._learned_tokens_at = float(tokens), now

    def _set_effective(self, now: float, limit: float) -> None:
        self.window.limit = min(self._configured, max(self._floor, limit))
        self._changed_at = now


def _news(limit: float, now: float, learned: float | None, learned_at: float) -> bool:
    """A limit shown is news if none is known, it is lower, the known one is old enough to
    be confirmed again, or has gone stale (then a higher one replaces it)."""
    if learned is None or limit < learned or now - learned_at >= LEARNED_LIMIT_TTL_S:
        return True
    return limit == learned and now - learned_at >= LEARNED_LIMIT_REFRESH_S


def _finite(at: float) -> float | None:
    return at if math.isfinite(at) else None  # JSON has no -Infinity


def _time(at: float | None) -> float:
    return -math.inf if at is None else at


def _tokens_text(tokens: float | None) -> str:
    return "unlimited" if tokens is None else f"{tokens:,.0f}"
