"""What OpenAI calls cost: a price table per model, and the tokens an image is expected to use.

Prices are USD per million tokens, by kind of token, as OpenAI's pricing and model pages
list them (read 2026-12-01, see README "Models and what they cost"). A model id is priced
by its own entry or else by the longest entry it starts with, so that dated snapshots
(`gpt-image-2.5-flare-2026-09-08`) share their family's prices. `DYNAMO_PRICES` overrides
or adds entries (config.py parses it); a model without a price costs 0 and is logged once.

`expected_image_tokens()` is what one image call will cost in tokens before it is made:
the rate limiter takes it against a tokens-per-minute budget (`acquire_permit(tokens=)`).
The answer's `usage` is what is counted afterwards, in money and in tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

log = logging.getLogger(__name__)

PER_MILLION = 1_000_000


@dataclasses.dataclass(frozen=True)
class Prices:
    """USD per million tokens."""

    text_input: float = 0.0
    text_output: float = 0.0
    image_input: float = 0.0
    image_output: float = 0.0


PRICE_FIELDS = tuple(field.name for field in dataclasses.fields(Prices))

# GPT Image 2, 2.5 and 2.6 (flare and sunburst alike) share one token price list.
_GPT_IMAGE_2 = Prices(text_input=5.0, text_output=10.0, image_input=8.0, image_output=30.0)
DEFAULT_PRICES: dict[str, Prices] = {
    "gpt-image-2": _GPT_IMAGE_2,  # also every gpt-image-2.5-* and gpt-image-2.6-* id
    "gpt-6-luna": Prices(text_input=0.10, text_output=0.50),
    "gpt-6-sol": Prices(text_input=2.00, text_output=10.00),
    "gpt-5.6-luna": Prices(text_input=0.20, text_output=1.20),
    "gpt-4o-mini": Prices(text_input=0.15, text_output=0.60),
    # The moderation endpoint is free.
    "omni-moderation": Prices(),
    "text-moderation": Prices(),
}

# Image output tokens of one 1024x1024 image, by model family and quality. Larger images
# scale with their pixels. GPT Image 2.x: the per-quality figures published for
# gpt-image-2.5-flare (2.6 keeps 2.5's token prices); gpt-image-1: OpenAI's former table.
IMAGE_OUTPUT_TOKENS: dict[str, dict[str, int]] = {
    "gpt-image-2": {"low": 196, "medium": 439, "high": 1756, "xhigh": 3122, "max": 7024},
    "gpt-image-1": {"low": 272, "medium": 1056, "high": 4160},
}
# A model of no known family: the most expensive family's figures, so a budget errs safe.
_UNKNOWN_FAMILY = "gpt-image-1"
# The text tokens of our longest prompt (a friend's, ~45 words), as input to an image call.
PROMPT_TOKENS = 64
_REFERENCE_PIXELS = 1024 * 1024


def _longest_prefix(model: str, table: Mapping[str, object]) -> str | None:
    matches = [key for key in table if model == key or model.startswith(key)]
    return max(matches, key=len) if matches else None


def expected_image_tokens(model: str, quality: str, size: str = "1024x1024") -> int:
    """`usage.total_tokens` one image call of `model` at `quality` and `size` will report."""
    family = _longest_prefix(model, IMAGE_OUTPUT_TOKENS) or _UNKNOWN_FAMILY
    by_quality = IMAGE_OUTPUT_TOKENS[family]
    output = by_quality.get(quality, by_quality["medium"])
    width, height = (int(side) for side in size.split("x"))
    return round(output * width * height / _REFERENCE_PIXELS) + PROMPT_TOKENS


class PriceTable:
    """Turns a call's `usage` into USD; `overrides` (DYNAMO_PRICES) win over the defaults."""

    def __init__(self, overrides: Mapping[str, Prices] | None = None):
        self._prices = {**DEFAULT_PRICES, **(overrides or {})}
        self._unpriced_logged: set[str] = set()

    def prices_for(self, model: str) -> Prices | None:
        key = _longest_prefix(model, self._prices)
        return None if key is None else self._prices[key]

    def cost_usd(self, model: str, usage: Mapping | None) -> float:
        """USD for one call's `usage` (an image answer's or a chat completion's)."""
        if not usage:
            return 0.0
        prices = self.prices_for(model)
        if prices is None:
            if model not in self._unpriced_logged:
                self._unpriced_logged.add(model)
                log.warning(
                    "no price known for model %s: its calls count as $0 (set DYNAMO_PRICES)", model
                )
            return 0.0
        if "input_tokens" in usage:  # an image answer
            return _image_cost(prices, usage)
        return (
            _count(usage, "prompt_tokens") * prices.text_input
            + _count(usage, "completion_tokens") * prices.text_output
        ) / PER_MILLION

    def image_price_usd(self, model: str, quality: str, size: str = "1024x1024") -> float:
        """What one image is expected to cost: output tokens plus the prompt's text."""
        prices = self.prices_for(model) or Prices()
        tokens = expected_image_tokens(model, quality, size)
        output = tokens - PROMPT_TOKENS
        return (output * prices.image_output + PROMPT_TOKENS * prices.text_input) / PER_MILLION


def _image_cost(prices: Prices, usage: Mapping) -> float:
    inputs = usage.get("input_tokens_details") or {}
    outputs = usage.get("output_tokens_details") or {}
    text_in = _count(inputs, "text_tokens")
    image_in = _count(inputs, "image_tokens")
    if not inputs:  # no breakdown: our image calls send text only
        text_in = _count(usage, "input_tokens")
    text_out = _count(outputs, "text_tokens")
    image_out = _count(outputs, "image_tokens") if outputs else _count(usage, "output_tokens")
    return (
        text_in * prices.text_input
        + image_in * prices.image_input
        + text_out * prices.text_output
        + image_out * prices.image_output
    ) / PER_MILLION


def _count(mapping: Mapping, key: str) -> int:
    value = mapping.get(key)
    return value if isinstance(value, int) and value > 0 else 0


def parse_overrides(raw: object) -> dict[str, Prices]:
    """DYNAMO_PRICES, already JSON-decoded: {model: {field: USD per million, ...}}.
    Raises ValueError with what is wrong; a partial entry keeps the default's other fields."""
    if not isinstance(raw, dict):
        raise ValueError("must be a JSON object {model: {field: USD per million tokens}}")
    overrides = {}
    for model, fields in raw.items():
        if not isinstance(fields, dict):
            raise ValueError(f"{model}: must be an object of prices")
        unknown = set(fields) - set(PRICE_FIELDS)
        if unknown:
            raise ValueError(f"{model}: unknown field(s) {sorted(unknown)}; use {PRICE_FIELDS}")
        for name, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{model}.{name}: must be a number of at least 0")
        family = _longest_prefix(model, DEFAULT_PRICES)
        base = DEFAULT_PRICES[family] if family else Prices()
        overrides[model] = dataclasses.replace(base, **{k: float(v) for k, v in fields.items()})
    return overrides
