"""A fake OpenAI API: moderations, image generations, chat completions.

Answers have the real shapes, the real error bodies and the real rate-limit headers, so
the real `openai` client can talk to it (base URL `{url}/v1`). Endpoint names used by
`script`, `hold`, `latency_s`, `wait_for_calls`: "moderations", "images", "chat",
and "files" (the PNGs behind `url` answers, served from the same server, no key needed).

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
import math
import re
import time
import uuid
from collections import deque
from typing import Any

import trio
from quart import Response
from quart_trio import QuartTrio

from ._service import Call, FakeService, json_response
from .pictures import png_for_prompt

WINDOW_S = 60.0
BUCKET_OF_ENDPOINT = {"images": "images", "chat": "text", "moderations": "text"}
IMAGE_SIZES = {"256x256", "512x512", "1024x1024", "1792x1024", "1024x1792", "1536x1024", "1024x1536"}
MAX_PROMPT_CHARS = 4000
# The omni moderation model's categories, all of which the real answer lists.
MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions",
    "sexual", "sexual/minors", "violence", "violence/graphic",
)  # fmt: skip
# Retry-after suggested by a scripted 429 (a real one follows the window instead).
SCRIPTED_RETRY_AFTER_S = 1.0
# Output tokens of one GPT image by quality and size (OpenAI's image generation guide).
IMAGE_OUTPUT_TOKENS = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}

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
        # "b64_json" or "url" forces the answer's format; None honours the request
        # (whose default, as in the real API, is "url").
        self.response_format: str | None = "b64_json"
        self.friend_name = "Sir Hatsworth"
        self.images_per_minute: int | None = None
        self.text_per_minute: int | None = None
        self.image_tokens_per_minute: int | None = None
        self.files: dict[str, bytes] = {}
        self._windows: dict[str, deque[float]] = {"images": deque(), "text": deque()}
        self._image_tokens: deque[tuple[float, int]] = deque()  # (arrival, total tokens)

    def env(self) -> dict[str, str]:
        return {"OPENAI_API_KEY": self.api_key, "OPENAI_BASE_URL": f"{self.url}/v1"}

    # Swap it (fake.png_for = ...) to serve other pictures, e.g. broken bytes.
    def png_for(self, prompt: str, size: tuple[int, int]) -> bytes:
        return png_for_prompt(prompt, size)

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

        @app.get("/files/<name>.png")
        async def files(name: str) -> Response:
            async def serve_file(call: Call) -> Response:
                if name not in self.files:
                    return Response("BlobNotFound", status=404, content_type="application/xml")
                return Response(self.files[name], content_type="image/png")

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
        cost = self.image_usage(call.body)["total_tokens"] if token_limit is not None else 0
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

    def image_usage(self, body: Any) -> dict:
        """The `usage` an image answer carries: the image's output tokens by quality (auto
        and unknown count as medium) and size, and the prompt's words as text tokens.
        (A stand-in for the model catalogue's pricing in issue 9; same name and shape.)"""
        body = body if isinstance(body, dict) else {}
        by_size = IMAGE_OUTPUT_TOKENS.get(body.get("quality"), IMAGE_OUTPUT_TOKENS["medium"])
        output = by_size.get(body.get("size") or "1024x1024", by_size["1024x1024"])
        text = len(str(body.get("prompt") or "").split())
        return {
            "input_tokens": text,
            "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
            "output_tokens": output,
            "total_tokens": text + output,
        }

    # ---- normal answers -----------------------------------------------------------

    def _invalid(self, call: Call, message: str, param: str | None = None) -> Response:
        return self._answer(call, error_body(message, "invalid_request_error", None, param), 400)

    async def _moderate(self, call: Call) -> Response:
        body = call.body if isinstance(call.body, dict) else {}
        inputs = body.get("input")
        if isinstance(inputs, str):
            texts = [inputs]
        elif isinstance(inputs, list) and inputs:
            texts = [item if isinstance(item, str) else str(item.get("text", "")) for item in inputs]
        else:
            return self._invalid(call, "'input' is a required property", "input")
        results = []
        for text in texts:
            flagged = _mentions(text, self.flagged_words)
            results.append({
                "flagged": flagged,
                "categories": {name: flagged and name == "violence" for name in MODERATION_CATEGORIES},
                "category_scores": {
                    name: 0.97 if flagged and name == "violence" else 1e-6 for name in MODERATION_CATEGORIES
                },
                "category_applied_input_types": {name: ["text"] for name in MODERATION_CATEGORIES},
            })  # fmt: skip
        model = body.get("model") or "omni-moderation-latest"
        return self._answer(call, {"id": f"modr-{uuid.uuid4().hex}", "model": model, "results": results})

    async def _generate(self, call: Call) -> Response:
        body = call.body if isinstance(call.body, dict) else {}
        prompt, size, n = body.get("prompt"), body.get("size", "1024x1024"), body.get("n", 1)
        model = body.get("model", "dall-e-2")
        requested_format = body.get("response_format", "url")
        if not isinstance(prompt, str) or not prompt.strip():
            return self._invalid(call, "'prompt' is a required property", "prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            return self._invalid(call, f"'prompt' is too long: maximum length is {MAX_PROMPT_CHARS}", "prompt")
        if size not in IMAGE_SIZES:
            return self._invalid(call, f"'{size}' is not one of {sorted(IMAGE_SIZES)} - 'size'", "size")
        if requested_format not in ("url", "b64_json"):
            return self._invalid(call, f"'{requested_format}' is not one of ['url', 'b64_json']", "response_format")
        if n != 1 and model == "dall-e-3":
            return self._invalid(call, "You must provide n=1 for this model.", "n")
        if _mentions(prompt, self.policy_words):
            return self.scripted_response(call, "content_policy_violation")
        width, height = (int(side) for side in size.split("x"))
        png = self.png_for(prompt, (width, height))
        if (self.response_format or requested_format) == "b64_json":
            item = {"b64_json": base64.b64encode(png).decode("ascii")}
        else:
            name = uuid.uuid4().hex
            self.files[name] = png
            item = {"url": f"{self.url}/files/{name}.png"}
        item["revised_prompt"] = prompt
        return self._answer(call, {"created": int(time.time()), "data": [item] * max(1, int(n)),
                                   "usage": self.image_usage(body)})

    async def _complete(self, call: Call) -> Response:
        body = call.body if isinstance(call.body, dict) else {}
        messages = body.get("messages")
        if not body.get("model"):
            return self._invalid(call, "you must provide a model parameter", "model")
        if not isinstance(messages, list) or not messages:
            return self._invalid(call, "'messages' must be a non-empty array", "messages")
        prompt_tokens = sum(len(str(message.get("content", "")).split()) for message in messages)
        completion_tokens = len(self.friend_name.split())
        return self._answer(call, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": self.friend_name, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_fake",
        })  # fmt: skip
