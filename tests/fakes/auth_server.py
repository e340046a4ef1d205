"""A fake of the Golden VCR auth service: service tokens (HMAC-signed) and access checks.

`POST /service-token` (endpoint "service-token") checks the HMAC headers the way
server-common/hmac does (lower-case hex, `sha256=` prefix, over request id + timestamp
+ raw body) and, more strictly than the real one, that the timestamp is RFC 3339 and
within `max_clock_skew_s` of now and that login == displayName.lower(). It answers a
JWT-shaped token (`application/jwt`) with the real RS256 one's header and claims (`iss`,
`iat`, `exp` = `iat` + `token_ttl_s`, `gvcr_service`, the user), which can be decoded,
but whose signature is random: the fake ledger maps it back with `user_for_token`, and
tells an expired one with `expired_service_token`.

`GET /access` (endpoint "access") answers `{"user":{...},"role":...}` for the tokens
tests register with `add_viewer` / `add_broadcaster`. Like the Go original, JSON answers
are labelled `text/plain; charset=utf-8` and errors are plain text lines.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from quart import Response
from quart_trio import QuartTrio

from ._service import Call, FakeService, go_error, go_json_response

# The real service issues tokens valid for 15 minutes (golden-vcr/auth,
# internal/server/service_auth.go: "exp": time.Now().Add(15 * time.Minute).Unix()).
TOKEN_TTL_S = 15 * 60
# The real service's `iss` (AUTH_JWT_ISSUER's default), which the ledger's client expects.
ISSUER = "https://goldenvcr.com/api/auth"
# How far the signed timestamp may be from the fake's wall clock.
MAX_CLOCK_SKEW_S = 5 * 60


@dataclass
class IssuedToken:
    token: str
    user: dict[str, str]  # {"id", "login", "displayName"}
    expires_at: float  # wall clock, as a JWT's exp


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign(secret: str, body: bytes, request_id: str | None = None, timestamp: str | None = None) -> dict[str, str]:
    """The three HMAC headers a correct client sends (for tests that post by hand)."""
    request_id = request_id or secrets.token_hex(16)
    timestamp = timestamp or datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    digest = hmac.new(secret.encode(), request_id.encode() + timestamp.encode() + body, hashlib.sha256)
    return {
        "x-hmac-request-id": request_id,
        "x-hmac-request-timestamp": timestamp,
        "x-hmac-signature": f"sha256={digest.hexdigest()}",
    }


class FakeAuth(FakeService):
    def __init__(self, secret: str = "test-shared-secret") -> None:
        super().__init__()
        self.secret = secret
        self.max_clock_skew_s = MAX_CLOCK_SKEW_S
        self.token_ttl_s = TOKEN_TTL_S
        self.expected_service = "dynamo"
        self.issued: dict[str, IssuedToken] = {}
        # Twitch user access token -> {"user": {...}, "role": ...}, as /access answers it.
        self.access_tokens: dict[str, dict] = {}

    def env(self) -> dict[str, str]:
        return {"AUTH_URL": self.url or "", "AUTH_SHARED_SECRET": self.secret}

    def add_viewer(self, token: str, user_id: str, display_name: str) -> None:
        self.access_tokens[token] = {"user": self._user(user_id, display_name), "role": "viewer"}

    def add_broadcaster(self, token: str, user_id: str, display_name: str) -> None:
        self.access_tokens[token] = {"user": self._user(user_id, display_name), "role": "broadcaster"}

    @staticmethod
    def _user(user_id: str, display_name: str) -> dict[str, str]:
        return {"id": user_id, "login": display_name.lower(), "displayName": display_name}

    def user_for_token(self, token: str) -> dict[str, str] | None:
        """The user a bearer token stands for: an unexpired service token, or an access token."""
        issued = self.issued.get(token)
        if issued is not None:
            return issued.user if issued.expires_at > time.time() else None
        claims = self.access_tokens.get(token)
        return claims["user"] if claims else None

    def expired_service_token(self, token: str) -> bool:
        """Whether `token` is a service token this fake issued that has expired since."""
        issued = self.issued.get(token)
        return issued is not None and issued.expires_at <= time.time()

    def tokens_for(self, user_id: str) -> list[str]:
        return [issued.token for issued in self.issued.values() if issued.user["id"] == user_id]

    def expire_tokens(self) -> None:
        """Every service token issued so far is now expired (the ledger answers 500, as
        the real one does for a service JWT it cannot verify)."""
        for issued in self.issued.values():
            issued.expires_at = 0.0

    def build_app(self) -> QuartTrio:
        app = QuartTrio(__name__)

        @app.post("/service-token")
        async def service_token() -> Response:
            return await self.receive("service-token", self._issue)

        @app.get("/access")
        async def access() -> Response:
            return await self.receive("access", self._access)

        return app

    def _signature_ok(self, call: Call) -> bool:
        request_id = call.headers.get("x-hmac-request-id", "")
        timestamp = call.headers.get("x-hmac-request-timestamp", "")
        signature = call.headers.get("x-hmac-signature", "")
        if not request_id or not timestamp or not signature.startswith("sha256="):
            return False
        try:
            signed_at = datetime.fromisoformat(timestamp)
        except ValueError:
            return False
        if signed_at.tzinfo is None or abs(time.time() - signed_at.timestamp()) > self.max_clock_skew_s:
            return False
        expected = sign(self.secret, call.raw, request_id, timestamp)["x-hmac-signature"]
        return hmac.compare_digest(signature.encode(), expected.encode())

    async def _issue(self, call: Call) -> Response:
        if not self._signature_ok(call):
            return go_error("access denied", 401)
        content_type = call.headers.get("content-type", "")
        if content_type and not content_type.startswith("application/json"):
            return go_error("content-type not supported", 400)
        body = call.body
        user = body.get("user") if isinstance(body, dict) else None
        if not isinstance(user, dict):
            return go_error("invalid payload: 'user' is required", 400)
        for key in ("id", "login", "displayName"):
            if not isinstance(user.get(key), str) or not user[key]:
                return go_error(f"invalid payload: 'user.{key}' is required", 400)
        if user["login"] != user["displayName"].lower():
            return go_error("invalid payload: 'user.login' must be the lower-cased display name", 400)
        if body.get("service") != self.expected_service:
            return go_error(f"invalid payload: 'service' must be {self.expected_service!r}", 400)
        now = time.time()
        header = {"alg": "RS256", "kid": "fake", "typ": "JWT"}
        claims = {
            "iss": ISSUER,
            "iat": int(now),
            "exp": int(now + self.token_ttl_s),
            "gvcr_service": body["service"],
            "twitch_user_id": user["id"],
            "twitch_user_login": user["login"],
            "twitch_display_name": user["displayName"],
        }
        token = ".".join([
            _b64url(json.dumps(header).encode()),
            _b64url(json.dumps(claims).encode()),
            _b64url(secrets.token_bytes(32)),
        ])  # fmt: skip
        user_details = {key: user[key] for key in ("id", "login", "displayName")}
        self.issued[token] = IssuedToken(token, user_details, now + self.token_ttl_s)
        call.extra["user"] = user_details
        return Response(token, status=200, content_type="application/jwt")

    async def _access(self, call: Call) -> Response:
        authorization = call.headers.get("authorization", "")
        token = authorization.removeprefix("Bearer ")
        if not token:
            return go_error("Twitch user access token must be supplied in Authorization header", 400)
        claims = self.access_tokens.get(token)
        if claims is None:
            return go_error("unauthorized", 401)
        return go_json_response(claims)
