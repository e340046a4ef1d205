"""The rate limiter's pure logic: the window's schedule, adaptation, circuit, fair queue."""

import uuid

import pytest
import trio

from dynamo.domain.jobs import Job, Style, Viewer
from dynamo.inflight.fair_queue import FairQueue
from dynamo.limits.permits import CallKind, CallOutcome
from dynamo.limits.state import (
    PROBE_LEASE_S,
    AdaptiveLimit,
    AuthCircuit,
    Grant,
    KindLimiter,
    RateLimiterStatus,
    RateLimitHeaders,
    SlidingWindow,
    duration_s,
    parse_ratelimit_headers,
)

# An answer without x-ratelimit-* headers, as the OpenAI port parses it.
NO_HEADERS = RateLimitHeaders()


def most_in_any_window(times, window_s=60.0):
    """The most calls in any window (t-60, t]; the maximum is reached at some call."""
    most, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def schedule(window, calls, start=0.0):
    """Start times of `calls` calls made as early as the window allows."""
    times, now = [], start
    for _ in range(calls):
        now = window.next_allowed(now)
        window.record(Grant(now))
        times.append(now)
    return times


def test_five_per_minute_is_spread_evenly_from_the_first_call():
    times = schedule(SlidingWindow(5), 12)
    # Every 12 s; a call that refills the window waits EDGE_MARGIN_S more (60.5, not 60).
    assert times == [0, 12, 24, 36, 48, 60.5, 72.5, 84.5, 96.5, 108.5, 121, 133]
    assert most_in_any_window(times) == 5


def test_a_backlog_reaches_the_limit_but_never_exceeds_it():
    for per_minute in (5, 7, 500):
        times = schedule(SlidingWindow(per_minute), per_minute * 10 + 1)
        assert most_in_any_window(times) <= per_minute
        in_ten_minutes = sum(1 for t in times if t < 600)
        assert in_ten_minutes >= 0.97 * per_minute * 10


def test_a_lowered_limit_counts_calls_made_at_the_old_pace():
    window = SlidingWindow(10)
    times = schedule(window, 6)  # 0, 6, ... 30
    window.limit = 5
    times += schedule(window, 10, start=times[-1])
    assert most_in_any_window(times) <= 6  # the 6 at the old pace, then never 6 again
    assert most_in_any_window([t for t in times if t > 30]) <= 5
    assert all(most_in_any_window([t for t in times if end - 60 < t <= end]) <= 5
               for end in times if end >= 60)


def test_a_fractional_limit_stays_under_it():
    times = schedule(SlidingWindow(2.5), 20)
    assert most_in_any_window(times) <= 2
    times = schedule(SlidingWindow(0.5), 4)
    assert times == [0, 120, 240, 360]


def test_an_idle_window_allows_a_call_at_once():
    window = SlidingWindow(5)
    window.record(Grant(0))
    assert window.next_allowed(100) == 100
    assert window.count(100) == 0
    with pytest.raises(ValueError):
        window.limit = 0


def test_ratelimit_headers():
    parsed = parse_ratelimit_headers({"X-RateLimit-Limit-Requests": "5",
                                      "x-ratelimit-remaining-requests": "0",
                                      "x-ratelimit-reset-requests": "6m0s"})
    assert (parsed.limit, parsed.remaining, parsed.reset_s) == (5, 0, 360)
    assert parse_ratelimit_headers(None).limit is None
    assert duration_s("20ms") == pytest.approx(0.02)
    assert duration_s("1m30.5s") == 90.5
    assert duration_s("1h2m3s") == 3723
    assert duration_s("1.5") == 1.5
    assert duration_s("soon") is None


def test_a_429_pauses_for_the_retry_after():
    limit = AdaptiveLimit(5)
    limit.record(Grant(0))
    limit.on_rate_limited(1, 30, NO_HEADERS)
    assert limit.paused_until == 31
    assert limit.next_allowed(2) == 31
    limit.on_rate_limited(2, 40, NO_HEADERS)  # the port read it from retry-after-ms
    assert limit.paused_until == 42


def test_a_429_without_retry_after_backs_off():
    limit = AdaptiveLimit(5)
    limit.record(Grant(0))
    limit.on_rate_limited(1, None, NO_HEADERS)
    assert 1 <= limit.paused_until <= 1 + 60 / limit.effective_limit


def test_a_429_with_a_lower_limit_shown_lowers_to_it_then_recovers_when_it_rises():
    limit = AdaptiveLimit(10)
    limit.on_rate_limited(0, 1, parse_ratelimit_headers({"x-ratelimit-limit-requests": "5"}))
    assert limit.effective_limit == 5
    limit.on_success(100, parse_ratelimit_headers({"x-ratelimit-limit-requests": "5"}))
    assert limit.effective_limit == 5  # never above what the API shows
    # The key was upgraded: once the learned limit is stale, one step per clean minute.
    limit.on_success(800, parse_ratelimit_headers({"x-ratelimit-limit-requests": "10"}))
    assert limit.effective_limit == 6
    limit.on_success(830, parse_ratelimit_headers({"x-ratelimit-limit-requests": "10"}))
    assert limit.effective_limit == 6
    for minute, expected in ((1, 7), (2, 8), (3, 9), (4, 10), (5, 10)):
        limit.on_success(800 + 60 * minute, parse_ratelimit_headers({"x-ratelimit-limit-requests": "10"}))
        assert limit.effective_limit == expected


def test_a_success_showing_a_lower_limit_lowers_at_once():
    limit = AdaptiveLimit(10)
    limit.on_success(0, parse_ratelimit_headers({"x-ratelimit-limit-requests": "4"}))
    assert limit.effective_limit == 4
    assert limit.window.interval_s == 15


def test_a_429_within_the_known_limit_slows_down_then_recovers():
    limit = AdaptiveLimit(10)
    limit.on_rate_limited(0, 10, parse_ratelimit_headers({"x-ratelimit-limit-requests": "10"}))
    assert limit.effective_limit == 8
    limit.on_success(59, NO_HEADERS)
    assert limit.effective_limit == 8
    limit.on_success(60, NO_HEADERS)
    assert limit.effective_limit == 9
    limit.on_success(120, NO_HEADERS)
    assert limit.effective_limit == 10


def test_a_short_429_within_the_known_limit_only_pauses():
    """A call that arrived a few ms before its predecessor left the API's window: the
    limit is right, the timing was not. Waiting is enough."""
    limit = AdaptiveLimit(60)
    limit.on_rate_limited(60.0, 0.006, parse_ratelimit_headers({"x-ratelimit-limit-requests": "60"}))
    assert limit.effective_limit == 60 and limit.paused_until == 60.006


def test_a_429_without_headers_lowers_to_what_the_server_took():
    limit = AdaptiveLimit(10)
    for t in (0, 6, 12, 18, 24, 30):  # the server took 5, refused the 6th
        limit.record(Grant(t))
    limit.on_rate_limited(30.5, 29.5, NO_HEADERS)
    assert limit.effective_limit == 5
    limit.on_success(200, NO_HEADERS)
    assert limit.effective_limit == 5  # learned: no recovery into 429s again
    limit.on_success(30.5 + 600, NO_HEADERS)
    assert limit.effective_limit == 6  # the learned limit went stale: probe upwards


def test_429s_for_calls_made_before_the_pause_do_not_compound():
    limit = AdaptiveLimit(10)
    shown = parse_ratelimit_headers({"x-ratelimit-limit-requests": "10"})
    limit.on_rate_limited(0, 10, shown)
    assert limit.effective_limit == 8
    limit.on_rate_limited(0.5, 10, shown)  # in flight when the first came back
    limit.on_rate_limited(1, 10, shown)
    assert limit.effective_limit == 8 and limit.paused_until == 11
    limit.on_rate_limited(2, 10, parse_ratelimit_headers({"x-ratelimit-limit-requests": "4"}))
    assert limit.effective_limit == 4  # a limit the API shows still applies


async def test_reconfiguring_keeps_what_was_learned():
    status = RateLimiterStatus()
    status.configure({CallKind.IMAGE: 10})
    await status.budget.report(CallOutcome(CallKind.IMAGE, succeeded=True,
                                           limits=parse_ratelimit_headers({"x-ratelimit-limit-requests": "5"})))
    status.configure({CallKind.IMAGE: 10})  # the actor was restarted
    await status.budget.refresh(CallKind.IMAGE)
    image = status.limiter(CallKind.IMAGE).limit
    assert image.effective_limit == 5
    status.configure({CallKind.IMAGE: 3})
    await status.budget.refresh(CallKind.IMAGE)
    assert image.effective_limit == 3 and image.configured == 3
    with pytest.raises(ValueError):
        status.configure({CallKind.IMAGE: -1})


def test_a_first_call_429_without_headers_at_most_halves():
    limit = AdaptiveLimit(500)
    limit.record(Grant(0))
    limit.on_rate_limited(0.5, 1, NO_HEADERS)
    assert limit.effective_limit == 250


def test_a_429_without_retry_after_waits_for_the_reset_when_nothing_remains():
    limit = AdaptiveLimit(10)
    limit.record(Grant(0))
    limit.on_rate_limited(1, None, parse_ratelimit_headers({"x-ratelimit-limit-requests": "10",
                                    "x-ratelimit-remaining-requests": "0",
                                    "x-ratelimit-reset-requests": "20s"}))
    assert limit.paused_until == 21


def test_auth_circuit_spaces_probes_5_10_20_40_60_60():
    circuit = AuthCircuit()
    circuit.open(0)
    assert circuit.is_open and circuit.probe_at() == 5
    now, spacings = 5.0, []
    for _ in range(6):
        circuit.probe_granted(now)
        assert circuit.probe_at() == now + PROBE_LEASE_S  # one probe at a time
        circuit.probe_failed(now + 1)
        spacings.append(circuit.probe_at() - (now + 1))
        now = circuit.probe_at()
    assert spacings == [10, 20, 40, 60, 60, 60]
    circuit.close()
    assert not circuit.is_open


def test_kind_limiter_outcomes():
    limiter = KindLimiter(CallKind.IMAGE, 5)
    limiter.on_outcome(CallOutcome(CallKind.IMAGE, auth_failed=True), now=0)
    assert limiter.circuit.is_open
    permit = limiter.permit()
    assert permit.probe and limiter.next_grant_at(0) == 5
    limiter.granted(5, permit)
    limiter.on_outcome(CallOutcome(CallKind.IMAGE, probe=True), now=6)  # a 5xx: inconclusive
    assert limiter.circuit.is_open and limiter.next_grant_at(6) == 17  # window: 5 + 12
    limiter.on_outcome(CallOutcome(CallKind.IMAGE, rate_limited=True, retry_after_s=3, probe=True),
                       now=20)
    assert not limiter.circuit.is_open  # a 429 means the key was accepted
    assert limiter.limit.paused_until == 23


def job_for(viewer, deadline=1000.0):
    return Job(id=uuid.uuid4(), viewer=Viewer(viewer, viewer.title()), style=Style.GHOST,
               inputs={"subject": "a seal"}, prompt="p", description="a seal", deadline=deadline)


def test_fair_queue_round_robin():
    queue = FairQueue()
    for _ in range(3):
        queue.push(job_for("a"))
    queue.push(job_for("b"))
    queue.push(job_for("c"))
    queue.push(job_for("b"))
    order = []
    while (job := queue.peek()) is not None:
        order.append(job.viewer.twitch_user_id)
        queue.served(job)
    assert order == ["a", "b", "c", "a", "b", "a"]
    assert len(queue) == 0 and queue.viewers_waiting == 0


def test_fair_queue_expiry_keeps_the_others_in_place():
    queue = FairQueue()
    first, late, soon = job_for("a", 100), job_for("b", 50), job_for("b", 80)
    for job in (first, late, soon):
        queue.push(job)
    assert queue.earliest_deadline() == 50
    assert queue.expired(60) == [late]
    queue.discard(late)
    assert queue.peek() is first and len(queue) == 2 and queue.viewers_waiting == 2


async def test_status_as_json(autojump_clock):
    status = RateLimiterStatus()
    status.configure({CallKind.IMAGE: 5, CallKind.TEXT: 500})
    assert status.as_json()["kinds"]["image"]["calls_last_60s"] == 0  # no call yet
    assert (await status.budget.try_grant(CallKind.IMAGE)).permit is not None
    await trio.sleep(1)
    await status.budget.report(CallOutcome(CallKind.IMAGE, rate_limited=True, retry_after_s=30))
    await status.budget.report(CallOutcome(CallKind.TEXT, auth_failed=True))
    status.fair_queue.push(job_for("a"))
    await trio.sleep(1)
    data = status.as_json()
    assert data["scope"] == "process"
    assert data["kinds"]["image"]["configured_per_minute"] == 5
    assert data["kinds"]["image"]["effective_per_minute"] == 2.5
    assert data["kinds"]["image"]["calls_last_60s"] == 1
    assert data["kinds"]["image"]["paused_until"].endswith("+00:00")
    assert data["kinds"]["image"]["circuit"] == "closed"
    assert data["kinds"]["text"]["circuit"] == "open" and data["kinds"]["text"]["circuit_open"]
    assert data["kinds"]["text"]["paused_until"] is None
    assert data["fair_queue"] == {"depth": 1, "viewers_waiting": 1}
