"""The one backoff policy (`dynamo.supervision.backoff.Backoff`) and the figures each of
its users promises (README): the waits are the same as when each loop doubled by hand."""

from __future__ import annotations

import random

import pytest

from actors import discord, rate_limiter
from dynamo.database import changes
from dynamo.limits import kind
from dynamo.supervision import outages, retry, supervisor
from dynamo.supervision.backoff import RETRY_AFTER_JITTER_S, Backoff


class TopOfRange:
    def uniform(self, low, high):
        return high


class BottomOfRange:
    def uniform(self, low, high):
        return low


def waits(policy: Backoff, count: int, rng) -> list[float]:
    return [policy.delay_s(attempt, rng=rng) for attempt in range(count)]


def test_an_openai_outage_waits_equal_jitter_from_2_s_doubling_to_32_s():
    assert waits(retry.OUTAGE_BACKOFF, 7, TopOfRange()) == [2, 4, 8, 16, 32, 32, 32]
    assert waits(retry.OUTAGE_BACKOFF, 6, BottomOfRange()) == [1, 2, 4, 8, 16, 16]


def test_external_calls_wait_full_jitter_capped_by_the_caller():
    policy = Backoff(cap_s=5.0)  # the ledger, auth and storage
    assert waits(policy, 6, TopOfRange()) == [1, 2, 4, 5, 5, 5]
    assert waits(policy, 6, BottomOfRange()) == [0] * 6


def test_a_probe_waits_at_most_1_s():
    assert waits(outages.PROBE_BACKOFF, 7, TopOfRange()) == [0.05, 0.1, 0.2, 0.4, 0.8, 1, 1]
    assert waits(outages.PROBE_BACKOFF, 3, BottomOfRange()) == [0, 0, 0]


def test_discord_waits_up_to_1_2_4_s():
    assert waits(discord.BACKOFF, 3, TopOfRange()) == [1, 2, 4]


def test_fixed_schedules_repeat_their_last_step():
    assert waits(supervisor.RESTART_BACKOFF, 7, random) == [0.1, 0.5, 1, 2, 5, 5, 5]
    assert waits(changes.RECONNECT_BACKOFF, 5, random) == [0.5, 1, 2, 5, 5]


def test_deterministic_doubling_has_no_jitter():
    assert waits(rate_limiter.STORE_BACKOFF, 6, random) == [0.5, 1, 2, 4, 5, 5]
    assert waits(kind.PROBE_BACKOFF, 6, random) == [5, 10, 20, 40, 60, 60]


def test_a_servers_retry_after_is_a_floor_even_above_the_cap():
    delay = Backoff(cap_s=5).delay_s(0, retry_after_s=90, rng=TopOfRange())
    assert delay == 90 + RETRY_AFTER_JITTER_S


def test_a_huge_attempt_does_not_overflow():
    assert Backoff().delay_s(10_000, rng=TopOfRange()) == 60


@pytest.mark.parametrize("bad", [{"floor": 1.5}, {"floor": -0.1}, {"base_s": -1}, {"steps_s": (1, -1)}])
def test_a_bad_policy_is_refused(bad):
    with pytest.raises(ValueError):
        Backoff(**bad)
