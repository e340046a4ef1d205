"""The account's budget under the autojump clock: tokens per minute as well as calls, and
several rate limiters sharing one budget as the processes of a fleet do.

A "fleet" here is several `rate_limiter` actors, each with its own `Budget` (its own
worker name, as each process has), all over one `MemoryStore`: the same decisions as
with PostgreSQL (`dynamo.database.fleet_store`), minus the SQL, which tests/integration/test_fleet_budget.py
covers against the real database.
"""

import functools
from contextlib import asynccontextmanager

import trio
import trio.testing

from actors import rate_limiter
from dynamo.limits.budget import Budget, BudgetUnavailable, KindConfig, MemoryStore
from dynamo.limits.kind import KindLimiter
from dynamo.limits.permits import CallKind, CallOutcome, acquire_permit, report_outcome
from dynamo.limits.state import RateLimiterStatus
from dynamo.limits.window import EDGE_MARGIN_S, WINDOW_S, Grant, SlidingWindow
from dynamo.openai_port.rate_headers import parse_ratelimit_headers

MEDIUM_SQUARE = 1056  # usage.total_tokens of a 1024x1024 image at quality medium
PERMITS_CAPACITY = 8


def most_in_any_window(times, window_s=WINDOW_S):
    times, most, first = sorted(times), 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def most_tokens_in_any_window(grants, window_s=WINDOW_S):
    """grants: (time, tokens); the most tokens any window (t-60, t] holds."""
    grants = sorted(grants)
    return max(sum(n for s, n in grants if t - window_s < s <= t) for t, _ in grants)


# ---- the window, pure ------------------------------------------------------------------


def test_tokens_bind_before_calls_20_a_minute_evenly_spaced():
    window, times, now = SlidingWindow(100, token_limit=21120), [], 0.0
    for _ in range(45):
        now = window.next_allowed(now, MEDIUM_SQUARE)
        window.record(Grant(now, MEDIUM_SQUARE))
        times.append(now)
    # Every 3 s (60 × 1056 / 21120); the call that refills the window waits the edge margin.
    assert times[:21] == [3.0 * n for n in range(20)] + [60.5]
    assert [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)].count(3.0) == 42
    assert most_tokens_in_any_window([(t, MEDIUM_SQUARE) for t in times]) <= 21120
    assert most_in_any_window(times) == 20


def test_calls_bind_when_tokens_are_plenty():
    window, times, now = SlidingWindow(5, token_limit=1_000_000), [], 0.0
    for _ in range(6):
        now = window.next_allowed(now, MEDIUM_SQUARE)
        window.record(Grant(now, MEDIUM_SQUARE))
        times.append(now)
    assert times == [0, 12, 24, 36, 48, 60.5]


def test_a_call_larger_than_the_whole_token_limit_waits_for_an_empty_window():
    window = SlidingWindow(100, token_limit=1000)
    window.record(Grant(0.0, 400))
    window.record(Grant(10.0, 400))
    assert window.next_allowed(11.0, 5000) == 70.5  # alone in its window, never with others


def test_varied_costs_stay_under_the_token_limit():
    for costs, share in (((1070, 1100, 1085, 1126), 0.97),  # one quality, prompts vary
                         ((272, 1056, 4160), 0.75)):  # low, medium, high mixed
        window, grants, now = SlidingWindow(100, token_limit=21120), [], 0.0
        for n in range(400):
            tokens = costs[n % len(costs)]
            now = window.next_allowed(now, tokens)
            window.record(Grant(now, tokens))
            grants.append((now, tokens))
        assert most_tokens_in_any_window(grants) <= 21120
        # A window holds whole calls only: what is left over cannot be used.
        assert sum(tokens for at, tokens in grants if at < 600) >= share * 21120 * 10


# ---- learning token limits -------------------------------------------------------------


def test_a_token_limit_shown_caps_the_tokens_and_keeps_the_call_rate():
    limiter = KindLimiter(CallKind.IMAGE, 100)
    limiter.on_outcome(CallOutcome(CallKind.IMAGE, succeeded=True,
                                   limits=parse_ratelimit_headers({"x-ratelimit-limit-requests": "100",
                                            "x-ratelimit-limit-tokens": "21120"})), now=0)
    assert limiter.limit.token_ceiling(0) == 21120
    assert limiter.limit.effective_limit == 100


def test_a_429_explained_by_a_token_limit_lowers_tokens_not_calls():
    limiter = KindLimiter(CallKind.IMAGE, 100, configured_tokens=50_000)
    for at in range(0, 30, 3):
        limiter.granted(at, limiter.permit(), MEDIUM_SQUARE)
    limiter.on_outcome(CallOutcome(CallKind.IMAGE, rate_limited=True, limits=parse_ratelimit_headers({
        "x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "90",
        "x-ratelimit-limit-tokens": "10560", "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "31s"})), now=30)
    assert limiter.limit.token_ceiling(30) == 10560
    assert limiter.limit.effective_limit == 100
    assert limiter.limit.paused_until == 61  # no retry-after: the reset of the tokens


def test_an_answer_corrects_the_tokens_its_permit_was_granted():
    limiter = KindLimiter(CallKind.IMAGE, 100, configured_tokens=21120)
    permit = limiter.permit()
    limiter.granted(0, permit, MEDIUM_SQUARE)
    outcome = CallOutcome(CallKind.IMAGE, succeeded=True, tokens_used=1100, permit=permit)
    assert not limiter.outcome_changes_nothing(outcome, 1)
    limiter.on_outcome(outcome, now=1)
    assert limiter.limit.window.tokens(1) == 1100
    assert limiter.outcome_changes_nothing(outcome, 1)
    # Without its permit, only what is above the expected cost is added, from now on.
    limiter.on_outcome(CallOutcome(CallKind.IMAGE, succeeded=True, tokens_used=1200), 2,
                       expected_tokens=1100)
    assert limiter.limit.window.tokens(2) == 1200 and limiter.limit.window.count(2) == 1


# ---- the actor with tokens ----------------------------------------------------------------


@asynccontextmanager
async def running(status, *, images_per_minute=5, image_tokens=None, text_per_minute=500):
    jobs_send, jobs_recv = trio.open_memory_channel(0)
    generate_send, generate_recv = trio.open_memory_channel(0)
    permits_send, permits_recv = trio.open_memory_channel(PERMITS_CAPACITY)
    failures_send, failures_recv = trio.open_memory_channel(PERMITS_CAPACITY)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(
            rate_limiter.run, jobs_recv=jobs_recv, generate_send=generate_send,
            permits_recv=permits_recv, failures_send=failures_send,
            images_per_minute=images_per_minute, image_tokens_per_minute=image_tokens,
            text_per_minute=text_per_minute, status=status))
        yield permits_send, nursery
        nursery.cancel_scope.cancel()


async def image_calls(permits_send, nursery, grants, *, workers=4, used=MEDIUM_SQUARE,
                      asked=MEDIUM_SQUARE, call_s=5.0, who=None):
    """Generator workers making image calls back to back, reporting what each cost."""
    async def worker():
        while True:
            permit = await acquire_permit(permits_send, CallKind.IMAGE, tokens=asked)
            grants.append(trio.current_time() if who is None else (trio.current_time(), who))
            await trio.sleep(call_s)
            await report_outcome(permits_send, CallOutcome(
                CallKind.IMAGE, succeeded=True, tokens_used=used, permit=permit))

    for _ in range(workers):
        nursery.start_soon(worker)


async def test_tokens_binding_20_a_minute_evenly_spaced_through_the_actor(autojump_clock):
    """100 images/min but 21,120 tokens/min at 1,056 tokens an image: 20 a minute."""
    with trio.fail_after(700):
        async with running(RateLimiterStatus(), images_per_minute=100,
                           image_tokens=21120) as (permits_send, nursery):
            start, grants = trio.current_time(), []
            await image_calls(permits_send, nursery, grants)
            await trio.sleep(600)
            times = [t - start for t in grants]
            assert times[:4] == [0, 3, 6, 9]
            assert most_tokens_in_any_window([(t, MEDIUM_SQUARE) for t in times]) <= 21120
            assert sum(1 for t in times if t < 600) >= 0.97 * 20 * 10


async def test_unknown_costs_are_learned_from_the_answers(autojump_clock):
    """Permits asked without an expected cost (tokens=0) still keep to the token limit:
    the first answer's usage is counted, and later calls are expected to cost as much."""
    with trio.fail_after(700):
        status = RateLimiterStatus()
        async with running(status, images_per_minute=100,
                           image_tokens=21120) as (permits_send, nursery):
            start, grants = trio.current_time(), []
            await image_calls(permits_send, nursery, grants, asked=0, used=1100)
            await trio.sleep(600)
            times = [t - start for t in grants]
            assert most_tokens_in_any_window([(t, 1100) for t in times]) <= 21120
            assert sum(1 for t in times if t < 600) >= 0.97 * 21120 / 1100 * 10


async def test_a_price_table_guess_above_the_real_cost_gives_way_to_the_answers(autojump_clock):
    """The table expects 503 tokens an image (439 + the prompt's 64) but the answers say 460:
    10,000 tokens/min then hold 21 calls a minute, not the 19 the guess would space out."""
    with trio.fail_after(700):
        async with running(RateLimiterStatus(), images_per_minute=100,
                           image_tokens=10000) as (permits_send, nursery):
            start, grants = trio.current_time(), []
            await image_calls(permits_send, nursery, grants, asked=503, used=460)
            await trio.sleep(600)
            times = [t - start for t in grants]
            assert most_tokens_in_any_window([(t, 460) for t in times]) <= 10000
            # 21 whole calls in every 60.5 s (the window and its edge margin), 19 if the
            # guess still spaced them.
            whole_calls = 10000 // 460
            assert sum(1 for t in times if t < 600) >= 0.99 * whole_calls * 600 / (
                WINDOW_S + EDGE_MARGIN_S)


# ---- a fleet: limiters sharing one budget ------------------------------------------------


async def test_two_limiters_share_one_limit_exactly_and_take_turns(autojump_clock):
    with trio.fail_after(700):
        store = MemoryStore()
        statuses = [RateLimiterStatus(budget=Budget(store, worker=name)) for name in "ab"]
        async with running(statuses[0], images_per_minute=30) as (permits_a, nursery_a), \
                running(statuses[1], images_per_minute=30) as (permits_b, nursery_b):
            start, grants = trio.current_time(), []
            await image_calls(permits_a, nursery_a, grants, asked=0, used=0, who="a")
            await image_calls(permits_b, nursery_b, grants, asked=0, used=0, who="b")
            await trio.sleep(600)
            times = [t - start for t, _ in grants]
            # Together exactly as one: every 2 s, never 31 in a window, 97 % of the limit.
            assert times[:5] == [0, 2, 4, 6, 8]
            assert most_in_any_window(times) == 30
            assert sum(1 for t in times if t < 600) >= 0.97 * 300
            # In turns, once both are waiting (at the start, one may ask again before the
            # other has asked at all).
            whose = [who for _, who in grants]
            assert all(whose[n] != whose[n + 1] for n in range(2, len(whose) - 1)), [(n, grants[n]) for n in range(2, len(whose) - 1) if whose[n] == whose[n + 1]]
            assert abs(whose.count("a") - whose.count("b")) <= 2
            # What one learns applies to both: a 429 reported by b pauses a too.
            await report_outcome(permits_b, CallOutcome(CallKind.IMAGE, rate_limited=True,
                                                        retry_after_s=30))
            await trio.testing.wait_all_tasks_blocked()  # b's limiter took the report
            paused_at, before = trio.current_time(), len(grants)
            await trio.sleep(29)
            assert len(grants) == before
            await trio.sleep(2)
            assert len(grants) > before
            assert statuses[0].as_json()["kinds"]["image"]["calls_last_60s"] >= 1
            assert paused_at


async def test_a_limiter_that_stops_asking_loses_its_turn(autojump_clock):
    """A process that waits in line and then never comes back (it died) costs the others
    one call: the next in line is due one call's spacing after it, and goes then."""
    with trio.fail_after(100):
        store = MemoryStore()
        budgets = {name: Budget(store, worker=name) for name in "ab"}
        for budget in budgets.values():
            budget.configure({CallKind.IMAGE: KindConfig(30)})
        start = trio.current_time()
        granted = await budgets["a"].try_grant(CallKind.IMAGE, more=True)
        assert granted.permit is not None and granted.retry_in_s == 2  # a is due back at 2
        behind = await budgets["b"].try_grant(CallKind.IMAGE)
        assert behind.permit is None and behind.retry_in_s == 4  # one spacing after a
        await trio.sleep(4)  # a never comes back
        granted = await budgets["b"].try_grant(CallKind.IMAGE)
        assert granted.permit is not None and trio.current_time() - start == 4


async def test_one_viewer_in_one_process_is_not_starved_by_a_flood_in_both(autojump_clock):
    """Fair share across a fleet: viewer "v" has one request in process b, viewer "f" has
    a flood in both. b serves its viewers round robin and the budget serves the processes
    in turns, so v's image call is among the first few, not after the flood."""
    from tests.unit.test_rate_limiter_actor import job_for

    with trio.fail_after(300):
        store = MemoryStore()
        statuses = [RateLimiterStatus(budget=Budget(store, worker=name)) for name in "ab"]
        order = []
        async with running(statuses[0], images_per_minute=30) as (permits_a, _), \
                running(statuses[1], images_per_minute=30) as (permits_b, _):
            far = trio.current_time() + 900
            for status in statuses:
                for _ in range(20):
                    status.fair_queue.push(job_for("f", far))
            statuses[1].fair_queue.push(job_for("v", far))
            assert statuses[1].fair_queue.peek().viewer.twitch_user_id == "f"
            # Each process hands its next job to a worker, which calls the image API.
            async with trio.open_nursery() as workers:
                for status, permits_send in zip(statuses, (permits_a, permits_b), strict=True):
                    workers.start_soon(serve_queue, status, permits_send, order)
                await trio.sleep(60)
                workers.cancel_scope.cancel()
        viewers = [viewer for _, viewer in order]
        assert viewers.index("v") <= 3  # f (a), f (b), f (a), v (b): not the 41st
        assert most_in_any_window([t for t, _ in order]) <= 30


async def serve_queue(status, permits_send, order):
    """One generator worker of a process: its next job, then that job's image permit."""
    while (job := status.fair_queue.peek()) is not None:
        status.fair_queue.served(job)
        await acquire_permit(permits_send, CallKind.IMAGE)
        order.append((trio.current_time(), job.viewer.twitch_user_id))


# ---- the store unreachable ------------------------------------------------------------


class UnreachableStore(MemoryStore):
    """A store whose database is down until `back_at`."""

    def __init__(self, back_at: float):
        super().__init__()
        self.back_at = back_at

    async def transact(self, kind, config, step):
        if trio.current_time() < self.back_at:
            raise BudgetUnavailable("ConnectionRefusedError: [Errno 111] Connection refused")
        return await super().transact(kind, config, step)


async def test_no_permit_is_granted_blind_while_the_budget_is_unreachable(autojump_clock):
    with trio.fail_after(100):
        start = trio.current_time()
        status = RateLimiterStatus(budget=Budget(UnreachableStore(back_at=start + 10)))
        async with running(status) as (permits_send, nursery):
            # An answer that cannot be learned from is logged, and the actor goes on.
            await report_outcome(permits_send, CallOutcome(CallKind.TEXT, succeeded=True))
            await acquire_permit(permits_send, CallKind.IMAGE)
            waited = trio.current_time() - start
            assert 10 <= waited <= 10 + rate_limiter.STORE_RETRY_CAP_S
            await acquire_permit(permits_send, CallKind.TEXT)  # and text goes on as well


def test_a_raised_configured_limit_applies_at_once_a_learned_one_holds():
    """The fleet's state carries what the API taught, not one process's configuration: a
    rolling deploy raising DYNAMO_IMAGES_PER_MINUTE is not held back by the old value."""
    written_at_5 = KindLimiter(CallKind.IMAGE, 5).state()
    read_at_10 = KindLimiter(CallKind.IMAGE, 10)
    read_at_10.restore(written_at_5, [])
    assert read_at_10.limit.effective_limit == 10
    taught = KindLimiter(CallKind.IMAGE, 5)
    taught.on_outcome(CallOutcome(CallKind.IMAGE, rate_limited=True, retry_after_s=1,
                                  limits=parse_ratelimit_headers({"x-ratelimit-limit-requests": "4"})), now=0)
    read_at_10 = KindLimiter(CallKind.IMAGE, 10)
    read_at_10.restore(taught.state(), [])
    assert read_at_10.limit.effective_limit == 4
