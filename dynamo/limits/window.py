"""The 60-second window of one kind of OpenAI call, in calls and in tokens.

Pure logic on times passed in (trio time for a budget kept in memory, the database's
clock for the fleet's budget), so that it is tested without a clock. Every grant is a
`Grant`; a window holds the grants of the last 60 s and says when the next call may
start under a limit of calls per minute and, where one is known, of tokens per minute.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections import deque
from collections.abc import Iterable

WINDOW_S = 60.0  # limits are per minute, and no minute-long window may exceed them
# The API counts a call when it arrives, a little after we granted it, and not always
# equally late: a call that would fill the window again waits this much longer, so that
# it cannot arrive before the call it replaces has left the API's window. Costs <1% of
# the rate (5/min: 5 calls per 60.5 s).
EDGE_MARGIN_S = 0.5


@dataclasses.dataclass
class Grant:
    """One permit given out: a call started at `at`, expected to cost `tokens`. A grant
    that is not a call (`call=False`) only adds tokens an answer reported on top. A
    summary of older grants (`dynamo.database.fleet_store` loads a busy window so) stands for `calls`
    calls and their tokens, all taken as made at the latest of them."""

    at: float
    tokens: int = 0
    call: bool = True
    id: uuid.UUID = dataclasses.field(default_factory=uuid.uuid4)
    calls: int = 1  # the calls it stands for, if `call`


class SlidingWindow:
    """Paces calls so that no window (t-60, t] ever holds more than `limit` calls, nor more
    than `token_limit` tokens.

    Spacing: a call starts at least 60/limit s after the previous one, and at least
    60 × (its tokens) / token_limit s after it when tokens are limited. With costs that
    vary a lot (low, medium and high images mixed), a window cannot always be filled with
    whole calls: 75-85 % of the tokens are used then, 97-99 % when they vary a little. Count: no window
    (t-60, t] holds more than max(1, floor(limit)) calls, nor more than token_limit
    tokens; spacing implies it for an integer limit and equal costs, but not after a
    limit was lowered (calls made at the old pace still count), for a fractional limit,
    or when costs vary. The first call goes at once and a backlog is spread evenly:
    5/min → 0, 12, 24, 36, 48, 60.5, 72.5 ... (EDGE_MARGIN_S keeps the sixth call clear
    of the first one's window); 100/min and 21,120 tokens/min at 1,056 tokens a call →
    every 3 s, 20 a minute.
    """

    def __init__(self, limit: float, token_limit: float | None = None):
        self._grants: deque[Grant] = deque()  # oldest first, all within the last WINDOW_S
        self.limit = limit
        self.token_limit = token_limit

    @property
    def limit(self) -> float:
        return self._limit

    @limit.setter
    def limit(self, limit: float) -> None:
        if not limit > 0:
            raise ValueError(f"a rate limit must be positive, not {limit!r}")
        self._limit = float(limit)

    @property
    def token_limit(self) -> float | None:
        return self._token_limit

    @token_limit.setter
    def token_limit(self, token_limit: float | None) -> None:
        if token_limit is not None and not token_limit > 0:
            raise ValueError(f"a token limit must be positive, not {token_limit!r}")
        self._token_limit = None if token_limit is None else float(token_limit)

    @property
    def interval_s(self) -> float:
        return WINDOW_S / self._limit

    def next_allowed(self, now: float, tokens: int = 0) -> float:
        """The earliest time, not before `now`, at which a call costing `tokens` may start."""
        self._forget(now)
        last_call = self._newest_call(1)
        earliest = now
        if last_call is not None:
            earliest = max(earliest, last_call.at + self.interval_s)
            # The call `most` calls back must have left the window.
            nth_call = self._newest_call(max(1, math.floor(self._limit)))
            if nth_call is not None:
                earliest = max(earliest, _leaves(nth_call.at) + EDGE_MARGIN_S)
        if self._token_limit is not None and self._grants:
            if last_call is not None and tokens > 0:
                # Spaced evenly by the whole calls of this cost a window holds (at least
                # one), so that a limit that is not a multiple of the cost does not make
                # the window's edge stall.
                fit = max(1, math.floor(self._token_limit / tokens))
                earliest = max(earliest, last_call.at + WINDOW_S / fit)
            excess = self.tokens(now) + tokens - self._token_limit
            if excess > 0:
                # The oldest grants leave first; wait until enough of their tokens have
                # (or until the window is empty, for a call larger than the whole limit).
                freed = 0
                for grant in self._grants:
                    freed += grant.tokens
                    if freed >= excess:
                        break
                earliest = max(earliest, _leaves(grant.at) + EDGE_MARGIN_S)
        return earliest

    def record(self, grant: Grant) -> None:
        self._grants.append(grant)

    def restore(self, grants: Iterable[Grant]) -> None:
        self._grants = deque(sorted(grants, key=lambda grant: grant.at))

    def grants(self) -> list[Grant]:
        return list(self._grants)

    def find(self, grant_id: uuid.UUID | None) -> Grant | None:
        return next((grant for grant in self._grants if grant.id == grant_id), None)

    def remove(self, grant_id: uuid.UUID | None) -> None:
        self._grants = deque(grant for grant in self._grants if grant.id != grant_id)

    def count(self, now: float) -> int:
        """Calls in the window (now-60, now]."""
        self._forget(now)
        return sum(grant.calls for grant in self._grants if grant.call)

    def _newest_call(self, n: int) -> Grant | None:
        """The grant that holds the n-th newest call (1: the last call), if there are n."""
        seen = 0
        for grant in reversed(self._grants):
            if grant.call:
                seen += grant.calls
                if seen >= n:
                    return grant
        return None

    def tokens(self, now: float) -> int:
        """Tokens in the window (now-60, now]."""
        self._forget(now)
        return sum(grant.tokens for grant in self._grants)

    def mean_tokens(self, now: float) -> float:
        calls = self.count(now)
        return self.tokens(now) / calls if calls else 0.0

    def _forget(self, now: float) -> None:
        while self._grants and self._grants[0].at <= now - WINDOW_S:
            self._grants.popleft()


def _leaves(at: float) -> float:
    """The first t with `at` outside (t-60, t], exactly despite rounding."""
    leaves_at = at + WINDOW_S
    while leaves_at - WINDOW_S < at:
        leaves_at = math.nextafter(leaves_at, math.inf)
    return leaves_at
