"""Reserved permits (issue 18): far below the limits, a busy process's step of a shared
budget grants the permits of the next half second too, so that most calls take no
transaction; near a limit, for a process called now and then, or with another process
in line, it reserves nothing, and what it does not use is given back."""

import functools

import trio

from actors import rate_limiter
from dynamo.limits import budget as budget_module
from dynamo.limits.budget import RESERVE_MAX, RESERVE_S, Budget, KindConfig, MemoryStore
from dynamo.limits.permits import CallKind, CallOutcome, acquire_permit, report_outcome
from dynamo.limits.state import RateLimiterStatus
from dynamo.limits.window import WINDOW_S


class CountingStore(MemoryStore):
    """The in-memory store, counting its steps (a fleet's store makes each a transaction)."""

    shared = True

    def __init__(self):
        super().__init__()
        self.steps = 0

    async def transact(self, kind, config, step):
        self.steps += 1
        return await super().transact(kind, config, step)


def budget_for(store, per_minute, *, worker="a", tokens_per_minute=None):
    budget = Budget(store, worker=worker)
    budget.configure({CallKind.TEXT: KindConfig(per_minute, tokens_per_minute)})
    return budget


_next_ask = {}


async def take(budget, kind=CallKind.TEXT, tokens=0, *, more=True):
    """Asks until a permit comes, as the rate limiter does (also when the last decision
    said to ask again); (permit, when it came)."""
    await trio.sleep_until(_next_ask.pop(id(budget), 0.0))
    while True:
        decision = await budget.try_grant(kind, tokens, more=more)
        if decision.permit is not None:
            _next_ask[id(budget)] = trio.current_time() + decision.retry_in_s
            return decision.permit, trio.current_time()
        await trio.sleep(decision.retry_in_s)


async def until_some_are_reserved(budget, kind=CallKind.TEXT):
    """Takes permits back to back until the budget holds reserved ones; how many it took."""
    taken = 0
    while not budget._reserved.get(kind):
        await take(budget, kind)
        taken += 1
        assert taken < 10, "nothing reserved"
    return taken


def window_of(store, kind=CallKind.TEXT):
    return store._limiters[kind].limit.window


async def test_a_busy_process_far_below_the_limit_takes_most_permits_without_a_step(
    autojump_clock,
):
    store = CountingStore()
    budget = budget_for(store, 6000)  # a call every 10 ms at the limit's pace
    times = []
    for _ in range(200):
        _, at = await take(budget)
        times.append(at)
    # One step grants its own permit and up to RESERVE_MAX more (fewer while the process
    # has handed out fewer than that in the last second, i.e. at the start).
    assert store.steps <= 200 / (1 + RESERVE_MAX) + 5, store.steps
    # Still paced as the limit says: never closer than 60/6000 s, never more in a window.
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= WINDOW_S / 6000 - 1e-9
    assert window_of(store).count(trio.current_time()) <= 200 + RESERVE_MAX


async def test_the_process_alone_in_memory_reserves_nothing(autojump_clock):
    store = MemoryStore()  # not shared: a step costs nothing, nothing is reserved
    budget = budget_for(store, 6000)
    for _ in range(50):
        await take(budget)
    assert not budget._reserved
    assert window_of(store).count(trio.current_time()) == 50


async def test_a_process_called_now_and_then_reserves_nothing(autojump_clock):
    store = CountingStore()
    budget = budget_for(store, 6000)
    for _ in range(20):
        await take(budget)
        await trio.sleep(2.0)  # nothing handed out in the last second before each ask
    assert store.steps == 20
    assert window_of(store).count(trio.current_time()) == 20


async def test_near_the_limit_nothing_is_reserved(autojump_clock):
    """500/min (a call every 0.12 s): reserving stops once the window holds half of it."""
    store = CountingStore()
    budget = budget_for(store, 500)
    took_a_step = []
    for _ in range(400):  # 48 s at the limit's pace: all of them within one window
        before = store.steps
        await take(budget)
        took_a_step.append(store.steps > before)
    assert took_a_step[:250].count(False) > 100  # far below the limit: mostly reserved
    assert all(took_a_step[260:])  # past half of it, every permit is a step of its own
    assert window_of(store).count(trio.current_time()) == 400


async def test_unused_reserved_permits_are_given_back_by_the_next_step(autojump_clock):
    store = CountingStore()
    budget = budget_for(store, 6000)
    taken = await until_some_are_reserved(budget)
    reserved = len(budget._reserved[CallKind.TEXT])
    assert window_of(store).count(trio.current_time()) == taken + reserved
    await trio.sleep(RESERVE_S + 1.0)  # they lapse
    await take(budget)
    # The lapsed ones left the window with that step: only the calls made are counted
    # (that step reserves nothing: nothing was handed out in the last second).
    assert not budget._reserved
    assert window_of(store).count(trio.current_time()) == taken + 1


async def test_a_429_gives_the_reserved_permits_back(autojump_clock):
    store = CountingStore()
    budget = budget_for(store, 6000)
    taken = await until_some_are_reserved(budget)
    await budget.report(CallOutcome(CallKind.TEXT, rate_limited=True, retry_after_s=5))
    assert not budget._reserved
    assert window_of(store).count(trio.current_time()) == taken
    decision = await budget.try_grant(CallKind.TEXT)
    assert decision.permit is None  # paused: no reserved permit hands a call out either


async def test_with_another_process_in_line_nothing_is_reserved(autojump_clock):
    store = CountingStore()
    a, b = budget_for(store, 6000, worker="a"), budget_for(store, 6000, worker="b")
    await until_some_are_reserved(a)
    # b asks while a's reserved permits come first: b waits in line.
    decision = await b.try_grant(CallKind.TEXT, more=True)
    assert decision.permit is None and "b" in store._limiters[CallKind.TEXT].turns
    # a's reserve runs out (as if used or lapsed): its next step sees b in line.
    a._reserved.clear()
    a._paced_until.clear()
    await a.try_grant(CallKind.TEXT, more=True)
    assert not a._reserved


async def test_a_token_limit_not_yet_known_reserves_nothing(autojump_clock):
    store = CountingStore()
    budget = Budget(store, worker="a")
    budget.configure({CallKind.IMAGE: KindConfig(6000)})
    for _ in range(10):
        permit, _ = await take(budget, CallKind.IMAGE, tokens=1056)
        await budget.report(CallOutcome(CallKind.IMAGE, succeeded=True, tokens_used=1056,
                                        permit=permit))
    # Calls priced in tokens go one at a time until an answer shows the limit, then may
    # be reserved: the answers here showed none (no headers), so after the first, some are.
    assert store.steps < 2 * 10


async def test_through_the_actor_a_flood_of_text_calls_takes_few_steps(autojump_clock):
    store = CountingStore()
    status = RateLimiterStatus(budget=Budget(store, worker="a"))
    jobs_send, jobs_recv = trio.open_memory_channel(0)
    generate_send, _generate_recv = trio.open_memory_channel(0)
    permits_send, permits_recv = trio.open_memory_channel(8)
    failures_send, _failures_recv = trio.open_memory_channel(8)
    granted = []

    async def caller():
        for _ in range(25):
            permit = await acquire_permit(permits_send, CallKind.TEXT)
            granted.append(trio.current_time())
            await report_outcome(permits_send, CallOutcome(CallKind.TEXT, succeeded=True,
                                                           permit=permit))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(
                rate_limiter.run, jobs_recv=jobs_recv, generate_send=generate_send,
                permits_recv=permits_recv, failures_send=failures_send,
                images_per_minute=5, text_per_minute=60000, status=status))
            async with trio.open_nursery() as callers:
                for _ in range(4):
                    callers.start_soon(caller)
            nursery.cancel_scope.cancel()
    assert len(granted) == 100
    assert store.steps < 100 / 2, store.steps
    assert budget_module.BUDGET_STEPS.labels("text", "reserve-used")._value.get() > 0


async def test_a_process_first_in_line_takes_its_permit_but_reserves_none_for_later(
    autojump_clock,
):
    """Both wait out a pause; a is first in line and gets its permit, but with b waiting
    behind it, a reserves nothing that b would have to wait for."""
    store = CountingStore()
    a, b = budget_for(store, 6000, worker="a"), budget_for(store, 6000, worker="b")
    for _ in range(5):
        await take(a)  # a is busy
    a._reserved.clear()
    a._paced_until.clear()
    await a.report(CallOutcome(CallKind.TEXT, rate_limited=True, retry_after_s=0.3))
    first = await a.try_grant(CallKind.TEXT, more=True)
    second = await b.try_grant(CallKind.TEXT, more=True)
    assert first.permit is None and second.permit is None
    await trio.sleep(first.retry_in_s)
    granted = await a.try_grant(CallKind.TEXT, more=True)
    assert granted.permit is not None
    assert not a._reserved


async def test_status_counts_the_calls_made_not_the_permits_reserved(autojump_clock):
    store = CountingStore()
    status = RateLimiterStatus(budget=budget_for(store, 6000))
    taken = await until_some_are_reserved(status.budget)
    reserved = len(status.budget._reserved[CallKind.TEXT])
    assert window_of(store).count(trio.current_time()) == taken + reserved  # the fleet's view
    assert status.as_json()["kinds"]["text"]["calls_last_60s"] == taken
    await trio.sleep(RESERVE_S + 1.0)  # lapsed, not yet given back: still not calls
    status.budget._from_reserve(CallKind.TEXT, trio.current_time(), False)
    assert status.budget._lapsed[CallKind.TEXT]
    assert status.as_json()["kinds"]["text"]["calls_last_60s"] == taken
