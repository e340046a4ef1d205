"""Pacing under a tokens-per-minute limit that dynamo is not told, under the autojump clock
(issue 18): a process sends calls priced in tokens one at a time until an answer shows
the limit, so that pacing is even from the first call and the window's edge never stalls.

The API here is a few lines that count as the fake OpenAI does: every call arriving in
the last 60 s and its tokens, answered after `CALL_S` with x-ratelimit-* headers, or
refused with a 429 when a limit would be exceeded.
"""

import collections
import functools

import pytest
import trio

from dynamo.limits.adaptive import AdaptiveLimit
from dynamo.limits.budget import UNKNOWN_TOKENS_LEASE_S, Budget, KindConfig, MemoryStore
from dynamo.limits.kind import KindLimiter
from dynamo.limits.permits import CallKind, CallOutcome, acquire_permit, report_outcome
from dynamo.limits.state import RateLimiterStatus
from dynamo.limits.window import EDGE_MARGIN_S, WINDOW_S, Grant, SlidingWindow
from dynamo.openai_port.rate_headers import parse_ratelimit_headers
from tests.support.timeouts import VIRTUAL_S
from tests.unit.test_budget import MEDIUM_SQUARE, most_tokens_in_any_window, running

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
                CallKind.IMAGE, succeeded=True, limits=parse_ratelimit_headers(headers), tokens_used=cost, permit=permit))
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
    with trio.fail_after(VIRTUAL_S):
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
    with trio.fail_after(VIRTUAL_S):
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


# ---- one call at a time while the token limit is unknown, step by step ------------------


def budget_told_nothing_about_tokens() -> Budget:
    budget = Budget(MemoryStore())
    budget.configure({CallKind.IMAGE: KindConfig(IMAGES_PER_MINUTE)})
    return budget


async def test_a_call_priced_in_tokens_waits_for_the_first_answer(autojump_clock):
    with trio.fail_after(VIRTUAL_S):
        budget, start = budget_told_nothing_about_tokens(), trio.current_time()
        first = await budget.try_grant(CallKind.IMAGE, PRICE_TABLE_GUESS)
        await trio.sleep(1.0)  # the count limit alone would let the next go after 0.6 s
        held = await budget.try_grant(CallKind.IMAGE, PRICE_TABLE_GUESS)
        assert first.permit is not None and held.permit is None
        assert held.retry_in_s <= UNKNOWN_TOKENS_LEASE_S - 1.0
        # Not priced in tokens (a text call's way): the count limit only.
        assert (await budget.try_grant(CallKind.IMAGE, 0)).permit is not None
        await trio.sleep(1.0)
        assert await budget.report(CallOutcome(
            CallKind.IMAGE, succeeded=True, tokens_used=MEDIUM_SQUARE, permit=first.permit,
            limits=parse_ratelimit_headers({"x-ratelimit-limit-tokens": str(TOKENS_PER_MINUTE)})))
        # Known now: 60 × 1056 / 21120 = 3 s after the last call (the one at 1.0 s).
        decision = await budget.try_grant(CallKind.IMAGE, PRICE_TABLE_GUESS)
        assert decision.permit is None
        assert trio.current_time() - start + decision.retry_in_s == pytest.approx(4.0)


async def test_an_answer_without_a_token_limit_ends_the_wait_for_good(autojump_clock):
    with trio.fail_after(VIRTUAL_S):
        budget = budget_told_nothing_about_tokens()
        first = await budget.try_grant(CallKind.IMAGE, PRICE_TABLE_GUESS)
        await budget.report(CallOutcome(CallKind.IMAGE, succeeded=True, permit=first.permit,
                                        limits=parse_ratelimit_headers({"x-ratelimit-limit-requests": "100"})))
        for _ in range(3):  # one every 0.6 s, as 100/min allows
            await trio.sleep(0.6)
            assert (await budget.try_grant(CallKind.IMAGE, PRICE_TABLE_GUESS)).permit is not None
        # Answers keep saying so: the shared state changes at most once a minute.
        limiter = KindLimiter(CallKind.IMAGE, IMAGES_PER_MINUTE)
        quiet = CallOutcome(CallKind.IMAGE, succeeded=True,
                            limits=parse_ratelimit_headers({"x-ratelimit-limit-requests": "100"}))
        limiter.on_outcome(quiet, 0.0)
        assert limiter.outcome_changes_nothing(quiet, 30.0)
        assert not limiter.outcome_changes_nothing(quiet, 62.0)


async def test_a_failed_or_lost_call_frees_the_next_one(autojump_clock):
    with trio.fail_after(VIRTUAL_S):
        budget = budget_told_nothing_about_tokens()
        await budget.try_grant(CallKind.IMAGE, PRICE_TABLE_GUESS)
        # A 500 shows no limits, but it is an outcome: the next call may go.
        assert await budget.report(CallOutcome(CallKind.IMAGE))
        await trio.sleep(0.6)
        assert (await budget.try_grant(CallKind.IMAGE, PRICE_TABLE_GUESS)).permit is not None
        # That one is never answered (its caller was cancelled, or the API hangs): the
        # next goes after the lease.
        await trio.sleep(0.6)
        held = await budget.try_grant(CallKind.IMAGE, PRICE_TABLE_GUESS)
        assert held.permit is None
        await trio.sleep(held.retry_in_s)
        assert (await budget.try_grant(CallKind.IMAGE, PRICE_TABLE_GUESS)).permit is not None


def test_a_state_written_before_issue_18_restores():
    limit = AdaptiveLimit(IMAGES_PER_MINUTE)
    old = {key: value for key, value in limit.state().items() if key != "answered_at"}
    limit.restore(old)
    assert limit.state()["answered_at"] is None and limit.tokens_unknown(0.0)


async def test_a_fleet_sends_one_call_per_process_then_paces_evenly(autojump_clock):
    """Two processes over one budget: each sends one call before the first answer (a
    process knows only of its own calls in flight: a process that died with one out holds
    nobody up), then together they keep the pace."""
    with trio.fail_after(VIRTUAL_S):
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
        assert sum(1 for at in times if at < CALL_S) <= 2  # one each at most
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        # The second process's call came 0.6 s after the first instead of 3 s: the window
        # pays those 2.4 s back once, at its first edge.
        assert max(gaps) <= 3.0 + EDGE_MARGIN_S + (3.0 - 0.6) + 1e-9, times
        assert steady_rate(times) >= 0.95 * 20
        assert most_tokens_in_any_window([(at, MEDIUM_SQUARE) for at in times]) <= TOKENS_PER_MINUTE


async def test_a_process_waiting_for_its_own_answer_holds_no_other_process_up(autojump_clock):
    """Three processes told 30 images/min, the token limit not known yet: a process whose
    first call is unanswered waits for it, and the others' calls still go out at the
    count's spacing (2 s) from the start, with no gap while the limit is being learned."""
    with trio.fail_after(VIRTUAL_S):
        store = MemoryStore()
        account = Account(30, 10**9)
        statuses = [RateLimiterStatus(budget=Budget(store, worker=name)) for name in "abc"]
        start = trio.current_time()
        async with running(statuses[0], images_per_minute=30) as (permits_a, _), \
                running(statuses[1], images_per_minute=30) as (permits_b, _), \
                running(statuses[2], images_per_minute=30) as (permits_c, _):
            async with trio.open_nursery() as ghosts:
                for number in range(12):
                    permits_send = (permits_a, permits_b, permits_c)[number % 3]
                    ghosts.start_soon(functools.partial(ghost, permits_send, account, MEDIUM_SQUARE))
        times = [at - start for at, accepted in account.calls if accepted]
        assert len(times) == 12 and all(accepted for _, accepted in account.calls)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert max(gaps) <= 2.0 + 1e-6, times
