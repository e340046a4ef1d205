"""The retry policy: backoff, retry-after, `retrying`, and the HTTP status classification."""

import email.utils
import random
import time

import httpx2
import pytest
import trio

from dynamo import metrics
from dynamo.supervision import retry
from dynamo.supervision.retry import (
    AuthFailure,
    ContentRejected,
    GaveUp,
    Permanent,
    Transient,
    backoff_s,
    classify_http_status,
    retry_after_from_headers,
    retrying,
)


class TopOfRange:
    """An rng that always draws the top of the range, to make backoff exact."""

    def uniform(self, low, high):
        return high


def test_backoff_doubles_up_to_the_cap():
    delays = [backoff_s(attempt, rng=TopOfRange()) for attempt in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_backoff_full_jitter_with_a_seeded_rng():
    drawn = [backoff_s(attempt, rng=random.Random(7)) for attempt in range(8)]
    expected = [random.Random(7).uniform(0, min(60, 2 ** attempt)) for attempt in range(8)]
    assert drawn == expected
    rng = random.Random(1)
    for attempt in range(12):
        assert 0 <= backoff_s(attempt, rng=rng) <= min(60, 2 ** attempt)
    assert backoff_s(10_000, rng=TopOfRange()) == 60  # no overflow


def test_backoff_honours_retry_after_even_above_the_cap():
    assert backoff_s(0, retry_after_s=30, rng=TopOfRange()) == 30 + retry.RETRY_AFTER_JITTER_S
    rng = random.Random(3)
    for attempt in range(6):
        delay = backoff_s(attempt, retry_after_s=90, rng=rng)
        assert 90 <= delay <= 90 + retry.RETRY_AFTER_JITTER_S


def test_retry_after_from_headers():
    assert retry_after_from_headers({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_from_headers(httpx2.Headers({"Retry-After": "7"})) == 7
    in_30_s = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after_from_headers({"Retry-After": in_30_s}) <= 30
    assert retry_after_from_headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0
    assert retry_after_from_headers({"retry-after": "soon"}) is None
    assert retry_after_from_headers({}) is None
    assert retry_after_from_headers(None) is None


def test_classify_http_status():
    for status in (408, 429, 500, 502, 503):
        assert classify_http_status(status, {}) is Transient
    for status in (400, 401, 403, 404, 409, 422):
        assert classify_http_status(status, {}) is Permanent
    with pytest.raises(ValueError):
        classify_http_status(200, {})


class Flaky:
    """A call that fails with the given exceptions, then returns "ok"."""

    def __init__(self, *failures):
        self.failures = list(failures)
        self.calls: list[float] = []

    async def __call__(self):
        self.calls.append(trio.current_time())
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


def passthrough(exc):
    return exc


def retried(system):
    return metrics.RETRIES.labels(system)._value.get()


async def test_retrying_waits_the_backoff_and_counts_retries(autojump_clock):
    with trio.fail_after(60):
        call = Flaky(Transient("a"), Transient("b"))
        before = retried("test-ok")
        start = trio.current_time()
        result = await retrying(call, system="test-ok", deadline=start + 100, max_attempts=6,
                                classify=passthrough, rng=TopOfRange())
        assert result == "ok"
        assert [t - start for t in call.calls] == [0, 1, 3]
        assert retried("test-ok") == before + 2


async def test_retrying_honours_retry_after(autojump_clock):
    with trio.fail_after(60):
        call = Flaky(Transient("429", retry_after_s=20))
        start = trio.current_time()
        await retrying(call, system="test", deadline=start + 100, max_attempts=None,
                       classify=passthrough)
        assert 20 <= call.calls[1] - start <= 20 + retry.RETRY_AFTER_JITTER_S


async def test_retrying_never_sleeps_past_the_deadline(autojump_clock):
    with trio.fail_after(60):
        call = Flaky(*[Transient(f"try {n}") for n in range(100)])
        start = trio.current_time()
        with pytest.raises(GaveUp) as caught:
            await retrying(call, system="test", deadline=start + 10, max_attempts=None,
                           classify=passthrough, rng=TopOfRange())
        # Attempts at 0, 1, 3, 7; the next would start at 15, after the deadline.
        assert [t - start for t in call.calls] == [0, 1, 3, 7]
        assert trio.current_time() - start == 7
        assert caught.value.reason == "deadline"
        assert str(caught.value.last_error) == "try 3"
        assert isinstance(caught.value.__cause__, Transient)


async def test_retrying_gives_up_after_max_attempts(autojump_clock):
    with trio.fail_after(60):
        call = Flaky(*[Transient(f"try {n}") for n in range(10)])
        with pytest.raises(GaveUp) as caught:
            await retrying(call, system="test", deadline=trio.current_time() + 1000,
                           max_attempts=3, classify=passthrough)
        assert len(call.calls) == 3
        assert caught.value.reason == "attempts"
        assert str(caught.value.last_error) == "try 2"


@pytest.mark.parametrize("error", [Permanent("no"), ContentRejected("filter"), AuthFailure("key")])
async def test_non_transient_errors_are_not_retried(autojump_clock, error):
    with trio.fail_after(60):
        call = Flaky(error)
        with pytest.raises(type(error)):
            await retrying(call, system="test", deadline=trio.current_time() + 1000,
                           max_attempts=6, classify=passthrough)
        assert len(call.calls) == 1


async def test_retrying_classifies_and_chains_the_original(autojump_clock):
    with trio.fail_after(60):
        call = Flaky(KeyError("boom"))
        with pytest.raises(Permanent) as caught:
            await retrying(call, system="test", deadline=trio.current_time() + 1000,
                           max_attempts=6, classify=lambda exc: Permanent(repr(exc)))
        assert isinstance(caught.value.__cause__, KeyError)


async def test_on_retry_is_told_and_may_be_async(autojump_clock):
    with trio.fail_after(60):
        seen = []

        async def on_retry(attempt, error, delay_s):
            seen.append((attempt, str(error), delay_s))

        await retrying(Flaky(Transient("a"), Transient("b")), system="test",
                       deadline=trio.current_time() + 100, max_attempts=None,
                       classify=passthrough, on_retry=on_retry, rng=TopOfRange())
        assert seen == [(1, "a", 1), (2, "b", 2)]


async def test_cancellation_is_never_swallowed(autojump_clock):
    with trio.fail_after(60):
        call = Flaky(*[Transient("x") for _ in range(100)])
        with trio.move_on_after(30) as scope:
            await retrying(call, system="test", deadline=trio.current_time() + 1000,
                           max_attempts=None, classify=passthrough, rng=TopOfRange())
        assert scope.cancelled_caught
        assert len(call.calls) == 5  # at 0, 1, 3, 7, 15; cancelled while waiting 16 s

        async def hangs():
            await trio.sleep_forever()

        with trio.move_on_after(5) as scope:
            await retrying(hangs, system="test", deadline=trio.current_time() + 1000,
                           max_attempts=None, classify=lambda exc: Transient(str(exc)))
        assert scope.cancelled_caught
