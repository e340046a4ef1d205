"""Everything the account's budget knows about one kind of OpenAI call: `KindLimiter`.

Pure logic on times passed in: the window and adaptive limit (`dynamo.limits.adaptive`),
the auth circuit, what calls of this kind really cost in tokens, and whose turn it is
among the processes waiting for a permit. Its state is plain JSON (`state()` /
`restore()`), so that a budget store can keep it in memory or in PostgreSQL.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping

from dynamo.limits.adaptive import AdaptiveLimit
from dynamo.limits.permits import CallKind, CallOutcome, Permit
from dynamo.limits.window import WINDOW_S, Grant
from dynamo.supervision.backoff import Backoff

log = logging.getLogger(__name__)

# A refused key is probed after 5 s, then 10, 20, 40, 60, 60 ... s.
PROBE_BASE_S = 5.0
PROBE_CAP_S = 60.0
PROBE_BACKOFF = Backoff(base_s=PROBE_BASE_S, cap_s=PROBE_CAP_S, floor=1.0)
# A probe whose outcome is never reported (its caller crashed) frees the turn after this.
PROBE_LEASE_S = 120.0
# A process waiting for its turn keeps it while it comes back within this long of the
# time it was told; one that does not (it died, or is late) loses it to the next, which
# is due one call's spacing later: a process that dies in line costs the fleet one call.
TURN_GRACE_S = 0.5


class AuthCircuit:
    """Open after a 401/403: only probe permits, one at a time, spaced 5, 10, 20, 40, 60,
    60 ... s after each failed probe, until a probe succeeds."""

    def __init__(self) -> None:
        self.is_open = False
        self._failed_probes = 0
        self._next_probe_at = -math.inf
        self._probe_granted_at: float | None = None

    def open(self, now: float) -> None:
        if not self.is_open:
            self.is_open, self._failed_probes, self._probe_granted_at = True, 0, None
            self._next_probe_at = now + PROBE_BASE_S

    def close(self) -> None:
        self.is_open, self._probe_granted_at = False, None

    def probe_at(self) -> float:
        """When the next probe may go out (while one is out: when its lease ends)."""
        if self._probe_granted_at is not None:
            return max(self._next_probe_at, self._probe_granted_at + PROBE_LEASE_S)
        return self._next_probe_at

    def probe_granted(self, now: float) -> None:
        self._probe_granted_at = now

    def probe_returned(self) -> None:
        """The probe permit was never used: the next one may go at once."""
        self._probe_granted_at = None

    def probe_failed(self, now: float) -> None:
        self._failed_probes += 1
        self._schedule_probe(now)

    def probe_inconclusive(self, now: float) -> None:
        """The probe failed for another reason (5xx, network): the key is still unknown."""
        self._schedule_probe(now)

    def _schedule_probe(self, now: float) -> None:
        self._probe_granted_at = None
        self._next_probe_at = now + PROBE_BACKOFF.delay_s(self._failed_probes)

    def state(self) -> dict:
        next_probe = self._next_probe_at
        return {
            "open": self.is_open,
            "failed_probes": self._failed_probes,
            "next_probe_at": next_probe if math.isfinite(next_probe) else None,
            "probe_granted_at": self._probe_granted_at,
        }

    def restore(self, state: Mapping) -> None:
        self.is_open, self._failed_probes = state["open"], state["failed_probes"]
        self._next_probe_at = (
            -math.inf if state["next_probe_at"] is None else state["next_probe_at"]
        )
        self._probe_granted_at = state["probe_granted_at"]


class KindLimiter:
    """One kind of call: its window and limits, its circuit, its costs, and the turns of
    the processes (`worker`s) waiting for it."""

    def __init__(
        self,
        kind: CallKind,
        configured: float,
        configured_tokens: float | None = None,
        *,
        rng=random,
    ):
        self.kind = kind
        self.limit = AdaptiveLimit(configured, configured_tokens, rng=rng)
        self.limit.label = f"openai {kind.value}"
        self.circuit = AuthCircuit()
        # worker -> (ticket, expected back at): the fleet's queue for permits, in the
        # order the processes started waiting.
        self.turns: dict[str, tuple[int, float]] = {}
        self._next_ticket = 0
        # What the latest answer said a call cost, for a process that has had no answer
        # of its own yet (its first call would otherwise be spaced by a price table's guess).
        self.last_cost: int | None = None

    def configure(self, per_minute: float, tokens_per_minute: float | None) -> None:
        self.limit.configured = per_minute
        self.limit.configured_tokens = tokens_per_minute

    def next_grant_at(self, now: float, tokens: int = 0) -> float:
        at = self.limit.next_allowed(now, tokens)
        if self.circuit.is_open:
            at = max(at, self.circuit.probe_at())
        return at

    def permit(self) -> Permit:
        return Permit(probe=self.circuit.is_open)

    def granted(self, now: float, permit: Permit, tokens: int = 0) -> None:
        """Counts a permit given out: its caller calls the API right away."""
        grant = Grant(now, tokens)
        permit.grant_id = grant.id
        self.limit.record(grant)
        if permit.probe:
            self.circuit.probe_granted(now)

    # -- turns: processes waiting for a permit are served in the order they came --------

    def ahead_of(self, worker: str, now: float) -> float | None:
        """When the last of the processes ahead of `worker` in line (still expected) comes
        back for its permit; None if `worker` is first. One not yet in line is last."""
        mine = self.turns[worker][0] if worker in self.turns else math.inf
        backs = [
            back_at
            for ticket, back_at in self.turns.values()
            if ticket < mine and now < back_at + TURN_GRACE_S
        ]
        return max(backs) if backs else None

    def wait_turn(self, worker: str, now: float, at: float) -> float:
        """Puts `worker` in line (keeping its place if it is in it already), due back when
        its call may start: at `at`, or one call's spacing after the last process ahead
        of it. Returns that time."""
        for other, (_, back_at) in list(self.turns.items()):
            if now >= back_at + TURN_GRACE_S:
                del self.turns[other]  # it stopped coming back: its place is lost
        if worker in self.turns:
            ticket = self.turns[worker][0]
        else:
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
        self.turns[worker] = (ticket, at)
        ahead = self.ahead_of(worker, now)
        if ahead is not None:
            at = max(at, ahead + WINDOW_S / self.limit.pace_per_minute(now))
            self.turns[worker] = (ticket, at)
        return at

    def end_turn(self, worker: str) -> None:
        """`worker` got its permit: if it needs another, it queues up behind the others."""
        self.turns.pop(worker, None)

    # -- outcomes -------------------------------------------------------------------------

    def on_outcome(self, outcome: CallOutcome, now: float, expected_tokens: int = 0) -> None:
        """Learns from a call's answer; `expected_tokens`: what such a call was expected
        to cost, for an answer whose permit is not known."""
        if outcome.tokens_used is not None:
            self._count_tokens(outcome, outcome.tokens_used, now, expected_tokens)
        if outcome.succeeded or outcome.rate_limited:
            self.limit.on_answer(now)
        if outcome.auth_failed:
            if outcome.probe and self.circuit.is_open:
                self.circuit.probe_failed(now)
                log.error(
                    "openai %s: probe refused (401/403); next probe in %.0f s",
                    self.kind.value,
                    self.circuit.probe_at() - now,
                )
            elif not self.circuit.is_open:
                self.circuit.open(now)
                log.error(
                    "openai %s: API key refused (401/403); circuit open, calls stopped",
                    self.kind.value,
                )
            return
        if outcome.probe and self.circuit.is_open:
            if outcome.succeeded or outcome.rate_limited:  # either way, the key was accepted
                self.circuit.close()
                log.warning("openai %s: probe accepted; circuit closed", self.kind.value)
            else:
                self.circuit.probe_inconclusive(now)
        if outcome.rate_limited:
            self.limit.on_rate_limited(now, outcome.retry_after_s, outcome.limits)
        elif outcome.succeeded:
            self.limit.on_success(now, outcome.limits)

    def outcome_changes_nothing(
        self, outcome: CallOutcome, now: float, expected_tokens: int = 0
    ) -> bool:
        """Whether `on_outcome` would leave the state as it is: a success like the others."""
        if outcome.auth_failed or outcome.rate_limited or outcome.probe:
            return False
        if outcome.succeeded and not self.limit.answer_changes_nothing(now):
            return False
        if outcome.tokens_used is not None:
            if max(0, outcome.tokens_used) != self.last_cost:
                return False
            grant = self.limit.window.find(_grant_id(outcome))
            if grant is not None and grant.tokens != outcome.tokens_used:
                return False
            if grant is None and outcome.tokens_used > expected_tokens:
                return False
        return not outcome.succeeded or self.limit.success_changes_nothing(now, outcome.limits)

    def _count_tokens(
        self, outcome: CallOutcome, tokens_used: int, now: float, expected_tokens: int
    ) -> None:
        """What the answer says the call cost replaces what was expected of it; without the
        permit to match, only a cost above what was expected is added, from now on."""
        used = max(0, tokens_used)
        self.last_cost = used
        grant = self.limit.window.find(_grant_id(outcome))
        if grant is not None:
            grant.tokens = used
        elif used > expected_tokens:
            self.limit.record(Grant(now, used - expected_tokens, call=False))

    # -- the state, as JSON ---------------------------------------------------------------

    def state(self) -> dict:
        return {
            "limit": self.limit.state(),
            "circuit": self.circuit.state(),
            "turns": {worker: list(turn) for worker, turn in self.turns.items()},
            "next_ticket": self._next_ticket,
            "last_cost": self.last_cost,
        }

    def restore(self, state: Mapping | None, grants: Iterable[Grant]) -> None:
        self.limit.window.restore(grants)
        if not state:
            return
        self.limit.restore(state["limit"])
        self.circuit.restore(state["circuit"])
        self.turns = {worker: tuple(turn) for worker, turn in state["turns"].items()}
        self._next_ticket = state["next_ticket"]
        self.last_cost = state.get("last_cost")  # absent from a state written before issue 18


def _grant_id(outcome: CallOutcome):
    return None if outcome.permit is None else outcome.permit.grant_id
