"""What the fake OpenAI knows about models: its catalogue, and what each family accepts.

Built from the same sources as dynamo's defaults (README "Models and what they cost"):
the SDK's parameter reference and model lists (openai 3.57.0) and OpenAI's deprecations
page as read on 2026-12-01. A model is one line in `CATALOGUE` (its shutdown date, or
None); its family, by the longest matching prefix, says what its requests may carry.
A model whose shutdown date is today or past answers 404 `model_not_found`, as the real
API does, and is not listed.
"""

from __future__ import annotations

import dataclasses
import datetime

_date = datetime.date.fromisoformat

# id: shutdown date (None: none announced).
CATALOGUE: dict[str, datetime.date | None] = {
    # Image models live today.
    "gpt-image-2": None,
    "gpt-image-2-2026-04-21": None,
    "gpt-image-2.5-flare": None,
    "gpt-image-2.5-flare-2026-09-08": None,
    "gpt-image-2.5-sunburst": None,
    "gpt-image-2.5-sunburst-2026-09-08": None,
    "gpt-image-2.6-flare": None,
    "gpt-image-2.6-sunburst": None,
    # Image models shut down.
    "dall-e-2": _date("2026-05-12"),
    "dall-e-3": _date("2026-05-12"),
    "gpt-image-1": _date("2026-10-23"),
    "gpt-image-1-mini": _date("2026-12-01"),
    "gpt-image-1.5": _date("2026-12-01"),
    "gpt-image-1.5-2025-12-16": _date("2026-12-01"),
    "chatgpt-image-latest": _date("2026-12-01"),
    # Text models live today, then those with an announced shutdown.
    "gpt-6-luna": None,
    "gpt-6-sol": None,
    "gpt-6.1-terra": None,
    "gpt-6.1-sol": None,
    "gpt-5.6-luna": None,
    "gpt-5.6-terra": None,
    "gpt-5.6-sol": None,
    "gpt-5.5": None,
    "gpt-5.4-mini": None,
    "gpt-5": _date("2026-12-11"),
    "gpt-5-mini": _date("2026-12-11"),
    "gpt-5-nano": _date("2026-12-11"),
    "o3": _date("2026-12-11"),
    "gpt-4o": _date("2027-01-14"),
    "gpt-4o-mini": _date("2027-01-14"),
    "gpt-4.1": _date("2027-01-14"),
    "gpt-4.1-mini": _date("2027-01-14"),
    "gpt-5.1": _date("2027-04-01"),
    "gpt-5.4-nano": _date("2027-04-01"),
    "gpt-4.1-nano": _date("2026-10-23"),
    "o4-mini": _date("2026-10-23"),
    "o3-mini": _date("2026-10-23"),
    "o1": _date("2026-10-23"),
    "gpt-4-turbo": _date("2026-10-23"),
    "gpt-4": _date("2026-10-23"),
    "gpt-3.5-turbo": _date("2026-10-23"),
    # Moderation.
    "omni-moderation-latest": None,
}

# Output image tokens of a 1024x1024 image by quality (auto is medium); larger sizes scale.
GPT_IMAGE_2_TOKENS = {"low": 196, "medium": 439, "high": 1756, "xhigh": 3122, "max": 7024}
GPT_IMAGE_1_TOKENS = {"low": 272, "medium": 1056, "high": 4160}
GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")


@dataclasses.dataclass(frozen=True)
class ImageFamily:
    gpt_image: bool = True  # takes output_format & co.; refuses response_format and style
    transparency: bool = False
    tokens: dict = dataclasses.field(default_factory=lambda: GPT_IMAGE_2_TOKENS)
    sizes: tuple[str, ...] = GPT_IMAGE_SIZES

    @property
    def qualities(self) -> tuple[str, ...]:
        return (*self.tokens, "auto") if self.gpt_image else ("standard", "hd")


@dataclasses.dataclass(frozen=True)
class TextFamily:
    reasoning: bool
    efforts: tuple[str, ...] = ()  # the reasoning_effort values it takes
    default_effort: str = "medium"


IMAGE_FAMILIES: dict[str, ImageFamily] = {
    "gpt-image-2.6-": ImageFamily(transparency=True),
    "gpt-image-2.5-": ImageFamily(transparency=True),
    "gpt-image-2": ImageFamily(transparency=False, tokens={"low": 196, "medium": 439, "high": 1756}),
    "gpt-image-1": ImageFamily(transparency=True, tokens=GPT_IMAGE_1_TOKENS),
    "chatgpt-image-": ImageFamily(transparency=True, tokens=GPT_IMAGE_1_TOKENS),
    "dall-e-": ImageFamily(gpt_image=False, sizes=("256x256", "512x512", "1024x1024", "1792x1024", "1024x1792")),
}

TEXT_FAMILIES: dict[str, TextFamily] = {
    "gpt-6": TextFamily(reasoning=True, efforts=("none", "low", "medium", "high", "xhigh", "max")),
    "gpt-5.": TextFamily(reasoning=True, efforts=("none", "low", "medium", "high", "xhigh")),
    "gpt-5": TextFamily(reasoning=True, efforts=("minimal", "low", "medium", "high")),
    "o": TextFamily(reasoning=True, efforts=("low", "medium", "high")),
    "gpt-4": TextFamily(reasoning=False),
    "gpt-3.5": TextFamily(reasoning=False),
}

# Hidden reasoning tokens a reasoning model spends before it answers, by effort.
REASONING_TOKENS = {"none": 0, "minimal": 16, "low": 128, "medium": 512, "high": 2048,
                    "xhigh": 4096, "max": 8192}  # fmt: skip


def family_of(model: str, families: dict):
    """The family of the longest prefix `model` starts with, or None."""
    matches = [prefix for prefix in families if model.startswith(prefix)]
    return families[max(matches, key=len)] if matches else None
