"""Pacing under a tokens-per-minute limit that dynamo is not told, under the autojump clock
(issue 18): calls priced in tokens go one at a time until an answer shows the limit, so
that pacing is even from the first call and the window's edge never stalls.

The API here is a few lines that count as the fake OpenAI does: every call arriving in
the last 60 s and its tokens, answered after `CALL_S` with x-ratelimit-* headers, or
refused with a 429 when a limit would be exceeded.
"""

import collections
import functools

import pytest
import trio

from dynamo.budget import Budget, MemoryStore
from dynamo.permits import CallKind, CallOutcome, acquire_permit, report_outcome
from dynamo.rate_adaptive import UNKNOWN_TOKENS_LEASE_S, AdaptiveLimit
from dynamo.rate_kind import KindLimiter
from dynamo.rate_window import EDGE_MARGIN_S, WINDOW_S, Grant, SlidingWindow
from dynamo.ratelimit import RateLimiterStatus
from tests.test_budget import MEDIUM_SQUARE, most_tokens_in_any_window, running

CALL_S = 2.0  # the API's time per image
GHOSTS = 30
IMAGES_PER_MINUTE = 100
TOKENS_PER_MINUTE = 21120  # 20 medium 1024x1024 images of 1,056 tokens
PRICE_TABLE_GUESS = 503  # what dynamo expects of an image before an answer says


class Account:
    """The API's side of one account: images and tokens per minute, sliding windows."""

    def __init__(self, per_minute: int, tokens_per_minute: int):
        self.per_minute, self.tokens_per_minute = per_minute, tokens_per_minute
        self.window: collections.deque[tuple[float, int]] = collections.deque()
        self.calls: list[tuple[float, bool]] = []  # (arrival, accepted)

    def arrive(self, now: float, cost: int) -> dict[str, str] | None:
        """The headers of an accepted call; None for a 429."""
        while self.window and self.window[0][0] <= now - WINDOW_S:
            self.window.popleft()
        used = sum(tokens for _, tokens in self.window)
        accepted = len(self.window) < self.per_minute and used + cost <= self.tokens_per_minute
        self.calls.append((now, accepted))
        if not accepted:
            return None
        self.window.append((now, cost))
        return {
            "x-ratelimit-limit-requests": str(self.per_minute),
            "x-ratelimit-remaining-requests": str(self.per_minute - len(self.window)),
            "x-ratelimit-limit-tokens": str(self.tokens_per_minute),
            "x-ratelimit-remaining-tokens": str(self.tokens_per_minute - used - cost),
        }


async def ghost(permits_send, account: Account, cost: int) -> None:
    """One request's image call, retried after a 429 as call_openai does."""
    while True:
        permit = await acquire_permit(permits_send, CallKind.IMAGE, tokens=PRICE_TABLE_GUESS)
        headers = account.arrive(trio.current_time(), cost)
        await trio.sleep(CALL_S)
        if headers is not None:
            await report_outcome(permits_send, CallOutcome(
                CallKind.IMAGE, succeeded=True, headers=headers, tokens_used=cost, permit=permit))
            return
        await report_outcome(permits_send, CallOutcome(
            CallKind.IMAGE, rate_limited=True, retry_after_s=1.0, permit=permit))


async def thirty_ghosts(cost: int) -> list[tuple[float, bool]]:
    """30 ghosts at once, dynamo told 100 images/min and nothing about tokens: the calls'
    arrivals (s after the first) and whether each was accepted."""
    account = Account(IMAGES_PER_MINUTE, TOKENS_PER_MINUTE)
    async with running(RateLimiterStatus(), images_per_minute=IMAGES_PER_MINUTE) as (
            permits_send, _):
        async with trio.open_nursery() as ghosts:
            for _ in range(GHOSTS):
                ghosts.start_soon(ghost, permits_send, account, cost)
    start = account.calls[0][0]
    return [(at - start, accepted) for at, accepted in account.calls]


def steady_rate(times: list[float]) -> float:
    """Calls per minute over calls 5-24, as the issue measures it."""
    steady = times[4:24]
    return (len(steady) - 1) / (steady[-1] - steady[0]) * WINDOW_S


async def test_an_unknown_token_limit_is_used_evenly_with_no_stall_at_the_edge(autojump_clock):
    """The issue's scenario: before, 4 calls went out before the first answer showed the
    limit, then one every 3 s, then nothing for 10.6 s at the window's edge (0.88 of the
    limit over calls 5-24). Now one every 3 s from the first call, 3.5 s at the edge."""
    with trio.fail_after(300):
        calls = await thirty_ghosts(MEDIUM_SQUARE)
    times = [at for at, accepted in calls if accepted]
    assert len(times) == GHOSTS
    assert sum(1 for _, accepted in calls if not accepted) <= 1
    binding = TOKENS_PER_MINUTE / MEDIUM_SQUARE  # 20 a minute
    interval = WINDOW_S / binding
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert max(gaps) <= interval + EDGE_MARGIN_S + 1e-9, gaps
    assert steady_rate(times) >= 0.97 * binding
    assert most_tokens_in_any_window([(at, MEDIUM_SQUARE) for at in times]) <= TOKENS_PER_MINUTE


async def test_a_cost_that_does_not_divide_the_limit_is_paced_by_whole_calls(autojump_clock):
    """1,077 tokens an image (1,056 and the prompt's): 19 whole calls fit in 21,120 tokens.
    They are spaced 60/19 s, not 60 × 1077/21120 s with a stall when the 20th does not fit."""
    with trio.fail_after(300):
        calls = await thirty_ghosts(1077)
    times = [at for at, accepted in calls if accepted]
    assert len(times) == GHOSTS and all(accepted for _, accepted in calls)
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert max(gaps) <= WINDOW_S / 19 + EDGE_MARGIN_S + 1e-9, gaps
    # 19 whole calls in every 60.5 s: 0.97 of them at least, from the first call.
    assert steady_rate(times) >= 0.97 * 19 * WINDOW_S / (WINDOW_S + EDGE_MARGIN_S)


def test_whole_calls_spacing_of_the_window():
    window, times, now = SlidingWindow(100, token_limit=21120), [], 0.0
    for _ in range(40):
        now = window.next_allowed(now, 1077)
        window.record(Grant(now, 1077))
        times.append(now)
    assert times[:20] == pytest.approx([n * WINDOW_S / 19 for n in range(19)] + [60.5])
    assert most_tokens_in_any_window([(at, 1077) for at in times]) <= 21120


# ---- the hold while the token limit is unknown, step by step ---------------------------


def held_limiter() -> tuple[KindLimiter, object]:
    """A limiter told nothing about tokens that has granted one call at 0."""
    limiter = KindLimiter(CallKind.IMAGE, IMAGES_PER_MINUTE)
    permit = limiter.permit()
    limiter.granted(0.0, permit, PRICE_TABLE_GUESS)
    return limiter, permit


def test_a_call_priced_in_tokens_waits_for_the_first_answer():
    limiter, permit = held_limiter()
    assert limiter.next_grant_at(1.0, PRICE_TABLE_GUESS) > 1.0  # held, looked at again soon
    assert limiter.next_grant_at(1.0, 0) == 1.0  # not priced in tokens: the count pace only
    outcome = CallOutcome(CallKind.IMAGE, succeeded=True, tokens_used=MEDIUM_SQUARE,
                          permit=permit, headers={"x-ratelimit-limit-tokens": "21120"})
    assert not limiter.outcome_changes_nothing(outcome, 2.0)
    limiter.on_outcome(outcome, 2.0)
    assert limiter.next_grant_at(2.0, MEDIUM_SQUARE) == 3.0  # 60 × 1056 / 21120 after the first


def test_an_answer_without_a_token_limit_ends_the_hold_for_good():
    limiter, permit = held_limiter()
    limiter.on_outcome(CallOutcome(CallKind.IMAGE, succeeded=True, permit=permit,
                                   headers={"x-ratelimit-limit-requests": "100"}), 2.0)
    limiter.granted(2.0, limiter.permit(), PRICE_TABLE_GUESS)
    assert limiter.next_grant_at(2.6, PRICE_TABLE_GUESS) == 2.6  # no token limit: no hold
    # Answers keep saying so: at most one state change a minute, within the TTL.
    quiet = CallOutcome(CallKind.IMAGE, succeeded=True, headers={"x-ratelimit-limit-requests": "100"})
    assert limiter.outcome_changes_nothing(quiet, 30.0)
    assert not limiter.outcome_changes_nothing(quiet, 62.0)


def test_a_failed_or_lost_call_frees_the_next_one():
    limiter, _ = held_limiter()
    limiter.on_outcome(CallOutcome(CallKind.IMAGE), 1.0)  # a 500: no limits shown
    limiter.granted(1.0, limiter.permit(), PRICE_TABLE_GUESS)
    assert limiter.next_grant_at(1.6, PRICE_TABLE_GUESS) > 1.6  # the next one is held
    # Its caller was cancelled and never reports: the lease ends the hold.
    assert limiter.next_grant_at(1.0 + UNKNOWN_TOKENS_LEASE_S, PRICE_TABLE_GUESS) == (
        1.0 + UNKNOWN_TOKENS_LEASE_S)


def test_a_state_written_before_the_hold_existed_restores():
    limit = AdaptiveLimit(IMAGES_PER_MINUTE)
    old = {key: value for key, value in limit.state().items()
           if key not in ("answered_at", "outcome_at")}
    limit.restore(old)
    assert limit.state()["answered_at"] is None


async def test_a_fleet_waits_for_one_answer_then_paces_evenly(autojump_clock):
    """Two processes over one budget: the second is held too until the first one's call is
    answered, then both together keep the token pace."""
    with trio.fail_after(300):
        store = MemoryStore()
        account = Account(IMAGES_PER_MINUTE, TOKENS_PER_MINUTE)
        statuses = [RateLimiterStatus(budget=Budget(store, worker=name)) for name in "ab"]
        start = trio.current_time()
        async with running(statuses[0], images_per_minute=IMAGES_PER_MINUTE) as (permits_a, _), \
                running(statuses[1], images_per_minute=IMAGES_PER_MINUTE) as (permits_b, _):
            async with trio.open_nursery() as ghosts:
                for number in range(GHOSTS):
                    permits_send = permits_a if number % 2 else permits_b
                    ghosts.start_soon(functools.partial(ghost, permits_send, account, MEDIUM_SQUARE))
        times = [at - start for at, accepted in account.calls if accepted]
        assert all(accepted for _, accepted in account.calls)
        assert times[1] >= CALL_S  # nothing before the first answer
        assert max(b - a for a, b in zip(times, times[1:], strict=False)) <= 3.0 + EDGE_MARGIN_S + 1e-9, times
        assert steady_rate(times) >= 0.97 * 20
        assert most_tokens_in_any_window([(at, MEDIUM_SQUARE) for at in times]) <= TOKENS_PER_MINUTE
