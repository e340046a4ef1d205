"""Who is calling: bearer tokens checked with the auth service, or the admin token.

With an auth service, `GET {AUTH_URL}/access` with the caller's own Authorization header
answers `{"user": {"id", "login", "displayName"}, "role": "viewer" | "broadcaster"}`.
Its answer is cached for `CACHE_TTL_S` under the token's SHA-256 (the raw token is never
kept or logged). A refused token is 401; an auth service that is down, slow or answers
nonsense is 503: a token that cannot be checked never opens the door.

`DYNAMO_ADMIN_TOKEN` (development only: the service passes None in production when the
auth service is configured) is a broadcaster with the viewer identity "0"/"broadcaster".
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
from collections import OrderedDict

import httpx
import trio
from quart import current_app, request

from dynamo.api.errors import ApiError
from dynamo.domain.jobs import Viewer

log = logging.getLogger(__name__)

ROLES = ("viewer", "broadcaster")
# Where the app keeps its Authenticator (`app.extensions[...]`).
EXTENSION_KEY = "dynamo.access"
# A role change (or a revoked token) is noticed within this long.
CACHE_TTL_S = 30.0
# A refused token is remembered briefly, so a client retrying it does not hammer auth.
REFUSED_TTL_S = 5.0
# Bounds the cache's memory; far more than the distinct callers of one stream.
CACHE_MAX_ENTRIES = 10_000
# The auth service answers in milliseconds; a caller should not wait long for it.
AUTH_DEADLINE_S = 5.0
# The identity of the admin token, a broadcaster.
ADMIN_USER_ID = "0"
ADMIN_DISPLAY_NAME = "broadcaster"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="dynamo"'}


@dataclasses.dataclass(frozen=True)
class Caller:
    user_id: str
    display_name: str
    role: str

    @property
    def is_broadcaster(self) -> bool:
        return self.role == "broadcaster"

    @property
    def viewer(self) -> Viewer:
        return Viewer(self.user_id, self.display_name)

    def may_see(self, twitch_user_id: str) -> bool:
        return self.is_broadcaster or twitch_user_id == self.user_id


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, CHALLENGE)


class Authenticator:
    def __init__(
        self,
        *,
        http_client: httpx.AsyncClient,
        auth_url: str,
        auth_configured: bool,
        admin_token: str | None,
    ):
        self._client = http_client
        self._access_url = f"{auth_url.rstrip('/')}/access"
        self._auth_configured = auth_configured
        self._admin_token = admin_token.encode() if admin_token else None
        # sha256(token) -> (expires at, the caller or None for a refused token)
        self._cache: OrderedDict[bytes, tuple[float, Caller | None]] = OrderedDict()

    async def caller_for(self, authorization: str | None) -> Caller:
        """The caller an Authorization header stands for; raises ApiError 401 or 503."""
        token = _bearer_token(authorization)
        if self._admin_token is not None and hmac.compare_digest(token.encode(), self._admin_token):
            return Caller(ADMIN_USER_ID, ADMIN_DISPLAY_NAME, "broadcaster")
        if not self._auth_configured:
            raise unauthorized("invalid bearer token")
        digest = hashlib.sha256(token.encode()).digest()
        now = trio.current_time()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            caller = cached[1]
        else:
            caller = await self._ask_auth(token)
            self._remember(digest, caller, now)
        if caller is None:
            raise unauthorized("invalid bearer token")
        return caller

    async def _ask_auth(self, token: str) -> Caller | None:
        """The caller, None for a refused token; raises ApiError 503 when auth cannot tell."""
        with trio.move_on_after(AUTH_DEADLINE_S) as scope:
            try:
                response = await self._client.get(
                    self._access_url, headers={"Authorization": f"Bearer {token}"}
                )
            except httpx.HTTPError as exc:
                log.warning("auth service unreachable: %s", type(exc).__name__)
                raise _auth_unavailable() from None
        if scope.cancelled_caught:
            log.warning("auth service did not answer within %.0f s", AUTH_DEADLINE_S)
            raise _auth_unavailable()
        if response.status_code in (400, 401, 403):
            return None
        if response.status_code != 200:
            log.warning("auth service answered HTTP %d", response.status_code)
            raise _auth_unavailable()
        # The Go service labels its JSON text/plain: read the body by status alone.
        caller = _caller_from_access(response.content)
        if caller is None:
            log.warning("auth service answered an unreadable access document")
            raise _auth_unavailable()
        return caller

    def _remember(self, digest: bytes, caller: Caller | None, now: float) -> None:
        ttl = CACHE_TTL_S if caller is not None else REFUSED_TTL_S
        self._cache[digest] = (now + ttl, caller)
        self._cache.move_to_end(digest)
        while len(self._cache) > CACHE_MAX_ENTRIES:
            self._cache.popitem(last=False)


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise unauthorized("a bearer token is required (Authorization: Bearer ...)")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise unauthorized("a bearer token is required (Authorization: Bearer ...)")
    if not all("!" <= char <= "~" for char in token):
        raise unauthorized("invalid bearer token")  # tokens are visible ASCII (RFC 6750)
    return token


def _auth_unavailable() -> ApiError:
    return ApiError(503, "the auth service is unavailable; try again later", {"Retry-After": "5"})


def _caller_from_access(body: bytes) -> Caller | None:
    try:
        document = json.loads(body)
        user, role = document["user"], document["role"]
        user_id = user["id"]
        display_name = user.get("displayName") or user.get("login") or user_id
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if role not in ROLES or not isinstance(user_id, str) or not user_id:
        return None
    if not isinstance(display_name, str):
        return None
    return Caller(user_id, display_name, role)


async def authenticate() -> Caller:
    """The caller of the current request; raises ApiError 401 or 503."""
    authenticator: Authenticator = current_app.extensions[EXTENSION_KEY]
    return await authenticator.caller_for(request.headers.get("Authorization"))


async def authenticate_broadcaster() -> Caller:
    caller = await authenticate()
    if not caller.is_broadcaster:
        raise ApiError(403, "only the broadcaster may do this")
    return caller
