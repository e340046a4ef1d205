"""What OpenAI's answers say about its rate limits: the `x-ratelimit-*` headers.

OpenAI's rate-limit guide lists, on every answer: `x-ratelimit-limit-requests` /
`-tokens` (the most permitted per minute), `x-ratelimit-remaining-requests` / `-tokens`
(what is left before the limit is exhausted) and `x-ratelimit-reset-requests` / `-tokens`
(the time until that limit is back to its initial state, written like Go durations:
"1s", "6m0s", "20ms"). GPT image models are limited in images and in tokens per minute
at once; whichever is exhausted first answers 429.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


@dataclasses.dataclass(frozen=True)
class RateLimitHeaders:
    limit: float | None = None  # x-ratelimit-limit-requests: calls per minute
    remaining: float | None = None  # x-ratelimit-remaining-requests
    reset_s: float | None = None  # x-ratelimit-reset-requests ("6m0s", "20ms", "1.5s")
    token_limit: float | None = None  # x-ratelimit-limit-tokens: tokens per minute
    remaining_tokens: float | None = None  # x-ratelimit-remaining-tokens
    reset_tokens_s: float | None = None  # x-ratelimit-reset-tokens


def parse_ratelimit_headers(headers: Mapping[str, str] | None) -> RateLimitHeaders:
    if not headers:
        return RateLimitHeaders()
    lowered = {key.lower(): value for key, value in headers.items()}
    return RateLimitHeaders(
        limit=_positive(lowered.get("x-ratelimit-limit-requests")),
        remaining=_float(lowered.get("x-ratelimit-remaining-requests")),
        reset_s=duration_s(lowered.get("x-ratelimit-reset-requests")),
        token_limit=_positive(lowered.get("x-ratelimit-limit-tokens")),
        remaining_tokens=_float(lowered.get("x-ratelimit-remaining-tokens")),
        reset_tokens_s=duration_s(lowered.get("x-ratelimit-reset-tokens")),
    )


def duration_s(text: str | None) -> float | None:
    """OpenAI's durations ("1s", "6m0s", "20ms", "1h2m3.5s", or bare seconds) in seconds."""
    if text is None:
        return None
    text = text.strip()
    plain = _float(text)
    if plain is not None:
        return max(0.0, plain)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def _float(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _positive(value: str | None) -> float | None:
    # Some gateways send -1 for "no limit"; that is no limit we can pace to.
    number = _float(value)
    return number if number is not None and number > 0 else None
