"""The rate limiter actor: hands jobs to the generator fairly, and paces OpenAI calls.

Receives reserved jobs (points already held) on `jobs_recv` into a fair queue of at most
`queue_capacity` jobs; when it is full it stops receiving, so that backpressure reaches
the ledger and intake. Sends them on `generate_send` (capacity 0: a send completes only
when a generator worker is free), one viewer at a time, round robin. A job whose deadline
passed is not generated: it goes on `failures_send` as expired (its debit is refunded there).

Serves the permit protocol of `dynamo.ratelimit` on `permits_recv`: a `PermitRequest` is
answered with a `Permit` once its kind's window, 429 pause and auth circuit allow (FIFO
per kind; image and text are paced independently, so waiting image calls never hold up
text calls); a `CallOutcome` teaches the kind's limit and circuit.

Persists nothing in the database: its whole state lives in the `RateLimiterStatus` it is
given (also the live view for GET /status), which outlives the actor. A restarted actor
continues with the same windows (the 60-s ceiling holds across a crash), learned limits,
circuits, waiting permit requests and queued jobs. It never closes the channel ends it is
given: the graph owns them. On cancellation it just stops; a job being handed over when
cancelled stays queued.
"""

from __future__ import annotations

import logging

import trio
from trio.lowlevel import ParkingLot

from dynamo import metrics
from dynamo.jobs import Reason
from dynamo.messages import failure
from dynamo.permits import CallKind, CallOutcome, PermitRequest
from dynamo.ratelimit import RateLimiterStatus

log = logging.getLogger(__name__)

# Jobs held for fair ordering: at most this many, and at most a third of a request's
# timeout worth of images (`fair_queue_capacity`), because every job here has its points
# reserved and its deadline running; the rest of a flood waits in RabbitMQ.
FAIR_QUEUE_CAPACITY = 64
# ...but always room for a few jobs, so that workers never wait on the queue.
MIN_FAIR_QUEUE_CAPACITY = 4


def fair_queue_capacity(images_per_minute: float, request_timeout_s: float) -> int:
    """How many reserved jobs may wait here: at the image rate, the last of them still
    starts within a third of its timeout (5/min, 900 s: 25 jobs, 5 minutes of images)."""
    worth = int(images_per_minute * request_timeout_s / 60 / 3)
    return max(MIN_FAIR_QUEUE_CAPACITY, min(FAIR_QUEUE_CAPACITY, worth))


# The name of the fair queue in the dynamo_channel_* metrics.
FAIR_QUEUE_METRIC = "rate_limiter.fair_queue"


async def run(
    *,
    jobs_recv: trio.MemoryReceiveChannel,
    generate_send: trio.MemorySendChannel,
    permits_recv: trio.MemoryReceiveChannel,
    failures_send: trio.MemorySendChannel,
    images_per_minute: float,
    text_per_minute: float,
    status: RateLimiterStatus,
    queue_capacity: int = FAIR_QUEUE_CAPACITY,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    status.configure({CallKind.IMAGE: images_per_minute, CallKind.TEXT: text_per_minute})
    limiter = _RateLimiter(status, queue_capacity)
    metrics.QUEUE_CAPACITY.labels(FAIR_QUEUE_METRIC).set(queue_capacity)
    limiter.queue_changed()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(limiter.receive_jobs, jobs_recv)
        nursery.start_soon(limiter.dispatch_jobs, generate_send, failures_send)
        nursery.start_soon(limiter.serve_permits, permits_recv)
        for kind in status.kinds:
            nursery.start_soon(limiter.grant_permits, kind)
        task_status.started()


class _RateLimiter:
    """One run of the actor: its tasks, and the wake-ups between them."""

    def __init__(self, status: RateLimiterStatus, queue_capacity: int):
        self.status = status
        self.queue = status.fair_queue
        self.queue_capacity = queue_capacity
        self._queue_lot = ParkingLot()  # the fair queue changed
        self._kind_lots = {kind: ParkingLot() for kind in status.kinds}  # requests or outcomes
        self._jobs_ended = False
        self._permits_ended = False
        self._handover: trio.CancelScope | None = None  # waiting for a worker, until a deadline

    def queue_changed(self) -> None:
        metrics.QUEUE_DEPTH.labels(FAIR_QUEUE_METRIC).set(len(self.queue))
        self._queue_lot.unpark_all()

    async def receive_jobs(self, jobs_recv: trio.MemoryReceiveChannel) -> None:
        while True:
            while len(self.queue) >= self.queue_capacity:
                await self._queue_lot.park()
            try:
                job = await jobs_recv.receive()
            except trio.EndOfChannel:
                break
            self.queue.push(job)
            if self._handover is not None:  # a resumed job may expire before all others
                self._handover.deadline = min(self._handover.deadline, job.deadline)
            self.queue_changed()
        self._jobs_ended = True
        self.queue_changed()

    async def dispatch_jobs(
        self, generate_send: trio.MemorySendChannel, failures_send: trio.MemorySendChannel
    ) -> None:
        while True:
            await self._fail_expired(failures_send)
            job = self.queue.peek()
            if job is None:
                if self._jobs_ended:
                    return
                await self._queue_lot.park()
                continue
            # Waiting for a worker ends when any queued job expires, so that it is failed
            # (and refunded) on time rather than when its turn comes.
            with trio.move_on_at(self.queue.earliest_deadline()) as self._handover:
                await generate_send.send(job)
                # A cancelled send sent nothing, so the job leaves the queue only here.
                self.queue.served(job)
                self.queue_changed()
            self._handover = None

    async def _fail_expired(self, failures_send: trio.MemorySendChannel) -> None:
        for job in self.queue.expired(trio.current_time()):
            job.failure = failure(Reason.EXPIRED, "deadline passed waiting for a generator worker")
            log.info("request expired while queued for generation", extra=job.log_extra)
            await failures_send.send(job)
            self.queue.discard(job)
            self.queue_changed()

    async def serve_permits(self, permits_recv: trio.MemoryReceiveChannel) -> None:
        async for message in permits_recv:
            limiter = self.status.kinds.get(getattr(message, "kind", None))
            if limiter is None:
                log.error("permit protocol: ignoring %r", message)
                continue
            if isinstance(message, PermitRequest):
                limiter.waiting.append(message)
            elif isinstance(message, CallOutcome):
                limiter.on_outcome(message, trio.current_time())
            else:
                log.error("permit protocol: ignoring %r", message)
                continue
            self._kind_lots[limiter.kind].unpark_all()
        self._permits_ended = True
        for lot in self._kind_lots.values():
            lot.unpark_all()

    async def grant_permits(self, kind: CallKind) -> None:
        limiter = self.status.kinds[kind]
        changed = self._kind_lots[kind]
        while limiter.waiting or not self._permits_ended:
            if not limiter.waiting:
                await changed.park()
                continue
            now = trio.current_time()
            grant_at = limiter.next_grant_at(now)
            if grant_at > now:
                # An outcome may move grant_at (a 429 pause, a closed circuit): look again.
                with trio.move_on_at(grant_at):
                    await changed.park()
                continue
            request = limiter.waiting[0]
            permit = limiter.permit()
            try:
                request.reply_send.send_nowait(permit)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                pass  # the caller stopped waiting: the turn goes to the next one, unspent
            else:
                limiter.granted(now, permit)
            limiter.waiting.popleft()
