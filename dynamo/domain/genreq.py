"""Parsing and validation of image requests (contract §3, the golden-vcr `genreq` schema).

The one model of the message, shared by both doors: `GenreqMessage` (and its parts) is
what the broker door validates and what the HTTP API documents (`api/schemas.py` reuses
it). `parse_message` reads a whole message body from the broker (or the HTTP API);
`parse_inputs` reads the HTTP API's short form `{"style", "inputs"}` for a known viewer.
Both run the same payload checks and return a `ParsedRequest` with the prompt and the
description already made, or raise `InvalidRequest` with a sentence naming every bad
field. Unknown extra fields are ignored, as the other golden-vcr services add some.
Control characters are invalid anywhere in the subject, even where trimming would remove
them (contract §3).

Whatever the bytes (anyone who can publish to the exchange can send them), the answer is
a request or `InvalidRequest`, never another exception: `load_json` reads them with
`json_body` (size, nesting depth and numbers bounded, lone surrogates refused).
"""

from __future__ import annotations

import dataclasses
import unicodedata
import uuid
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, Field, TypeAdapter
from pydantic_core import PydanticCustomError

from dynamo.domain import json_body, prompts
from dynamo.domain.jobs import Style, Viewer
from dynamo.domain.json_body import MAX_BODY_BYTES, MAX_NESTING_DEPTH  # noqa: F401 (re-exported)

# Longest subject accepted: the original service's limit, which the chat command enforces.
MAX_SUBJECT_CHARS = 120
# Twitch ids and display names are far shorter; this only keeps garbage out of the database.
MAX_VIEWER_FIELD_CHARS = 100
NIL_UUID = uuid.UUID(int=0)
# A refusal's text goes into a message header and a database column: keep it short.
MAX_REASON_CHARS = 1000
# The characters the contract calls control characters (Unicode category Cc), as a JSON
# Schema pattern for the document: "none anywhere", written with a lookahead because
# `...*$` lets a final newline through in Python's regular expressions (not in ECMA's).
NO_CONTROL_CHARACTERS = r"^(?![\s\S]*[\u0000-\u001f\u007f-\u009f])"


class InvalidRequest(Exception):
    """A request that can never succeed; `viewer` is set when one could be read."""

    def __init__(self, reason_text: str, viewer: Viewer | None = None) -> None:
        # pydantic's messages may quote the input (a UUID's bad character): escaped, so
        # that the text can always be stored (PostgreSQL refuses NUL, UTF-8 surrogates).
        reason_text = _printable(reason_text)[:MAX_REASON_CHARS]
        super().__init__(reason_text)
        self.reason_text = reason_text
        self.viewer = viewer

    @property
    def fields(self) -> tuple[str, ...]:
        """The refused fields, as named in the reason (`body` for the whole message)."""
        clauses = self.reason_text.split("; ")
        return tuple(dict.fromkeys(clause.split(": ", 1)[0] for clause in clauses))


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    viewer: Viewer
    style: Style
    inputs: dict[str, Any]  # normalized: only the style's keys, subject trimmed
    broadcast_id: int | None  # 0 in the message means none
    screening_id: uuid.UUID | None  # the nil UUID in the message means none
    prompt: str
    description: str


def _is_control_character(char: str) -> bool:
    # Cs: a lone surrogate, which is no character at all and cannot be stored.
    return unicodedata.category(char) in ("Cc", "Cs")


def _has_control_characters(text: str) -> bool:
    return any(_is_control_character(char) for char in text)


def _printable(text: str) -> str:
    """`text` with each control character written as its escape (`\\x00`)."""
    if not _has_control_characters(text):
        return text
    return "".join(
        char.encode("unicode_escape", "backslashreplace").decode("ascii")
        if _is_control_character(char)
        else char
        for char in text
    )


def _check_subject(subject: str) -> str:
    # Before trimming: a subject ending in a newline holds a control character too.
    if _has_control_characters(subject):
        raise PydanticCustomError("subject", "must not contain control characters")
    subject = subject.strip()
    if not 1 <= len(subject) <= MAX_SUBJECT_CHARS:
        raise PydanticCustomError("subject", f"must be 1 to {MAX_SUBJECT_CHARS} characters")
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


# The document's view of each checked string (the checks themselves are the validators).
_SUBJECT_SCHEMA = Field(
    description="Trimmed before the length is checked; control characters are invalid.",
    json_schema_extra={
        "minLength": 1,
        "maxLength": MAX_SUBJECT_CHARS,
        "pattern": NO_CONTROL_CHARACTERS,
    },
)
_VIEWER_FIELD_SCHEMA = Field(
    json_schema_extra={
        "minLength": 1,
        "maxLength": MAX_VIEWER_FIELD_CHARS,
        "pattern": NO_CONTROL_CHARACTERS,
    }
)
Subject = Annotated[str, AfterValidator(_check_subject), _SUBJECT_SCHEMA]
Color = Annotated[
    str, AfterValidator(_check_color), Field(json_schema_extra={"enum": list(prompts.COLORS)})
]
ViewerField = Annotated[str, AfterValidator(_check_viewer_field), _VIEWER_FIELD_SCHEMA]
# bool is an int in Python; a JSON `true` is no broadcast id, hence strict. The upper
# bound is the database column's (PostgreSQL integer).
Id = Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]


class MessageViewer(BaseModel):
    twitch_user_id: ViewerField
    twitch_display_name: ViewerField


class MessageState(BaseModel):
    """broadcast_id 0 and the nil screening_id mean none."""

    broadcast_id: Id = 0
    screening_id: uuid.UUID = NIL_UUID
    tape_id: Id = 0


class GhostInputs(BaseModel):
    subject: Subject


class FriendInputs(BaseModel):
    color: Color
    subject: Subject


class GhostPayload(BaseModel):
    style: Literal["ghost"]
    inputs: GhostInputs


class FriendPayload(BaseModel):
    style: Literal["friend"]
    inputs: FriendInputs


Payload = Annotated[GhostPayload | FriendPayload, Field(discriminator="style")]
_PAYLOAD = TypeAdapter(Payload)


class GenreqMessage(BaseModel):
    """A golden-vcr `genreq` message, as `dispatch` publishes it."""

    type: Literal["image"]
    viewer: MessageViewer
    state: MessageState | None = None
    payload: Payload


# pydantic names the union's branch in an error's path (`payload.ghost.inputs`); the
# message's own field names do not include it.
_BRANCH_NAMES = frozenset(style.value for style in Style)


def _describe_error(error: Any) -> str:
    """One `field.path: what is wrong` clause from a pydantic error."""
    path = [str(part) for part in error["loc"] if part not in _BRANCH_NAMES]
    kind = error["type"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        path.append("style")
    field = ".".join(path) or "body"
    if kind in ("missing", "union_tag_not_found"):
        return f"{field}: is required"
    if kind == "union_tag_invalid":
        return f"{field}: must be " + " or ".join(f"'{style.value}'" for style in Style)
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"{field}: must be an object"
    message = error["msg"].replace("Input should be", "must be")
    return f"{field}: {message[:1].lower()}{message[1:]}"


def _problems(error: pydantic.ValidationError) -> str:
    return "; ".join(dict.fromkeys(_describe_error(detail) for detail in error.errors()))


def _read_viewer(data: object) -> Viewer | None:
    try:
        viewer = MessageViewer.model_validate(data)
    except pydantic.ValidationError:
        return None
    return Viewer(viewer.twitch_user_id, viewer.twitch_display_name)


def _build(
    viewer: Viewer, payload: GhostPayload | FriendPayload, state: MessageState | None
) -> ParsedRequest:
    state = state or MessageState()
    style = Style(payload.style)
    inputs = payload.inputs.model_dump()
    return ParsedRequest(
        viewer=viewer,
        style=style,
        inputs=inputs,
        broadcast_id=state.broadcast_id or None,
        screening_id=None if state.screening_id == NIL_UUID else state.screening_id,
        prompt=prompts.prompt(style, inputs),
        description=prompts.description(style, inputs),
    )


def load_json(body: bytes) -> dict[str, Any]:
    """The JSON object in `body`, whatever the bytes (`json_body.load_object`); raises
    InvalidRequest naming the `body`."""
    try:
        return json_body.load_object(body)
    except json_body.UnreadableBody as error:
        raise InvalidRequest(f"body: {error}") from None


def parse_message(body: bytes) -> ParsedRequest:
    """A whole `genreq` message body, any bytes at all; raises InvalidRequest."""
    message = load_json(body)
    # Read apart from the rest, so that an otherwise bad request can still be answered.
    viewer = _read_viewer(message.get("viewer"))
    try:
        checked = GenreqMessage.model_validate(message)
    except pydantic.ValidationError as error:
        raise InvalidRequest(_problems(error), viewer) from None
    assert viewer is not None  # the message's viewer passed the same checks
    return _build(viewer, checked.payload, checked.state)


def parse_inputs(viewer: Viewer, style: object, inputs: object) -> ParsedRequest:
    """The HTTP API's short form for `viewer`; raises InvalidRequest."""
    try:
        payload = _PAYLOAD.validate_python({"style": style, "inputs": inputs})
    except pydantic.ValidationError as error:
        raise InvalidRequest(_problems(error), viewer) from None
    return _build(viewer, payload, state=None)
