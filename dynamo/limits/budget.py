"""The OpenAI account's budget of calls and tokens, however many processes share it.

The limits belong to the account, not to a process. A `Budget` decides every permit, and
learns from every answer, in one step on the kind's `KindLimiter` (the pure logic of
`dynamo.limits.kind`) that a store lends it under the store's lock:

- `MemoryStore`: the limiter lives in this process and trio's clock is the time base. A
  process alone uses it in tests; so do the tests' "fleets": limiters given budgets over
  one `MemoryStore` share its limits exactly, as the processes of a fleet do.
- `dynamo.database.fleet_store.PostgresStore`: the fleet's store. The limiter's history and learned
  state are rows in PostgreSQL, loaded and saved in one short transaction under an
  advisory lock, with the database's clock as the fleet's common time base.

Processes waiting for a permit of one kind take turns in the order they started waiting
(`KindLimiter.ahead_of`), so that no process, and no viewer whose request it holds, is
starved by the others. A budget holds no permit for later, with one exception that
keeps a busy fleet's database work small: far below the limits (`RESERVE_HEADROOM`), a
step of a shared store grants a process that has been busy the permits of the next half
second at the limit's pace too (`RESERVE_MAX` at most, each dated when it may be used),
so that most of its calls need no transaction. A reserved permit not used soon after
its time lapses and is given back by the next step; a process that dies leaves at most
those few, counted for a minute, well below the limit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import trio
from prometheus_client import Counter, Histogram

from dynamo import metrics
from dynamo.limits.kind import KindLimiter
from dynamo.limits.permits import CallKind, CallOutcome, Permit
from dynamo.limits.window import WINDOW_S

log = logging.getLogger(__name__)

T = TypeVar("T")

# A call is expected to cost at least the most any of this process's last few calls of its
# kind really cost: a prompt's own tokens come on top of the image's, and a price table
# may lag behind the API. Kept per process: it changes with every answer.
RECENT_COSTS = 8
# Until an answer has shown whether a kind is limited in tokens (and how much), this
# process sends calls priced in tokens one at a time: a burst made before the limit is
# known would have to be paid back by a stall when it leaves the window (issue 18). A
# call not answered within this long (the API is slow, or its caller was cancelled) lets
# the next one go, so that a hung API or a lost outcome never holds calls for long.
UNKNOWN_TOKENS_LEASE_S = 5.0
# Reserved permits (see the module's docstring): only while the window, with them, holds
# at most this share of every limit (calls, and tokens where a token limit is known);
# at most this many; those of the next RESERVE_S at the limit's pace; never more than
# this process handed out in the last DEMAND_S (a process called once a minute reserves
# none); each lapses RESERVE_S after its time. At 500 text calls/min: up to 4, 0.12 s apart.
RESERVE_HEADROOM = 0.5
RESERVE_MAX = 8
RESERVE_S = 0.5
DEMAND_S = 1.0

BUDGET_STEPS = Counter(
    "dynamo_budget_steps_total",
    "Decisions and lessons of the OpenAI budget, by kind and what they were",
    ["kind", "step"],
    registry=metrics.REGISTRY,
)
BUDGET_STEP_SECONDS = Histogram(
    "dynamo_budget_step_seconds",
    "Time one step of the OpenAI budget took (a database transaction for a fleet), by kind",
    ["kind"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=metrics.REGISTRY,
)


class BudgetUnavailable(Exception):
    """The budget's store cannot be reached now: no permit can be decided; ask again."""


@dataclasses.dataclass(frozen=True)
class KindConfig:
    """This process's configured limits for one kind (the API's may be lower)."""

    per_minute: float
    tokens_per_minute: float | None = None


@dataclasses.dataclass
class Decision:
    permit: Permit | None  # granted, or None
    # When to ask (again, or for the next caller after a grant): the process's turn.
    retry_in_s: float = 0.0


@dataclasses.dataclass
class _Reserved:
    """A permit granted ahead by a step: usable from `usable_at` until `lapses_at` (trio time)."""

    permit: Permit
    usable_at: float
    lapses_at: float


class Store(Protocol):
    shared: bool  # whether other processes share it

    async def transact(
        self, kind: CallKind, config: KindConfig, step: Callable[[KindLimiter, float], T]
    ) -> tuple[T, float, KindLimiter]:
        """Runs `step(limiter, now)` alone on the kind's limiter and keeps what it changed;
        returns its result, `now` and the limiter as `step` left it."""
        ...


class MemoryStore:
    """The limiters in this process's memory, on trio's clock."""

    shared = False

    def __init__(self) -> None:
        self._limiters: dict[CallKind, KindLimiter] = {}

    async def transact(self, kind, config, step):
        limiter = self._limiters.get(kind)
        if limiter is None:
            limiter = self._limiters[kind] = KindLimiter(
                kind, config.per_minute, config.tokens_per_minute
            )
        else:
            limiter.configure(config.per_minute, config.tokens_per_minute)
        now = trio.current_time()
        return step(limiter, now), now, limiter


@dataclasses.dataclass
class _Seen:
    """The limiter as the last step left it, and when, for /status and for telling which
    outcomes need no step at all."""

    limiter: KindLimiter
    store_now: float
    trio_now: float

    def now(self, trio_now: float | None = None) -> float:
        trio_now = trio.current_time() if trio_now is None else trio_now
        return self.store_now + (trio_now - self.trio_now)


class Budget:
    """This process's handle on the account's budget; `worker` names it among the fleet."""

    def __init__(self, store: Store | None = None, *, worker: str = "local"):
        self.store = store if store is not None else MemoryStore()
        self.worker = worker
        self.configs: dict[CallKind, KindConfig] = {}
        self._seen: dict[CallKind, _Seen] = {}
        self._recent_costs: dict[CallKind, deque[int]] = {}
        # kind -> when (trio time) this process sent a call while the token limit was
        # unknown, until an outcome of that kind comes back.
        self._probing: dict[CallKind, float] = {}
        self._reserved: dict[CallKind, deque[_Reserved]] = {}
        self._lapsed: dict[CallKind, list[uuid.UUID | None]] = {}  # given back by the next step
        self._handed: dict[CallKind, deque[float]] = {}  # trio times of permits handed out
        self._paced_until: dict[CallKind, float] = {}  # after the last reserved permit's time

    @property
    def shared(self) -> bool:
        return self.store.shared

    def configure(self, configs: Mapping[CallKind, KindConfig]) -> None:
        for kind, config in configs.items():
            KindLimiter(kind, config.per_minute, config.tokens_per_minute)  # validates
            self.configs[kind] = config
            self._recent_costs.setdefault(kind, deque(maxlen=RECENT_COSTS))

    def expected_tokens(self, kind: CallKind, requested: int = 0) -> int:
        """What the next call of `kind` will cost: the most any recent answer said (the
        price table's guess, `requested`, only until an answer said it)."""
        recent = self._recent_costs.get(kind)
        return max(recent) if recent else requested

    async def try_grant(self, kind: CallKind, tokens: int = 0, *, more: bool = False) -> Decision:
        """A permit for a call of `kind` expected to cost `tokens`, if it may start now and it
        is this process's turn; else when to ask again. `more`: other callers here wait
        too; then the process queues up for its next turn at once, and the decision says
        when that turn is due (so that it need not ask before)."""
        trio_now = trio.current_time()
        if kind in self._reserved:
            decision = self._from_reserve(kind, trio_now, more)
            if decision is not None:
                return decision
        paced_until = self._paced_until.pop(kind, trio_now)
        if paced_until > trio_now:
            # Its own last reserved permit spaces the next call: no step can grant before.
            self._paced_until[kind] = paced_until
            return Decision(None, paced_until - trio_now)
        expected = self.expected_tokens(kind, tokens)
        answered_here = bool(self._recent_costs.get(kind))
        demand = self._demand(kind, trio_now)
        ahead: list[tuple[Permit, float]] = []  # reserved by the step, kept once it is stored

        def attempt(limiter: KindLimiter, now: float) -> Decision:
            # Until this process has an answer of its own, another process's answer is a
            # better guess than the price table.
            cost = expected if answered_here or not limiter.last_cost else limiter.last_cost
            at = limiter.next_grant_at(now, cost)
            probe = cost > 0 and limiter.limit.tokens_unknown(now)
            # Held back by its own unanswered call (not by the budget), this process keeps
            # its place in line due when the budget allows, not when its wait ends: the
            # others' calls are spaced from that, not from the end of its lease.
            own_answer_s = self._probe_wait_s(kind) if probe else 0.0
            if at > now or own_answer_s > 0 or limiter.ahead_of(self.worker, now) is not None:
                turn_s = limiter.wait_turn(self.worker, now, at) - now
                return Decision(None, max(turn_s, own_answer_s))
            permit = limiter.permit()
            limiter.granted(now, permit, cost)
            limiter.end_turn(self.worker)
            if probe:
                self._probing[kind] = trio.current_time()
            else:
                ahead[:] = self._reserve_ahead(limiter, now, cost, demand)
            if not more or ahead:
                return Decision(permit)
            next_at = limiter.next_grant_at(now, cost)
            return Decision(permit, limiter.wait_turn(self.worker, now, next_at) - now)

        decision = await self._step(kind, attempt)
        BUDGET_STEPS.labels(kind.value, "granted" if decision.permit else "wait").inc()
        if decision.permit is not None:
            stored_at = trio.current_time()
            self._handed.setdefault(kind, deque()).append(stored_at)
            if ahead:
                self._reserved[kind] = deque(
                    _Reserved(permit, stored_at + after_s, stored_at + after_s + RESERVE_S)
                    for permit, after_s in ahead
                )
                interval_s = ahead[0][1]
                self._paced_until[kind] = stored_at + ahead[-1][1] + interval_s
                BUDGET_STEPS.labels(kind.value, "reserved").inc(len(ahead))
        return decision

    def _from_reserve(self, kind: CallKind, trio_now: float, more: bool) -> Decision | None:
        """A reserved permit if one is usable now, or when the next will be; None if none
        is left (then the store decides). Lapsed ones are set aside to be given back."""
        reserved = self._reserved[kind]
        while reserved and reserved[0].lapses_at <= trio_now:
            self._give_back(kind, [reserved.popleft()])
            BUDGET_STEPS.labels(kind.value, "reserve-lapsed").inc()
        if not reserved:
            del self._reserved[kind]
            return None
        if reserved[0].usable_at > trio_now:
            return Decision(None, reserved[0].usable_at - trio_now)
        permit = reserved.popleft().permit
        if not reserved:
            del self._reserved[kind]
        self._handed.setdefault(kind, deque()).append(trio_now)
        BUDGET_STEPS.labels(kind.value, "reserve-used").inc()
        if more and reserved:
            return Decision(permit, max(0.0, reserved[0].usable_at - trio_now))
        return Decision(permit)

    def _give_back(self, kind: CallKind, reserved) -> None:
        """Reserved permits that will not be used: the next step takes them out of the window."""
        self._lapsed.setdefault(kind, []).extend(entry.permit.grant_id for entry in reserved)

    def _demand(self, kind: CallKind, trio_now: float) -> int:
        """Permits this process handed out for `kind` in the last DEMAND_S."""
        handed = self._handed.get(kind)
        if handed is None:
            return 0
        while handed and handed[0] <= trio_now - DEMAND_S:
            handed.popleft()
        return len(handed)

    def _reserve_ahead(
        self, limiter: KindLimiter, now: float, cost: int, demand: int
    ) -> list[tuple[Permit, float]]:
        """Inside a step that granted a permit: the permits of the next RESERVE_S at the
        limit's pace as well (each with how long after now it may be used), if this
        process is busy, nobody else waits, and the window stays far below every limit
        with them."""
        # Reserving saves a shared store's transactions; in memory a step is free.
        if not self.shared or demand == 0 or limiter.turns or limiter.circuit.is_open:
            return []
        limit = limiter.limit
        if limit.paused_until > now or (cost > 0 and limit.tokens_unknown(now)):
            return []
        interval_s = WINDOW_S / limit.pace_per_minute(now)
        count = min(RESERVE_MAX, demand, math.floor(RESERVE_S / interval_s))
        count = min(count, math.floor(RESERVE_HEADROOM * limit.effective_limit) - limit.window.count(now))
        token_ceiling = limit.token_ceiling(now)
        if token_ceiling is not None and cost > 0:
            room = RESERVE_HEADROOM * token_ceiling - limit.window.tokens(now)
            count = min(count, math.floor(room / cost))
        ahead = []
        for n in range(1, count + 1):
            permit = limiter.permit()
            limiter.granted(now + n * interval_s, permit, cost)
            ahead.append((permit, n * interval_s))
        return ahead

    def _probe_wait_s(self, kind: CallKind) -> float:
        """How long until this process's unanswered call of `kind` stops holding the next
        (0: none is out). Its outcome ends the wait sooner (the rate limiter looks again)."""
        sent_at = self._probing.get(kind)
        if sent_at is None:
            return 0.0
        return max(0.0, sent_at + UNKNOWN_TOKENS_LEASE_S - trio.current_time())

    async def release(self, kind: CallKind, permit: Permit) -> None:
        """Gives back a permit nobody used (its caller left before it was handed over)."""

        def give_back(limiter: KindLimiter, now: float) -> None:
            limiter.limit.window.remove(permit.grant_id)
            if permit.probe:
                limiter.circuit.probe_returned()

        await self._step(kind, give_back)
        self._probing.pop(kind, None)
        BUDGET_STEPS.labels(kind.value, "released").inc()

    async def report(self, outcome: CallOutcome) -> bool:
        """Learns from a call's answer; False if it taught nothing new (most successes),
        and then no step was taken, and it freed no call waiting for it."""
        kind = outcome.kind
        if (outcome.rate_limited or outcome.auth_failed) and kind in self._reserved:
            # The limits moved: permits reserved under the old ones are given back.
            self._give_back(kind, self._reserved.pop(kind))
            self._paced_until.pop(kind, None)
        expected = self.expected_tokens(kind)
        if outcome.tokens_used is not None:
            self._recent_costs[kind].append(outcome.tokens_used)
        probed = self._probing.pop(kind, None) is not None
        seen = self._seen.get(kind)
        if seen is not None and seen.limiter.outcome_changes_nothing(outcome, seen.now(), expected):
            BUDGET_STEPS.labels(kind.value, "outcome-skipped").inc()
            return probed
        await self._step(kind, lambda limiter, now: limiter.on_outcome(outcome, now, expected))
        BUDGET_STEPS.labels(kind.value, "outcome").inc()
        return True

    async def refresh(self, kind: CallKind) -> None:
        """Looks at the kind's state without changing it (for /status)."""
        await self._step(kind, lambda limiter, now: None)

    def view(
        self, kind: CallKind, trio_now: float | None = None
    ) -> tuple[KindLimiter, float] | None:
        """The kind's limiter as last seen, and the store's time now; None if never seen.
        Permits this process reserved and has not used are left out: the fleet counts
        them, but they are not calls made (what /status shows)."""
        seen = self._seen.get(kind)
        if seen is None:
            return None
        limiter = seen.limiter
        unused = [reserved.permit.grant_id for reserved in self._reserved.get(kind, ())]
        unused += self._lapsed.get(kind, [])
        if unused:
            left_out = set(unused)
            shown = KindLimiter(kind, limiter.limit.configured, limiter.limit.configured_tokens)
            grants = [grant for grant in limiter.limit.window.grants() if grant.id not in left_out]
            shown.restore(limiter.state(), grants)  # as a fleet's step rebuilds it
            limiter = shown
        return limiter, seen.now(trio_now)

    async def _step(self, kind: CallKind, step: Callable[[KindLimiter, float], Any]):
        started = trio.current_time()
        lapsed = self._lapsed.pop(kind, [])
        if lapsed:
            # Reserved permits that went unused leave the window with this step.
            given_back = step

            def step(limiter: KindLimiter, now: float):
                for grant_id in lapsed:
                    limiter.limit.window.remove(grant_id)
                return given_back(limiter, now)

        try:
            result, now, limiter = await self.store.transact(kind, self.configs[kind], step)
        except BaseException:
            if lapsed:
                self._lapsed.setdefault(kind, []).extend(lapsed)
            raise
        finished = trio.current_time()
        BUDGET_STEP_SECONDS.labels(kind.value).observe(finished - started)
        self._seen[kind] = _Seen(limiter, now, finished)
        return result
