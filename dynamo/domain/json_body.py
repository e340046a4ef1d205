"""Any bytes to a JSON object, bounded: the first step of reading a `genreq` message from
either door (the broker's deliveries, POST /requests).

Whatever the bytes, `load_object` answers a dict or raises `UnreadableBody` saying why:
it bounds the size, the nesting depth and the length of numbers before the JSON decoder
sees them, and refuses text that is not valid Unicode (lone surrogates), which
PostgreSQL could not store.
"""

from __future__ import annotations

import json
import re
from typing import Any

# A genreq message is a few hundred bytes; this leaves room for fields other services add.
MAX_BODY_BYTES = 16 * 1024
# A genreq message nests 3 deep; deeper junk is refused before the decoder recurses into it
# (5,000 brackets make `json.loads` raise RecursionError).
MAX_NESTING_DEPTH = 32
# Longer numbers are refused before Python converts them (quadratic, then a ValueError
# past 4,300 digits); the largest id the database holds has 10 digits.
MAX_NUMBER_CHARS = 40
# A JSON string literal, to skip brackets inside strings when measuring the depth. An
# unterminated one runs to the end: without that, each later quote would start a new
# scan to the end (quadratic: seconds for 16 KB of `"\\"`).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


class UnreadableBody(ValueError):
    """The body is not a JSON object this service can read; the text says why."""


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub('""', text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _parse_int(digits: str) -> int:
    if len(digits) > MAX_NUMBER_CHARS:
        raise ValueError(f"a number longer than {MAX_NUMBER_CHARS} characters")
    return int(digits)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _lone_surrogate_in(value: object) -> bool:
    """True if a string anywhere in `value` (depth already bounded) is not valid Unicode."""
    if isinstance(value, str):
        return any("\ud800" <= char <= "\udfff" for char in value)
    if isinstance(value, dict):
        return any(_lone_surrogate_in(k) or _lone_surrogate_in(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate_in(item) for item in value)
    return False


def load_object(body: bytes) -> dict[str, Any]:
    """The JSON object in `body`, whatever the bytes; raises UnreadableBody."""
    if len(body) > MAX_BODY_BYTES:
        raise UnreadableBody(f"larger than {MAX_BODY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UnreadableBody(f"not valid UTF-8 JSON ({error})") from None
    if _nesting_depth(text) > MAX_NESTING_DEPTH:
        raise UnreadableBody(f"nested deeper than {MAX_NESTING_DEPTH} levels")
    try:
        message = json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise UnreadableBody(f"not valid UTF-8 JSON ({error})") from None
    if not isinstance(message, dict):
        raise UnreadableBody("must be a JSON object")
    if _lone_surrogate_in(message):
        raise UnreadableBody("a string is not valid Unicode (a lone surrogate escape)")
    return message
