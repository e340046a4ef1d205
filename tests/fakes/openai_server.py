"""A fake OpenAI API: moderations, image generations, chat completions, the model catalogue.

Answers have the real shapes, the real error bodies and the real rate-limit headers, so
the real `openai` client can talk to it (base URL `{url}/v1`). Endpoint names used by
`script`, `hold`, `latency_s`, `wait_for_calls`: "moderations", "images", "chat",
"models" (GET /v1/models and /v1/models/{id}), and "files" (the pictures behind `url`
answers, served from the same server, no key needed).

Models behave as today's API (see `openai_catalogue`): a model shut down (its shutdown
date today or past, `fake.today`) or unknown answers 404 `model_not_found` everywhere;
GPT image models refuse `response_format` and `style` (400 `unknown_parameter`), honour
`output_format`, `output_compression`, `background` (a real alpha channel where the
family does transparency, else 400) and `quality`, and answer with `usage`
(`image_usage`); reasoning text models refuse `max_tokens` and a `temperature` other than
1, spend hidden reasoning tokens, and answer "" with finish_reason `length` when
`max_completion_tokens` leaves no room; older ones refuse `reasoning_effort`.

Moderation takes `input` as the real endpoint does (a string, a list of strings, or a list
of `text` and `image_url` parts, at most one image, as a URL or a base64 data URL), with
its 400s for bad input, and answers `category_applied_input_types`. Text is flagged for
one of `flagged_words`; an image this fake generated from a prompt holding
IMAGE_MARKER_WORD ("gruesome") carries a mark in its pixels and is flagged (violence,
violence/graphic, applied to the image). Each picture is judged from its pixels once,
when generated (or when first seen), and the verdict remembered by its bytes' sha256
(`pictures.Verdicts`), so screening a picture this fake made costs no decoding.

Rate limits are a sliding 60 s window (on `trio.current_time()`) over the calls that
passed the limit check: `images_per_minute` for images, `text_per_minute` for chat and
moderations together (the contract has one text limit for both), and
`image_tokens_per_minute` over the `usage.total_tokens` of image calls (`image_usage`),
counted when the call arrives. Whichever is exhausted first answers 429, with the
headers and message the real API sends for it. None is unlimited, and then no
x-ratelimit-* headers are sent for that limit.
"""

from __future__ import annotations

import base64
import datetime
import math
import re
import time
import uuid
from collections import deque
from typing import Any

import trio
from quart import Response
from quart_trio import QuartTrio

from . import openai_catalogue as catalogue
from ._service import Call, FakeService, json_response
from .pictures import Verdicts, encode, marked, png_for_prompt, transparent_png_for_prompt

WINDOW_S = 60.0
BUCKET_OF_ENDPOINT = {"images": "images", "chat": "text", "moderations": "text"}
MAX_PROMPT_CHARS = 32000
IMAGE_FORMATS = ("png", "jpeg", "webp")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# When the catalogue's models were made (Unix seconds): any fixed instant will do.
MODEL_CREATED = 1_760_000_000
# The omni moderation model's categories, all of which the real answer lists.
MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions",
    "sexual", "sexual/minors", "violence", "violence/graphic",
)  # fmt: skip
# The categories the omni moderation model judges images for too (the others: text only),
# as the SDK's `category_applied_input_types` types them.
IMAGE_CATEGORIES = frozenset({
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "violence",
    "violence/graphic",
})  # fmt: skip
# The real endpoint takes one image per request.
MAX_MODERATION_IMAGES = 1
# An image generated from a prompt holding this word carries a mark in its pixels
# (pictures.marked), and the moderation endpoint flags an image with that mark, for
# violence and violence/graphic, applied to the image: a test's "gruesome" ghost is
# generated, then flagged when dynamo screens it.
IMAGE_MARKER_WORD = "gruesome"
DATA_URL = re.compile(r"data:(image/(?:png|jpeg|webp|gif));base64,(.*)", re.DOTALL)
# Retry-after suggested by a scripted 429 (a real one follows the window instead).
SCRIPTED_RETRY_AFTER_S = 1.0

SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"
SCRIPTED_ERRORS: dict[Any, tuple[int, str, str, str | None]] = {
    # status or code: (status, message, type, code)
    400: (400, "Invalid request.", "invalid_request_error", None),
    401: (401, "Incorrect API key provided: sk-****. You can find your API key at "
          "https://platform.openai.com/account/api-keys.", "invalid_request_error", "invalid_api_key"),
    403: (403, "Country, region, or territory not supported", "request_forbidden",
          "unsupported_country_region_territory"),
    404: (404, "The model does not exist or you do not have access to it.", "invalid_request_error",
          "model_not_found"),
    429: (429, "Rate limit reached for requests", "requests", "rate_limit_exceeded"),
    500: (500, SERVER_ERROR, "server_error", None),
    502: (502, "Bad gateway.", "server_error", None),
    503: (503, "The engine is currently overloaded, please try again later", "server_error", None),
    "insufficient_quota": (429, "You exceeded your current quota, please check your plan and billing "
                           "details.", "insufficient_quota", "insufficient_quota"),
    "content_policy_violation": (400, "Your request was rejected as a result of our safety system. "
                                 "Your prompt may contain text that is not allowed by our safety system.",
                                 "invalid_request_error", "content_policy_violation"),
}  # fmt: skip


def go_duration(seconds: float) -> str:
    """'12s', '1m0s', '250ms': how OpenAI writes x-ratelimit-reset-* values."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _mentions(text: str, words: set[str]) -> bool:
    return any(re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) for word in words)


class FakeOpenAI(FakeService):
    def __init__(self, api_key: str = "sk-test") -> None:
        super().__init__()
        self.api_key = api_key
        self.flagged_words: set[str] = {"forbidden"}
        self.policy_words: set[str] = {"nsfw"}
        # None: answers as the model does (GPT image models: b64_json); "url" or
        # "b64_json" forces that form, as some proxies and other providers answer.
        self.response_format: str | None = None
        self.friend_name = "Sir Hatsworth"
        self.images_per_minute: int | None = None
        self.text_per_minute: int | None = None
        self.files: dict[str, tuple[bytes, str]] = {}
        self._windows: dict[str, deque[float]] = {"images": deque(), "text": deque()}
        # The catalogue (id: shutdown date or None) and the day it is judged by.
        self.catalogue: dict[str, datetime.date | None] = dict(catalogue.CATALOGUE)
        self.today: datetime.date = datetime.datetime.now(datetime.UTC).date()
        # What each model family accepts (by id prefix): add one to serve a new model.
        self.image_families = dict(catalogue.IMAGE_FAMILIES)
        self.text_families = dict(catalogue.TEXT_FAMILIES)
        # Hidden reasoning tokens per answer, instead of the effort's usual amount.
        self.reasoning_tokens: int | None = None
        # Models that answer a transparent request with an opaque image anyway.
        self.opaque_models: set[str] = set()
        self.image_tokens_per_minute: int | None = None
        self._image_tokens: deque[tuple[float, int]] = deque()  # (arrival, total tokens)
        # Whether each picture seen carries the marker, by its bytes' sha256.
        self.verdicts = Verdicts()

    def env(self) -> dict[str, str]:
        return {"OPENAI_API_KEY": self.api_key, "OPENAI_BASE_URL": f"{self.url}/v1"}

    # Swap them (fake.png_for = ...) to serve other pictures, e.g. broken bytes.
    def png_for(self, prompt: str, size: tuple[int, int]) -> bytes:
        return png_for_prompt(prompt, size)

    def transparent_png_for(self, prompt: str, size: tuple[int, int]) -> bytes:
        return transparent_png_for_prompt(prompt, size)

    # ---- the catalogue -----------------------------------------------------------------

    def add_model(self, model_id: str, shutdown_date: datetime.date | None = None) -> None:
        """A model in the catalogue (served while its shutdown date is ahead)."""
        self.catalogue[model_id] = shutdown_date

    def is_served(self, model_id: str) -> bool:
        if model_id not in self.catalogue:
            return False
        shutdown = self.catalogue[model_id]
        return shutdown is None or shutdown > self.today

    def model_object(self, model_id: str) -> dict:
        shutdown = self.catalogue[model_id]
        return {"id": model_id, "object": "model", "created": MODEL_CREATED, "owned_by": "system",
                "shutdown_date": shutdown.isoformat() if shutdown else None}

    def build_app(self) -> QuartTrio:
        app = QuartTrio(__name__)

        @app.post("/v1/moderations")
        async def moderations() -> Response:
            return await self.receive("moderations", self._moderate)

        @app.post("/v1/images/generations")
        async def images() -> Response:
            return await self.receive("images", self._generate)

        @app.post("/v1/chat/completions")
        async def chat() -> Response:
            return await self.receive("chat", self._complete)

        @app.get("/v1/models")
        async def models() -> Response:
            async def list_models(call: Call) -> Response:
                served = [self.model_object(m) for m in self.catalogue if self.is_served(m)]
                return self._answer(call, {"object": "list", "data": served})

            return await self.receive("models", list_models, parse_json=False)

        @app.get("/v1/models/<path:model_id>")
        async def model(model_id: str) -> Response:
            async def retrieve(call: Call) -> Response:
                if not self.is_served(model_id):
                    return self._model_not_found(call, model_id)
                return self._answer(call, self.model_object(model_id))

            return await self.receive("models", retrieve, parse_json=False)

        @app.get("/files/<name>")
        async def files(name: str) -> Response:
            async def serve_file(call: Call) -> Response:
                if name not in self.files:
                    return Response("BlobNotFound", status=404, content_type="application/xml")
                data, content_type = self.files[name]
                return Response(data, content_type=content_type)

            return await self.receive("files", serve_file, parse_json=False)

        return app

    # ---- refusals -----------------------------------------------------------------

    def _answer(self, call: Call, payload: dict, status: int = 200) -> Response:
        headers = {"x-request-id": f"req_{uuid.uuid4().hex}", "openai-version": "2020-10-01"}
        headers.update(call.extra.get("headers", {}))
        return json_response(payload, status, headers)

    def outage_response(self, call: Call) -> Response:
        return self._answer(call, error_body(*SCRIPTED_ERRORS[503][1:]), 503)

    def check_caller(self, call: Call) -> Response | None:
        if call.endpoint == "files":
            return None
        authorization = call.headers.get("authorization", "")
        if not authorization.startswith("Bearer "):
            message = "You didn't provide an API key. You need to provide your API key in an Authorization header."
            return self._answer(call, error_body(message, "invalid_request_error", None), 401)
        if authorization.removeprefix("Bearer ") != self.api_key:
            return self._answer(call, error_body(*SCRIPTED_ERRORS[401][1:]), 401)
        return None

    def scripted_response(self, call: Call, status: Any) -> Response:
        if status == 400 and call.endpoint == "images":
            status = "content_policy_violation"
        code, message, type_, error_code = SCRIPTED_ERRORS.get(status) or (
            int(status),
            "Scripted failure.",
            "server_error" if int(status) >= 500 else "invalid_request_error",
            None,
        )
        if code == 429 and status != "insufficient_quota":
            call.extra["headers"] = self._limit_headers(1, 0, SCRIPTED_RETRY_AFTER_S, retry=True)
        return self._answer(call, error_body(message, type_, error_code), code)

    def check_rate(self, call: Call) -> Response | None:
        bucket = BUCKET_OF_ENDPOINT.get(call.endpoint)
        limit = self.images_per_minute if bucket == "images" else self.text_per_minute
        token_limit = self.image_tokens_per_minute if bucket == "images" else None
        if bucket is None or (limit is None and token_limit is None):
            return None
        window, now = self._windows[bucket], trio.current_time()
        while window and window[0] <= now - WINDOW_S:
            window.popleft()
        while self._image_tokens and self._image_tokens[0][0] <= now - WINDOW_S:
            self._image_tokens.popleft()
        body = call.body if isinstance(call.body, dict) else {}
        cost = self.image_usage(body)["total_tokens"] if token_limit is not None else 0
        used = sum(tokens for _, tokens in self._image_tokens)
        if limit is not None and len(window) >= limit:
            wait_s = window[0] + WINDOW_S - now
            call.extra["headers"] = {
                **self._limit_headers(limit, 0, wait_s, retry=True),
                **self._token_headers(token_limit, used, now),
            }
            what = "images per min" if bucket == "images" else "requests per min (RPM)"
            return self._rate_limited(call, what, limit, len(window), 1, wait_s, "requests")
        if token_limit is not None and used + cost > token_limit:
            freed, wait_s = 0, WINDOW_S
            for arrived, tokens in self._image_tokens:  # the oldest leave first
                freed += tokens
                if used - freed + cost <= token_limit:
                    wait_s = arrived + WINDOW_S - now
                    break
            call.extra["headers"] = {
                **self._request_headers(limit, window, now),
                **self._token_headers(token_limit, used, now),
                "retry-after": str(math.ceil(wait_s)),
                "retry-after-ms": str(math.ceil(wait_s * 1000)),
            }
            what = "tokens per min (TPM)"
            return self._rate_limited(call, what, token_limit, used, cost, wait_s, "tokens")
        window.append(now)
        if token_limit is not None:
            self._image_tokens.append((now, cost))
        call.extra["headers"] = {
            **self._request_headers(limit, window, now),
            **self._token_headers(token_limit, used + cost, now),
        }
        return None

    def _rate_limited(self, call: Call, what: str, limit: int, used: int, requested: int,
                      wait_s: float, type_: str) -> Response:
        message = (
            f"Rate limit reached for {what} in organization org-fake: Limit {limit}, Used {used}, "
            f"Requested {requested}. Please try again in {go_duration(wait_s)}. "
            "Visit https://platform.openai.com/account/rate-limits to learn more."
        )
        return self._answer(call, error_body(message, type_, "rate_limit_exceeded"), 429)

    @staticmethod
    def _limit_headers(limit: int, remaining: int, reset_s: float, retry: bool = False) -> dict[str, str]:
        # reset: when the oldest counted call leaves the window, freeing one more call.
        headers = {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": go_duration(reset_s),
        }
        if retry:
            headers["retry-after"] = str(math.ceil(reset_s))
            headers["retry-after-ms"] = str(math.ceil(reset_s * 1000))
        return headers

    def _request_headers(self, limit: int | None, window: deque[float], now: float) -> dict[str, str]:
        if limit is None:
            return {}
        reset_s = window[0] + WINDOW_S - now if window else 0.0
        return self._limit_headers(limit, limit - len(window), reset_s)

    def _token_headers(self, token_limit: int | None, used: int, now: float) -> dict[str, str]:
        """x-ratelimit-*-tokens; reset: when every token counted now has left the window
        (the limit "resets to its initial state")."""
        if token_limit is None:
            return {}
        newest = self._image_tokens[-1][0] if self._image_tokens else now - WINDOW_S
        return {
            "x-ratelimit-limit-tokens": str(token_limit),
            "x-ratelimit-remaining-tokens": str(max(0, token_limit - used)),
            "x-ratelimit-reset-tokens": go_duration(max(0.0, newest + WINDOW_S - now)),
        }

    # ---- normal answers -----------------------------------------------------------

    def _invalid(self, call: Call, message: str, param: str | None = None, code: str | None = None) -> Response:
        return self._answer(call, error_body(message, "invalid_request_error", code, param), 400)

    def _model_not_found(self, call: Call, model_id: str) -> Response:
        message = f"The model `{model_id}` does not exist or you do not have access to it."
        return self._answer(call, error_body(message, "invalid_request_error", "model_not_found"), 404)

    def _unknown_parameter(self, call: Call, param: str) -> Response:
        return self._invalid(call, f"Unknown parameter: '{param}'.", param, "unknown_parameter")

    def _unsupported_parameter(self, call: Call, param: str, instead: str | None = None) -> Response:
        message = f"Unsupported parameter: '{param}' is not supported with this model."
        if instead:
            message += f" Use '{instead}' instead."
        return self._invalid(call, message, param, "unsupported_parameter")

    def _unsupported_value(self, call: Call, param: str, value: Any, supported=None) -> Response:
        message = f"Unsupported value: '{param}' does not support {value!r} with this model."
        if supported:
            message += f" Supported values are: {', '.join(repr(v) for v in supported)}."
        return self._invalid(call, message, param, "unsupported_value")

    async def _moderate(self, call: Call) -> Response:
        """As the real endpoint: `input` a string, a list of strings (one result each), or
        a list of `text` and `image_url` parts (one result for them all; at most one
        image, given as a URL or a base64 data URL). Text is flagged for a word of
        `flagged_words`; an image for the mark of IMAGE_MARKER_WORD."""
        body = call.body if isinstance(call.body, dict) else {}
        model = body.get("model") or "omni-moderation-latest"
        parsed = self._moderation_inputs(call, body.get("input"), model)
        if isinstance(parsed, Response):
            return parsed
        results = [self._moderation_result(texts, images) for texts, images in parsed]
        return self._answer(call, {"id": f"modr-{uuid.uuid4().hex}", "model": model, "results": results})

    def _moderation_inputs(self, call: Call, inputs: Any, model: str):
        """[(texts, images)] per result, or the 400 the real endpoint answers."""
        if isinstance(inputs, str):
            return [([inputs], [])]
        if not isinstance(inputs, list) or not inputs:
            return self._invalid(call, "'input' is a required property", "input")
        if all(isinstance(item, str) for item in inputs):
            return [([item], []) for item in inputs]
        texts, images = [], []
        for index, part in enumerate(inputs):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
                if not isinstance(url, str):
                    return self._invalid(call, f"Missing required parameter: 'input[{index}].image_url.url'.",
                                         f"input[{index}].image_url.url", "missing_required_parameter")
                picture = self._image_of(url)
                if picture is None:
                    return self._invalid(call, f"Invalid image in 'input[{index}]': expected a PNG, JPEG, "
                                         "WEBP or non-animated GIF, as a URL or a base64 data URL.",
                                         f"input[{index}]", "invalid_image_format")
                images.append(picture)
            else:
                return self._invalid(call, f"Invalid value for 'input[{index}]': expected a string, or an "
                                     "object of type 'text' or 'image_url'.", f"input[{index}]", "invalid_value")
        if len(images) > MAX_MODERATION_IMAGES:
            return self._invalid(call, f"Number of images ({len(images)}) exceeds maximum of "
                                 f"{MAX_MODERATION_IMAGES}", "input", "too_many_images")
        if images and not model.startswith("omni-moderation"):
            return self._invalid(call, f"The model '{model}' does not support image inputs.", "model",
                                 "invalid_value")
        return [(texts, images)]

    def _image_of(self, url: str) -> bytes | None:
        """The picture a part points at: a data URL's bytes, or one of this fake's files."""
        if match := DATA_URL.fullmatch(url):
            try:
                data = base64.b64decode(match.group(2), validate=True)
            except ValueError:
                return None
        else:
            name = url.rsplit("/files/", 1)[-1] if url.startswith(f"{self.url}/files/") else None
            data = self.files.get(name, (None, ""))[0] if name else None
        if not data:
            return None
        try:
            self.verdicts.judge(data)
        except ValueError:
            return None
        return data

    def _moderation_result(self, texts: list[str], images: list[bytes]) -> dict:
        text_flagged = any(_mentions(text, self.flagged_words) for text in texts)
        image_flagged = any(self.verdicts.judge(image) for image in images)
        applied = {}
        for name in MODERATION_CATEGORIES:
            kinds = (["text"] if texts else []) + (["image"] if images and name in IMAGE_CATEGORIES else [])
            applied[name] = kinds
        def hit(name: str) -> bool:
            return (text_flagged and name == "violence") or (
                image_flagged and name in ("violence", "violence/graphic"))
        return {
            "flagged": text_flagged or image_flagged,
            "categories": {name: hit(name) for name in MODERATION_CATEGORIES},
            "category_scores": {name: 0.97 if hit(name) else 1e-6 for name in MODERATION_CATEGORIES},
            "category_applied_input_types": applied,
        }

    def image_usage(self, body: dict) -> dict:
        """The `usage` an image answer carries for a request `body`: output image tokens by
        the model family's quality and the size's pixels, input text tokens of the prompt."""
        family = catalogue.family_of(str(body.get("model", "")), self.image_families)
        tokens = (family or catalogue.IMAGE_FAMILIES["gpt-image-2.6-"]).tokens
        quality = body.get("quality") or "auto"
        try:  # called before the request is validated: an odd size counts as 1024x1024
            width, height = (int(side) for side in str(body.get("size") or "").split("x"))
        except ValueError:
            width, height = 1024, 1024
        per_image = round(tokens.get(quality, tokens["medium"]) * width * height / (1024 * 1024))
        output = per_image * max(1, int(body.get("n") or 1))
        text = _text_tokens(str(body.get("prompt", "")))
        return {
            "input_tokens": text,
            "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
            "total_tokens": text + output,
        }

    async def _generate(self, call: Call) -> Response:
        body = call.body if isinstance(call.body, dict) else {}
        model = body.get("model")
        if not model:
            return self._invalid(call, "you must provide a model parameter", "model")
        if not self.is_served(model):
            return self._model_not_found(call, model)
        family = catalogue.family_of(model, self.image_families)
        if family is None:
            return self._invalid(call, f"Invalid value for 'model': '{model}' is not an image model.",
                                 "model", "invalid_value")
        refusal = self._check_image_request(call, body, family)
        if refusal is not None:
            return refusal
        prompt, size, n = body["prompt"], body.get("size") or "1024x1024", int(body.get("n") or 1)
        if _mentions(prompt, self.policy_words):
            return self.scripted_response(call, "content_policy_violation")
        width, height = (1024, 1024) if size == "auto" else (int(side) for side in size.split("x"))
        transparent = body.get("background") == "transparent" and model not in self.opaque_models
        output_format = body.get("output_format") or "png"
        if transparent:
            picture = self.transparent_png_for(prompt, (width, height))
        else:
            picture = self.png_for(prompt, (width, height))
        if _mentions(prompt, {IMAGE_MARKER_WORD}):
            picture = marked(picture)  # flagged when it comes back to the moderation endpoint
        compression = body.get("output_compression")
        data = encode(picture, output_format, 100 if compression is None else int(compression))
        call.extra["image"] = data  # what was sent, for tests to compare with what is stored
        try:  # judged now, once per distinct picture: screening it is then a lookup
            self.verdicts.judge(data)
        except ValueError:
            pass  # no picture (a test's png_for): the moderation endpoint refuses it, as ever
        forced = self.response_format
        as_url = forced == "url" or (forced is None and not family.gpt_image
                                     and body.get("response_format", "url") == "url")
        if as_url:
            name = f"{uuid.uuid4().hex}.{output_format}"
            self.files[name] = (data, CONTENT_TYPES[output_format])
            item = {"url": f"{self.url}/files/{name}"}
        else:
            item = {"b64_json": base64.b64encode(data).decode("ascii")}
        answer: dict[str, Any] = {"created": int(time.time()), "data": [item] * max(1, n)}
        if family.gpt_image:
            quality = body.get("quality") or "auto"
            answer.update(
                background="transparent" if transparent else "opaque",
                output_format=output_format,
                quality="medium" if quality == "auto" else quality,
                size=f"{width}x{height}",
                usage=self.image_usage(body),
            )
        else:
            item["revised_prompt"] = prompt
        return self._answer(call, answer)

    def _check_image_request(self, call: Call, body: dict, family) -> Response | None:
        """The 400 the real API answers for this request, if any."""
        prompt, size, n = body.get("prompt"), body.get("size") or "1024x1024", body.get("n") or 1
        if not isinstance(prompt, str) or not prompt.strip():
            return self._invalid(call, "'prompt' is a required property", "prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            return self._invalid(call, f"'prompt' is too long: maximum length is {MAX_PROMPT_CHARS}", "prompt")
        if size not in family.sizes:
            return self._invalid(call, f"Invalid value: '{size}'. Supported values are: {list(family.sizes)}.",
                                 "size", "invalid_value")
        if not isinstance(n, int) or not 1 <= n <= 10:
            return self._invalid(call, "'n' must be between 1 and 10", "n", "invalid_value")
        if not family.gpt_image:
            for param in ("output_format", "output_compression", "background", "moderation"):
                if body.get(param) is not None:
                    return self._unknown_parameter(call, param)
            if body.get("response_format", "url") not in ("url", "b64_json"):
                return self._invalid(call, "'response_format' must be url or b64_json", "response_format")
            return None
        for param in ("response_format", "style"):
            if param in body:
                return self._unknown_parameter(call, param)
        quality = body.get("quality")
        if quality is not None and quality not in family.qualities:
            return self._unsupported_value(call, "quality", quality, family.qualities)
        output_format = body.get("output_format")
        if output_format is not None and output_format not in IMAGE_FORMATS:
            return self._unsupported_value(call, "output_format", output_format, IMAGE_FORMATS)
        compression = body.get("output_compression")
        if compression is not None:
            if not isinstance(compression, int) or not 0 <= compression <= 100:
                return self._invalid(call, "'output_compression' must be between 0 and 100",
                                     "output_compression", "invalid_value")
            if (output_format or "png") == "png":
                return self._invalid(call, "'output_compression' is only supported for the jpeg and "
                                     "webp output formats.", "output_compression", "invalid_value")
        background = body.get("background")
        if background not in (None, "transparent", "opaque", "auto"):
            return self._invalid(call, f"Invalid value: '{background}'.", "background", "invalid_value")
        if background == "transparent":
            if not family.transparency:
                return self._invalid(call, "Transparent background is not supported for this model.",
                                     "background", "unsupported_value")
            if (output_format or "png") == "jpeg":
                return self._invalid(call, "Transparent background requires the png or webp output "
                                     "format.", "output_format", "invalid_value")
        return None

    async def _complete(self, call: Call) -> Response:
        body = call.body if isinstance(call.body, dict) else {}
        messages, model = body.get("messages"), body.get("model")
        if not model:
            return self._invalid(call, "you must provide a model parameter", "model")
        if not self.is_served(model):
            return self._model_not_found(call, model)
        if not isinstance(messages, list) or not messages:
            return self._invalid(call, "'messages' must be a non-empty array", "messages")
        family = catalogue.family_of(model, self.text_families)
        if family is None:
            return self._invalid(call, f"Invalid value for 'model': '{model}' is not a chat model.",
                                 "model", "invalid_value")
        effort = body.get("reasoning_effort")
        if family.reasoning:
            if "max_tokens" in body:
                return self._unsupported_parameter(call, "max_tokens", "max_completion_tokens")
            if body.get("temperature") not in (None, 1, 1.0):
                return self._unsupported_value(call, "temperature", body["temperature"], [1])
            if effort is not None and effort not in family.efforts:
                return self._unsupported_value(call, "reasoning_effort", effort, family.efforts)
        elif effort is not None:
            return self._unsupported_parameter(call, "reasoning_effort")
        hidden = 0
        if family.reasoning:
            hidden = self.reasoning_tokens
            if hidden is None:
                hidden = catalogue.REASONING_TOKENS[effort or family.default_effort]
        room = body.get("max_completion_tokens") or body.get("max_tokens") or 10**9
        answer_tokens = _text_tokens(self.friend_name)
        if room < hidden + answer_tokens:
            # The room ran out: what was reasoned is spent, the answer is cut (or empty).
            visible = max(0, room - hidden)
            content, finish = self.friend_name[: visible * 4], "length"
            spent_reasoning, spent_visible = min(hidden, room), visible
        else:
            content, finish = self.friend_name, "stop"
            spent_reasoning, spent_visible = hidden, answer_tokens
        prompt_tokens = sum(_text_tokens(str(message.get("content", ""))) for message in messages)
        completion_tokens = spent_reasoning + spent_visible
        return self._answer(call, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": spent_reasoning, "audio_tokens": 0,
                    "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
                },
            },
            "system_fingerprint": "fp_fake",
        })  # fmt: skip


def _text_tokens(text: str) -> int:
    """About as many tokens as OpenAI's tokenizers count: one per four characters."""
    return max(1, math.ceil(len(text) / 4))
