"""The auth + ledger port: the points protocol of contract §5, unchanged from the original.

A service token is asked of the auth service (HMAC-signed), then the ledger reserves a
debit (`reserve`), and later accepts or refunds it. Errors come out classified for the one
retry policy (`dynamo.supervision.retry`): `Transient` for outages, `Permanent` for refusals, and
`InsufficientPoints` for the ledger's 409 on reserve.

`pending_redemptions` reads the viewer's ledger history (`GET /history`, newest first,
paged by `nextCursor`), so that a reservation cut off by a crash after the ledger made
its debit can find that debit again (`actors.ledger`).

`FreePoints` stands in when no auth secret is configured (development): nothing is
charged.
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

from dynamo.domain.jobs import Job
from dynamo.supervision.retry import (
    Permanent,
    Transient,
    classify_http_status,
    retry_after_from_headers,
)

log = logging.getLogger(__name__)

ALERT_TYPE = "image-generation"
# How the ledger describes an image alert's debit in a viewer's history.
ALERT_DESCRIPTION = f"Redeemed alert of type '{ALERT_TYPE}'"
# The ledger's largest page of history.
HISTORY_PAGE_MAX = 100
# Pages read at most when looking for a debit: a viewer with more history than this
# since the reservation began is not a viewer but a load test.
HISTORY_PAGES_MAX = 10


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

    async def reserve(self, job: Job, token: str) -> str | None: ...  # the flow id

    async def accept(self, flow_id: str, token: str) -> None: ...

    async def refund(self, flow_id: str, token: str) -> None: ...

    async def pending_redemptions(
        self, job: Job, token: str, since: datetime.datetime
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
    ):
        self._client = client
        self._auth_url = auth_url
        self._ledger_url = ledger_url
        self._secret = shared_secret.encode()
        self.points_cost = points_cost

    async def _send(self, what: str, method: str, url: str, **kwargs) -> httpx.Response:
        try:
            return await self._client.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise Transient(f"{what}: {type(exc).__name__}") from exc

    async def service_token(self, job: Job) -> str:
        body = json.dumps(
            {
                "service": "dynamo",
                "user": {
                    "id": job.viewer.twitch_user_id,
                    "login": job.viewer.twitch_display_name.lower(),
                    "displayName": job.viewer.twitch_display_name,
                },
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
        return response.text.strip()

    async def reserve(self, job: Job, token: str) -> str:
        """Creates a pending debit; returns its flow id. Raises InsufficientPoints on 409."""
        body = {
            "type": "alert-redemption",
            "numPointsToDebit": self.points_cost,
            "alertType": ALERT_TYPE,
            "alertMetadata": {"imageRequestId": str(job.id), "style": job.valid_style.value},
        }
        response = await self._send(
            "ledger reserve",
            "POST",
            f"{self._ledger_url}/outflow",
            json=body,
            headers={"authorization": f"Bearer {token}"},
        )
        if response.status_code == 409:
            raise InsufficientPoints()
        _raise_for(response, "ledger reserve")
        # The Go ledger does not always say application/json: read the body by status.
        try:
            flow_id = json.loads(response.content)["flowId"]
        except (ValueError, KeyError, TypeError) as exc:
            raise Transient("ledger reserve: answer without a flowId") from exc
        return str(flow_id)

    async def _finalize(self, method: str, flow_id: str, token: str, what: str) -> None:
        response = await self._send(
            what,
            method,
            f"{self._ledger_url}/outflow/{flow_id}",
            headers={"authorization": f"Bearer {token}"},
        )
        if response.status_code == 409:
            raise AlreadyFinalized()
        _raise_for(response, what)

    async def accept(self, flow_id: str, token: str) -> None:
        await self._finalize("PATCH", flow_id, token, "ledger accept")

    async def refund(self, flow_id: str, token: str) -> None:
        await self._finalize("DELETE", flow_id, token, "ledger refund")


    async def pending_redemptions(
        self, job: Job, token: str, since: datetime.datetime
    ) -> list[tuple[datetime.datetime, str]]:
        """(made at, flow id) of the viewer's pending image-alert debits of this request's
        cost made at or after `since` (the ledger's clock), oldest first."""
        found: list[tuple[datetime.datetime, str]] = []
        seen: set[str] = set()
        cursor = ""
        for _ in range(HISTORY_PAGES_MAX):
            params = {"max": str(HISTORY_PAGE_MAX)} | ({"from": cursor} if cursor else {})
            response = await self._send(
                "ledger history",
                "GET",
                f"{self._ledger_url}/history",
                params=params,
                headers={"authorization": f"Bearer {token}"},
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

    async def reserve(self, job: Job, token: str) -> str | None:
        return None

    async def accept(self, flow_id: str, token: str) -> None:
        return None

    async def refund(self, flow_id: str, token: str) -> None:
        return None

    async def pending_redemptions(
        self, job: Job, token: str, since: datetime.datetime
    ) -> list[tuple[datetime.datetime, str]]:
        return []
