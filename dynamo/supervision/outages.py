"""Outages of the dependencies every request needs (PostgreSQL, RabbitMQ): noticed, waited
out, reported, never taken for a bug.

A `Dependency` is up or down. The first failure that shows it unreachable logs one
WARNING and counts an outage; the first success after that logs one INFO with how long it
was down. While it is down, `/readyz` says so (`dynamo.supervision.readiness`), and the gauge
`dynamo_dependency_up{dependency}` is 0.

`wait_until_up()` is how an actor rides an outage out: one caller at a time probes the
dependency with jittered exponential backoff, capped at `PROBE_CAP_S` so that work resumes
within about a second of its return; the others wait for that prober's verdict.
`patiently()` runs one call again and again until it goes through, for calls that may be
repeated as they are (reads, heartbeats, compare-and-set writes whose second try the
caller checks: see `patient_step`).

`patient_step()` wraps a pipeline stage's step: when the database drops out under it, the
job is not failed and its actor does not crash; once the database is back the job is
read again (its persisted step says what was committed, so a write whose COMMIT was cut
off is not made twice: the step sees it done) and the step runs again from there.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

import trio

from dynamo import metrics
from dynamo.supervision.backoff import Backoff
from dynamo.supervision.unavailable import Unavailable, outage_of  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# The first probe comes quickly: most outages seen by a caller are a connection that was
# cut while the server stays up (a failover, a restarted proxy).
PROBE_BASE_S = 0.05
# The longest wait between two probes: the dependency's return is noticed within it.
PROBE_CAP_S = 1.0
PROBE_BACKOFF = Backoff(base_s=PROBE_BASE_S, cap_s=PROBE_CAP_S)
# A waiter that is not the prober looks again this often, in case the prober was cancelled.
WAITER_RECHECK_S = PROBE_CAP_S


class BrokerUnavailable(Unavailable):
    """RabbitMQ cannot be reached, or the connection broke: try again later."""

    dependency = "broker"
    maybe_sent: bool = False  # whether a message may have reached the broker before the break


class Dependency:
    """Up or down, with one log line per change and the outage's duration."""

    def __init__(self, name: str, probe: Callable[[], Awaitable[object]] | None = None):
        self.name = name
        self.probe = probe
        self.up = True
        self.down_since: float | None = None  # trio.current_time() of the first failure
        self.reason = ""
        self.outages = 0
        self._back = trio.Event()
        self._probing = False
        metrics.DEPENDENCY_UP.labels(name).set(1)

    def went_down(self, reason: str) -> None:
        if not self.up:
            return
        self.up, self.down_since, self.reason = False, trio.current_time(), reason
        self.outages += 1
        self._back = trio.Event()
        metrics.DEPENDENCY_UP.labels(self.name).set(0)
        metrics.OUTAGES.labels(self.name).inc()
        log.warning("%s unreachable (%s); waiting for it to come back", self.name, reason)

    def came_back(self) -> None:
        if self.up:
            return
        down_s = self.down_for_s()
        self.up, self.down_since, self.reason = True, None, ""
        metrics.DEPENDENCY_UP.labels(self.name).set(1)
        self._back.set()
        log.info("%s is back after %.1f s", self.name, down_s)

    def down_for_s(self) -> float:
        return 0.0 if self.down_since is None else trio.current_time() - self.down_since

    def describe(self) -> str:
        """'ok', or what readiness reports while down."""
        if self.up:
            return "ok"
        return f"unreachable for {self.down_for_s():.0f} s: {self.reason}"[:300]

    async def wait_until_up(self) -> None:
        """Returns once the dependency answers again (at once if it is up)."""
        attempt = 0
        while not self.up:
            if self._probing or self.probe is None:
                # Someone else probes (or a port reports the return, as aio-pika's robust
                # connection does): wait for the verdict, and look again now and then.
                with trio.move_on_after(WAITER_RECHECK_S):
                    await self._back.wait()
                continue
            self._probing = True
            try:
                await trio.sleep(PROBE_BACKOFF.delay_s(attempt))
                attempt += 1
                try:
                    await self.probe()
                except Exception as exc:
                    if outage_of(exc) is None:
                        raise
                    continue
                self.came_back()
            finally:
                self._probing = False


class Dependencies:
    """The process's dependencies by name, so that any actor can report and wait."""

    def __init__(self, **dependencies: Dependency):
        self._by_name = dict(dependencies)

    def __getitem__(self, name: str) -> Dependency:
        return self._by_name[name]

    def __iter__(self):
        return iter(self._by_name.values())

    def get(self, name: str) -> Dependency | None:
        return self._by_name.get(name)

    def longest_down_s(self) -> float:
        return max((dep.down_for_s() for dep in self), default=0.0)

    async def ride_out(self, exc: BaseException) -> bool:
        """If `exc` is an outage of a known dependency: reports it, waits until it is
        back, and returns True. Else returns False (the caller re-raises)."""
        dependency = self.get(outage_of(exc) or "")
        if dependency is None:
            return False
        dependency.went_down(f"{type(exc).__name__}: {exc}"[:200])
        await dependency.wait_until_up()
        return True


async def patiently(dependencies: Dependencies, call: Callable[[], Awaitable]):
    """`await call()` until it goes through, waiting out outages of known dependencies.

    Only for calls that may be made twice: a read, a heartbeat, a write that is
    idempotent or checked by the caller."""
    while True:
        try:
            return await call()
        except Exception as exc:
            if not await dependencies.ride_out(exc):
                raise


def patient_step(dependencies: Dependencies, pipeline, step):
    """A pipeline stage's `step(job)` that rides out database outages.

    After an outage the job is read again from the database before its step runs again:
    what was committed (even a COMMIT whose answer was lost) shows in its persisted step,
    and every step starts by skipping what its persisted step says is done. A job the
    database no longer knows is dropped (None).
    """

    @functools.wraps(step)
    async def run(job):
        while True:
            try:
                return await step(job)
            except Exception as exc:
                if not await dependencies.ride_out(exc):
                    raise
            fresh = await patiently(dependencies, functools.partial(pipeline.job, job.id))
            if fresh is None:
                return None
            refresh(job, fresh)

    return run


def refresh(job, fresh) -> None:
    """Makes `job` the persisted `fresh` copy, in place (the stage holds this object).

    A failure decided in memory only (by the rate limiter, which has no database) is
    kept: it was not persisted yet."""
    failure = job.failure
    for field in job.__dataclass_fields__:
        setattr(job, field, getattr(fresh, field))
    if job.failure is None:
        job.failure = failure


async def patient_write(dependencies: Dependencies, pipeline, request_id, write, *, done_at):
    """`await write()` (a compare-and-set returning whether it moved the request) until
    the database takes it. If a try was cut off by an outage, its COMMIT may have gone
    through: a later try then finds the request moved and returns False, so the request's
    persisted step is read, and a step in `done_at` counts as this write done."""
    interrupted = False
    while True:
        try:
            moved = await write()
        except Exception as exc:
            if not await dependencies.ride_out(exc):
                raise
            interrupted = True
            continue
        if moved or not interrupted:
            return moved
        row = await patiently(dependencies, functools.partial(pipeline.db.load_request, request_id))
        return row is not None and row["step"] in {step.value for step in done_at}


async def follow(dependency: Dependency, is_up: Callable[[], bool], *, every_s: float) -> None:
    """Reports `is_up()` to `dependency` every `every_s`: for a port that reconnects by
    itself and can say whether it is connected (the broker's robust connection)."""
    while True:
        if is_up():
            dependency.came_back()
        else:
            dependency.went_down("connection lost")
        await trio.sleep(every_s)
