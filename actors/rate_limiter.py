"""The rate limiter actor: hands jobs to the generator fairly, and paces OpenAI calls.

Receives reserved jobs (points already held) on `jobs_recv` into a fair queue of at most
`queue_capacity` jobs; when it is full it stops receiving, so that backpressure reaches
the ledger and intake. Sends them on `generate_send` (capacity 0: a send completes only
when a generator worker is free), one viewer at a time, round robin. A job whose deadline
passed is not generated: it goes on `failures_send` as expired (its debit is refunded there).

Serves the permit protocol of `dynamo.limits.permits` on `permits_recv`: a `PermitRequest` is
answered with a `Permit` once the account's budget (`dynamo.limits.budget`: its windows of calls
and tokens, 429 pause and auth circuit, shared with every process of a fleet) grants it
(FIFO per kind; image and text are paced independently, so waiting image calls never hold
up text calls); a `CallOutcome` teaches the budget.

Persists nothing itself: the budget's store does (PostgreSQL for a fleet), and the rest of
its state lives in the `RateLimiterStatus` it is given (also the live view for GET
/status), which outlives the actor. A restarted actor continues with the same budget (the
60-s ceiling holds across a crash), waiting permit requests and queued jobs. While the
budget's store is unreachable no permit is granted: calls wait, they are not made blind.
It never closes the channel ends it is given: the graph owns them. On cancellation it just
stops; a job being handed over when cancelled stays queued.
"""

from __future__ import annotations

import logging

import trio
from trio.lowlevel import ParkingLot

from dynamo import metrics
from dynamo.domain.jobs import Reason
from dynamo.domain.viewer_messages import failure
from dynamo.limits.budget import BudgetUnavailable, Decision, KindConfig
from dynamo.limits.permits import CallKind, CallOutcome, PermitRequest
from dynamo.limits.state import RateLimiterStatus
from dynamo.supervision.backoff import Backoff

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
# While the budget's store cannot be reached, ask it again after this long, doubling.
STORE_RETRY_S = 0.5
STORE_RETRY_CAP_S = 5.0
STORE_BACKOFF = Backoff(base_s=STORE_RETRY_S, cap_s=STORE_RETRY_CAP_S, floor=1.0)


async def run(
    *,
    jobs_recv: trio.MemoryReceiveChannel,
    generate_send: trio.MemorySendChannel,
    permits_recv: trio.MemoryReceiveChannel,
    failures_send: trio.MemorySendChannel,
    images_per_minute: float,
    text_per_minute: float,
    status: RateLimiterStatus,
    image_tokens_per_minute: float | None = None,
    queue_capacity: int = FAIR_QUEUE_CAPACITY,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    status.configure(
        {
            CallKind.IMAGE: KindConfig(images_per_minute, image_tokens_per_minute),
            CallKind.TEXT: KindConfig(text_per_minute),
        }
    )
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
        # The budget's store: failed asks in a row (0 while it answers).
        self._unreachable = {kind: 0 for kind in status.kinds}

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
            if (
                not isinstance(message, PermitRequest | CallOutcome)
                or message.kind not in self.status.waiting
            ):
                log.error("permit protocol: ignoring %r", message)
                continue
            kind, waiting = message.kind, self.status.waiting[message.kind]
            if isinstance(message, PermitRequest):
                waiting.append(message)
                if len(waiting) == 1:
                    self._kind_lots[kind].unpark_all()
                continue
            try:
                learned = await self.status.budget.report(message)
            except BudgetUnavailable as exc:
                log.warning("openai %s: an answer not learned from: %s", kind.value, exc)
                continue
            if learned:  # a pause or a circuit may move the next grant: look again
                self._kind_lots[kind].unpark_all()
        self._permits_ended = True
        for lot in self._kind_lots.values():
            lot.unpark_all()

    async def grant_permits(self, kind: CallKind) -> None:
        waiting, changed = self.status.waiting[kind], self._kind_lots[kind]
        while waiting or not self._permits_ended:
            while waiting and _abandoned(waiting[0]):
                waiting.popleft()  # its caller stopped waiting: the turn goes to the next
            if not waiting:
                await changed.park()
                continue
            decision = await self._ask_budget(kind, waiting[0], more=len(waiting) > 1)
            if decision is None:
                continue  # unreachable: it waited a little already
            if decision.permit is not None:
                await self._hand_over(kind, waiting[0], decision.permit)
            # Until this process's turn comes; an outcome may move it (a 429 pause, a
            # closed circuit), and a new caller after none: look again then.
            if waiting and decision.retry_in_s > 0:
                with trio.move_on_after(decision.retry_in_s):
                    await changed.park()

    async def _ask_budget(
        self, kind: CallKind, request: PermitRequest, *, more: bool
    ) -> Decision | None:
        """The budget's decision; None (after a growing wait) while it is unreachable."""
        try:
            decision = await self.status.budget.try_grant(kind, request.tokens, more=more)
        except BudgetUnavailable as exc:
            if not self._unreachable[kind]:
                log.warning(
                    "openai %s: no permits while the budget is unreachable: %s", kind.value, exc
                )
            await trio.sleep(STORE_BACKOFF.delay_s(self._unreachable[kind]))
            self._unreachable[kind] += 1
            return None
        if self._unreachable[kind]:
            log.warning("openai %s: the budget is reachable again", kind.value)
            self._unreachable[kind] = 0
        return decision

    async def _hand_over(self, kind: CallKind, request: PermitRequest, permit) -> None:
        """Gives the permit to the request it was decided for; if that caller left while the
        budget was deciding, gives the permit back."""
        waiting = self.status.waiting[kind]
        if waiting and waiting[0] is request and _deliver(request, permit):
            waiting.popleft()
            return
        if request in waiting:
            waiting.remove(request)
        try:
            await self.status.budget.release(kind, permit)
        except BudgetUnavailable:
            pass  # the unused permit just counts, as if the call had been made


def _abandoned(request: PermitRequest) -> bool:
    return request.reply_send.statistics().open_receive_channels == 0


def _deliver(request: PermitRequest, permit) -> bool:
    try:
        request.reply_send.send_nowait(permit)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
        return False
    return True
