"""One-for-one supervision with a restart intensity, under the autojump clock."""

from __future__ import annotations

import pytest
import trio

from dynamo.supervisor import MAX_RESTARTS, Supervisor, TooManyRestarts


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
