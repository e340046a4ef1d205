"""A fake of the Golden VCR ledger's outflow API: reserve, accept, refund points.

Endpoints (names for `script`, `hold`, `wait_for_calls`):

- "outflow": `POST /outflow` with a bearer token that `FakeAuth.user_for_token`
  knows: 200 `{"flowId": …}` (text/plain, Go style), a pending debit; 409 "not enough
  points" when the user's balance minus their pending and accepted debits is too low.
  The body is checked more strictly than the real ledger does: exactly the contract's
  alert-redemption shape, or 400.
- "accept": `PATCH /outflow/{flowId}` and "refund": `DELETE /outflow/{flowId}`: 204;
  409 when already finalized; 404 when unknown or another user's. A flow id that is not
  a UUID gets 500, as the Go original answers it.

- "history": `GET /history` (viewer role: any token the auth fake knows, a service
  token included): the caller's flows, newest first, as the real ledger's
  `records.handleGetHistory` answers: `{"items": [{id, timestamp, type, state,
  deltaPoints, description}], "nextCursor"?}` (Go's encoder: text/plain, a newline).
  `?max=` is clamped to 1..100 (default 50, ignored unless an integer); `?from=` (a flow
  id: that flow and older ones; an unknown id gives an empty page, as its SQL does) is
  ignored unless a UUID; `nextCursor` is the first flow of the next page. A pending
  flow's timestamp is its creation, a finalized one's its finalization (wall clock,
  RFC 3339 with nanoseconds, UTC); an image alert reads
  "Redeemed alert of type 'image-generation'".

Bearer tokens are checked as the real ledger's auth middleware (golden-vcr/auth v0.3.0
`RequireAccess`) does, before any handler runs: a missing one is 400; an unknown one 401
(the real middleware asks `GET /access` about a token that is not a service JWT, and
passes its 401 on); an expired service token 500, "token has invalid claims: token is
expired" (the real middleware verifies a service JWT itself, and answers any failure but
a 401 from `/access` with 500). Errors are Go http.Error text lines.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio

from ._service import Call, FakeService, go_error, go_json_response
from .auth_server import FakeAuth

DEFAULT_BALANCE = 1000
HISTORY_DEFAULT_MAX, HISTORY_MAX = 50, 100
STYLES = ("ghost", "friend")


@dataclass
class Flow:
    flow_id: str
    user_id: str
    amount: int
    alert_type: str
    metadata: dict[str, Any]
    state: str = "pending"  # pending | accepted | rejected
    created_at: float = 0.0  # trio.current_time()
    finalized_at: float | None = None
    # Wall clock, as the ledger's database stamps it (what /history shows).
    created_wall: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))
    finalized_wall: datetime.datetime | None = None
    # (method, status, time) of every call about this flow, the creating POST included.
    history: list[tuple[str, int, float]] = field(default_factory=list)

    @property
    def request_id(self) -> str | None:
        return self.metadata.get("imageRequestId")


def _valid_uuid(text: Any) -> bool:
    try:
        uuid.UUID(str(text))
    except ValueError:
        return False
    return True


def body_error(body: Any) -> str | None:
    """Why an outflow body is not the contract's alert redemption, or None."""
    if not isinstance(body, dict):
        return "invalid request payload: not a JSON object"
    expected_keys = {"type", "numPointsToDebit", "alertType", "alertMetadata"}
    if set(body) != expected_keys:
        return f"invalid request payload: keys must be {sorted(expected_keys)}"
    if body["type"] != "alert-redemption":
        return "unsupported transaction type"
    points = body["numPointsToDebit"]
    if not isinstance(points, int) or isinstance(points, bool) or points <= 0:
        return "numPointsToDebit must be positive"
    if body["alertType"] != "image-generation":
        return "alertType must be 'image-generation'"
    metadata = body["alertMetadata"]
    if not isinstance(metadata, dict) or set(metadata) != {"imageRequestId", "style"}:
        return "alertMetadata must be {imageRequestId, style}"
    if not isinstance(metadata["imageRequestId"], str) or not _valid_uuid(metadata["imageRequestId"]):
        return "alertMetadata.imageRequestId must be a UUID"
    if metadata["style"] not in STYLES:
        return f"alertMetadata.style must be one of {STYLES}"
    return None


class FakeLedger(FakeService):
    def __init__(self, auth: FakeAuth) -> None:
        super().__init__()
        self.auth = auth
        self.default_balance = DEFAULT_BALANCE
        self.balances: dict[str, int] = {}
        self.flows: dict[str, Flow] = {}

    def env(self) -> dict[str, str]:
        return {"LEDGER_URL": self.url or ""}

    # ---- views for tests ----------------------------------------------------------

    def available(self, user_id: str) -> int:
        spent = sum(flow.amount for flow in self.flows.values() if flow.user_id == user_id and flow.state != "rejected")
        return self.balances.get(user_id, self.default_balance) - spent

    def flows_for(self, request_id: str) -> list[Flow]:
        return [flow for flow in self.flows.values() if flow.request_id == request_id]

    def pending(self) -> list[Flow]:
        return [flow for flow in self.flows.values() if flow.state == "pending"]

    def accepted(self) -> list[Flow]:
        return [flow for flow in self.flows.values() if flow.state == "accepted"]

    def rejected(self) -> list[Flow]:
        return [flow for flow in self.flows.values() if flow.state == "rejected"]

    # ---- the API ------------------------------------------------------------------

    def build_app(self) -> QuartTrio:
        app = QuartTrio(__name__)

        @app.post("/outflow")
        async def create() -> Response:
            return await self.receive("outflow", self._create)

        @app.patch("/outflow/<flow_id>")
        async def accept(flow_id: str) -> Response:
            return await self.receive("accept", lambda call: self._finalize(call, flow_id, "accepted"))

        @app.delete("/outflow/<flow_id>")
        async def refund(flow_id: str) -> Response:
            return await self.receive("refund", lambda call: self._finalize(call, flow_id, "rejected"))

        @app.get("/history")
        async def history() -> Response:
            return await self.receive("history", self._history)

        return app

    def check_caller(self, call: Call) -> Response | None:
        token = call.headers.get("authorization", "").removeprefix("Bearer ")
        if not token:
            return go_error("Twitch user access token must be supplied in Authorization header", 400)
        if self.auth.expired_service_token(token):
            return go_error("token has invalid claims: token is expired", 500)
        user = self.auth.user_for_token(token)
        if user is None:
            return go_error("unauthorized", 401)
        call.extra["user_id"] = user["id"]
        return None

    async def _create(self, call: Call) -> Response:
        content_type = call.headers.get("content-type", "")
        if content_type and not content_type.startswith("application/json"):
            return go_error("content-type not supported", 400)
        problem = body_error(call.body)
        if problem is not None:
            return go_error(problem, 400)
        user_id, amount = call.extra["user_id"], call.body["numPointsToDebit"]
        if self.available(user_id) < amount:
            return go_error("not enough points", 409)
        now = trio.current_time()
        metadata = call.body["alertMetadata"]
        flow = Flow(str(uuid.uuid4()), user_id, amount, call.body["alertType"], metadata, created_at=now)
        flow.history.append(("POST", 200, now))
        self.flows[flow.flow_id] = flow
        call.extra["flow_id"] = flow.flow_id
        return go_json_response({"flowId": flow.flow_id})

    async def _finalize(self, call: Call, flow_id: str, state: str) -> Response:
        if not _valid_uuid(flow_id):
            return go_error(f"invalid UUID length: {len(flow_id)}", 500)
        flow = self.flows.get(str(uuid.UUID(flow_id)))
        if flow is None or flow.user_id != call.extra["user_id"]:
            return go_error("no such transaction", 404)
        now = trio.current_time()
        if flow.state != "pending":
            flow.history.append((call.method, 409, now))
            return go_error("transaction is not pending", 409)
        flow.state, flow.finalized_at = state, now
        flow.finalized_wall = datetime.datetime.now(datetime.UTC)
        flow.history.append((call.method, 204, now))
        return Response("", status=204)

    async def _history(self, call: Call) -> Response:
        limit = HISTORY_DEFAULT_MAX
        try:
            limit = max(1, min(int(request.args.get("max", "")), HISTORY_MAX))
        except ValueError:
            pass
        flows = sorted((flow for flow in self.flows.values() if flow.user_id == call.extra["user_id"]),
                       key=lambda flow: flow.created_wall, reverse=True)
        start = request.args.get("from", "")
        if _valid_uuid(start):
            cursor = self.flows.get(str(uuid.UUID(start)))
            flows = [] if cursor is None else [f for f in flows if f.created_wall <= cursor.created_wall]
        page = {"items": [_transaction(flow) for flow in flows[:limit]]}
        if len(flows) > limit:
            page["nextCursor"] = flows[limit].flow_id
        return go_json_response(page)


def _transaction(flow: Flow) -> dict[str, Any]:
    """`util.BuildTransaction` of the real ledger, for an alert redemption."""
    stamp = flow.created_wall if flow.finalized_wall is None else flow.finalized_wall
    state = "pending" if flow.state == "pending" else flow.state
    return {"id": flow.flow_id, "timestamp": _go_time(stamp), "type": "alert-redemption",
            "state": state, "deltaPoints": -flow.amount,
            "description": f"Redeemed alert of type '{flow.alert_type}'"}


def _go_time(value: datetime.datetime) -> str:
    """time.Time's JSON: RFC 3339 with up to nine fractional digits, zeros trimmed."""
    text = value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{value.microsecond:06d}000".rstrip("0")
    return f"{text}.{fraction}Z" if fraction else f"{text}Z"
