"""In-memory fakes of dynamo's ports, for driving one actor at a time through its channels.

Each fake keeps what it was asked in plain lists that a test asserts on, can be scripted to
fail the way the real system does (the exceptions are the ones the real port raises), and
offers `wait_until(predicate)` so that a test waits for an outcome instead of sleeping.

- `MemoryDatabase`: the `dynamo.database.port.Database` methods the actors and `Pipeline` use, with
  the same compare-and-set semantics; rows are dicts with the `REQUEST_COLUMNS` keys.
- `FakeBroker` / `FakeDelivery`: input deliveries from a list, recorded publishes.
- `FakePoints`: the auth + ledger port, with scriptable 409s and outages.
- `FakeGenerator`: the OpenAI port, answering `Answer`s or raising real `openai` errors,
  classified as the real port does; `FakeSpend`: the spend port.
- `FakeStorage`: the storage port, with scriptable outages.

All times given to the fakes are `trio.current_time()` values, i.e. the test's mock clock.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import datetime
import functools
import io
import itertools
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import httpx2
import openai
import trio
from PIL import Image

from dynamo.database.port import _ADVANCE_COLUMNS, REQUEST_COLUMNS
from dynamo.database.spend_store import CallCost
from dynamo.domain import prompts
from dynamo.domain.jobs import Step, Style, state_for
from dynamo.inflight.pipeline import Pipeline
from dynamo.openai_port.client import Answer, GeneratedImage, ImageVerdict, NameAnswer
from dynamo.openai_port.dialect import ImageOrder
from dynamo.openai_port.errors import classify_openai
from dynamo.supervision import retry
from dynamo.viewer_points.port import AlreadyFinalized, InsufficientPoints


def _without_parentheses(sql: str) -> str:
    """`sql` with every parenthesized part (subqueries, calls, nested too) taken out."""
    while (stripped := re.sub(r"\([^()]*\)", "", sql)) != sql:
        sql = stripped
    return sql


# The keys of a row as `Database.load_request` returns it, read from its own SELECT list so
# that the fake cannot drift from the real query.
ROW_KEYS: tuple[str, ...] = tuple(
    column.split()[-1].split(".")[-1]
    for column in _without_parentheses(REQUEST_COLUMNS).split(",")
)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class _Observable:
    """`wait_until(predicate)`: returns once a recorded change makes `predicate()` true."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()


# -- database -------------------------------------------------------------------------


class MemoryDatabase(_Observable):
    """The Database port in memory: one dict per request, compare-and-set steps."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: dict[uuid.UUID, dict[str, Any]] = {}  # every column, not only ROW_KEYS
        self.answers: dict[uuid.UUID, dict[str, str]] = {}  # dynamo.answer: prompt, value
        self.images: dict[uuid.UUID, dict[str, str]] = {}  # dynamo.image index 0: url, color
        self.generated: dict[uuid.UUID, bytes] = {}  # dynamo.generated_image
        self.generated_loads: list[uuid.UUID] = []  # each load_generated's request id
        self.advances: list[tuple[uuid.UUID, Step, Step, bool]] = []  # (id, from, to, moved)
        # dynamo.openai_call: rows written by themselves (FakeSpend.write) or with a step
        self.openai_calls: list[dict[str, Any]] = []

    # -- what tests use to set up and to look -----------------------------------------

    def add_request(self, *, step: Step = Step.RECEIVED, style: str = "ghost",
                    inputs: dict | None = None, prompt: str | None = None,
                    viewer_id: str = "90790024", display_name: str = "wasabimilkshake",
                    timeout_s: float = 900.0, **columns: Any) -> uuid.UUID:
        """A request stored directly at `step`, as a resumed one would be found."""
        if inputs is None:
            inputs = ({"color": "yellow", "subject": "caterpillar in a top hat"}
                      if style == "friend" else {"subject": "a seal"})
        if prompt is None:
            prompt = prompts.prompt(Style(style), inputs)
        row = self._new_row(
            viewer_id=viewer_id, display_name=display_name, broadcast_id=None,
            screening_id=None, style=style, inputs=inputs, prompt=prompt, source="broker",
            owner=None, timeout_s=timeout_s, points_cost=200, message_key=None,
            body_sha256=None, intake_acked=True, step=step,
            failed=columns.get("failure_reason") is not None,
        )
        unknown = set(columns) - set(row)
        if unknown:
            raise ValueError(f"unknown columns {unknown}")
        row.update(columns)
        self.requests[row["id"]] = row
        return row["id"]

    def row(self, request_id: uuid.UUID) -> dict[str, Any]:
        """The request as `load_request` returns it (raises KeyError if there is none)."""
        return self._project(self.requests[request_id])

    def rows(self) -> list[dict[str, Any]]:
        return [self._project(row) for row in self.requests.values()]

    # -- intake -----------------------------------------------------------------------

    async def insert_request(self, *, viewer_id: str, display_name: str,
                             broadcast_id: int | None, screening_id: uuid.UUID | None,
                             style: str, inputs: dict, prompt: str, source: str,
                             owner: uuid.UUID | None, timeout_s: float, points_cost: int,
                             message_key: str | None = None, body_sha256: str | None = None,
                             intake_acked: bool = True, failure_reason: str | None = None,
                             failure_message: str | None = None) -> tuple[uuid.UUID, bool]:
        await trio.lowlevel.checkpoint()
        if message_key is not None:  # `on conflict (message_key) do nothing`; NULLs never clash
            for existing in self.requests.values():
                if existing["message_key"] == message_key:
                    return existing["id"], False
        failed = failure_reason is not None
        row = self._new_row(
            viewer_id=viewer_id, display_name=display_name, broadcast_id=broadcast_id,
            screening_id=screening_id, style=style, inputs=inputs, prompt=prompt, source=source,
            owner=owner, timeout_s=timeout_s, points_cost=points_cost, message_key=message_key,
            body_sha256=body_sha256, intake_acked=intake_acked,
            step=Step.REFUNDED if failed else Step.RECEIVED, failed=failed,
        )
        row["failure_reason"] = failure_reason
        row["error_message"] = failure_message
        self.requests[row["id"]] = row
        self._notify()
        return row["id"], True

    async def store_request(self, *, load_existing: bool = True, **fields):
        """(the row as `load_request` reads it, created), as `Database.store_request`."""
        request_id, created = await self.insert_request(**fields)
        return await self.load_request(request_id), created

    async def claim_unacked_by_body(self, body_sha256: str) -> uuid.UUID | None:
        await trio.lowlevel.checkpoint()
        candidates = [row for row in self.requests.values()
                      if row["body_sha256"] == body_sha256 and not row["intake_acked"]]
        if not candidates:
            return None
        oldest = min(candidates, key=lambda row: row["created_at"])
        oldest["intake_acked"] = True
        self._notify()
        return oldest["id"]

    async def mark_acked(self, request_id: uuid.UUID) -> None:
        await trio.lowlevel.checkpoint()
        if request_id in self.requests:
            self.requests[request_id]["intake_acked"] = True
            self._notify()

    # -- pipeline ---------------------------------------------------------------------

    async def advance(self, request_id: uuid.UUID, from_steps: Iterable[Step], to_step: Step,
                      *, costs: Iterable[CallCost] = (), **fields: Any) -> bool:
        from_steps = [Step(step) for step in from_steps]
        for column in fields:
            if column not in _ADVANCE_COLUMNS:
                raise ValueError(f"advance() cannot set {column}")
        await trio.lowlevel.checkpoint()
        self.record_calls(costs)  # moved or not, as the real statement
        return self._advance_now(request_id, from_steps, to_step, fields)

    def record_calls(self, costs: Iterable[CallCost]) -> None:
        """dynamo.openai_call's rows for `costs`, each once (known by its call id), as
        `dynamo.database.spend_store` writes them."""
        for cost in costs:
            if not any(call["call_id"] == cost.call_id for call in self.openai_calls):
                self.openai_calls.append({
                    "call_id": cost.call_id,
                    "image_request_id": cost.request_id, "kind": cost.kind, "model": cost.model,
                    "usage": cost.usage, "cost_usd": cost.cost_usd,
                    "created_at": cost.answered_at})
                self._notify()

    def _advance_now(self, request_id, from_steps, to_step: Step, fields: dict) -> bool:
        row = self.requests.get(request_id)
        moved = row is not None and Step(row["step"]) in from_steps
        self.advances.append((request_id, Step(row["step"]) if row else None, to_step, moved))
        if not moved:
            return False
        failed = to_step in (Step.FAILING, Step.REFUNDED) or (
            to_step is Step.DONE and "failure_reason" in fields)
        row.update(fields)
        row["step"] = to_step.value
        if to_step is Step.DONE and not failed:
            row["state"] = "succeeded" if row["failure_reason"] is None else "failed"
        else:
            row["state"] = state_for(to_step, failed).value
        if to_step is Step.DONE:
            row["finished_at"] = _utcnow()
        row["updated_at"] = _utcnow()
        self._notify()
        return True

    async def load_request(self, request_id: uuid.UUID) -> dict[str, Any] | None:
        await trio.lowlevel.checkpoint()
        row = self.requests.get(request_id)
        return None if row is None else self._project(row)

    async def unfinished_requests(self) -> list[dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        rows = [row for row in self.requests.values() if row["step"] != Step.DONE.value]
        return [self._project(row) for row in sorted(rows, key=lambda row: row["created_at"])]

    async def record_late_flow(self, request_id: uuid.UUID, flow_id: str) -> bool:
        await trio.lowlevel.checkpoint()
        if self._flow_holder(flow_id) not in (None, request_id):
            return False  # the unique index on flow_id
        row = self.requests[request_id]
        if row["flow_id"] is None:
            row["flow_id"] = flow_id
            self._notify()
        return True

    async def store_flow(self, request_id: uuid.UUID, flow_id: str) -> str:
        await trio.lowlevel.checkpoint()
        if self._flow_holder(flow_id) is not None:
            return "taken"
        moved = self._advance_now(request_id, [Step.RESERVING], Step.RESERVED, {"flow_id": flow_id})
        return "stored" if moved else "moved"

    adopt_flow = store_flow

    async def reserving_since(self, request_id: uuid.UUID) -> datetime.datetime | None:
        await trio.lowlevel.checkpoint()
        row = self.requests.get(request_id)
        return None if row is None else row.get("reserving_since") or row["updated_at"]

    def _flow_holder(self, flow_id: str) -> uuid.UUID | None:
        return next((rid for rid, row in self.requests.items() if row["flow_id"] == flow_id), None)

    async def save_name(self, request_id: uuid.UUID, prompt: str, name: str) -> None:
        await trio.lowlevel.checkpoint()
        if request_id not in self.answers:
            self.answers[request_id] = {"prompt": prompt, "value": name}
            self._notify()

    async def save_generated(
        self, request_id: uuid.UUID, data: bytes, prompt: str | None = None, *,
        costs: Iterable[CallCost] = ()
    ) -> bool:
        await trio.lowlevel.checkpoint()
        self.record_calls(costs)  # moved or not: the image was paid for
        row = self.requests.get(request_id)
        if row is None or row["step"] != Step.GENERATING.value:
            return False
        row["step"] = Step.GENERATED.value
        row["prompt"] = prompt if prompt is not None else row["prompt"]
        row["updated_at"] = _utcnow()
        self.generated[request_id] = bytes(data)
        self._notify()
        return True

    async def load_generated(self, request_id: uuid.UUID) -> bytes | None:
        await trio.lowlevel.checkpoint()
        self.generated_loads.append(request_id)
        return self.generated.get(request_id)

    async def save_image(self, request_id: uuid.UUID, url: str, color: str) -> bool:
        await trio.lowlevel.checkpoint()
        row = self.requests.get(request_id)
        if row is None or row["step"] not in (Step.GENERATED.value, Step.APPROVED.value):
            return False
        row["step"] = Step.STORED.value
        row["updated_at"] = _utcnow()
        self.images[request_id] = {"url": url, "color": color}
        self.generated.pop(request_id, None)
        self._notify()
        return True

    async def mark_discord_posted(self, request_id: uuid.UUID) -> bool:
        await trio.lowlevel.checkpoint()
        row = self.requests.get(request_id)
        if row is None or row["discord_posted_at"] is not None:
            return False
        row["discord_posted_at"] = _utcnow()
        self._notify()
        return True

    async def ping(self) -> None:
        await trio.lowlevel.checkpoint()

    async def counts_by_state(self) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        return dict(collections.Counter(row["state"] for row in self.requests.values()))

    async def orphan_debit_count(self) -> int:
        await trio.lowlevel.checkpoint()
        return sum(1 for row in self.requests.values() if row["orphan_suspected"])

    # -- internals --------------------------------------------------------------------

    def _new_row(self, *, viewer_id, display_name, broadcast_id, screening_id, style, inputs,
                 prompt, source, owner, timeout_s, points_cost, message_key, body_sha256,
                 intake_acked, step: Step, failed: bool) -> dict[str, Any]:
        now = _utcnow()
        return {
            "id": uuid.uuid4(), "twitch_user_id": viewer_id, "twitch_display_name": display_name,
            "broadcast_id": broadcast_id, "screening_id": screening_id, "style": style,
            # jsonb: what comes back is a copy, never the caller's dict
            "inputs": json.loads(json.dumps(inputs)), "prompt": prompt,
            "created_at": now, "finished_at": None, "error_message": None,
            "step": step.value, "state": state_for(step, failed).value, "source": source,
            "expires_at": now + datetime.timedelta(seconds=timeout_s),
            "points_cost": points_cost, "flow_id": None, "failure_reason": None,
            "failure_detail": None, "announced_at": None, "discord_posted_at": None,
            "orphan_suspected": False, "approval_deadline": None, "approval_decision": None,
            # columns load_request does not return
            "message_key": message_key, "body_sha256": body_sha256,
            "intake_acked": intake_acked, "owner": owner, "accepted_at": None,
            "refunded_at": None, "updated_at": now, "reserving_since": None,
        }

    def _project(self, row: dict[str, Any]) -> dict[str, Any]:
        answer = self.answers.get(row["id"])
        image = self.images.get(row["id"])
        joined = dict(row, name=answer["value"] if answer else None,
                      image_url=image["url"] if image else None,
                      image_color=image["color"] if image else None,
                      cost_usd=sum(call["cost_usd"] for call in self.openai_calls
                                   if call["image_request_id"] == row["id"]))
        return copy.deepcopy({key: joined[key] for key in ROW_KEYS})


# -- broker ---------------------------------------------------------------------------


@dataclasses.dataclass
class Published:
    exchange: str
    body: dict
    message_id: str


class FakeDelivery:
    """One input message; records whether it was acked or dead-lettered (and why)."""

    def __init__(self, broker: FakeBroker, body: bytes, message_id: str | None,
                 redelivered: bool) -> None:
        self._broker = broker
        self.body = body
        self.message_id = message_id
        self.redelivered = redelivered
        self.acked = False
        self.dead_letter_reason: str | None = None

    async def ack(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.acked:
            raise AssertionError("delivery acked twice")
        self.acked = True
        self._broker._notify()

    async def dead_letter(self, reason: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.acked:
            raise AssertionError("delivery dead-lettered after it was acked")
        self.dead_letter_reason = reason
        self._broker.dead_letters.append((self.body, reason))
        await self.ack()  # as the real port: copy to the dead-letter queue, then ack

    async def requeue(self) -> None:
        """As RabbitMQ does: the message comes again, marked redelivered."""
        await trio.lowlevel.checkpoint()
        if self.settled:
            raise AssertionError("delivery requeued after it was settled")
        self.requeued = True
        self._broker.deliveries_given.append(
            FakeDelivery(self._broker, self.body, self.message_id, redelivered=True))
        self._broker._notify()

    @property
    def settled(self) -> bool:
        return self.acked or getattr(self, "requeued", False)


class FakeBroker(_Observable):
    """The broker port: deliveries from a list, publishes recorded (confirmed) or failed.

    `deliveries` are `(body, message_id, redelivered)` tuples or bare bodies. Once the list
    is consumed the queue stays empty (the iterator waits), as a real queue does.
    `fail_publishes` makes the next that many `publish_json` calls raise `publish_error`.
    """

    configured = True
    connected = True

    def __init__(self, deliveries: Iterable = (), *, fail_publishes: int = 0,
                 publish_error: Callable[[], Exception] = lambda: ConnectionError("broker gone")):
        super().__init__()
        self.deliveries_given: list[FakeDelivery] = []
        for item in deliveries:
            body, message_id, redelivered = item if isinstance(item, tuple) else (item, None, False)
            self.deliveries_given.append(FakeDelivery(self, body, message_id, redelivered))
        self.fail_publishes = fail_publishes
        self.publish_error = publish_error
        self.publish_attempts = 0
        self.published: list[Published] = []
        self.dead_letters: list[tuple[bytes, str]] = []

    async def deliveries(self):
        for delivery in self.deliveries_given:
            yield delivery
        await trio.sleep_forever()

    async def probe(self) -> None:
        await trio.lowlevel.checkpoint()

    async def publish_json(self, exchange: str, body: dict, *, message_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self.publish_attempts += 1
        if self.fail_publishes > 0:
            self.fail_publishes -= 1
            self._notify()
            raise self.publish_error()
        self.published.append(Published(exchange, copy.deepcopy(body), message_id))
        self._notify()

    def settled_count(self) -> int:
        return sum(1 for delivery in self.deliveries_given if delivery.settled)

    def on(self, exchange: str) -> list[Published]:
        return [message for message in self.published if message.exchange == exchange]


# -- points (auth + ledger) -----------------------------------------------------------


class FakePoints(_Observable):
    """The auth + ledger port. Every attempt is recorded in `calls` as (operation, subject,
    outcome): subject is the request id for `service_token`/`reserve`, the flow id for
    `accept`/`refund`; outcome is "ok" or the exception's class name. As with `Points`,
    the ledger calls name the job, not a token: tokens stay inside the port.

    Script it with `outage(until=...)` (Transient errors, as the real port raises for 5xx
    and connection errors), `insufficient_points = True` (409 on reserve) and
    `already_finalized = True` (409 on accept/refund).
    """

    charges = True
    points_cost = 200

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any, str]] = []
        self.insufficient_points = False
        self.already_finalized = False
        self._outages: dict[str, float] = {}
        self._flow_ids = (f"flow-{n}" for n in itertools.count(1))
        self.flows: dict[str, str] = {}  # flow id -> "pending" | "accepted" | "refunded"
        self.pending_made: list[tuple[str, str, datetime.datetime]] = []

    def outage(self, *operations: str, until: float = math.inf) -> None:
        """`operations` (all four if none) fail with Transient until trio time `until`."""
        for operation in operations or ("service_token", "reserve", "accept", "refund", "history"):
            self._outages[operation] = until

    def attempts(self, operation: str) -> list[tuple[str, Any, str]]:
        return [call for call in self.calls if call[0] == operation]

    def succeeded(self, operation: str) -> list[Any]:
        return [subject for op, subject, outcome in self.calls
                if op == operation and outcome in ("ok", "AlreadyFinalized")]

    async def _attempt(self, operation: str, subject: Any, action: Callable[[], Any]):
        await trio.lowlevel.checkpoint()
        try:
            if trio.current_time() < self._outages.get(operation, -math.inf):
                raise retry.Transient(f"{operation}: HTTP 503")
            result = action()
        except Exception as exc:
            self.calls.append((operation, subject, type(exc).__name__))
            self._notify()
            raise
        self.calls.append((operation, subject, "ok"))
        self._notify()
        return result

    async def service_token(self, job) -> str:
        return await self._attempt("service_token", job.id, lambda: f"token-{job.viewer.twitch_user_id}")

    async def reserve(self, job) -> str:
        def reserve():
            if self.insufficient_points:
                raise InsufficientPoints()
            flow_id = next(self._flow_ids)
            self.flows[flow_id] = "pending"
            self.pending_made.append((flow_id, job.viewer.twitch_user_id, _utcnow()))
            return flow_id
        return await self._attempt("reserve", job.id, reserve)

    def _finalizer(self, to_state: str, flow_id: str):
        def finalize():
            if self.already_finalized or self.flows.get(flow_id, "pending") != "pending":
                raise AlreadyFinalized()
            self.flows[flow_id] = to_state
        return finalize

    async def accept(self, job, flow_id: str) -> None:
        await self._attempt("accept", flow_id, self._finalizer("accepted", flow_id))

    async def pending_redemptions(self, job, since: datetime.datetime) -> list[str]:
        """Pending flows of `job`'s viewer made at or after `since`: `pending_made` holds
        (flow id, viewer id, made at), as the ledger's history would show them; reserve()
        adds to it."""
        def history():
            return [(made_at, flow_id) for flow_id, viewer_id, made_at in sorted(
                        self.pending_made, key=lambda made: made[2])
                    if viewer_id == job.viewer.twitch_user_id and made_at >= since
                    and self.flows.get(flow_id) == "pending"]
        return await self._attempt("history", job.id, history)

    async def refund(self, job, flow_id: str) -> None:
        await self._attempt("refund", flow_id, self._finalizer("refunded", flow_id))


# -- OpenAI ---------------------------------------------------------------------------


_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


def openai_error(status: int, message: str = "", *, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None,
                 path: str = "/v1/images/generations") -> openai.APIStatusError:
    """The exception the openai SDK raises for an HTTP error answer, built as it builds it
    (`_make_status_error_from_response` / `_make_status_error`)."""
    error = {"message": message or f"HTTP {status}", "type": type, "param": None, "code": code}
    request = httpx2.Request("POST", f"https://api.openai.com{path}")
    response = httpx2.Response(status, headers=headers or {}, json={"error": error},
                               request=request)
    body = json.loads(response.text)
    data = body.get("error", body)
    err_msg = f"Error code: {status} - {data['message']}"
    cls = _STATUS_ERRORS.get(status)
    if cls is None:
        cls = openai.InternalServerError if status >= 500 else openai.APIStatusError
    return cls(err_msg, response=response, body=data)


def solid_png(color: tuple[int, int, int], *, size: tuple[int, int] = (64, 64),
              figure: tuple[int, int, int] | None = None) -> bytes:
    """A PNG of one solid color, with an optional square figure of another in the middle."""
    image = Image.new("RGB", size, color)
    if figure is not None:
        width, height = size
        image.paste(figure, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class FakeGenerator(_Observable):
    """The OpenAI port. Each operation answers from its script (an `Answer`'s value, or an
    exception to raise), then with its default once the script is used up. An `openai`
    SDK exception is raised as the real port raises it: classified into the service's
    error classes (`openai_errors.classify_openai`).

    `calls` records every attempt as (operation, argument): the moderated text, the name
    prompt, the image prompt and user, or the screened image's bytes; `orders` the image
    calls' `ImageOrder`s and `name_attempts` the names' `attempt` argument.
    """

    offline = False
    image_model = "gpt-image-2.6-flare"
    text_model = "gpt-6-luna"
    image_quality = "medium"

    def __init__(self, *, flagged: bool = False, name: str = "Sir Hatsworth",
                 image: bytes | None = None, headers: dict[str, str] | None = None,
                 image_tokens: int = 0) -> None:
        super().__init__()
        self.defaults = {"moderate": flagged, "name": name,
                         "image": image if image is not None else solid_png((12, 10, 18)),
                         "moderate_image": ImageVerdict(False)}
        self.headers = headers or {"x-ratelimit-remaining-requests": "99"}
        self.scripts: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.calls: list[tuple[str, Any]] = []
        self.orders: list[ImageOrder] = []
        self.name_attempts: list[int] = []
        self.image_tokens = image_tokens
        # The `usage` each operation's answers carry (None: none, as moderation).
        self.usage: dict[str, dict | None] = {"moderate": None, "name": None, "image": None,
                                              "moderate_image": None}

    def expected_image_tokens(self) -> int:
        return self.image_tokens

    def script(self, operation: str, *outcomes: Any) -> None:
        """The next answers of `operation`, in order: values, or exceptions to raise."""
        self.scripts[operation].extend(outcomes)

    def always(self, operation: str, outcome: Any) -> None:
        """Every later answer of `operation` (a value or an exception factory)."""
        self.defaults[operation] = outcome

    def count(self, operation: str) -> int:
        return sum(1 for op, _ in self.calls if op == operation)

    async def _answer(self, operation: str, argument: Any, model: str | None) -> Answer:
        await trio.lowlevel.checkpoint()
        self.calls.append((operation, argument))
        self._notify()
        script = self.scripts[operation]
        outcome = script.popleft() if script else self.defaults[operation]
        if callable(outcome):  # a factory: a fresh exception for each call
            outcome = outcome()
        if isinstance(outcome, openai.OpenAIError):
            raise classify_openai(outcome, image_call=operation == "image") from outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return Answer(outcome, dict(self.headers), model, self.usage.get(operation))

    async def moderate(self, text: str) -> Answer[bool]:
        return await self._answer("moderate", text, "omni-moderation-latest")

    async def moderate_image(self, data: bytes) -> Answer[ImageVerdict]:
        return await self._answer("moderate_image", data, "omni-moderation-latest")

    async def name(self, prompt: str, *, attempt: int = 0) -> Answer[NameAnswer]:
        self.name_attempts.append(attempt)
        answer = await self._answer("name", prompt, self.text_model)
        if isinstance(answer.value, str):  # a plain name: complete unless empty
            answer.value = NameAnswer(answer.value, bool(answer.value.strip()))
        return answer

    async def image(self, order: ImageOrder) -> Answer[GeneratedImage]:
        self.orders.append(order)
        answer = await self._answer("image", (order.prompt, order.user), self.image_model)
        if isinstance(answer.value, bytes):
            answer.value = GeneratedImage(answer.value, transparent=False)
        return answer

    async def aclose(self) -> None:
        return None


class FakeSpend:
    """The spend port: free calls. Those counted once written are in `calls` (rows written
    by themselves also in the database's `openai_calls`; a step write puts its own there);
    a budget that is reached when the test says so (`reached`)."""

    def __init__(self, db: MemoryDatabase | None = None) -> None:
        self.db = db
        self.calls: list[tuple[uuid.UUID, str, str | None, dict | None]] = []
        self.alone: list[CallCost] = []  # the rows written by themselves (`write`)
        self.reached = False
        self.checks = 0

    def row(self, request_id: uuid.UUID, kind: str, answer) -> CallCost:
        return CallCost(request_id, kind, answer.model, answer.usage, 0.0, _utcnow())

    async def write(self, costs: Iterable[CallCost]) -> None:
        await trio.lowlevel.checkpoint()
        costs = list(costs)
        self.alone.extend(costs)
        if self.db is not None:
            self.db.record_calls(costs)
        self.counted(costs)

    def counted(self, costs: Iterable[CallCost]) -> None:
        self.calls.extend((cost.request_id, cost.kind, cost.model, cost.usage) for cost in costs)

    async def paused(self) -> bool:
        await trio.lowlevel.checkpoint()
        self.checks += 1
        return self.reached


# -- storage --------------------------------------------------------------------------


@dataclasses.dataclass
class Upload:
    key: str
    data: bytes
    content_type: str


class FakeStorage(_Observable):
    """The storage port: objects kept in `objects`; `outage(until=...)` fails uploads with
    Transient (as the real port does for 5xx and connection errors) until then."""

    def __init__(self, public_base_url: str = "https://cdn.example") -> None:
        super().__init__()
        self.public_base_url = public_base_url
        self.objects: dict[str, Upload] = {}
        self.attempts: list[tuple[str, str]] = []  # (key, "ok" | error class name)
        self._outage_until = -math.inf

    def outage(self, *, until: float = math.inf) -> None:
        self._outage_until = until

    def public_url(self, key: str) -> str:
        return f"{self.public_base_url}/{key}"

    async def upload(self, key: str, data: bytes, content_type: str) -> str:
        await trio.lowlevel.checkpoint()
        if trio.current_time() < self._outage_until:
            self.attempts.append((key, "Transient"))
            self._notify()
            raise retry.Transient("storage upload: HTTP 503")
        self.objects[key] = Upload(key, bytes(data), content_type)
        self.attempts.append((key, "ok"))
        self._notify()
        return self.public_url(key)

    async def ping(self) -> None:
        await trio.lowlevel.checkpoint()


# -- running one actor ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(run, **kwargs: Any):
    """Runs one actor's `run(...)` (started: `task_status.started()` was called) for the
    block, then cancels it. An actor that crashes fails the test with its exception."""
    async with trio.open_nursery() as nursery:
        yield await nursery.start(functools.partial(run, **kwargs))
        nursery.cancel_scope.cancel()


def channel(capacity: int = 16):
    """A memory channel pair for an actor's inbox or outbox in a test."""
    return trio.open_memory_channel(capacity)


async def nothing_within(receive_channel, seconds: float):
    """None if nothing arrives on `receive_channel` for `seconds`, else what arrived."""
    with trio.move_on_after(seconds):
        return await receive_channel.receive()
    return None


def threads_pause_the_clock(clock, monkeypatch) -> None:
    """Keeps the autojump clock still while a task waits for a worker thread.

    Trio counts a task waiting for `trio.to_thread.run_sync` as blocked, so the autojump
    clock would jump to the next deadline (often the test's `fail_after`) while the thread
    works. With this, work in threads takes no virtual time, as if the thread were instant;
    the real function still runs in a real thread under the caller's limiter.
    """
    real_run_sync = trio.to_thread.run_sync
    threshold = clock.autojump_threshold
    running = 0

    async def run_sync(fn, *args, **kwargs):
        nonlocal running
        running += 1
        clock.autojump_threshold = math.inf
        try:
            return await real_run_sync(fn, *args, **kwargs)
        finally:
            running -= 1
            if running == 0:
                clock.autojump_threshold = threshold

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


def make_pipeline(db, *, request_timeout_s: float = 900.0, points_cost: int = 200):
    """A `Pipeline` on `db`, as the service builds it."""
    return Pipeline(db, worker_id=uuid.uuid4(), request_timeout_s=request_timeout_s,
                    points_cost=points_cost)
