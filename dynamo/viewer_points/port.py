"""The auth + ledger port: the points protocol of contract §5, unchanged from the original.

A service token is asked of the auth service (HMAC-signed), then the ledger reserves a
debit (`reserve`), and later accepts or refunds it. Errors come out classified for the one
retry policy (`dynamo.supervision.retry`): `Transient` for outages, `Permanent` for refusals, and
`InsufficientPoints` for the ledger's 409 on reserve.

The service token is kept per viewer (`dynamo.viewer_points.token_cache`) and reused for
every ledger call until shortly before it expires (the auth service's tokens live 15
minutes: one auth call per viewer every 14), so a request costs no auth round trip once
its viewer has a token. Callers name the viewer (the job), never a token: the port
takes the token from the cache, or asks for one, in `_as_viewer`, the one place that also
replaces a token the ledger refuses (see there). `service_token` asks for it ahead, so
that the ledger actor can wait out an auth outage before a debit can exist.

`pending_redemptions` reads the viewer's ledger history (`GET /history`, newest first,
paged by `nextCursor`), so that a reservation cut off by a crash after the ledger made
its debit can find that debit again (`actors.ledger`).

`FreePoints` stands in when no auth secret is configured (development): nothing is
charged.

Tokens are secrets: no log line or error message here carries one.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import uuid
from typing import Protocol

import httpx
import trio

from dynamo.domain.jobs import Job
from dynamo.supervision.retry import (
    Permanent,
    Transient,
    classify_http_status,
    retry_after_from_headers,
)
from dynamo.viewer_points.token_cache import TokenCache, ViewerKey

log = logging.getLogger(__name__)

ALERT_TYPE = "image-generation"
# How the ledger describes an image alert's debit in a viewer's history.
ALERT_DESCRIPTION = f"Redeemed alert of type '{ALERT_TYPE}'"
# The ledger's largest page of history.
HISTORY_PAGE_MAX = 100
# Pages read at most when looking for a debit: a viewer with more history than this
# since the reservation began is not a viewer but a load test.
HISTORY_PAGES_MAX = 10
# The ledger's answers to a request whose token it did not accept. Its auth middleware
# (golden-vcr/auth v0.3.0 `RequireAccess`, wrapping every route before its handler: a
# refused call did nothing) answers 401 only for a token it sends on to `GET /access`; a
# service JWT it cannot verify itself, an expired one in particular ("token has invalid
# claims: token is expired"), is a 500.
TOKEN_REFUSED = 401
TOKEN_UNVERIFIED = 500


class InsufficientPoints(Exception):
    pass


class AlreadyFinalized(Exception):
    """The ledger's 409 on accept/refund: the flow was finalized before."""


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.status_code < 400:
        return
    kind = classify_http_status(response.status_code, response.headers)
    message = f"{what}: HTTP {response.status_code}"
    if kind is Transient:
        raise Transient(message, retry_after_s=retry_after_from_headers(response.headers))
    raise Permanent(message)


class PointsPort(Protocol):
    """What the ledger actor asks of the auth and ledger services: `Points`, or
    `FreePoints` when none is configured."""

    charges: bool

    async def service_token(self, job: Job) -> str: ...

    async def reserve(self, job: Job) -> str | None: ...  # the flow id

    async def accept(self, job: Job, flow_id: str) -> None: ...

    async def refund(self, job: Job, flow_id: str) -> None: ...

    async def pending_redemptions(
        self, job: Job, since: datetime.datetime
    ) -> list[tuple[datetime.datetime, str]]: ...


class Points:
    """Talks to the real auth and ledger services."""

    charges = True

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        auth_url: str,
        ledger_url: str,
        shared_secret: str,
        points_cost: int,
        tokens: TokenCache | None = None,
    ):
        self._client = client
        self._auth_url = auth_url
        self._ledger_url = ledger_url
        self._secret = shared_secret.encode()
        self.points_cost = points_cost
        self._tokens = tokens if tokens is not None else TokenCache()
        # Viewers whose token is being asked for: their other requests wait for it
        # instead of asking too (a viewer's requests come in bursts).
        self._asking: dict[ViewerKey, trio.Event] = {}

    async def _send(self, what: str, method: str, url: str, **kwargs) -> httpx.Response:
        try:
            return await self._client.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise Transient(f"{what}: {type(exc).__name__}") from exc

    async def service_token(self, job: Job) -> str:
        """The viewer's service token: the one kept for them, or a new one."""
        token, _ = await self._token(job)
        return token

    async def _token(self, job: Job) -> tuple[str, bool]:
        """(token, whether it was kept from before) for the job's viewer."""
        viewer = _viewer_key(job)
        while (kept := self._tokens.get(viewer)) is None:
            asking = self._asking.get(viewer)
            if asking is None:
                break
            await asking.wait()  # then take what it got, or ask in turn if it failed
        if kept is not None:
            return kept, True
        self._asking[viewer] = asked = trio.Event()
        try:
            return await self._new_token(job), False
        finally:
            del self._asking[viewer]
            asked.set()

    async def _new_token(self, job: Job) -> str:
        """Asks the auth service for a service token (contract §5 step 1) and keeps it."""
        viewer = _viewer_key(job)
        user_id, login, display_name = viewer
        body = json.dumps(
            {
                "service": "dynamo",
                "user": {"id": user_id, "login": login, "displayName": display_name},
            },
            separators=(",", ":"),
        ).encode()
        request_id = str(uuid.uuid4())
        timestamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        timestamp = timestamp.replace("+00:00", "Z")
        digest = hmac.new(
            self._secret, request_id.encode() + timestamp.encode() + body, hashlib.sha256
        ).hexdigest()
        response = await self._send(
            "auth service-token",
            "POST",
            f"{self._auth_url}/service-token",
            content=body,
            headers={
                "content-type": "application/json",
                "x-hmac-request-id": request_id,
                "x-hmac-request-timestamp": timestamp,
                "x-hmac-signature": f"sha256={digest}",
            },
        )
        _raise_for(response, "auth service-token")
        token = response.text.strip()
        if not self._tokens.put(viewer, token):
            log.debug("service token without a readable expiry: not kept", extra=job.log_extra)
        return token

    async def _as_viewer(
        self, job: Job, what: str, method: str, path: str, **kwargs
    ) -> httpx.Response:
        """One ledger call with the viewer's service token: the one place where a refused
        token is replaced.

        A 401 to a kept token (the ledger does not accept it any more) drops it and makes
        the call once more, at once, with a new one: the ledger's auth middleware refuses
        before its handler runs, so the refused call did nothing, and a reservation made
        again this way is not a second debit. A second 401 comes out as the refusal it is.
        A 500 drops the token too: that is how the real ledger answers a service JWT it
        cannot verify (expired by its clock, signed with a key since rotated); the retry
        policy makes the call again (a 500 is Transient), with a new token. Any other
        answer is the caller's to read."""
        viewer = _viewer_key(job)
        token, kept = await self._token(job)
        while True:
            response = await self._send_with(token, what, method, path, **kwargs)
            if response.status_code not in (TOKEN_REFUSED, TOKEN_UNVERIFIED):
                return response
            self._tokens.forget(viewer, token)
            if response.status_code != TOKEN_REFUSED or not kept:
                return response
            log.info("%s: the ledger refused the viewer's kept service token (HTTP 401); "
                     "trying once more with a new one", what, extra=job.log_extra)
            token, kept = await self._new_token(job), False

    async def _send_with(
        self, token: str, what: str, method: str, path: str, **kwargs
    ) -> httpx.Response:
        return await self._send(
            what, method, f"{self._ledger_url}{path}",
            headers={"authorization": f"Bearer {token}"}, **kwargs,
        )

    async def reserve(self, job: Job) -> str:
        """Creates a pending debit; returns its flow id. Raises InsufficientPoints on 409."""
        body = {
            "type": "alert-redemption",
            "numPointsToDebit": self.points_cost,
            "alertType": ALERT_TYPE,
            "alertMetadata": {"imageRequestId": str(job.id), "style": job.valid_style.value},
        }
        response = await self._as_viewer(job, "ledger reserve", "POST", "/outflow", json=body)
        if response.status_code == 409:
            raise InsufficientPoints()
        _raise_for(response, "ledger reserve")
        # The Go ledger does not always say application/json: read the body by status.
        try:
            flow_id = json.loads(response.content)["flowId"]
        except (ValueError, KeyError, TypeError) as exc:
            raise Transient("ledger reserve: answer without a flowId") from exc
        return str(flow_id)

    async def _finalize(self, job: Job, method: str, flow_id: str, what: str) -> None:
        response = await self._as_viewer(job, what, method, f"/outflow/{flow_id}")
        if response.status_code == 409:
            raise AlreadyFinalized()
        _raise_for(response, what)

    async def accept(self, job: Job, flow_id: str) -> None:
        await self._finalize(job, "PATCH", flow_id, "ledger accept")

    async def refund(self, job: Job, flow_id: str) -> None:
        await self._finalize(job, "DELETE", flow_id, "ledger refund")

    async def pending_redemptions(
        self, job: Job, since: datetime.datetime
    ) -> list[tuple[datetime.datetime, str]]:
        """(made at, flow id) of the viewer's pending image-alert debits of this request's
        cost made at or after `since` (the ledger's clock), oldest first."""
        found: list[tuple[datetime.datetime, str]] = []
        seen: set[str] = set()
        cursor = ""
        for _ in range(HISTORY_PAGES_MAX):
            params = {"max": str(HISTORY_PAGE_MAX)} | ({"from": cursor} if cursor else {})
            response = await self._as_viewer(
                job, "ledger history", "GET", "/history", params=params
            )
            _raise_for(response, "ledger history")
            try:
                page = json.loads(response.content)
                items, cursor = page["items"] or [], page.get("nextCursor") or ""
                entries = [(_timestamp(item["timestamp"]), item) for item in items]
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise Transient("ledger history: answer not understood") from exc
            for at, item in entries:
                # A finalized entry is stamped when it was finalized, after its creation:
                # one stamped before `since` was also created before it.
                if at < since or str(item.get("id")) in seen:
                    continue
                seen.add(str(item.get("id")))
                if (
                    item.get("type") == "alert-redemption"
                    and item.get("state") == "pending"
                    and item.get("description") == ALERT_DESCRIPTION
                    and item.get("deltaPoints") == -self.points_cost
                ):
                    found.append((at, str(item["id"])))
            # Newest first: once an entry is older than `since`, so is the rest.
            if not cursor or any(at < since for at, _ in entries):
                break
        return sorted(found)


def _viewer_key(job: Job) -> ViewerKey:
    """The viewer as the token request names them: id, login (the lower-cased display
    name, contract §5) and display name."""
    name = job.viewer.twitch_display_name
    return (job.viewer.twitch_user_id, name.lower(), name)


def _timestamp(text: str) -> datetime.datetime:
    """A Go time.Time in JSON (RFC 3339, up to nanoseconds), as an aware datetime."""
    head, dot, rest = text.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        rest = rest[:digits][:6] + rest[digits:]
        text = f"{head}.{rest}"
    value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"timestamp without a zone: {text}")
    return value


class FreePoints:
    """No auth service configured: reservations succeed and nothing is charged."""

    charges = False
    points_cost = 0

    async def service_token(self, job: Job) -> str:
        return ""

    async def reserve(self, job: Job) -> str | None:
        return None

    async def accept(self, job: Job, flow_id: str) -> None:
        return None

    async def refund(self, job: Job, flow_id: str) -> None:
        return None

    async def pending_redemptions(
        self, job: Job, since: datetime.datetime
    ) -> list[tuple[datetime.datetime, str]]:
        return []
