"""How each OpenAI model family is asked, and what the API has taught us it refuses.

Requests are built from what is known about the model's family (one line per family
below; a new model of a known family needs nothing). When the API still answers 400
`unknown_parameter` / `unsupported_parameter` / `unsupported_value` naming a parameter we
sent, `learn()` remembers it for that model (in this process, with one WARNING), and
every later request to that model leaves the parameter out, or renames it where the API
has a successor (`max_tokens` → `max_completion_tokens`, `user` → `safety_identifier`).
The caller retries once; the limiter learns rate limits from 429s the same way.

Images: GPT image models take no `response_format` nor `style`; a ghost is asked as a
JPEG at the contract's quality 80, a friend (where the family does transparency) as a
WEBP with a transparent background and the chroma-key clause left out of its prompt.
Otherwise (refused, or an opaque answer) the friend goes back to the chroma-key prompt,
and dynamo keys the background out itself. Text models that reason take
`max_completion_tokens` and the lightest `reasoning_effort`; older ones `max_tokens`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

from dynamo.domain.jobs import Style

log = logging.getLogger(__name__)

IMAGE_SIZE = "1024x1024"
GHOST_FORMAT = "jpeg"
GHOST_COMPRESSION = 80  # contract §4: ghosts are stored as JPEG quality 80
FRIEND_FORMAT = "webp"
# The API's codes for a parameter it does not take, or a value it does not take.
PARAMETER_CODES = ("unknown_parameter", "unsupported_parameter")
VALUE_CODE = "unsupported_value"
# Parameters that define the request: a refusal of these is not something to learn.
NEVER_ADJUSTED = frozenset({"model", "prompt", "messages", "n", "size", "input"})
# A refused parameter that has a successor under another name.
SUCCESSORS = {
    "max_tokens": "max_completion_tokens",
    "max_completion_tokens": "max_tokens",
    "user": "safety_identifier",
}
# Room for a friend's name, in tokens: first, and once more after a cut-off answer. A
# name is under 20 tokens; a reasoning model spends hidden reasoning tokens first.
NAME_ROOM = {False: (32, 128), True: (256, 4096)}


@dataclasses.dataclass(frozen=True)
class ImageFamily:
    prefix: str
    gpt_image: bool = True  # output_format, output_compression, background, quality
    transparency: bool = False  # background=transparent


# The longest matching prefix wins. Transparency: the SDK's parameter reference (2.5),
# the deprecations page's replacements for 1.x (2.6); gpt-image-2's preview ended.
IMAGE_FAMILIES = (
    ImageFamily("gpt-image-2.6-", transparency=True),
    ImageFamily("gpt-image-2.5-", transparency=True),
    ImageFamily("gpt-image-2", transparency=False),
    ImageFamily("gpt-image-1", transparency=True),
    ImageFamily("chatgpt-image-", transparency=True),
    ImageFamily("dall-e-", gpt_image=False),
)
# A model of no known family is most likely a newer GPT image model: asked as one.
NEWER_IMAGE_FAMILY = ImageFamily("", transparency=True)


@dataclasses.dataclass(frozen=True)
class TextFamily:
    prefix: str
    reasoning: bool
    effort: str | None = None  # the lightest reasoning_effort the family takes


TEXT_FAMILIES = (
    TextFamily("gpt-6", reasoning=True, effort="none"),
    TextFamily("gpt-5.", reasoning=True, effort="none"),  # 5.1 and later
    TextFamily("gpt-5", reasoning=True, effort="minimal"),
    TextFamily("o1", reasoning=True, effort="low"),
    TextFamily("o3", reasoning=True, effort="low"),
    TextFamily("o4", reasoning=True, effort="low"),
    TextFamily("gpt-4", reasoning=False),
    TextFamily("gpt-3.5", reasoning=False),
    TextFamily("chatgpt-4o", reasoning=False),
)
NEWER_TEXT_FAMILY = TextFamily("", reasoning=True)


def _family(model: str, families, newer):
    matches = [family for family in families if model.startswith(family.prefix)]
    return max(matches, key=lambda family: len(family.prefix)) if matches else newer


def image_family(model: str) -> ImageFamily:
    return _family(model, IMAGE_FAMILIES, NEWER_IMAGE_FAMILY)


def text_family(model: str) -> TextFamily:
    return _family(model, TEXT_FAMILIES, NEWER_TEXT_FAMILY)


@dataclasses.dataclass(frozen=True)
class ImageOrder:
    """One image to buy: the request's prompt, and for a friend the same prompt without its
    chroma-key clause, for a model that draws the background transparent itself."""

    style: Style
    prompt: str
    user: str
    prompt_without_background: str | None = None


@dataclasses.dataclass(frozen=True)
class ImagePlan:
    params: dict[str, Any]
    transparent: bool  # asked with a transparent background


class Dialect:
    """Request parameters per model, and the refusals learned so far (this process)."""

    def __init__(self) -> None:
        self._refused_params: dict[str, set[str]] = collections.defaultdict(set)
        self._refused_values: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)

    def refuses(self, model: str, param: str, value: object = None) -> bool:
        if param in self._refused_params[model]:
            return True
        return value is not None and (param, str(value)) in self._refused_values[model]

    def image_request(self, model: str, order: ImageOrder, *, quality: str) -> ImagePlan:
        family = image_family(model)
        params: dict[str, Any] = {
            "model": model,
            "prompt": order.prompt,
            "n": 1,
            "size": IMAGE_SIZE,
            "user": order.user,
        }
        if not family.gpt_image:
            params["response_format"] = "b64_json"
            return ImagePlan(self._adjusted(model, params), transparent=False)
        params["quality"] = quality
        transparent = (
            order.style is Style.FRIEND
            and order.prompt_without_background is not None
            and family.transparency
            and not self.refuses(model, "background", "transparent")
            and not self.refuses(model, "output_format", FRIEND_FORMAT)
        )
        if transparent:
            params.update(
                prompt=order.prompt_without_background,
                background="transparent",
                output_format=FRIEND_FORMAT,
            )
        elif order.style is Style.GHOST and not (
            self.refuses(model, "output_format", GHOST_FORMAT)
            or self.refuses(model, "output_compression", GHOST_COMPRESSION)
        ):
            params.update(output_format=GHOST_FORMAT, output_compression=GHOST_COMPRESSION)
        # Otherwise the API's default, PNG: converted or keyed out by dynamo.
        return ImagePlan(self._adjusted(model, params), transparent=transparent)

    def name_request(self, model: str, prompt: str, *, attempt: int) -> dict[str, Any]:
        """A chat completion asking for a friend's name; `attempt` 1 gets more room."""
        family = text_family(model)
        room = NAME_ROOM[family.reasoning][min(attempt, 1)]
        params: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
        if family.reasoning:
            params["max_completion_tokens"] = room
            if family.effort is not None:
                params["reasoning_effort"] = family.effort
        else:
            params["max_tokens"] = room
        return self._adjusted(model, params)

    def learn(
        self, model: str, sent: Mapping[str, Any], param: str | None, code: str | None, said: str
    ) -> bool:
        """Remembers a 400 refusing `param` of a request `sent`; True if the next request
        will differ (worth one retry), False if there is nothing to adjust."""
        param = param or _named_parameter(said)
        if param is None or param in NEVER_ADJUSTED or param not in sent:
            return False
        if code is None and "not supported" in (said or "").lower():
            code = VALUE_CODE  # e.g. "Transparent background is not supported for this model."
        if code == VALUE_CODE:
            refused = (param, str(sent[param]))
            if refused in self._refused_values[model]:
                return False
            self._refused_values[model].add(refused)
            what = f"{param}={sent[param]}"
        elif code in PARAMETER_CODES:
            if param in self._refused_params[model]:
                return False
            self._refused_params[model].add(param)
            what = param
        else:
            return False
        instead = SUCCESSORS.get(param) if code in PARAMETER_CODES else None
        log.warning(
            "OpenAI refused %s for model %s (%s: %s); %s from now on",
            what,
            model,
            code,
            said,
            f"sending {instead} instead" if instead else "leaving it out",
        )
        return True

    def learn_opaque(self, model: str) -> None:
        """The model answered an opaque image to a transparent request."""
        refused = ("background", "transparent")
        if refused not in self._refused_values[model]:
            self._refused_values[model].add(refused)
            log.warning(
                "model %s sent an opaque image for a transparent background; its friends "
                "are drawn on a chroma-key background and keyed out by dynamo from now on",
                model,
            )

    def _adjusted(self, model: str, params: dict[str, Any]) -> dict[str, Any]:
        adjusted = dict(params)
        for param, value in params.items():
            if param in NEVER_ADJUSTED or not self.refuses(model, param, value):
                continue
            del adjusted[param]
            successor = SUCCESSORS.get(param)
            if param in self._refused_params[model] and successor and successor not in params:
                if not self.refuses(model, successor, value):
                    adjusted[successor] = value
        return adjusted


def _named_parameter(message: str) -> str | None:
    """The parameter an error message quotes ("Unknown parameter: 'response_format'.")."""
    match = re.search(r"parameter:? '([A-Za-z_.]+)'", message or "")
    return match.group(1) if match else None
