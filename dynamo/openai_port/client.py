"""The OpenAI port: moderation, a friend's name, the image, and the model catalogue.

It owns its error contract, as `dynamo.viewer_points.port` and `dynamo.images.storage` do: SDK exceptions never
leave it. Every failure comes out as one of the service's classes (`retry.Transient`,
`Permanent`, `AuthFailure`, `ContentRejected`, or `ModelNotFound`), classified here by
`classify_openai`. A 400 refusing a parameter is learned by the model's `Dialect` and
comes out as `ParameterLearned`, a Transient worth one immediate retry.

The SDK's own retries are off (`max_retries=0`): dynamo.supervision.retry is the one retry policy,
and the rate limiter learns from the answers' headers, which every call returns with its
value, its model and its `usage`.

`OfflineGenerator` stands in when no API key is configured (development only): it draws a
placeholder locally and never claims to be a real generation.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
from collections.abc import Mapping
from typing import Any, Generic, Protocol, TypeVar

import httpx
import openai
import trio
from openai.types import ModerationImageURLInputParam

from dynamo.domain import prompts
from dynamo.images import processing as imaging
from dynamo.openai_port import pricing
from dynamo.openai_port.dialect import IMAGE_SIZE, Dialect, ImageOrder
from dynamo.openai_port.errors import ModelNotFound, ParameterLearned, api_said, classify_openai
from dynamo.supervision.retry import Transient

__all__ = [
    "Answer",
    "GeneratedImage",
    "ImageVerdict",
    "ModelInfo",
    "ModelNotFound",
    "NameAnswer",
    "OfflineGenerator",
    "OpenAIGenerator",
    "ParameterLearned",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# The moderation model that judges images too (contract §4).
IMAGE_MODERATION_MODEL = "omni-moderation-latest"
# An image answer can take a minute; the deadline around each call is the caller's.
CALL_TIMEOUT_S = 120.0
MODEL_NOT_FOUND = "model_not_found"


@dataclasses.dataclass
class Answer(Generic[T]):
    value: T
    headers: Mapping[str, str]
    model: str | None = None  # the model the call was made to (priced by it)
    usage: dict[str, Any] | None = None  # the answer's `usage`, as the API sent it

    @property
    def tokens_used(self) -> int | None:
        total = (self.usage or {}).get("total_tokens")
        return total if isinstance(total, int) else None


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
    data: bytes
    transparent: bool  # asked with a transparent background, and answered so
    # The prompt the image was asked with (the chroma-key clause left out when asked
    # transparent): what the request stores as its prompt. None: the order's prompt.
    prompt: str | None = None


@dataclasses.dataclass(frozen=True)
class ImageVerdict:
    flagged: bool
    # The categories flagged, each with the input types the API says it judged ("image").
    categories: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(
            f"{name} ({'/'.join(kinds) or 'n/a'})" for name, kinds in sorted(self.categories.items())
        ) or "flagged"


@dataclasses.dataclass(frozen=True)
class NameAnswer:
    text: str
    complete: bool  # False: empty, or cut off by the token limit (finish_reason length)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    id: str
    shutdown_date: str | None  # YYYY-MM-DD, or None when none is announced


class GeneratorPort(Protocol):
    """What the generator actor, the image screen and the catalogue ask of OpenAI: `OpenAIGenerator`, or
    `OfflineGenerator`'s placeholders."""

    offline: bool
    image_model: str
    text_model: str

    def expected_image_tokens(self) -> int: ...

    async def moderate(self, text: str) -> Answer[bool]: ...

    async def moderate_image(self, data: bytes) -> Answer[ImageVerdict]: ...

    async def name(self, prompt: str, *, attempt: int = 0) -> Answer[NameAnswer]: ...

    async def image(self, order: ImageOrder) -> Answer[GeneratedImage]: ...

    async def aclose(self) -> None: ...


class OpenAIGenerator:
    offline = False

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        image_model: str,
        text_model: str,
        image_quality: str = "medium",
    ):
        self._client = openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=CALL_TIMEOUT_S
        )
        self._downloads = httpx.AsyncClient(timeout=CALL_TIMEOUT_S, follow_redirects=True)
        self.image_model = image_model
        self.text_model = text_model
        self.image_quality = image_quality
        self.dialect = Dialect()

    def expected_image_tokens(self) -> int:
        return pricing.expected_image_tokens(self.image_model, self.image_quality, IMAGE_SIZE)

    async def moderate(self, text: str) -> Answer[bool]:
        """Whether the moderation endpoint flags `text`."""
        with _classified():
            raw = await self._client.moderations.with_raw_response.create(input=text)
        results, model = _moderation_results(raw.content)
        flagged = any(result["flagged"] for result in results)
        return Answer(flagged, dict(raw.headers), model=model)

    async def moderate_image(self, data: bytes) -> Answer[ImageVerdict]:
        """Whether the moderation endpoint flags the image `data` (sent as a data URL)."""
        part: ModerationImageURLInputParam = {
            "type": "image_url",
            "image_url": {"url": imaging.data_url(data)},
        }
        with _classified():
            raw = await self._client.moderations.with_raw_response.create(
                model=IMAGE_MODERATION_MODEL, input=[part]
            )
        results, model = _moderation_results(raw.content)
        flagged: dict[str, list[str]] = {}
        for judged in results:
            applied = judged.get("category_applied_input_types") or {}
            for name, hit in (judged.get("categories") or {}).items():
                if hit:
                    flagged[name] = list(applied.get(name) or [])
        verdict = ImageVerdict(any(result["flagged"] for result in results), flagged)
        return Answer(verdict, dict(raw.headers), model=model)

    async def name(self, prompt: str, *, attempt: int = 0) -> Answer[NameAnswer]:
        """A friend's name; `attempt` 1 gives a reasoning model more room to answer in."""
        params = self.dialect.name_request(self.text_model, prompt, attempt=attempt)
        with _classified(self.dialect, params):
            raw = await self._client.chat.completions.with_raw_response.create(**params)
            completion = raw.parse()
        choice = completion.choices[0]
        text = choice.message.content or ""
        complete = bool(text.strip()) and choice.finish_reason not in ("length", "content_filter")
        usage = completion.usage.model_dump(exclude_none=True) if completion.usage else None
        return Answer(NameAnswer(text, complete), dict(raw.headers), self.text_model, usage)

    async def image(self, order: ImageOrder) -> Answer[GeneratedImage]:
        """One 1024x1024 image, as the encoded bytes the API sent (see dialect.py)."""
        plan = self.dialect.image_request(self.image_model, order, quality=self.image_quality)
        with _classified(self.dialect, plan.params, image_call=True):
            raw = await self._client.images.with_raw_response.generate(**plan.params)
            response = raw.parse()
        item = (response.data or [None])[0]
        if item is None:
            raise classify_openai(ValueError("the image API answered without an image"))
        data = base64.b64decode(item.b64_json) if item.b64_json else await self._download(item.url)
        transparent = plan.transparent and response.background != "opaque"
        if plan.transparent and not transparent:
            self.dialect.learn_opaque(self.image_model)
        usage = response.usage.model_dump(exclude_none=True) if response.usage else None
        image = GeneratedImage(data, transparent, prompt=plan.params["prompt"])
        return Answer(image, dict(raw.headers), self.image_model, usage)

    async def model_info(self, model_id: str) -> ModelInfo:
        """The catalogue's entry for `model_id`; ModelNotFound if it has none."""
        try:
            model = await self._client.models.retrieve(model_id)
        except openai.NotFoundError as exc:
            if exc.code == MODEL_NOT_FOUND:
                raise ModelNotFound(api_said(exc), status_code=404) from exc
            raise classify_openai(exc) from exc
        except openai.OpenAIError as exc:
            raise classify_openai(exc) from exc
        return ModelInfo(model.id, getattr(model, "shutdown_date", None))

    async def _download(self, url: str | None) -> bytes:
        try:
            response = await self._downloads.get(url or "")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise Transient(f"image download failed: {type(exc).__name__}") from exc
        return response.content

    async def aclose(self) -> None:
        with trio.move_on_after(5, shield=True):
            await self._client.close()
            await self._downloads.aclose()


def _moderation_results(content: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """A moderation answer's `results` and `model`, read from its JSON as sent: the SDK's
    typed model of it (three objects of 13 categories a result) cost more CPU than the
    whole rest of a moderation call, and only `flagged`, the categories and the input
    types they applied to are read. An answer without them is the API's fault: Transient."""
    try:
        answer = json.loads(content)
        results = answer["results"]
        if not results or not all(isinstance(result["flagged"], bool) for result in results):
            raise ValueError("no verdict")
    except (ValueError, KeyError, TypeError) as exc:
        raise Transient(f"the moderation API answered without results ({exc})") from None
    model = answer.get("model")
    return results, model if isinstance(model, str) else None


class _classified:
    """Turns an SDK exception inside the block into the service's own error class; a 400
    refusing a parameter is first taught to `dialect` (the request was `sent`)."""

    def __init__(self, dialect: Dialect | None = None, sent=None, *, image_call=False):
        self.dialect, self.sent, self.image_call = dialect, sent or {}, image_call

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if exc is None or not isinstance(exc, openai.OpenAIError):
            return False
        if (
            self.dialect is not None
            and isinstance(exc, openai.BadRequestError)
            and self.dialect.learn(
                self.sent.get("model", ""), self.sent, exc.param, exc.code, api_said(exc)
            )
        ):
            raise ParameterLearned(api_said(exc), status_code=400) from exc
        raise classify_openai(exc, image_call=self.image_call) from exc


class OfflineGenerator:
    """Development aid without an API key: placeholders drawn locally, nothing flagged."""

    offline = True
    image_model = "offline-placeholder"
    text_model = "offline-placeholder"
    image_quality = "none"

    def expected_image_tokens(self) -> int:
        return 0

    async def moderate(self, text: str) -> Answer[bool]:
        return Answer(False, {})

    async def moderate_image(self, data: bytes) -> Answer[ImageVerdict]:
        return Answer(ImageVerdict(False), {})

    async def name(self, prompt: str, *, attempt: int = 0) -> Answer[NameAnswer]:
        return Answer(NameAnswer("Offline Friend", True), {})

    async def image(self, order: ImageOrder) -> Answer[GeneratedImage]:
        background = None
        for complement in prompts.COMPLEMENTS.values():
            if f"solid {complement} background" in order.prompt:
                background = imaging.COLOR_RGB[complement]
                break
        image = await trio.to_thread.run_sync(
            functools.partial(imaging.placeholder_image, order.prompt, background=background)
        )
        return Answer(GeneratedImage(image, transparent=False, prompt=order.prompt), {})

    async def aclose(self) -> None:
        return None
