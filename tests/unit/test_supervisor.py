"""One-for-one supervision with a restart intensity, under the autojump clock."""

from __future__ import annotations

import pytest
import trio

from dynamo.database.errors import DatabaseUnavailable
from dynamo.supervision import outages
from dynamo.supervision.supervisor import (
    MAX_RESTARTS,
    OUTAGE_LIMIT_S,
    OutageTooLong,
    Supervisor,
    TooManyRestarts,
)


async def test_a_crashing_actor_is_restarted_alone(autojump_clock):
    with trio.fail_after(60):
        supervisor = Supervisor()
        runs = {"flaky": 0, "steady": 0}
        restarted = []
        supervisor.on_restart = restarted.append

        async def flaky(task_status):
            runs["flaky"] += 1
            task_status.started()
            if runs["flaky"] < 3:
                await trio.sleep(1)
                raise ConnectionError("lost the broker")
            await trio.sleep_forever()

        async def steady(task_status):
            runs["steady"] += 1
            task_status.started()
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            await supervisor.start(nursery, "steady", steady)
            await supervisor.start(nursery, "flaky", flaky)
            await trio.sleep(30)
            status = supervisor.actors
            assert runs == {"flaky": 3, "steady": 1}
            assert status["flaky"].restarts == 2 and status["flaky"].state == "running"
            assert status["flaky"].last_error == "ConnectionError: lost the broker"
            assert status["steady"].restarts == 0 and status["steady"].state == "running"
            assert restarted == ["flaky", "flaky"]
            nursery.cancel_scope.cancel()


async def test_too_many_crashes_in_the_window_escalate(autojump_clock):
    with trio.fail_after(600):
        supervisor = Supervisor()
        crashes = 0

        async def broken(task_status):
            nonlocal crashes
            task_status.started()
            crashes += 1
            raise RuntimeError("bug")

        with pytest.raises(BaseExceptionGroup) as group:
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, "broken", broken)
        assert group.value.subgroup(TooManyRestarts) is not None
        assert crashes == MAX_RESTARTS + 1
        assert supervisor.actors["broken"].state == "stopped"


async def test_crashes_spread_over_time_never_escalate(autojump_clock):
    with trio.fail_after(3600):
        supervisor = Supervisor(max_restarts=2, window_s=60)
        crashes = 0

        async def rarely_broken(task_status):
            nonlocal crashes
            task_status.started()
            await trio.sleep(45)  # one crash every ~45 s: never 3 within 60 s
            crashes += 1
            raise RuntimeError("rare")

        async with trio.open_nursery() as nursery:
            await supervisor.start(nursery, "rare", rarely_broken)
            await trio.sleep(900)
            assert crashes >= 15 and supervisor.actors["rare"].state != "stopped"
            nursery.cancel_scope.cancel()


async def test_a_setup_error_comes_out_of_start(autojump_clock):
    supervisor = Supervisor()

    async def misconfigured(task_status):
        raise ValueError("no such queue")

    async with trio.open_nursery() as nursery:
        with pytest.raises(ValueError, match="no such queue"):
            await supervisor.start(nursery, "intake", misconfigured)
    assert supervisor.actors["intake"].restarts == 0


# -- outages are not crashes ------------------------------------------------------------


def _database(down_for_s: float):
    """A dependency that is down from now for `down_for_s`, and its probe."""
    back_at = trio.current_time() + down_for_s

    async def probe():
        if trio.current_time() < back_at:
            raise DatabaseUnavailable("refused")

    return outages.Dependencies(database=outages.Dependency("database", probe=probe)), back_at


async def test_an_actor_stopped_by_an_outage_waits_and_is_not_counted(autojump_clock):
    with trio.fail_after(3600):
        dependencies, back_at = _database(600)
        supervisor = Supervisor(dependencies=dependencies)
        runs = 0
        restarted = []
        supervisor.on_restart = restarted.append

        async def needs_the_database(task_status):
            nonlocal runs
            runs += 1
            task_status.started()
            if trio.current_time() < back_at:
                await trio.sleep(1)
                raise DatabaseUnavailable("ConnectionRefusedError: refused")
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            await supervisor.start(nursery, "resume", needs_the_database)
            await trio.sleep(300)
            status = supervisor.actors["resume"]
            assert status.state == "waiting" and status.restarts == 0
            assert status.last_error.startswith("DatabaseUnavailable")
            await trio.sleep(301)
            assert trio.current_time() <= back_at + 1.1
            assert status.state == "running"
            # Started again once after the outage, however long it was: no counted crash.
            assert status.restarts == 0 and status.outage_restarts == 1 and runs == 2
            assert restarted == ["resume"]
            nursery.cancel_scope.cancel()


async def test_an_outage_longer_than_the_limit_exits(autojump_clock):
    with trio.fail_after(3 * OUTAGE_LIMIT_S):
        dependencies, _ = _database(2 * OUTAGE_LIMIT_S)
        dependencies["database"].went_down("refused")
        supervisor = Supervisor(dependencies=dependencies)
        started = trio.current_time()
        with pytest.raises(OutageTooLong, match="database unreachable for 90[01] s"):
            await supervisor.watch_outages()
        assert OUTAGE_LIMIT_S <= trio.current_time() - started <= OUTAGE_LIMIT_S + 1.1


async def test_an_outage_shorter_than_the_limit_does_not_exit(autojump_clock):
    with trio.fail_after(3 * OUTAGE_LIMIT_S):
        dependencies, back_at = _database(OUTAGE_LIMIT_S - 10)
        database = dependencies["database"]
        database.went_down("refused")
        supervisor = Supervisor(dependencies=dependencies)
        with trio.move_on_after(2 * OUTAGE_LIMIT_S) as watched:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(supervisor.watch_outages)
                await database.wait_until_up()
                await trio.sleep(OUTAGE_LIMIT_S)  # and up for a while since
                nursery.cancel_scope.cancel()
        assert not watched.cancelled_caught and database.up
