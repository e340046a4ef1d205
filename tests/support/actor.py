"""The one actor harness: an actor with the in-memory database, a pipeline and its named
channels, driven by feeding its inbox and reading its outbox, run for a `with` block.

Each actor's test module subclasses `ActorHarness`: it names the actor's channels
(`CHANNELS`: each name gives `<name>_send` and `<name>_recv`), the row a job of that
actor starts from (`JOB_ROW`: its step, its flow id), adds its fakes in `__init__` and
says in `run()` how the actor is started:

    class Uploader(ActorHarness):
        CHANNELS = ("upload", "announce", "finalize")
        JOB_ROW = {"step": Step.GENERATED, "flow_id": "flow-1"}

        def run(self):
            return self.running(uploader.run, storage=self.storage, upload_recv=...)
"""

from __future__ import annotations

import functools
import uuid
from typing import Any, ClassVar

import trio

from tests.fakes.ports import MemoryDatabase, channel, make_pipeline, running

# Room in each channel for what a test feeds or lets pile up before it reads.
CHANNEL_CAPACITY = 16


class ActorHarness:
    CHANNELS: ClassVar[tuple[str, ...]] = ()
    JOB_ROW: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        *,
        db: MemoryDatabase | None = None,
        request_timeout_s: float = 900.0,
        channel_capacity: int = CHANNEL_CAPACITY,
    ):
        self.db = MemoryDatabase() if db is None else db
        self.request_timeout_s = request_timeout_s
        self.pipeline = make_pipeline(self.db, request_timeout_s=request_timeout_s)
        for name in self.CHANNELS:
            send, recv = channel(channel_capacity)
            setattr(self, f"{name}_send", send)
            setattr(self, f"{name}_recv", recv)

    def add_request(self, **row) -> uuid.UUID:
        """A request row, as this actor finds one (`JOB_ROW`, then `row`)."""
        return self.db.add_request(**{**self.JOB_ROW, "timeout_s": self.request_timeout_s, **row})

    async def job(self, **row):
        """A job of a new request, in flight as the pipeline routes it to the actor."""
        return await self.in_flight(self.add_request(**row))

    async def in_flight(self, request_id: uuid.UUID):
        job = await self.pipeline.job(request_id)
        assert self.pipeline.inflight.add(job.id)
        return job

    def running(self, run, **ports_and_channels):
        """`run(pipeline=..., **ports_and_channels)` started, for the `async with` block;
        an actor that crashes fails the test with its exception."""
        return running(run, pipeline=self.pipeline, **ports_and_channels)

    def running_behind_permits(self, run, **ports_and_channels):
        """As `running`, for an actor that asks the rate limiter for permits: the harness's
        permit server (`self.permits`, serving `self.permits_recv`) is started first, then
        the actor (downstream first, as the service starts them)."""
        return running(
            _behind_permits,
            permits=self.permits,
            permits_recv=self.permits_recv,
            actor=functools.partial(run, pipeline=self.pipeline, **ports_and_channels),
        )

    def run(self):
        raise NotImplementedError("a harness says how its actor is started")


async def _behind_permits(*, permits, permits_recv, actor, task_status=trio.TASK_STATUS_IGNORED):
    async with trio.open_nursery() as nursery:
        await nursery.start(permits.serve, permits_recv)
        await nursery.start(actor)
        task_status.started()
