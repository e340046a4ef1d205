"""Poison messages (issue 10): whatever bytes arrive, `genreq.parse_message` answers a
request fit to store or an `InvalidRequest` naming what it refused; never another
exception (5,000 nested brackets made `json.loads` raise RecursionError, which crashed
the intake actor at every redelivery).

Known hostile bodies first, then hypothesis properties: arbitrary bytes, arbitrary JSON
values, valid messages mutated field by field and byte by byte."""

from __future__ import annotations

import copy
import functools
import json
import unicodedata

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dynamo.domain import genreq
from dynamo.domain.genreq import InvalidRequest, parse_inputs, parse_message
from dynamo.domain.jobs import Style, Viewer
from tests.support.poison import GHOST

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FRIEND = {"type": "image",
          "viewer": {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"},
          "state": {"broadcast_id": 0, "screening_id": "00000000-0000-0000-0000-000000000000",
                    "tape_id": 0},
          "payload": {"style": "friend",
                      "inputs": {"color": "yellow", "subject": "caterpillar in a top hat"}}}
VIEWER = Viewer("90790024", "wasabimilkshake")


def _storable(text: str) -> None:
    """What PostgreSQL and an AMQP header can hold: valid UTF-8, no NUL."""
    text.encode("utf-8")
    assert "\x00" not in text


def _check_refusal(refusal: InvalidRequest) -> None:
    assert refusal.reason_text and len(refusal.reason_text) <= genreq.MAX_REASON_CHARS
    _storable(refusal.reason_text)
    assert refusal.fields and all(refusal.fields)
    if refusal.viewer is not None:
        for text in (refusal.viewer.twitch_user_id, refusal.viewer.twitch_display_name):
            _storable(text)
            assert not any(unicodedata.category(c) == "Cc" for c in text)


def _check_request(request: genreq.ParsedRequest) -> None:
    assert isinstance(request.style, Style)
    subject = request.inputs["subject"]
    assert isinstance(subject, str) and 1 <= len(subject) <= genreq.MAX_SUBJECT_CHARS
    assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in subject)
    if request.style is Style.FRIEND:
        assert isinstance(request.inputs["color"], str)
    for text in (request.prompt, request.description, json.dumps(request.inputs, ensure_ascii=False),
                 request.viewer.twitch_user_id, request.viewer.twitch_display_name):
        _storable(text)
    assert request.broadcast_id is None or 0 < request.broadcast_id < 2**31


def outcome(body: bytes) -> genreq.ParsedRequest | InvalidRequest:
    """The request or the refusal; any other exception fails the test."""
    try:
        request = parse_message(body)
    except InvalidRequest as refusal:
        _check_refusal(refusal)
        return refusal
    _check_request(request)
    return request


def refused(body: bytes) -> InvalidRequest:
    result = outcome(body)
    assert isinstance(result, InvalidRequest), result
    return result


def with_inputs(**inputs) -> bytes:
    message = copy.deepcopy(GHOST)
    message["payload"]["inputs"] = inputs
    return json.dumps(message).encode()


# -- the hostile bodies issue 10 names, and their neighbours ---------------------------


@pytest.mark.parametrize("body", [
    b"[" * 5000 + b"]" * 5000,
    b'{"a":' * 2500 + b"1" + b"}" * 2500,
    json.dumps(GHOST).encode()[:-1] + b', "extra": ' + b"[" * 900 + b"]" * 900 + b"}",
])
def test_a_nesting_bomb_is_refused_as_too_deep(body):
    refusal = refused(body)
    assert refusal.fields == ("body",) and "nested deeper" in refusal.reason_text


def test_brackets_inside_strings_are_not_nesting():
    message = copy.deepcopy(GHOST)
    message["payload"]["inputs"]["subject"] = "[[[[" * 25 + '"{'
    assert outcome(json.dumps(message).encode()).inputs["subject"] == "[[[[" * 25 + '"{'


@pytest.mark.parametrize("number", [b"9" * 5000, b"-" + b"9" * 100, b"1" * 41])
def test_a_huge_integer_is_refused(number):
    body = json.dumps(GHOST).encode()[:-1] + b', "state": {"broadcast_id": ' + number + b"}}"
    assert refused(body).fields == ("body",)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_constants_are_refused(constant):
    assert refused(json.dumps(GHOST).encode()[:-1] + b', "x": ' + constant + b"}").fields == ("body",)


def test_a_body_over_16_kb_is_refused_before_decoding():
    message = copy.deepcopy(GHOST)
    message["padding"] = "x" * genreq.MAX_BODY_BYTES
    refusal = refused(json.dumps(message).encode())
    assert refusal.reason_text == f"body: larger than {genreq.MAX_BODY_BYTES} bytes"


@pytest.mark.parametrize("body", [b"\xff\xfe{}", json.dumps(GHOST).encode().replace(b"seal", b"s\xc3al"),
                                  json.dumps(GHOST).encode("utf-16")])
def test_bytes_that_are_not_utf8_are_refused(body):
    assert "not valid UTF-8" in refused(body).reason_text


@pytest.mark.parametrize("where", ["subject", "viewer", "extra field", "key"])
def test_a_lone_surrogate_anywhere_is_refused(where):
    message = copy.deepcopy(GHOST)
    if where == "subject":
        message["payload"]["inputs"]["subject"] = "a \ud800 seal"
    elif where == "viewer":
        message["viewer"]["twitch_display_name"] = "\udc00"
    elif where == "extra field":
        message["trace"] = ["\ud83d"]
    else:
        message["\udfff"] = 1
    refusal = refused(json.dumps(message).encode())  # ensure_ascii: sent as \ud800 escapes
    assert "lone surrogate" in refusal.reason_text


@pytest.mark.parametrize(("inputs", "field"), [
    ({"subject": ["a"]}, "payload.inputs.subject"),
    ({"subject": {"a": 1}}, "payload.inputs.subject"),
    ({"subject": 12}, "payload.inputs.subject"),
    ({"subject": None}, "payload.inputs.subject"),
    ({"subject": "owl", "color": ["yellow"]}, "payload.inputs.color"),
])
def test_a_field_of_the_wrong_type_is_named(inputs, field):
    message = copy.deepcopy(GHOST if "color" not in inputs else FRIEND)
    message["payload"]["inputs"] = inputs
    refusal = refused(json.dumps(message).encode())
    assert refusal.fields == (field,) and refusal.viewer == VIEWER


def test_a_style_of_the_wrong_type_is_named():
    message = copy.deepcopy(GHOST)
    message["payload"]["style"] = ["ghost"]
    assert refused(json.dumps(message).encode()).fields == ("payload.style",)


@pytest.mark.parametrize("value", ["a\x00b", "\x00", "00000000-0000-0000-0000-00000000000\x1b"])
def test_a_refusal_quoting_a_control_character_can_be_stored(value):
    """pydantic's UUID error quotes the bad character; a NUL there reached the reason
    text, which PostgreSQL and an AMQP header refuse (found by hypothesis)."""
    message = copy.deepcopy(GHOST)
    message["state"]["screening_id"] = value
    refusal = refused(json.dumps(message).encode())
    assert refusal.fields == ("state.screening_id",) and refusal.viewer == VIEWER
    assert not any(unicodedata.category(c) == "Cc" for c in refusal.reason_text)


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b'"a seal"', b"12", b"true", b"[{}]"])
def test_json_that_is_not_an_object_is_refused(body):
    assert refused(body).fields == ("body",)


def test_every_refused_field_is_reported():
    message = copy.deepcopy(FRIEND)
    message["type"] = ["image"]
    message["payload"]["inputs"] = {"subject": ["a"], "color": 3}
    assert set(refused(json.dumps(message).encode()).fields) == {
        "type", "payload.inputs.subject", "payload.inputs.color"}


def test_the_examples_still_parse():
    assert outcome(json.dumps(GHOST).encode()).description == "a seal"
    assert outcome(json.dumps(FRIEND).encode()).description == "a caterpillar in a top hat"


# -- properties ------------------------------------------------------------------------

# Text as an attacker would send it: any code point, lone surrogates included.
hostile_text = st.text(st.characters(codec=None, categories=None), max_size=30) | st.sampled_from(
    ["\ud800", "a\udfffb", "\x00", "", " " * 130, "x" * 121, "yellow", "ghost", "friend", "image"])
json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**60), max_value=10**60)
                | st.floats() | hostile_text)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["type", "viewer", "state", "payload", "style", "inputs",
                                       "subject", "color", "twitch_user_id", "twitch_display_name",
                                       "broadcast_id", "screening_id", "tape_id"]) | hostile_text,
                      children, max_size=5),
    max_leaves=20)


def _encodings(value) -> list[bytes]:
    """`value` as JSON the ways a sender might: escaped, raw UTF-8 (surrogates passed
    through, as CESU-8 senders do)."""
    out = [json.dumps(value).encode()]  # NaN and Infinity come out as their non-JSON names
    out.append(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return out


@SETTINGS
@given(st.binary(max_size=2000))
def test_any_bytes_are_a_request_or_a_refusal(body):
    outcome(body)


@SETTINGS
@given(json_values)
def test_any_json_value_is_a_request_or_a_refusal(value):
    for body in _encodings(value):
        outcome(body)


def _set_path(message: dict, path: tuple[str, ...], value) -> None:
    node = message
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    # A copy: `nasty_values` hands out the same objects, and a later change under this
    # path must not alter them (that made a message that contains itself).
    node[path[-1]] = copy.deepcopy(value)


_PATHS = [("type",), ("viewer",), ("viewer", "twitch_user_id"), ("viewer", "twitch_display_name"),
          ("state",), ("state", "broadcast_id"), ("state", "screening_id"), ("state", "tape_id"),
          ("payload",), ("payload", "style"), ("payload", "inputs"), ("payload", "inputs", "subject"),
          ("payload", "inputs", "color"), ("extra",)]
DEEP_LIST = functools.reduce(lambda inner, _: [inner], range(40), "deep")
# Values known to have broken parsers here, drawn as often as all others together.
nasty_values = st.sampled_from(["\ud800", "a\udfffb", ["a"], {"subject": ["a"]}, 10**50, -1, 2**31,
                                float("inf"), float("nan"), True, "", "x" * 121, "a\x00b",
                                DEEP_LIST])
mutations = st.lists(st.tuples(st.sampled_from(_PATHS), nasty_values | json_values | st.just(...)),
                     min_size=1, max_size=4)


@SETTINGS
@given(st.sampled_from([GHOST, FRIEND]), mutations)
def test_a_valid_message_mutated_field_by_field_is_a_request_or_a_refusal(original, changes):
    message = copy.deepcopy(original)
    for path, value in changes:
        if value is ...:  # delete the field
            parent = message
            for key in path[:-1]:
                parent = parent.get(key) if isinstance(parent, dict) else None
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
        else:
            _set_path(message, path, value)
    for body in _encodings(message):
        outcome(body)


@SETTINGS
@given(st.sampled_from([GHOST, FRIEND]), st.data())
def test_a_valid_message_mutated_byte_by_byte_is_a_request_or_a_refusal(original, data):
    body = bytearray(json.dumps(original).encode())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(body)))
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "repeat"]))
        if kind == "flip" and at < len(body):
            body[at] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            body[at:at] = data.draw(st.binary(min_size=1, max_size=8)
                                    | st.sampled_from([b"[", b"{", b'"\\ud800"', b"9" * 50, b"\xff"]))
        elif kind == "delete":
            del body[at:at + data.draw(st.integers(1, 8))]
        else:  # a piece repeated many times: bombs of brackets, digits, quotes
            piece = bytes(body[at:at + data.draw(st.integers(1, 4))])
            assume(piece)
            body[at:at] = piece * data.draw(st.integers(2, 6000))
    outcome(bytes(body))


@SETTINGS
@given(st.integers(1, 6000), st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'{"payload":', b"}")]))
def test_nesting_of_any_depth_is_a_request_or_a_refusal(depth, brackets):
    opening, closing = brackets
    result = outcome(opening * depth + b"1" + closing * depth)
    assert isinstance(result, InvalidRequest)
    if depth > genreq.MAX_NESTING_DEPTH:
        assert result.fields == ("body",)


@SETTINGS
@given(json_values, json_values)
def test_the_short_form_takes_any_values(style, inputs):
    try:
        _check_request(parse_inputs(VIEWER, style, inputs))
    except InvalidRequest as refusal:
        _check_refusal(refusal)
