"""Hostile and invalid `generation-requests` messages, for the fuzz of the broker door
(tests/integration/test_broker_fuzz.py): the known cases of issue 10 (nesting bombs, bytes that are
not UTF-8, huge bodies, wrong types, missing fields, bodies that are not JSON, empty ones)
and seeded random ones, each invalid by construction (a required field made wrong)."""

from __future__ import annotations

import copy
import json
import random

GHOST = {"type": "image",
         "viewer": {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"},
         "state": {"broadcast_id": 13, "screening_id": "96d1ca5c-7658-48c9-8193-9d1739854467",
                   "tape_id": 124},
         "payload": {"style": "ghost", "inputs": {"subject": "a seal"}}}
FRIEND = {"type": "image",
          "viewer": {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"},
          "payload": {"style": "friend", "inputs": {"color": "yellow", "subject": "an owl"}}}

# Required fields, and values none of them may take.
_REQUIRED = [("type",), ("viewer",), ("viewer", "twitch_user_id"),
             ("viewer", "twitch_display_name"), ("payload",), ("payload", "style"),
             ("payload", "inputs"), ("payload", "inputs", "subject")]
_WRONG = [None, True, 0, -1, 1.5, 10**30, [], ["a"], {}, {"a": 1}, "", "\n\t", "x" * 121,
          "a\u0000b", "\ud800", "a\u0007b", [[[["deep"]]]]]
_WRONG_STATE = [-1, 2**31, "13", 1.5, True, [], {"a": 1}]


def _set(message: dict, path: tuple[str, ...], value) -> dict:
    message = copy.deepcopy(message)
    node = message
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return message


def _encode(message) -> bytes:
    return json.dumps(message).encode()


def known_cases() -> dict[str, bytes]:
    ghost = _encode(GHOST)
    cases = {
        "5,000-deep brackets": b"[" * 5000 + b"]" * 5000,
        "2,500-deep objects": b'{"a":' * 2500 + b"1" + b"}" * 2500,
        "deep payload": ghost[:-1] + b', "payload": ' + b"[" * 900 + b"]" * 900 + b"}",
        "deep extra field": ghost[:-1] + b', "trace": ' + b"[" * 4000 + b"]" * 4000 + b"}",
        "not UTF-8": ghost.replace(b"a seal", b"a \xff\xfe seal"),
        "UTF-16": json.dumps(GHOST).encode("utf-16"),
        "latin-1 subject": ghost.replace(b"a seal", "a s\u00e9al".encode("latin-1")),
        "lone surrogate subject": ghost.replace(b"a seal", b"a \\ud800 seal"),
        "lone surrogate viewer": ghost.replace(b"wasabimilkshake", b"\\udfff"),
        "5,000-digit number": ghost.replace(b'"broadcast_id": 13', b'"broadcast_id": ' + b"9" * 5000),
        "NaN": ghost.replace(b'"broadcast_id": 13', b'"broadcast_id": NaN'),
        "1e400": ghost.replace(b'"broadcast_id": 13', b'"broadcast_id": 1e400'),
        "20 KB subject": _encode(_set(GHOST, ("payload", "inputs", "subject"), "x" * 20_000)),
        "1 MB body": b'{"type":"image","pad":"' + b"x" * 1_000_000 + b'"}',
        "empty": b"",
        "whitespace": b"  \n ",
        "not JSON": b"a seal, please",
        "half an object": ghost[: len(ghost) // 2],
        "trailing junk": ghost + b"}",
        "a JSON list": b"[1, 2]",
        "a JSON string": b'"a seal"',
        "null": b"null",
        "a number": b"12",
        "subject a list": _encode(_set(GHOST, ("payload", "inputs", "subject"), ["a"])),
        "subject an object": _encode(_set(GHOST, ("payload", "inputs", "subject"), {"a": 1})),
        "color a list": _encode(_set(FRIEND, ("payload", "inputs", "color"), ["yellow"])),
        "color unknown": _encode(_set(FRIEND, ("payload", "inputs", "color"), "plaid")),
        "style a list": _encode(_set(GHOST, ("payload", "style"), ["ghost"])),
        "style unknown": _encode(_set(GHOST, ("payload", "style"), "dragon")),
        "type video": _encode(_set(GHOST, ("type",), "video")),
        "viewer a list": _encode(_set(GHOST, ("viewer",), ["90790024"])),
        "screening id junk": _encode(_set(GHOST, ("state", "screening_id"), "not-a-uuid")),
        "NUL in subject": _encode(_set(GHOST, ("payload", "inputs", "subject"), "a \u0000 seal")),
    }
    for path in _REQUIRED:
        cases["missing " + ".".join(path)] = _encode(_set(GHOST, path, ...))
    return cases


def random_cases(rng: random.Random, count: int) -> list[bytes]:
    """`count` messages, each with one to three required fields made wrong."""
    out = []
    for _ in range(count):
        message = copy.deepcopy(rng.choice([GHOST, FRIEND]))
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.2:
                path = ("state", rng.choice(["broadcast_id", "tape_id"]))
                message.setdefault("state", {})
                value = rng.choice(_WRONG_STATE)
            else:
                path = rng.choice(_REQUIRED)
                value = rng.choice([*_WRONG, ...])
            try:
                message = _set(message, path, value)
            except (KeyError, TypeError):  # its parent was made wrong already
                continue
        if message in (GHOST, FRIEND):
            message = _set(message, ("type",), "video")
        body = json.dumps(message, ensure_ascii=rng.random() < 0.5)
        out.append(body.encode("utf-8", "surrogatepass"))
    return out
