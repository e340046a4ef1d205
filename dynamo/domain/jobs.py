"""The values that travel through the actors' channels.

A `Job` is one image request in flight: what the pipeline needs to carry it one step
further, rebuilt from its database row after a restart. Actors update a job's fields as
they finish a step and persist the step before they pass the job on.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from typing import Any


class Style(str, enum.Enum):
    GHOST = "ghost"
    FRIEND = "friend"


class Step(str, enum.Enum):
    """The last step a request has persisted, in pipeline order."""

    RECEIVED = "received"  # stored, nothing else done
    RESERVING = "reserving"  # a debit was asked for; its answer not yet stored
    RESERVED = "reserved"  # the ledger's flow id is stored (or no points are charged)
    SCREENED = "screened"  # moderation passed; a friend's name is stored
    GENERATING = "generating"  # the image call was started: no longer cancellable
    GENERATED = "generated"  # the raw image bytes are stored in the database
    # The image passed its screening and waits for the broadcaster (DYNAMO_APPROVAL): no
    # actor holds it; a decision (or its timeout) moves it on, in whichever process.
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"  # the broadcaster (or the timeout) approved it: on to storage
    STORED = "stored"  # the processed image is uploaded, its URL in dynamo.image
    ANNOUNCED = "announced"  # the onscreen event was confirmed by the broker
    ACCEPTED = "accepted"  # the ledger accepted the debit
    FAILING = "failing"  # failure decided (reason stored); the debit still to refund
    REFUNDED = "refunded"  # the debit was refunded (or there was none)
    DONE = "done"  # the result message was confirmed by the broker


class State(str, enum.Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# Steps at which a request may still be cancelled: no image has been paid for yet. Not
# while RESERVING: the ledger's answer (a flow id to refund) is still on its way.
CANCELLABLE_STEPS = frozenset({Step.RECEIVED, Step.RESERVED, Step.SCREENED})


class Reason(str, enum.Enum):
    REJECTED = "rejected"
    INSUFFICIENT_POINTS = "insufficient-points"
    INVALID = "invalid"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    ERROR = "error"


def state_for(step: Step, failed: bool) -> State:
    """The externally visible state of a request at `step`."""
    if step is Step.DONE:
        return State.FAILED if failed else State.SUCCEEDED
    if failed or step not in CANCELLABLE_STEPS | {Step.RESERVING}:
        return State.PROCESSING
    return State.QUEUED


@dataclasses.dataclass(frozen=True)
class Viewer:
    twitch_user_id: str
    twitch_display_name: str

    def as_json(self) -> dict[str, str]:
        return {
            "twitch_user_id": self.twitch_user_id,
            "twitch_display_name": self.twitch_display_name,
        }


@dataclasses.dataclass(frozen=True)
class Failure:
    reason: Reason
    message: str  # a sentence fit to show the viewer
    detail: str = ""  # for operators: what actually went wrong (never shown to viewers)


@dataclasses.dataclass
class Job:
    id: uuid.UUID
    viewer: Viewer
    style: Style | None  # None only for an invalid request that is just being answered
    inputs: dict[str, Any]
    prompt: str
    description: str
    deadline: float  # trio.current_time() after which the request expires
    step: Step = Step.RECEIVED
    flow_id: str | None = None
    name: str | None = None  # a friend's generated name
    image_url: str | None = None
    image_color: str | None = None
    failure: Failure | None = None
    raw_style: str | None = None  # the style as it came, for an invalid request's result
    # The generated image's bytes in hand from the generator to the uploader, which takes
    # them; a job resumed from the database has none (the uploader loads them from there).
    generated: bytes | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def valid_style(self) -> Style:
        """The style of a request that passed validation: every job past intake."""
        if self.style is None:
            raise ValueError(f"request {self.id} has no valid style")
        return self.style

    @property
    def log_extra(self) -> dict[str, str]:
        return {"request_id": str(self.id), "step": self.step.value}
