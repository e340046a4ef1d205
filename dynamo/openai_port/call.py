"""One OpenAI call as every caller makes it: take a permit, call, report the outcome.

`call_openai()` runs a call of the OpenAI port (`dynamo.openai_port.client`, which raises only the
service's error classes) under the retry policy: before each attempt it takes a permit
from the rate limiter for the call's kind and expected tokens, and after it reports the
outcome (success with the answer's headers and tokens used, a 429 with its headers and
retry-after, a refused API key, or any other failure), so that the limiter paces calls and
learns limits. A refused key (AuthFailure) does not spend the request's attempts: the
call waits for the limiter's circuit to close and tries again, as long as the deadline lets.

An outage of the API (5xx, no connection, a timeout) is waited out with a longer backoff
(`retry.OUTAGE_BACKOFF_S`): every attempt counts against DYNAMO_MAX_ATTEMPTS, as the
contract says, and the default 6 span at least 31 s.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import trio

from dynamo import metrics
from dynamo.limits.permits import CallKind, CallOutcome, Permit, acquire_permit, report_outcome
from dynamo.openai_port.rate_headers import parse_ratelimit_headers
from dynamo.supervision import retry

log = logging.getLogger(__name__)


async def call_openai(
    permits_send: trio.MemorySendChannel,
    kind: CallKind,
    call: Callable[[], Awaitable],
    *,
    deadline: float,
    max_attempts: int,
    log_extra: Mapping[str, str],
    tokens: int = 0,
    before_call: Callable[[], Awaitable[None]] | None = None,
):
    """`await call()` (an `Answer`) under permits and the retry policy. `before_call`
    runs after each permit, right before the call (to claim the request); what it raises
    goes straight out. Raises the port's CallError, or retry.GaveUp."""

    async def attempt():
        permit = await acquire_permit(permits_send, kind, tokens=tokens)
        if before_call is not None:
            await before_call()
        try:
            answer = await call()
        except Exception as exc:  # trio.Cancelled is a BaseException: never caught here
            error = retry.classify_port_error(exc)
            await _report_failure(permits_send, kind, permit, error, log_extra)
            raise error from exc
        metrics.OPENAI_CALLS.labels(kind.value, "200").inc()
        outcome = CallOutcome(
            kind,
            succeeded=True,
            limits=parse_ratelimit_headers(answer.headers),
            probe=permit.probe,
            tokens_used=answer.tokens_used,
            permit=permit,  # so that the budget corrects this call's grant to what it cost
        )
        await report_outcome(permits_send, outcome)
        return answer

    while True:
        try:
            return await retry.retrying(
                attempt,
                system="openai",
                log_extra=log_extra,
                deadline=deadline,
                max_attempts=max_attempts,
                classify=_as_raised,
                outage=_outage,
            )
        except _AuthPaused:
            continue


async def _report_failure(
    permits_send, kind: CallKind, permit: Permit, error: Exception, log_extra
) -> None:
    status = getattr(error, "status_code", None) or type(error).__name__
    metrics.OPENAI_CALLS.labels(kind.value, str(status)).inc()
    if isinstance(error, retry.AuthFailure):
        log.error("OpenAI refused the API key (%s); generation paused", status, extra=log_extra)
        await report_outcome(permits_send, CallOutcome(kind, auth_failed=True, probe=permit.probe))
        # Not the request's fault: wait for the circuit to close, without spending one of
        # its attempts.
        raise _AuthPaused() from error
    if isinstance(error, retry.Transient) and error.rate_limited:
        metrics.OPENAI_RATE_LIMITED.labels(kind.value).inc()
        outcome = CallOutcome(
            kind,
            rate_limited=True,
            limits=parse_ratelimit_headers(error.headers),
            retry_after_s=error.retry_after_s,
            probe=permit.probe,
        )
    else:
        # Reported too, so that a probe's slot is freed at once.
        outcome = CallOutcome(kind, probe=permit.probe)
    await report_outcome(permits_send, outcome)


class _AuthPaused(Exception):
    pass


def _outage(error: retry.Transient) -> bool:
    return error.unavailable


def _as_raised(exc: Exception) -> Exception:
    """`attempt()` raises errors already classified, and `before_call`'s own as they are."""
    return exc
