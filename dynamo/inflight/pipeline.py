"""What the actors share about requests in flight: the database port, the set of requests
somewhere in the pipeline, and the conversions between a request's row and its `Job`.

`InFlight` makes sure a request is routed into the pipeline once: intake, the HTTP API
and the resume sweep all `add()` before they send, and the announcer `finish()`es it at
its end state. Each actor holds a job with `holding()`; if the actor crashes, the jobs it
held are `take_orphans()`ed and routed again once it has restarted. A request whose
result cannot be made is `set_aside()`: the resume sweep leaves it until the next start.
"""

from __future__ import annotations

import datetime
import functools
import logging
import uuid
from collections import defaultdict
from contextlib import contextmanager

import trio

from dynamo import metrics
from dynamo.domain import genreq, prompts
from dynamo.domain import viewer_messages as messages
from dynamo.domain.jobs import Failure, Job, Reason, Step, Style, Viewer
from dynamo.inflight.confirms import Confirms
from dynamo.safety.blocked_terms import BlockedTerms
from dynamo.supervision import outages

log = logging.getLogger(__name__)


class InFlight:
    def __init__(self) -> None:
        self._ids: set[uuid.UUID] = set()
        self._held: dict[str, set[uuid.UUID]] = defaultdict(set)
        self._orphans: dict[str, set[uuid.UUID]] = defaultdict(set)
        self._finish_watchers: list[set[uuid.UUID]] = []
        self._set_aside: set[uuid.UUID] = set()

    def __contains__(self, request_id: uuid.UUID) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> list[uuid.UUID]:
        return list(self._ids)

    def add(self, request_id: uuid.UUID) -> bool:
        """Marks the request as in the pipeline; False if it already was."""
        if request_id in self._ids:
            return False
        self._ids.add(request_id)
        return True

    def finish(self, request_id: uuid.UUID) -> None:
        self._ids.discard(request_id)
        for finished in self._finish_watchers:
            finished.add(request_id)

    def set_aside(self, request_id: uuid.UUID) -> None:
        """Out of the pipeline, and not routed again by this process's resume sweep: a
        request whose step raised where nothing else can be done for it. The next
        process to start (a fixed release, maybe) tries it once more."""
        self.finish(request_id)
        self._set_aside.add(request_id)

    def set_aside_ids(self) -> list[uuid.UUID]:
        return list(self._set_aside)

    @contextmanager
    def watching_finishes(self):
        """The ids finished while the block runs: the resume sweep reads rows while jobs
        go on, and a row read before its job finished is stale (a quick one, such as an
        invalid request's result, can be added, done and finished within one sweep)."""
        finished: set[uuid.UUID] = set()
        self._finish_watchers.append(finished)
        try:
            yield finished
        finally:
            self._finish_watchers.remove(finished)

    async def route(self, job, channel, *, added: bool = True) -> None:
        """Sends a job just `add()`ed; if the send is cancelled (shutdown), the job is not
        in the pipeline after all and the resume sweep will route it.

        `added=False`: the job was in flight already when `add()` was asked (a cancelled
        request is sent on to its refund all the same); a failed send then leaves it to
        the copy in flight."""
        try:
            await channel.send(job)
        except BaseException:
            if added:
                self.finish(job.id)
            raise

    @contextmanager
    def holding(self, actor: str, request_id: uuid.UUID):
        self._held[actor].add(request_id)
        try:
            yield
        except BaseException:
            # The actor is going down with this job in hand; the job is routed again.
            self._orphans[actor].add(request_id)
            raise
        finally:
            self._held[actor].discard(request_id)

    def take_orphans(self, actor: str) -> list[uuid.UUID]:
        orphans = list(self._orphans.pop(actor, ()))
        for request_id in orphans:
            self._ids.discard(request_id)
        return orphans


class Pipeline:
    def __init__(
        self,
        db,
        *,
        worker_id: uuid.UUID,
        request_timeout_s: float,
        points_cost: int,
        dependencies: outages.Dependencies | None = None,
        blocked_terms: BlockedTerms | None = None,
    ):
        self.db = db
        # DYNAMO_BLOCKED_TERMS_FILE's list in force (dynamo.safety.blocked_terms), or None.
        self.blocked_terms = blocked_terms
        self.worker_id = worker_id
        self.request_timeout_s = request_timeout_s
        self.points_cost = points_cost
        self.inflight = InFlight()
        # Who is reachable (the stages wait out outages), and the broker's confirmations
        # whose step is not stored yet (never published again: dynamo.inflight.confirms).
        self.dependencies = dependencies or outages.Dependencies(
            database=outages.Dependency("database", probe=getattr(db, "ping", None))
        )
        self.confirms = Confirms()

    def request_fields(self, request: genreq.ParsedRequest, *, source: str) -> dict:
        return dict(
            viewer_id=request.viewer.twitch_user_id,
            display_name=request.viewer.twitch_display_name,
            broadcast_id=request.broadcast_id,
            screening_id=request.screening_id,
            style=request.style.value,
            inputs=request.inputs,
            prompt=request.prompt,
            source=source,
            owner=self.worker_id,
            timeout_s=self.request_timeout_s,
            points_cost=self.points_cost,
        )

    def invalid_fields(self, exc: genreq.InvalidRequest, body: bytes) -> dict:
        """What can be stored of an invalid request with a viewer (one without is only
        dead-lettered), so that it has an id and a result."""
        if exc.viewer is None:
            raise ValueError("an invalid request without a viewer is not stored")
        style, inputs = "", {}
        try:
            payload = genreq.load_json(body).get("payload")
        except genreq.InvalidRequest:
            payload = None
        if isinstance(payload, dict):
            style = str(payload.get("style") or "")[:40].replace("\x00", "")
            inputs = _storable_strings(payload.get("inputs"))
        return dict(
            viewer_id=exc.viewer.twitch_user_id,
            display_name=exc.viewer.twitch_display_name,
            broadcast_id=None,
            screening_id=None,
            style=style,
            inputs=inputs,
            prompt="",
            source="broker",
            owner=self.worker_id,
            timeout_s=self.request_timeout_s,
            points_cost=0,
        )

    def job_from_row(self, row) -> Job:
        now = datetime.datetime.now(datetime.UTC)
        remaining = (row["expires_at"] - now).total_seconds() if row["expires_at"] else 0.0
        try:
            style = Style(row["style"])
        except ValueError:
            style = None  # an invalid request's style as it came; it only gets a result
        failure = None
        if row["failure_reason"]:
            failure = Failure(
                Reason(row["failure_reason"]),
                row["error_message"] or "",
                row["failure_detail"] or "",
            )
        inputs = row["inputs"] or {}
        return Job(
            id=row["id"],
            viewer=Viewer(row["twitch_user_id"], row["twitch_display_name"] or ""),
            style=style,
            inputs=inputs,
            prompt=row["prompt"],
            description=_description(style, inputs),
            deadline=trio.current_time() + remaining,
            step=Step(row["step"]),
            flow_id=row["flow_id"],
            name=row["name"],
            image_url=row["image_url"],
            image_color=row["image_color"],
            failure=failure,
            raw_style=row["style"],
        )

    async def fail_unreadable(self, row) -> Job | None:
        """A stored request `job_from_row` cannot read (say, a subject that is a list, stored
        before such messages were refused): logged and counted, then failed as `error` so
        that its debit is refunded. The job to route on (at FAILING), or None when it cannot
        be failed either (a step this code does not know)."""
        extra = {"request_id": str(row["id"])}
        metrics.UNREADABLE_REQUESTS.inc()
        log.error("stored request cannot be read; failing it", exc_info=True, extra=extra)
        try:
            step = Step(row["step"])
        except ValueError:
            log.error("unknown step %r: request left as it is", row["step"], extra=extra)
            return None
        job = Job(
            id=row["id"],
            viewer=Viewer(str(row["twitch_user_id"]), str(row["twitch_display_name"] or "")),
            style=None,
            inputs={},
            prompt="",
            description="",
            deadline=trio.current_time() + self.request_timeout_s,
            step=step,
            flow_id=row["flow_id"],
            raw_style=str(row["style"] or ""),
        )
        if await self.fail(job, messages.failure(Reason.ERROR, "stored request unreadable")):
            return job
        return None

    async def reject_if_blocked(self, job: Job) -> str | None:
        """Fails the request as `rejected` if its subject holds a blocked term: "failed",
        or "dropped" if it moved on meanwhile; None if it holds none."""
        if self.blocked_terms is None or not isinstance(job.inputs.get("subject"), str):
            return None
        line = self.blocked_terms.match(job.inputs["subject"])
        if line is None:
            return None
        metrics.BLOCKED_SUBJECTS.inc()
        # The term itself is never logged: its line in the file says which it is.
        detail = f"the subject holds a blocked term (line {line} of the blocked terms file)"
        moved = await self.fail(job, messages.failure(Reason.REJECTED, detail))
        return "failed" if moved else "dropped"

    async def job(self, request_id: uuid.UUID) -> Job | None:
        row = await self.db.load_request(request_id)
        return None if row is None else self.job_from_row(row)

    async def fail(self, job: Job, failure: Failure, *, from_steps=None) -> bool:
        """Decides the request's failure (step FAILING); False if it moved on meanwhile
        (or, with `from_steps`, is at none of them)."""
        if from_steps is None:
            from_steps = [
                s
                for s in Step
                if s not in (Step.ANNOUNCED, Step.ACCEPTED, Step.FAILING, Step.REFUNDED, Step.DONE)
            ]
        moved = await self.db.advance(
            job.id,
            from_steps,
            Step.FAILING,
            failure_reason=failure.reason.value,
            failure_detail=failure.detail[:2000],
            error_message=failure.message,
        )
        if moved:
            job.failure = failure
            job.step = Step.FAILING
            log.warning(
                "request failed: %s (%s)", failure.reason.value, failure.detail, extra=job.log_extra
            )
        return moved


async def serve_jobs(
    jobs_recv,
    *,
    actor: str,
    inflight: InFlight,
    concurrency: int,
    step,
    outboxes: dict,
    pipeline: Pipeline | None = None,
    failed_outcome: object = "failed",
) -> None:
    """Runs `await step(job)` for each job received, at most `concurrency` at once, each
    held in `inflight` by `actor`; then sends the job on `outboxes[outcome]` (an outcome
    without an outbox drops the job: another copy or the resume sweep owns it).

    A job is received only once a slot is free, so a sender on a 0-capacity channel hands
    a job over only when this stage can start it; and the slot is held until the job is
    handed on, so that a full next channel stops this stage, and backpressure reaches
    intake and RabbitMQ.

    One job's failure is its own: a step that raises unexpectedly (a bug, not an outage)
    fails that job alone with reason `error` through `pipeline` (its outcome is then
    `failed_outcome`, so it goes on to be refunded), while its siblings and the actor go on
    (as hypercorn's task group handles one request's error, and OTP one child)."""
    slots = trio.Semaphore(concurrency)
    serving = _Serving(actor, inflight, step, outboxes, pipeline, failed_outcome)
    async with trio.open_nursery() as nursery:
        while True:
            await slots.acquire()
            try:
                job = await jobs_recv.receive()
            except trio.EndOfChannel:
                return
            nursery.start_soon(serving.serve, job, slots)


class _Serving:
    """One stage's way of serving a job: its step, its outboxes, what a bug does."""

    def __init__(self, actor, inflight, step, outboxes, pipeline, failed_outcome):
        self.actor = actor
        self.inflight = inflight
        self.step = step
        self.outboxes = outboxes
        self.pipeline = pipeline
        self.failed_outcome = failed_outcome

    async def serve(self, job: Job, slots: trio.Semaphore) -> None:
        try:
            with self.inflight.holding(self.actor, job.id):
                try:
                    outcome = await self.step(job)
                except Exception as exc:
                    if outages.outage_of(exc) is not None:
                        raise  # not the job's fault: the actor waits for the dependency
                    outcome = await self._failed_by(job, exc)
                outbox = self.outboxes.get(outcome)
                if outbox is not None:
                    await outbox.send(job)
        finally:
            slots.release()

    async def _failed_by(self, job: Job, exc: Exception) -> object:
        """The outcome of a job whose step raised `exc`: failed as `error` when it can be."""
        metrics.JOB_ERRORS.labels(self.actor).inc()
        log.error("unexpected error in %s", self.actor, exc_info=exc, extra=job.log_extra)
        if self.pipeline is not None and await self._as_persisted(job):
            # At RESERVING a debit may exist that only the ledger knows: the resume sweep
            # looks for it in the ledger's history before anything else.
            if job.step is not Step.RESERVING:
                detail = f"{self.actor}: {type(exc).__name__}: {exc}"[:2000]
                failure = messages.failure(Reason.ERROR, detail)
                fail = functools.partial(self.pipeline.fail, job, failure)
                moved = await outages.patiently(self.pipeline.dependencies, fail)
                if moved and self.failed_outcome in self.outboxes:
                    return self.failed_outcome  # on to its refund and its result
        if job.step in (Step.ACCEPTED, Step.REFUNDED):
            # Its debit is settled and only its result is left: making the result is
            # what raised, and would raise again at every sweep.
            log.error("request set aside until the next start", extra=job.log_extra)
            self.inflight.set_aside(job.id)
            return None
        # Past the point of failing (announced, or failing already), or no way on from
        # here: out of the pipeline, so that the resume sweep routes it from its step.
        self.inflight.finish(job.id)
        return None

    async def _as_persisted(self, job: Job) -> bool:
        """Makes `job` its stored copy (the step may have raised between a write and
        updating the job: the refund must see the flow id the database holds)."""
        read = functools.partial(self.pipeline.job, job.id)
        try:
            fresh = await outages.patiently(self.pipeline.dependencies, read)
        except Exception:
            log.exception("request unreadable after an error", extra=job.log_extra)
            return False
        if fresh is None:
            return False
        outages.refresh(job, fresh)
        return True


def _description(style: Style | None, inputs) -> str:
    """The subject as shown, or "" where the stored inputs have none that can be shown."""
    subject = inputs.get("subject") if isinstance(inputs, dict) else None
    if not isinstance(subject, str):
        return ""
    try:
        return prompts.description(style, inputs) if style else subject
    except (KeyError, TypeError, ValueError):
        return subject


# An invalid request's inputs are kept for its result and for operators: its text fields
# only, cut short, without the characters PostgreSQL cannot hold.
_MAX_KEPT_INPUTS = 8
_MAX_KEPT_CHARS = 200


def _storable_strings(inputs: object) -> dict[str, str]:
    if not isinstance(inputs, dict):
        return {}
    kept = {}
    for key, value in list(inputs.items())[:_MAX_KEPT_INPUTS]:
        if isinstance(value, str):
            kept[key[:40].replace("\x00", "")] = value[:_MAX_KEPT_CHARS].replace("\x00", "")
    return kept
