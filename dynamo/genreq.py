"""Parsing and validation of image requests (contract §3, the golden-vcr `genreq` schema).

`parse_message` reads a whole message body from the broker (or the HTTP API);
`parse_inputs` reads the HTTP API's short form `{"style", "inputs"}` for a known viewer.
Both run the same payload checks and return a `ParsedRequest` with the prompt and the
description already made, or raise `InvalidRequest` with a sentence naming every bad
field. Unknown extra fields are ignored, as the other golden-vcr services add some.
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
import uuid
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, Field
from pydantic_core import PydanticCustomError

from dynamo import prompts
from dynamo.jobs import Style, Viewer

# Longest subject accepted: the original service's limit, which the chat command enforces.
MAX_SUBJECT_CHARS = 120
# Twitch ids and display names are far shorter; this only keeps garbage out of the database.
MAX_VIEWER_FIELD_CHARS = 100
NIL_UUID = uuid.UUID(int=0)


class InvalidRequest(Exception):
    """A request that can never succeed; `viewer` is set when one could be read."""

    def __init__(self, reason_text: str, viewer: Viewer | None = None) -> None:
        super().__init__(reason_text)
        self.reason_text = reason_text
        self.viewer = viewer


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    viewer: Viewer
    style: Style
    inputs: dict[str, Any]  # normalized: only the style's keys, subject trimmed
    broadcast_id: int | None  # 0 in the message means none
    screening_id: uuid.UUID | None  # the nil UUID in the message means none
    prompt: str
    description: str


def _has_control_characters(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)


def _check_subject(subject: str) -> str:
    subject = subject.strip()
    if not 1 <= len(subject) <= MAX_SUBJECT_CHARS:
        raise PydanticCustomError("subject", f"must be 1 to {MAX_SUBJECT_CHARS} characters")
    if _has_control_characters(subject):
        raise PydanticCustomError("subject", "must not contain control characters")
    return subject


def _check_color(color: str) -> str:
    if color not in prompts.COLORS:
        raise PydanticCustomError("color", "must be one of " + ", ".join(prompts.COLORS))
    return color


def _check_viewer_field(value: str) -> str:
    if not 1 <= len(value) <= MAX_VIEWER_FIELD_CHARS or _has_control_characters(value):
        raise PydanticCustomError(
            "viewer", f"must be 1 to {MAX_VIEWER_FIELD_CHARS} printable characters"
        )
    return value


Subject = Annotated[str, AfterValidator(_check_subject)]
Color = Annotated[str, AfterValidator(_check_color)]
ViewerField = Annotated[str, AfterValidator(_check_viewer_field)]
# bool is an int in Python; a JSON `true` is no broadcast id, hence strict. The upper
# bound is the database column's (PostgreSQL integer).
Id = Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]


class _Viewer(BaseModel):
    twitch_user_id: ViewerField
    twitch_display_name: ViewerField


class _State(BaseModel):
    broadcast_id: Id = 0
    screening_id: uuid.UUID = NIL_UUID
    tape_id: Id = 0


class _Envelope(BaseModel):
    type: Literal["image"]
    viewer: _Viewer
    state: _State | None = None
    payload: dict[str, Any]  # checked by `_check_payload`, shared with the short form


class _Payload(BaseModel):
    style: Style
    inputs: dict[str, Any]


class _GhostInputs(BaseModel):
    subject: Subject


class _FriendInputs(BaseModel):
    color: Color
    subject: Subject


_INPUTS_MODELS: dict[Style, type[BaseModel]] = {
    Style.GHOST: _GhostInputs,
    Style.FRIEND: _FriendInputs,
}


def _describe_error(error: Any, prefix: tuple[str, ...]) -> str:
    """One `field.path: what is wrong` clause from a pydantic error."""
    field = ".".join(str(part) for part in (*prefix, *error["loc"])) or "body"
    if error["type"] == "missing":
        return f"{field}: is required"
    if error["type"] in ("dict_type", "model_type", "model_attributes_type"):
        return f"{field}: must be an object"
    message = error["msg"].replace("Input should be", "must be")
    return f"{field}: {message[:1].lower()}{message[1:]}"


def _validate(model: type[BaseModel], data: object, prefix: tuple[str, ...], problems: list[str]):
    """The validated model, or None after adding its problems to `problems`."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as error:
        problems.extend(_describe_error(detail, prefix) for detail in error.errors())
        return None


def _check_payload(data: object, prefix: tuple[str, ...], problems: list[str]):
    """(style, normalized inputs), or None after adding the payload's problems."""
    payload = _validate(_Payload, data, prefix, problems)
    if payload is None:
        return None
    inputs = _validate(_INPUTS_MODELS[payload.style], payload.inputs, (*prefix, "inputs"), problems)
    if inputs is None:
        return None
    return payload.style, inputs.model_dump()


def _join(problems: list[str]) -> str:
    # A payload that is not an object is reported by both checks; say it once.
    return "; ".join(dict.fromkeys(problems))


def _read_viewer(data: object) -> Viewer | None:
    viewer = _validate(_Viewer, data, (), [])
    return None if viewer is None else Viewer(viewer.twitch_user_id, viewer.twitch_display_name)


def _build(
    viewer: Viewer, style: Style, inputs: dict[str, Any], state: _State | None
) -> ParsedRequest:
    state = state or _State()
    return ParsedRequest(
        viewer=viewer,
        style=style,
        inputs=inputs,
        broadcast_id=state.broadcast_id or None,
        screening_id=None if state.screening_id == NIL_UUID else state.screening_id,
        prompt=prompts.prompt(style, inputs),
        description=prompts.description(style, inputs),
    )


def parse_message(body: bytes) -> ParsedRequest:
    """A whole `genreq` message body; raises InvalidRequest."""
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequest(f"body: not valid UTF-8 JSON ({error})") from None
    if not isinstance(message, dict):
        raise InvalidRequest("body: must be a JSON object")
    # Read apart from the rest, so that an otherwise bad request can still be answered.
    viewer = _read_viewer(message.get("viewer"))
    problems: list[str] = []
    envelope = _validate(_Envelope, message, (), problems)
    # The payload is checked even when the envelope is bad, to report every problem at once.
    checked = (
        _check_payload(message["payload"], ("payload",), problems) if "payload" in message else None
    )
    if envelope is None or checked is None:
        raise InvalidRequest(_join(problems), viewer)
    assert viewer is not None  # the envelope's viewer passed the same checks
    style, inputs = checked
    return _build(viewer, style, inputs, envelope.state)


def parse_inputs(viewer: Viewer, style: object, inputs: object) -> ParsedRequest:
    """The HTTP API's short form for `viewer`; raises InvalidRequest."""
    problems: list[str] = []
    checked = _check_payload({"style": style, "inputs": inputs}, (), problems)
    if checked is None:
        raise InvalidRequest(_join(problems), viewer)
    return _build(viewer, *checked, state=None)
