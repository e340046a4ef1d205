"""Service tokens kept per viewer, so that the auth service is asked once per token's life
instead of once per ledger call (issue 18: that round trip cost 4-8 % of dynamo's CPU).

The real auth service (golden-vcr/auth, `internal/server/service_auth.go`) answers
`POST /service-token` with an RS256 JWT whose `exp` is its issue time (`iat`) plus
15 minutes. dynamo does not hold the key, nor needs to: the ledger verifies the token;
dynamo only reads `exp` (and `iat`) from the payload, unverified (PyJWT), to know how long to keep
it. A token is reused while more than a safety margin of its life is left: `MARGIN_S`, or
`MARGIN_FRACTION` of its lifetime when that is shorter (a short-lived token). A token
whose payload cannot be read, or that has no numeric `exp`, is not kept: every call then
asks for one, as before.

The life left is counted on this host's clock from the moment the token arrived
(received + (exp - iat)), or from `exp` if that comes first: a clock behind the auth
service's does not make an expired token look alive.

Keyed by the viewer as the token request names them (id, login, displayName), at most
`MAX_VIEWERS` of them, the least recently used going first. Tokens are secrets: nothing
here logs one, and the cache's repr shows none.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jwt

# Viewers whose token is kept: a stream's active viewers fit many times over, and a
# token is a few hundred bytes.
MAX_VIEWERS = 1_000
# A kept token is not used in its last minute: a ledger call made with it (and its
# retries, and the two hosts' clocks differing) must not outlive it.
MARGIN_S = 60.0
# For a short-lived token, a quarter of its lifetime instead.
MARGIN_FRACTION = 0.25

# (twitch user id, login, display name), as in the token request's body.
ViewerKey = tuple[str, str, str]


@dataclasses.dataclass(frozen=True)
class _Kept:
    token: str = dataclasses.field(repr=False)
    reuse_until: float  # on the cache's clock


class TokenCache:
    """Service tokens by viewer; `clock` is wall-clock seconds (what a JWT's `exp` counts)."""

    def __init__(self, *, max_viewers: int = MAX_VIEWERS, clock: Callable[[], float] = time.time):
        if max_viewers < 1:
            raise ValueError("max_viewers must be at least 1")
        self._max_viewers = max_viewers
        self._clock = clock
        self._kept: collections.OrderedDict[ViewerKey, _Kept] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def __repr__(self) -> str:
        return f"TokenCache({len(self._kept)} of {self._max_viewers} viewers)"

    def get(self, viewer: ViewerKey) -> str | None:
        """The viewer's kept token, if it still has more than its margin to live."""
        kept = self._kept.get(viewer)
        if kept is None:
            return None
        if self._clock() >= kept.reuse_until:
            del self._kept[viewer]
            return None
        self._kept.move_to_end(viewer)
        return kept.token

    def put(self, viewer: ViewerKey, token: str) -> bool:
        """Keeps a token just received for `viewer`; False when it is not worth keeping
        (unreadable, no `exp`, or already within its margin)."""
        now = self._clock()
        reuse_until = _reuse_until(token, now)
        if reuse_until is None or reuse_until <= now:
            self._kept.pop(viewer, None)
            return False
        self._kept[viewer] = _Kept(token, reuse_until)
        self._kept.move_to_end(viewer)
        while len(self._kept) > self._max_viewers:
            self._kept.popitem(last=False)
        return True

    def forget(self, viewer: ViewerKey, token: str) -> None:
        """Drops `token` (refused by the ledger), unless a newer one was kept meanwhile."""
        kept = self._kept.get(viewer)
        if kept is not None and kept.token == token:
            del self._kept[viewer]


def _reuse_until(token: str, now: float) -> float | None:
    """When to stop reusing a token received at `now`, or None if it says no expiry."""
    claims = unverified_claims(token)
    if claims is None:
        return None
    expires = _seconds(claims.get("exp"))
    if expires is None:
        return None
    issued = _seconds(claims.get("iat"))
    if issued is not None and issued < expires:
        lifetime = expires - issued
        expires = min(expires, now + lifetime)
    else:
        lifetime = expires - now
    return expires - min(MARGIN_S, MARGIN_FRACTION * lifetime)


def unverified_claims(token: str) -> dict[str, Any] | None:
    """A JWT's payload, read by PyJWT with the signature NOT verified (and so no claim
    checked either); None when it is not a JWT."""
    try:
        return jwt.decode(token, options={"verify_signature": False})
    except (jwt.InvalidTokenError, RecursionError):  # RecursionError: absurdly deep JSON
        return None


def _seconds(value: Any) -> float | None:
    """A NumericDate claim as a float, or None (a bool, a string, NaN, infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) else None
