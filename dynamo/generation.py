"""The OpenAI port: moderation, a friend's name, and the image, with the real `openai` SDK.

The SDK's own retries are off (`max_retries=0`): dynamo.retry is the one retry policy, and
the rate limiter learns from the answers' headers, which every call returns alongside its
value. Errors come out as the SDK's exception classes, for `retry.classify_openai`.

`OfflineGenerator` stands in when no API key is configured (development only): it draws a
placeholder locally and never claims to be a real generation.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Generic, TypeVar

import httpx
import openai
import trio

from dynamo import imaging, prompts

log = logging.getLogger(__name__)

T = TypeVar("T")

IMAGE_SIZE = "1024x1024"
# dall-e answers can take a minute; the deadline around each call is the caller's.
CALL_TIMEOUT_S = 120.0


@dataclasses.dataclass
class Answer(Generic[T]):
    value: T
    headers: Mapping[str, str]
    tokens_used: int | None = None  # the answer's usage.total_tokens, where it has one


class OpenAIGenerator:
    offline = False

    def __init__(self, *, api_key: str, base_url: str | None, image_model: str, text_model: str):
        self._client = openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=CALL_TIMEOUT_S
        )
        self._downloads = httpx.AsyncClient(timeout=CALL_TIMEOUT_S, follow_redirects=True)
        self.image_model = image_model
        self.text_model = text_model

    async def moderate(self, text: str) -> Answer[bool]:
        """Whether the moderation endpoint flags `text`."""
        raw = await self._client.moderations.with_raw_response.create(input=text)
        result = raw.parse()
        return Answer(any(r.flagged for r in result.results), dict(raw.headers))

    async def name(self, prompt: str) -> Answer[str]:
        raw = await self._client.chat.completions.with_raw_response.create(
            model=self.text_model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=32,
        )
        completion = raw.parse()
        return Answer(completion.choices[0].message.content or "", dict(raw.headers))

    async def image(self, prompt: str, *, user: str) -> Answer[bytes]:
        """One 1024x1024 image for `prompt`, as encoded bytes (PNG from the API)."""
        extra = {"response_format": "b64_json"} if self.image_model.startswith("dall-e") else {}
        raw = await self._client.images.with_raw_response.generate(
            model=self.image_model, prompt=prompt, n=1, size=IMAGE_SIZE, user=user, **extra
        )
        parsed = raw.parse()
        image = parsed.data[0]
        tokens_used = getattr(getattr(parsed, "usage", None), "total_tokens", None)
        if image.b64_json:
            data = base64.b64decode(image.b64_json)
        else:
            try:
                response = await self._downloads.get(image.url)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                raise openai.APIConnectionError(
                    message=f"image download failed: {type(exc).__name__}",
                    request=httpx.Request("GET", image.url),
                ) from exc
            data = response.content
        return Answer(data, dict(raw.headers), tokens_used)

    async def aclose(self) -> None:
        await self._client.close()
        await self._downloads.aclose()


class OfflineGenerator:
    """Development aid without an API key: placeholders drawn locally, nothing flagged."""

    offline = True
    image_model = "offline-placeholder"
    text_model = "offline-placeholder"

    async def moderate(self, text: str) -> Answer[bool]:
        return Answer(False, {})

    async def name(self, prompt: str) -> Answer[str]:
        return Answer("Offline Friend", {})

    async def image(self, prompt: str, *, user: str) -> Answer[bytes]:
        background = None
        for complement in prompts.COMPLEMENTS.values():
            if f"solid {complement} background" in prompt:
                background = imaging.COLOR_RGB[complement]
                break
        image = await trio.to_thread.run_sync(
            functools.partial(imaging.placeholder_image, prompt, background=background)
        )
        return Answer(image, {})

    async def aclose(self) -> None:
        return None
