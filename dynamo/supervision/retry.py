"""The one retry policy for every external call: classification, backoff, and `retrying`.

An external error is classified into one of four kinds, and only `Transient` is retried
(each port classifies its own: `classify_http_status` for httpx-based ports here,
`openai_errors.classify_openai` for the OpenAI port):

- `Transient`: try again later (429, 408, 5xx, connection errors, timeouts); carries the
  server's `retry_after_s` when it gave one.
- `Permanent`: trying again cannot help (other 4xx, an exhausted quota); fail the request.
- `AuthFailure`: the API key was refused (401/403); not the request's fault.
- `ContentRejected`: the content filter refused the prompt or the image.

`retrying()` waits between attempts with a `Backoff` (`dynamo.supervision.backoff`, the
one backoff policy): exponential with full jitter, at least as long as the server asked
for, and never sleeps past the caller's deadline.
"""

from __future__ import annotations

import datetime
import email.utils
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import trio

from dynamo import metrics
from dynamo.supervision.backoff import RETRY_AFTER_JITTER_S, Backoff  # noqa: F401 (re-exported)
from dynamo.supervision.unavailable import http_outage

log = logging.getLogger(__name__)

T = TypeVar("T")


class CallError(Exception):
    """An external call failed; the subclass says whether to try again."""

    def __init__(
        self,
        message: str = "",
        *,
        status_code: int | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.headers = headers


class Transient(CallError):
    """Worth another attempt, after `retry_after_s` if the server said so."""

    def __init__(
        self,
        message: str = "",
        *,
        retry_after_s: float | None = None,
        status_code: int | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message, status_code=status_code, headers=headers)
        self.retry_after_s = retry_after_s

    @property
    def rate_limited(self) -> bool:
        return self.status_code == 429

    @property
    def unavailable(self) -> bool:
        """The service is down or unreachable (5xx, no connection, a timeout), as opposed
        to refusing this call (429, 408, 409): what an outage looks like."""
        return http_outage(self.status_code)


class Permanent(CallError):
    """Another attempt would fail the same way."""


class AuthFailure(CallError):
    """The credentials were refused (401/403): no call of this kind can succeed for now."""


class ContentRejected(CallError):
    """The content filter refused the request."""


# The backoff after a failure that looks like an outage of the whole system (5xx, no
# connection): equal jitter from 2 s doubling, so that the default 6 attempts (contract:
# DYNAMO_MAX_ATTEMPTS counts every attempt) span at least (2+4+8+16+32)/2 = 31 s, a
# routine blip of the API, and at most 62 s.
OUTAGE_BACKOFF = Backoff(base_s=2.0, cap_s=32.0, floor=0.5)


class GaveUp(Exception):
    """A transient failure outlasted the attempts or the deadline; `last_error` is the last one."""

    def __init__(self, last_error: Transient, *, reason: str):
        super().__init__(f"gave up ({reason}): {last_error}")
        self.last_error = last_error
        self.reason = reason  # "deadline" or "attempts"


def backoff_s(
    attempt: int,
    *,
    base_s: float = 1.0,
    cap_s: float = 60.0,
    retry_after_s: float | None = None,
    floor: float = 0.0,
    rng=random,
) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry): the
    `Backoff(base_s, cap_s, floor)` policy's delay (see `dynamo.supervision.backoff`)."""
    return Backoff(base_s, cap_s, floor).delay_s(attempt, retry_after_s=retry_after_s, rng=rng)


def retry_after_from_headers(headers: Mapping[str, str] | None) -> float | None:
    """The wait a server asked for: `retry-after-ms`, else `retry-after` (seconds or HTTP-date)."""
    if not headers:
        return None
    lowered = {key.lower(): value for key, value in headers.items()}
    milliseconds = _number(lowered.get("retry-after-ms"))
    if milliseconds is not None:
        return max(0.0, milliseconds / 1000.0)
    value = lowered.get("retry-after")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if number == number and number != float("inf") else None  # no NaN, no inf


def classify_http_status(status: int, headers: Mapping[str, str] | None = None) -> type[CallError]:
    """For httpx-based ports: 429, 408 and 5xx are `Transient`; any other 4xx is `Permanent`.

    `headers` are not needed for the kind; build the instance with
    `retry_after_from_headers(headers)` for a Transient.
    """
    if status < 400:
        raise ValueError(f"HTTP {status} is not an error")
    if status in (408, 429) or status >= 500:
        return Transient
    return Permanent


def classify_port_error(exc: Exception, *, unknown=Permanent, passthrough=()) -> Exception:
    """For ports that raise classified errors already: those, and `passthrough` types,
    stay as they are; anything else becomes `unknown` (Permanent unless said)."""
    if isinstance(exc, (CallError, *passthrough)):
        return exc
    return unknown(f"{type(exc).__name__}: {exc}")


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    system: str,
    deadline: float,
    max_attempts: int | None,
    classify: Callable[[Exception], Exception],
    on_retry: Callable[[int, Transient, float], object] | None = None,
    backoff_cap_s: float = 60.0,
    outage: Callable[[Transient], bool] | None = None,
    log_extra: Mapping[str, str] | None = None,
    rng=random,
) -> T:
    """`await call()` until it succeeds, retrying `Transient` failures with `backoff_s`.

    `deadline` is a trio.current_time() value: a retry that would start after it is not
    made. `backoff_cap_s` caps the exponential backoff. `max_attempts` counts every call
    (None: unlimited until the deadline). A failure `outage(error)` calls an outage of the
    system waits OUTAGE_BACKOFF_S instead, so that the attempts span a routine blip.
    Either way the last Transient comes out wrapped in `GaveUp`. Anything `classify` does not turn
    into a Transient propagates at once. `on_retry(attempt, error, delay_s)`, sync or
    async, is told of each retry before its wait; `log_extra` (the request id) goes on the
    retry's log line. Cancellation is never caught.
    """
    if max_attempts is not None and max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    policy = Backoff(cap_s=backoff_cap_s)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as exc:  # trio.Cancelled is a BaseException: never caught here
            error = classify(exc)
            if not isinstance(error, Transient):
                if error is exc:
                    raise
                raise error from exc
            if max_attempts is not None and attempt >= max_attempts:
                raise GaveUp(error, reason="attempts") from exc
            if outage is not None and outage(error) and error.retry_after_s is None:
                delay_s = OUTAGE_BACKOFF.delay_s(attempt - 1, rng=rng)
            else:
                delay_s = policy.delay_s(attempt - 1, retry_after_s=error.retry_after_s, rng=rng)
            if trio.current_time() + delay_s > deadline:
                raise GaveUp(error, reason="deadline") from exc
        metrics.RETRIES.labels(system).inc()
        # Callers log with their request id through on_retry; this line is for debugging.
        log.debug("%s: attempt %d failed (%s); retrying in %.1f s", system, attempt, error, delay_s)
        if on_retry is not None:
            result = on_retry(attempt, error, delay_s)
            if inspect.isawaitable(result):
                await result
        await trio.sleep(delay_s)


async def connect_at_startup(
    connect: Callable[[], Awaitable[T]], *, system: str, within_s: float
) -> T:
    """`await connect()`, retried while the system comes up (a container started before
    its broker or database); after `within_s` the last error comes out, so that a wrong
    address still fails startup with its own message."""
    return await retrying(
        connect,
        system=system,
        deadline=trio.current_time() + within_s,
        max_attempts=None,
        classify=lambda exc: Transient(f"{type(exc).__name__}: {exc}"),
        backoff_cap_s=5.0,
    )
