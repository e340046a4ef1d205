"""The broker door and the HTTP door read a `genreq` message the same way (issue 19: the
two used to disagree on control characters; contract §3 says they are invalid in a
subject, wherever they are).

The same bodies go through the intake actor's parser (`genreq.parse_message`) and
through POST /requests' (`submit_routes._json_object` then `_parse`, for a broadcaster,
who may submit for anyone); both must accept or both refuse, with the same reason. The
bodies the OpenAPI document can describe exactly are also checked against the JSON
Schema it publishes for POST /requests."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from dynamo.api import schemas, submit_routes
from dynamo.api.access import Caller
from dynamo.api.errors import ApiError
from dynamo.domain import genreq
from tests.support.poison import GHOST

BROADCASTER = Caller("1", "broadcaster", "broadcaster")


def _with(path: tuple[str, ...], value) -> dict:
    message = copy.deepcopy(GHOST)
    node = message
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return message


def _friend(color: str) -> dict:
    message = copy.deepcopy(GHOST)
    message["payload"] = {"style": "friend", "inputs": {"color": color, "subject": "owl"}}
    return message


SUBJECT = ("payload", "inputs", "subject")
# Bodies whose verdict the published JSON Schema states exactly.
DESCRIBED = {
    "valid ghost": GHOST,
    "valid friend": _friend("yellow"),
    "newline inside": _with(SUBJECT, "a\nseal"),
    "newline at the end": _with(SUBJECT, "a seal\n"),
    "tab at the start": _with(SUBJECT, "\ta seal"),
    "NUL": _with(SUBJECT, "a\x00seal"),
    "DEL": _with(SUBJECT, "a\x7fseal"),
    "C1 control": _with(SUBJECT, "a\x85seal"),
    "escape": _with(SUBJECT, "\x1b[31ma seal"),
    "120 characters": _with(SUBJECT, "x" * 120),
    "121 characters": _with(SUBJECT, "x" * 121),
    "empty subject": _with(SUBJECT, ""),
    "unicode subject": _with(SUBJECT, "a ghöst 👻"),
    "control in a viewer": _with(("viewer", "twitch_display_name"), "wasabi\x00"),
    "unknown color": _friend("beige"),
    "unknown style": _with(("payload", "style"), "robot"),
    "wrong type": _with(("type",), "video"),
    "no viewer": {key: value for key, value in GHOST.items() if key != "viewer"},
    "broadcast id too big": _with(("state", "broadcast_id"), 2**31),
}
# Bodies the schema cannot state exactly (the subject is trimmed before its length is
# checked; JSON Schema has no trimming), or that it does not see (the bytes' encoding).
UNDESCRIBED = {
    "blank subject": _with(SUBJECT, "   "),
    "121 with spaces around": _with(SUBJECT, " " + "x" * 120 + " "),
    "lone surrogate": _with(SUBJECT, "a\ud800seal"),
    "NUL in the screening id": _with(("state", "screening_id"), "a\x00b"),
}


def _broker_door(body: bytes) -> str:
    try:
        genreq.parse_message(body)
    except genreq.InvalidRequest as refusal:
        return f"refused: {refusal.reason_text}"
    return "accepted"


def _http_door(body: bytes) -> str:
    try:
        submit_routes._parse(submit_routes._json_object(body), body, BROADCASTER)
    except ApiError as error:
        assert error.status == 400
        return f"refused: {error.message}"
    return "accepted"


@pytest.mark.parametrize("message", [*DESCRIBED.values(), *UNDESCRIBED.values()],
                         ids=[*DESCRIBED, *UNDESCRIBED])
def test_both_doors_give_the_same_verdict(message):
    body = json.dumps(message).encode()
    assert _broker_door(body) == _http_door(body)


@pytest.mark.parametrize("message", DESCRIBED.values(), ids=DESCRIBED.keys())
def test_the_published_schema_gives_the_same_verdict(message):
    schema = schemas.NewRequest.model_json_schema()
    valid = jsonschema.Draft202012Validator(schema).is_valid(message)
    assert valid == (_broker_door(json.dumps(message).encode()) == "accepted")


def test_a_control_character_where_trimming_would_remove_it_is_refused_by_both():
    body = json.dumps(DESCRIBED["newline at the end"]).encode()
    assert _broker_door(body) == _http_door(body) == (
        "refused: payload.inputs.subject: must not contain control characters")
