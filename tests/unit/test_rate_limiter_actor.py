"""The rate limiter actor, driven through its channels under the autojump clock."""

import dataclasses
import functools
import uuid
from contextlib import asynccontextmanager

import trio
import trio.testing

from actors import rate_limiter
from dynamo.domain.jobs import Job, Reason, Style, Viewer
from dynamo.limits.permits import CallKind, CallOutcome, acquire_permit, report_outcome
from dynamo.limits.state import WINDOW_S, RateLimiterStatus, parse_ratelimit_headers

PERMITS_CAPACITY = 8
FAILURES_CAPACITY = 8


@dataclasses.dataclass
class Limiter:
    jobs_send: trio.MemorySendChannel
    generate_recv: trio.MemoryReceiveChannel
    permits_send: trio.MemorySendChannel
    failures_recv: trio.MemoryReceiveChannel
    status: RateLimiterStatus
    nursery: trio.Nursery

    async def acquire(self, kind=CallKind.IMAGE):
        return await acquire_permit(self.permits_send, kind)

    async def report(self, outcome):
        await report_outcome(self.permits_send, outcome)


@asynccontextmanager
async def running(images_per_minute=5, text_per_minute=500, status=None):
    jobs_send, jobs_recv = trio.open_memory_channel(0)
    generate_send, generate_recv = trio.open_memory_channel(0)
    permits_send, permits_recv = trio.open_memory_channel(PERMITS_CAPACITY)
    failures_send, failures_recv = trio.open_memory_channel(FAILURES_CAPACITY)
    status = status or RateLimiterStatus()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(
            rate_limiter.run, jobs_recv=jobs_recv, generate_send=generate_send,
            permits_recv=permits_recv, failures_send=failures_send,
            images_per_minute=images_per_minute, text_per_minute=text_per_minute, status=status))
        yield Limiter(jobs_send, generate_recv, permits_send, failures_recv, status, nursery)
        nursery.cancel_scope.cancel()


def most_in_any_window(times):
    most, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - WINDOW_S:
            first += 1
        most = max(most, last - first + 1)
    return most


async def backlog(limiter, kind, workers, grants, *, calls=None):
    """`workers` callers that each take permits back to back, noting the grant times."""
    async def worker():
        while calls is None or len(grants) < calls:
            await limiter.acquire(kind)
            grants.append(trio.current_time())

    for _ in range(workers):
        limiter.nursery.start_soon(worker)


async def test_five_per_minute_schedule_with_a_backlog_of_12(autojump_clock):
    with trio.fail_after(200):
        async with running(images_per_minute=5) as limiter:
            start = trio.current_time()
            grants = []

            async def one():
                await limiter.acquire(CallKind.IMAGE)
                grants.append(trio.current_time() - start)

            async with trio.open_nursery() as callers:
                for _ in range(12):
                    callers.start_soon(one)
            assert grants == [0, 12, 24, 36, 48, 60.5, 72.5, 84.5, 96.5, 108.5, 121, 133]
            assert most_in_any_window(grants) == 5


async def test_images_reach_97_percent_over_ten_minutes_never_above(autojump_clock):
    with trio.fail_after(700):
        async with running(images_per_minute=5) as limiter:
            start, grants = trio.current_time(), []
            await backlog(limiter, CallKind.IMAGE, 4, grants)
            await trio.sleep(600)
            assert most_in_any_window(grants) <= 5
            assert sum(1 for t in grants if t - start < 600) >= 0.97 * 50


async def test_text_reaches_97_percent_over_ten_minutes_never_above(autojump_clock):
    with trio.fail_after(700):
        async with running(text_per_minute=500) as limiter:
            start, grants = trio.current_time(), []
            await backlog(limiter, CallKind.TEXT, 1, grants)
            await trio.sleep(600)
            assert most_in_any_window(grants) <= 500
            assert sum(1 for t in grants if t - start < 600) >= 0.97 * 5000


async def test_waiting_image_permits_never_delay_text_permits(autojump_clock):
    with trio.fail_after(100):
        async with running(images_per_minute=5, text_per_minute=500) as limiter:
            start, image_grants, text_grants = trio.current_time(), [], []
            await backlog(limiter, CallKind.IMAGE, 4, image_grants)
            await trio.sleep(1)
            await backlog(limiter, CallKind.TEXT, 1, text_grants, calls=10)
            await trio.sleep(5)
            assert [round(t - start, 2) for t in text_grants] == [
                1.0, 1.12, 1.24, 1.36, 1.48, 1.6, 1.72, 1.84, 1.96, 2.08]
            assert image_grants == [start]


async def test_a_429_pauses_its_kind_for_the_retry_after(autojump_clock):
    with trio.fail_after(200):
        async with running(images_per_minute=5) as limiter:
            start = trio.current_time()
            await limiter.acquire()
            await trio.sleep(1)
            await limiter.report(CallOutcome(CallKind.IMAGE, rate_limited=True, retry_after_s=30))
            await limiter.acquire()
            assert trio.current_time() - start == 31  # not at 12
            await limiter.acquire(CallKind.TEXT)  # text is not paused
            assert trio.current_time() - start == 31
            image = limiter.status.as_json()["kinds"]["image"]
            assert image["effective_per_minute"] < 5 and image["calls_last_60s"] == 2


async def test_headers_showing_a_lower_limit_slow_the_pace(autojump_clock):
    with trio.fail_after(200):
        async with running(images_per_minute=10) as limiter:
            start = trio.current_time()
            await limiter.acquire()
            await trio.sleep(1)
            await limiter.report(CallOutcome(CallKind.IMAGE, succeeded=True,
                                             limits=parse_ratelimit_headers({"x-ratelimit-limit-requests": "5"})))
            await limiter.acquire()
            assert trio.current_time() - start == 12  # not at 6
            assert limiter.status.limiter(CallKind.IMAGE).limit.effective_limit == 5


class FakeImageAPI:
    """An image endpoint with a real limit of `per_minute` in any 60-s window; refused calls
    do not count. Answers like OpenAI, with or without the x-ratelimit headers."""

    def __init__(self, per_minute, *, headers):
        self.per_minute = per_minute
        self.headers = headers
        self.accepted: list[float] = []
        self.refused: list[float] = []

    def call(self, now):
        recent = [t for t in self.accepted if t > now - WINDOW_S]
        if len(recent) >= self.per_minute:
            self.refused.append(now)
            retry_after = recent[-self.per_minute] + WINDOW_S - now
            return False, {"retry-after": str(round(retry_after)), **self._limits(now, 0)}
        self.accepted.append(now)
        return True, self._limits(now, self.per_minute - len(recent) - 1)

    def _limits(self, now, remaining):
        if not self.headers:
            return {}
        return {"x-ratelimit-limit-requests": str(self.per_minute),
                "x-ratelimit-remaining-requests": str(remaining),
                "x-ratelimit-reset-requests": "12s"}


async def simulate(limiter, api, *, workers=4, success_s=10.0, refusal_s=0.5):
    """Generator workers calling `api` through the limiter, reporting every answer."""
    async def worker():
        while True:
            permit = await limiter.acquire(CallKind.IMAGE)
            ok, headers = api.call(trio.current_time())
            await trio.sleep(success_s if ok else refusal_s)
            parsed = parse_ratelimit_headers(headers)
            assert parsed.limit is None or parsed.limit == api.per_minute
            await limiter.report(CallOutcome(CallKind.IMAGE, succeeded=ok, rate_limited=not ok,
                                             limits=parse_ratelimit_headers(headers), probe=permit.probe))

    for _ in range(workers):
        limiter.nursery.start_soon(worker)


async def test_a_real_limit_of_half_the_configured_one_is_learned(autojump_clock):
    for headers in (True, False):
        with trio.fail_after(700):
            async with running(images_per_minute=10) as limiter:
                start = trio.current_time()
                api = FakeImageAPI(5, headers=headers)
                await simulate(limiter, api)
                await trio.sleep(600)
                assert [t for t in api.refused if t - start >= 120] == []
                settled = [t for t in api.accepted if 180 <= t - start < 600]
                assert len(settled) >= 0.9 * 5 * 7


async def test_an_auth_failure_opens_the_circuit_until_a_probe_succeeds(autojump_clock):
    with trio.fail_after(300):
        async with running(text_per_minute=500) as limiter:
            start = trio.current_time()
            await limiter.acquire(CallKind.TEXT)
            await trio.sleep(1)
            await limiter.report(CallOutcome(CallKind.TEXT, auth_failed=True))
            await trio.testing.wait_all_tasks_blocked()  # the limiter took the report
            assert limiter.status.as_json()["kinds"]["text"]["circuit"] == "open"
            grants = []

            async def caller():
                permit = await limiter.acquire(CallKind.TEXT)
                grants.append((trio.current_time() - start, permit.probe))
                if permit.probe:
                    await trio.sleep(1)  # the probe call
                    refused = len(grants) < 3
                    await limiter.report(CallOutcome(CallKind.TEXT, probe=True,
                                                     auth_failed=refused, succeeded=not refused))

            async with trio.open_nursery() as callers:
                for _ in range(6):
                    callers.start_soon(caller)
            # Probes at 6 (5 s after the failure), 17 (10 s after the first probe was refused),
            # 38 (20 s after the second); it succeeds at 39 and the others go at once.
            assert [(round(t, 2), probe) for t, probe in grants] == [
                (6, True), (17, True), (38, True),
                (39, False), (39.12, False), (39.24, False)]
            assert limiter.status.as_json()["kinds"]["text"]["circuit"] == "closed"


def job_for(viewer, deadline):
    return Job(id=uuid.uuid4(), viewer=Viewer(viewer, viewer.title()), style=Style.GHOST,
               inputs={"subject": "a seal"}, prompt="p", description="a seal", deadline=deadline)


async def test_one_viewer_cannot_crowd_out_another(autojump_clock):
    with trio.fail_after(100):
        async with running() as limiter:
            far = trio.current_time() + 900
            for _ in range(50):
                await limiter.jobs_send.send(job_for("a", far))
            await limiter.jobs_send.send(job_for("b", far))
            dispatched = [(await limiter.generate_recv.receive()).viewer.twitch_user_id
                          for _ in range(51)]
            assert "b" in dispatched[:3]
            assert dispatched.count("a") == 50


async def test_a_full_fair_queue_stops_receiving(autojump_clock):
    with trio.fail_after(100):
        async with running() as limiter:
            far = trio.current_time() + 900
            for _ in range(rate_limiter.FAIR_QUEUE_CAPACITY):
                await limiter.jobs_send.send(job_for("a", far))
            with trio.move_on_after(10) as blocked:
                await limiter.jobs_send.send(job_for("b", far))
            assert blocked.cancelled_caught
            await limiter.generate_recv.receive()
            await limiter.jobs_send.send(job_for("b", far))  # room again


async def test_expired_jobs_are_failed_not_generated(autojump_clock):
    with trio.fail_after(100):
        async with running() as limiter:
            now = trio.current_time()
            waiting, soon = job_for("a", now + 50), job_for("b", now + 5)
            await limiter.jobs_send.send(waiting)
            await trio.sleep(1)  # it is being handed over; no worker is free
            await limiter.jobs_send.send(soon)  # expires first, while the other waits
            expired = await limiter.failures_recv.receive()
            assert expired is soon
            assert trio.current_time() == now + 5
            assert expired.failure.reason is Reason.EXPIRED
            assert (await limiter.generate_recv.receive()) is waiting
            gone = job_for("c", trio.current_time() - 1)
            await limiter.jobs_send.send(gone)
            assert (await limiter.failures_recv.receive()) is gone


async def test_a_restarted_actor_continues_where_it_stopped(autojump_clock):
    with trio.fail_after(100):
        status = RateLimiterStatus()
        start = trio.current_time()
        async with running(status=status) as limiter:
            await limiter.acquire()
            await limiter.jobs_send.send(job_for("a", start + 900))
        # The actor was cancelled (as after a crash); the supervisor runs it again.
        async with running(status=status) as limiter:
            await limiter.acquire()
            assert trio.current_time() - start == 12  # the window survived: no new burst
            assert (await limiter.generate_recv.receive()).viewer.twitch_user_id == "a"


def test_the_fair_queue_holds_no_more_than_a_third_of_a_timeout_of_images():
    assert rate_limiter.fair_queue_capacity(5, 900) == 25
    assert rate_limiter.fair_queue_capacity(600, 900) == rate_limiter.FAIR_QUEUE_CAPACITY
    assert rate_limiter.fair_queue_capacity(1, 60) == rate_limiter.MIN_FAIR_QUEUE_CAPACITY
