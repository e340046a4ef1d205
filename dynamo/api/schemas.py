"""The API's bodies, query strings and headers as pydantic models: the OpenAPI document
is generated from them (`openapi.py`), and the JSON answers pass through them
(`validate_response`), so document and code cannot drift apart.

Answers keep their extra keys (`extra="allow"`): `/status` and a request grow keys over
time, and a key the model does not name yet is passed on, not dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator
from pydantic_core import PydanticCustomError

from dynamo.domain import genreq
from dynamo.domain.jobs import Reason, State, Step, Style

# Literal types from the enums, so the document lists the values the code uses. Built at
# run time, which a type checker cannot follow: it sees strings.
if TYPE_CHECKING:
    StateName: TypeAlias = str
    StepName: TypeAlias = str
    StyleName: TypeAlias = str
    ReasonName: TypeAlias = str
else:
    StateName = Literal[tuple(state.value for state in State)]
    StepName = Literal[tuple(step.value for step in Step)]
    StyleName = Literal[tuple(style.value for style in Style)]
    ReasonName = Literal[tuple(reason.value for reason in Reason)]

Uuid = Annotated[str, Field(json_schema_extra={"format": "uuid"})]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- errors and headers ---------------------------------------------------------------


class ErrorBody(BaseModel):
    """The request failed; `error` says why (contract: every error is this shape)."""

    error: str


class ChallengeHeaders(BaseModel):
    www_authenticate: str = Field(alias="WWW-Authenticate")


class RetryHeaders(BaseModel):
    retry_after: str | None = Field(None, alias="Retry-After")


# -- submitting ----------------------------------------------------------------------


# The message is modelled once, in `genreq`, for the broker door and this one alike.
class NewRequest(RootModel[genreq.GenreqMessage | genreq.GhostPayload | genreq.FriendPayload]):
    """A whole `genreq` message (any viewer for a broadcaster; a viewer only for
    themselves), or the short form `{style, inputs}` for the caller. A body with any of
    `type`, `viewer`, `state`, `payload` is read as a whole message."""


class SubmitHeaders(BaseModel):
    idempotency_key: str | None = Field(
        None,
        alias="Idempotency-Key",
        pattern="^[!-~]{1,255}$",
        description="Per caller: a retry with the same body answers the first request; "
        "another body with the same key is 409.",
    )


class Accepted(_Open):
    """Stored and queued."""

    id: Uuid
    state: StateName
    url: str = Field(description="`/requests/{id}`")


class AcceptedHeaders(BaseModel):
    location: str = Field(alias="Location")
    idempotent_replayed: Literal["true"] | None = Field(
        None, alias="Idempotent-Replayed", description="Set when this answers an earlier request."
    )


# -- reading -------------------------------------------------------------------------


class Image(_Open):
    url: str
    color: str = Field(description="#rrggbb")


class Failure(_Open):
    reason: ReasonName
    message: str = Field(description="A sentence fit to show the viewer.")


class RequestViewer(_Open):
    twitch_user_id: str
    twitch_display_name: str


class OpenAICall(_Open):
    """One answered OpenAI call of a request, priced by the price table."""

    kind: Literal["image", "name", "moderation"]
    model: str
    usage: dict[str, Any] = Field(description="The answer's `usage`, as the API sent it.")
    cost_usd: float = Field(ge=0)
    created_at: Timestamp


class RequestBody(_Open):
    """The request."""

    id: Uuid
    state: StateName
    step: StepName = Field(description="The last step the request persisted.")
    style: str = Field(description="ghost or friend (anything for an invalid broker message)")
    inputs: dict[str, Any]
    prompt: str
    viewer: RequestViewer
    created_at: Timestamp
    finished_at: Timestamp | None
    images: list[Image]
    name: str | None = Field(description="A friend's generated name.")
    failure: Failure | None
    cost_usd: float | None = Field(
        None, ge=0, description="What the request's OpenAI calls cost, by the price table."
    )
    openai_calls: list[OpenAICall] | None = Field(
        None, description="GET /requests/{id} only: each answered OpenAI call."
    )


class RequestPage(_Open):
    """One page, newest first."""

    requests: list[RequestBody]
    next: str | None = Field(description="Cursor for the next page (`before=`); null on the last.")


def _query_error(name: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(name, message)


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    viewer: str | None = Field(None, description="A Twitch user id; for a viewer, only their own.")
    state: StateName | None = None
    style: StyleName | None = None
    limit: int | None = Field(
        None, ge=1, description="Page size, default 20; more than 100 gives 100."
    )
    before: str | None = Field(
        None,
        description="The `next` cursor of the previous page, a request id (the requests "
        "after it) or an RFC 3339 time (the requests created before it).",
    )

    @field_validator("viewer", "state", "style", "before", "limit", mode="before")
    @classmethod
    def _empty_is_absent(cls, value):
        return None if value == "" else value

    @field_validator("viewer")
    @classmethod
    def _viewer_id(cls, value: str | None) -> str | None:
        if value is not None and (
            len(value) > genreq.MAX_VIEWER_FIELD_CHARS or not value.isprintable()
        ):
            raise _query_error(
                "viewer",
                f"must be a Twitch user id (1 to {genreq.MAX_VIEWER_FIELD_CHARS} "
                "printable characters)",
            )
        return value


# -- operators -------------------------------------------------------------------------


class Health(BaseModel):
    """Alive."""

    status: Literal["ok"]


class Readiness(BaseModel):
    """Readiness: each dependency `ok` or what is wrong; `error` when not ready."""

    ready: bool
    checks: dict[str, str]
    error: str | None = None


class ActorStatus(_Open):
    name: str
    state: Literal["starting", "running", "restarting", "waiting", "stopped"]
    restarts: int = Field(ge=0)
    outage_restarts: int = Field(ge=0, default=0)
    last_error: str | None


class QueueStatistics(_Open):
    """A queue's depth (None: the broker did not say; `error` says why) and capacity
    (None: unbounded)."""

    depth: int | None = Field(ge=0)
    capacity: int | None = Field(ge=0)
    error: str | None = None


class ModelState(_Open):
    """A configured model as the API's catalogue knows it."""

    id: str
    state: Literal["ok", "retiring", "shut-down", "unknown", "unreachable", "unchecked", "offline"]
    shutdown_date: str | None = Field(json_schema_extra={"format": "date"})
    days_left: int | None
    checked_at: Timestamp | None = None
    error: str | None = None


class ModelsStatus(_Open):
    image: ModelState
    text: ModelState


class Spend(_Open):
    """OpenAI spend by the price table, summed over every process sharing the database."""

    today_usd: float = Field(ge=0)
    month_usd: float = Field(ge=0)
    daily_budget_usd: float | None = Field(ge=0)
    paused: bool = Field(description="The daily budget is reached: no image is bought.")
    paused_until: Timestamp | None


class FleetProcess(_Open):
    id: Uuid
    this: bool = Field(description="The process that answered.")
    host: str | None
    pid: int | None
    http_addr: str | None
    started_at: Timestamp | None
    heartbeat_age_s: float
    requests_in_hand: int = Field(ge=0)
    budget_last_60s: dict[str, dict[str, float]] = Field(
        description="Per kind of call: its calls, tokens and share of the fleet's."
    )


class Fleet(_Open):
    """Every live process sharing the database, and the fleet's totals."""

    this_process: Uuid
    processes: list[FleetProcess] | None = None
    budget_last_60s: dict[str, dict[str, float]] | None = None
    error: str | None = None


class Status(_Open):
    """The service's state. Other keys may appear."""

    version: str = Field(description="The running dynamo's version (its package's).")
    actors: dict[str, ActorStatus]
    queues: dict[str, QueueStatistics] = Field(
        description="Each pipeline channel, and the RabbitMQ input queue where configured."
    )
    rate_limiter: dict[str, Any] | None
    requests: dict[str, int] = Field(description="Requests by state.")
    orphan_debits: int = Field(
        ge=0,
        description="Debits that may be pending at the ledger without their id stored: "
        "reconcile them.",
    )
    in_flight: int = Field(ge=0)
    models: ModelsStatus | None = None
    spend: Spend | None = None
    fleet: Fleet | None = None


# -- the live page's stream -------------------------------------------------------------


class Caller(BaseModel):
    twitch_user_id: str
    twitch_display_name: str
    role: Literal["viewer", "broadcaster"]


class Ticket(BaseModel):
    """A one-use ticket for `GET /events?ticket=`: the stream cannot send a header."""

    ticket: str
    expires_in_s: int
    caller: Caller


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ticket: str | None = Field(
        None,
        description="From `POST /events/tickets`; used once. Not needed with an "
        "Authorization: Bearer header.",
    )


# -- answers that are not JSON ------------------------------------------------------------


class Media(RootModel[str]):
    """Marks an answer that is not JSON: `media_types` are its content types."""

    media_types: ClassVar[tuple[str, ...]] = ()
    # The schema of the body (of each event, for an event stream).
    body_schema: ClassVar[dict] = {"type": "string"}


class EventStream(Media):
    """Server-sent events: `hello` (who is listening), `request` (a request's new
    state, the body of GET /requests/{id}), `status` (broadcaster: GET /status's body,
    every few seconds), `resync` (changes may have been missed: read again)."""

    media_types = ("text/event-stream",)
    body_schema = {
        "type": "object",
        "properties": {
            "event": {"type": "string", "enum": ["hello", "request", "status", "resync"]},
            "data": {"type": "string", "contentMediaType": "application/json"},
        },
        "required": ["event", "data"],
    }


class Html(Media):
    """The broadcaster's live page."""

    media_types = ("text/html",)


class PrometheusText(Media):
    """Prometheus text format."""

    media_types = ("text/plain",)


class ImageFile(Media):
    """The image."""

    media_types = ("image/jpeg", "image/webp", "image/png")


class StaticFile(Media):
    """A file of the page (script, style sheet, license)."""

    media_types = ("text/javascript", "text/css", "text/plain")


class OpenApiDocument(_Open):
    """OpenAPI 3.1: this document."""
