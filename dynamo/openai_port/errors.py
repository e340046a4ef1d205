"""The OpenAI port's error contract: SDK exceptions in, the service's error classes out.

`classify_openai` maps an exception of the `openai` SDK to one of the shared kinds of
`dynamo.supervision.retry` (contract §4 for the image endpoint's 400s):

- `Transient`: 429 (but an exhausted quota), 408, 409, 5xx, connection errors, timeouts;
  with the server's retry-after, status and headers (the rate limiter learns from them).
- `AuthFailure`: 401/403, the API key was refused: not the request's fault.
- `ContentRejected`: a 400 `content_policy_violation`, or one whose message speaks of the
  content policy; on the image endpoint every 400 `invalid_request_error` (the original
  service's rule), once a refused parameter has been ruled out (`dialect.learn`).
- `Permanent`: anything else, an exhausted quota included.

Only the port modules (`client.py`, this one) import `openai`.
"""

from __future__ import annotations

import openai

from dynamo.supervision.retry import (
    AuthFailure,
    CallError,
    ContentRejected,
    Permanent,
    Transient,
    retry_after_from_headers,
)

# OpenAI's answer when the content filter refused the prompt (or the generated image).
_CONTENT_POLICY_CODE = "content_policy_violation"
_CONTENT_POLICY_WORDS = ("content policy", "content_policy", "safety system")
# A 429 that no amount of waiting fixes: the account is out of credit.
_QUOTA_CODE = "insufficient_quota"


class ModelNotFound(Permanent):
    """The API does not know the model (404 model_not_found): unknown, or shut down."""


class ParameterLearned(Transient):
    """The API refused a parameter, and the model's dialect now leaves it out: the same
    call, made again at once, is a different request."""

    def __init__(self, message: str = "", *, status_code: int | None = 400):
        super().__init__(message, retry_after_s=0.0, status_code=status_code)


def api_said(exc: openai.APIError) -> str:
    """What the API answered, in one line: `404 model_not_found: The model ... `."""
    body = exc.body if isinstance(exc.body, dict) else {}
    message = str(body.get("message") or exc.message or type(exc).__name__)
    status = getattr(exc, "status_code", None)
    parts = [str(part) for part in (status, exc.code) if part]
    return f"{' '.join(parts)}: {message}" if parts else message


def classify_openai(exc: BaseException, *, image_call: bool = False) -> CallError:
    """Maps an exception of the openai SDK to one of the four kinds (others: `Permanent`)."""
    if isinstance(exc, CallError):
        return exc
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return Transient(message)
    if isinstance(exc, openai.ContentFilterFinishReasonError):
        return ContentRejected(message)
    if not isinstance(exc, openai.APIStatusError):
        return Permanent(message)
    status = exc.status_code
    headers = dict(exc.response.headers)
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError) or status in (
        401,
        403,
    ):
        return AuthFailure(message, status_code=status, headers=headers)
    if status == 429 and exc.code == _QUOTA_CODE:
        return Permanent(message, status_code=status, headers=headers)
    if status == 400 and _content_rejected(exc, image_call=image_call):
        return ContentRejected(message, status_code=status, headers=headers)
    if status in (408, 409, 429) or status >= 500:
        return Transient(
            message,
            retry_after_s=retry_after_from_headers(headers),
            status_code=status,
            headers=headers,
        )
    return Permanent(message, status_code=status, headers=headers)


def _content_rejected(exc: openai.APIStatusError, *, image_call: bool) -> bool:
    if exc.code == _CONTENT_POLICY_CODE:
        return True
    if exc.type != "invalid_request_error":
        return False
    text = (exc.message or "").lower()
    return image_call or any(words in text for words in _CONTENT_POLICY_WORDS)
