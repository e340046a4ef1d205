"""Input messages (contract §3): the examples parse, every bad field is named."""

import json
import uuid

import pytest

from dynamo.domain import genreq, prompts
from dynamo.domain.genreq import InvalidRequest, parse_inputs, parse_message
from dynamo.domain.jobs import Style, Viewer

GHOST_EXAMPLE = (
    b'{"type":"image","viewer":{"twitch_user_id":"90790024","twitch_display_name":"wasabimilkshake"},'
    b'"state":{"broadcast_id":13,"screening_id":"96d1ca5c-7658-48c9-8193-9d1739854467","tape_id":124},'
    b'"payload":{"style":"ghost","inputs":{"subject":"a seal"}}}'
)
FRIEND_EXAMPLE = (
    b'{"type":"image","viewer":{"twitch_user_id":"90790024","twitch_display_name":"wasabimilkshake"},'
    b'"state":{"broadcast_id":0,"screening_id":"00000000-0000-0000-0000-000000000000","tape_id":0},'
    b'"payload":{"style":"friend","inputs":{"color":"yellow","subject":"caterpillar in a top hat"}}}'
)
VIEWER = Viewer("90790024", "wasabimilkshake")


def message(**changes) -> dict:
    """The ghost example as a dict, with top-level keys replaced (None deletes)."""
    body = json.loads(GHOST_EXAMPLE)
    for key, value in changes.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    return body


def ghost(subject) -> bytes:
    return json.dumps(message(payload={"style": "ghost", "inputs": {"subject": subject}})).encode()


def friend(color, subject="owl") -> bytes:
    payload = {"style": "friend", "inputs": {"color": color, "subject": subject}}
    return json.dumps(message(payload=payload)).encode()


def invalid(body: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        parse_message(body)
    return raised.value


def test_ghost_example():
    request = parse_message(GHOST_EXAMPLE)
    assert request.viewer == VIEWER
    assert request.style is Style.GHOST
    assert request.inputs == {"subject": "a seal"}
    assert request.broadcast_id == 13
    assert request.screening_id == uuid.UUID("96d1ca5c-7658-48c9-8193-9d1739854467")
    assert request.prompt == prompts.ghost_prompt("a seal")
    assert request.description == "a seal"


def test_friend_example():
    request = parse_message(FRIEND_EXAMPLE)
    assert request.viewer == VIEWER
    assert request.style is Style.FRIEND
    assert request.inputs == {"color": "yellow", "subject": "caterpillar in a top hat"}
    assert request.broadcast_id is None
    assert request.screening_id is None
    assert request.prompt == prompts.friend_prompt("yellow", "caterpillar in a top hat")
    assert request.description == "a caterpillar in a top hat"


def test_missing_or_null_state_means_none():
    for body in (message(state=None), {**message(), "state": None}):
        request = parse_message(json.dumps(body).encode())
        assert (request.broadcast_id, request.screening_id) == (None, None)


def test_unknown_fields_are_ignored():
    body = message(extra=1)
    body["payload"]["inputs"]["color"] = "red"  # not a ghost's; dropped
    body["viewer"]["twitch_login"] = "wasabimilkshake"
    request = parse_message(json.dumps(body).encode())
    assert request.inputs == {"subject": "a seal"}


def test_subject_is_trimmed():
    assert parse_message(ghost("  a seal \u3000")).inputs == {"subject": "a seal"}


def test_120_characters_are_fine():
    assert parse_message(ghost("x" * 120)).inputs["subject"] == "x" * 120


def test_bad_json():
    error = invalid(b'{"type":')
    assert error.reason_text.startswith("body:")
    assert error.viewer is None


def test_not_utf8():
    assert invalid(b'\xff\xfe{}').reason_text.startswith("body:")


def test_not_an_object():
    error = invalid(b'["image"]')
    assert error.reason_text == "body: must be a JSON object"
    assert error.viewer is None


def test_unknown_type():
    error = invalid(json.dumps(message(type="text")).encode())
    assert error.reason_text == "type: must be 'image'"
    assert error.viewer == VIEWER


def test_missing_type():
    assert invalid(json.dumps(message(type=None)).encode()).reason_text == "type: is required"


def test_unknown_style():
    body = message(payload={"style": "skeleton", "inputs": {"subject": "a seal"}})
    error = invalid(json.dumps(body).encode())
    assert error.reason_text.startswith("payload.style: must be 'ghost' or 'friend'")
    assert error.viewer == VIEWER


def test_missing_viewer():
    error = invalid(json.dumps(message(viewer=None)).encode())
    assert error.reason_text == "viewer: is required"
    assert error.viewer is None


def test_viewer_missing_a_field():
    error = invalid(json.dumps(message(viewer={"twitch_user_id": "90790024"})).encode())
    assert error.reason_text == "viewer.twitch_display_name: is required"
    assert error.viewer is None


def test_viewer_id_must_be_a_string():
    body = message(viewer={"twitch_user_id": 90790024, "twitch_display_name": "w"})
    assert invalid(json.dumps(body).encode()).reason_text.startswith("viewer.twitch_user_id:")


@pytest.mark.parametrize("subject", ["", "   ", "\u3000 "])
def test_empty_subject(subject):
    error = invalid(ghost(subject))
    assert error.reason_text == "payload.inputs.subject: must be 1 to 120 characters"
    assert error.viewer == VIEWER


def test_121_characters():
    error = invalid(ghost("x" * 121))
    assert error.reason_text == "payload.inputs.subject: must be 1 to 120 characters"


@pytest.mark.parametrize(
    "subject",
    # Where trimming would remove it too (contract §3: control characters are invalid).
    ["a\nseal", "a seal\x00", "a\x1bseal", "a\x7fseal", "a seal\n", "\ta seal", "\t \n"],
)
def test_control_character(subject):
    error = invalid(ghost(subject))
    assert error.reason_text == "payload.inputs.subject: must not contain control characters"
    assert error.viewer == VIEWER


def test_subject_must_be_a_string():
    assert invalid(ghost(12)).reason_text == "payload.inputs.subject: must be a valid string"


def test_unknown_color():
    error = invalid(friend("beige"))
    assert error.reason_text.startswith("payload.inputs.color: must be one of red, red-orange")
    assert error.viewer == VIEWER


@pytest.mark.parametrize("color", prompts.COLORS)
def test_every_color_is_accepted(color):
    assert parse_message(friend(color)).inputs["color"] == color


def test_missing_inputs():
    error = invalid(json.dumps(message(payload={"style": "ghost"})).encode())
    assert error.reason_text == "payload.inputs: is required"


def test_missing_payload():
    assert invalid(json.dumps(message(payload=None)).encode()).reason_text == "payload: is required"


def test_payload_not_an_object_is_reported_once():
    assert invalid(json.dumps(message(payload="x")).encode()).reason_text == "payload: must be an object"


@pytest.mark.parametrize(
    ("state", "field"),
    [
        ({"broadcast_id": -1}, "state.broadcast_id"),
        ({"broadcast_id": True}, "state.broadcast_id"),
        ({"broadcast_id": "13"}, "state.broadcast_id"),
        ({"screening_id": "not-a-uuid"}, "state.screening_id"),
    ],
)
def test_bad_state(state, field):
    error = invalid(json.dumps(message(state=state)).encode())
    assert error.reason_text.startswith(f"{field}: ")
    assert error.viewer == VIEWER


def test_every_problem_is_named():
    body = message(type="video", payload={"style": "ghost", "inputs": {"subject": ""}})
    reason = invalid(json.dumps(body).encode()).reason_text
    assert "type: " in reason and "payload.inputs.subject: " in reason


def test_short_form_ghost():
    request = parse_inputs(VIEWER, "ghost", {"subject": " a seal "})
    assert request.viewer == VIEWER
    assert request.inputs == {"subject": "a seal"}
    assert (request.broadcast_id, request.screening_id) == (None, None)
    assert request.description == "a seal"


def test_short_form_friend():
    request = parse_inputs(VIEWER, "friend", {"color": "orange", "subject": "the owl"})
    assert request.prompt == prompts.friend_prompt("orange", "the owl")
    assert request.description == "an owl"


@pytest.mark.parametrize(
    ("style", "inputs", "reason"),
    [
        ("robot", {"subject": "x"}, "style: must be 'ghost' or 'friend'"),
        ("friend", {"subject": "owl"}, "inputs.color: is required"),
        ("ghost", "a seal", "inputs: must be an object"),
        ("ghost", {"subject": "x" * 121}, "inputs.subject: must be 1 to 120 characters"),
    ],
)
def test_short_form_invalid(style, inputs, reason):
    with pytest.raises(InvalidRequest) as raised:
        parse_inputs(VIEWER, style, inputs)
    assert raised.value.reason_text == reason
    assert raised.value.viewer == VIEWER
    assert str(raised.value) == reason


def test_limit_is_the_contracts():
    assert genreq.MAX_SUBJECT_CHARS == 120
