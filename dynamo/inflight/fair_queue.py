"""The rate limiter's queue of reserved requests waiting for a generator worker."""

from __future__ import annotations

import math
from collections import deque

from dynamo.domain.jobs import Job


class FairQueue:
    """Jobs waiting for a generator worker, one FIFO per viewer, served round robin: after
    a viewer's job goes out, that viewer waits for everyone else's turn."""

    def __init__(self) -> None:
        self._by_viewer: dict[str, deque[Job]] = {}  # insertion order is the turn order
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def viewers_waiting(self) -> int:
        return len(self._by_viewer)

    def push(self, job: Job) -> None:
        self._by_viewer.setdefault(job.viewer.twitch_user_id, deque()).append(job)
        self._size += 1

    def peek(self) -> Job | None:
        """The job whose turn it is."""
        for jobs in self._by_viewer.values():
            return jobs[0]
        return None

    def served(self, job: Job) -> None:
        """Removes the job `peek()` gave; its viewer goes to the back of the line."""
        viewer = job.viewer.twitch_user_id
        jobs = self._by_viewer.pop(viewer)
        jobs.remove(job)
        self._size -= 1
        if jobs:
            self._by_viewer[viewer] = jobs

    def discard(self, job: Job) -> None:
        """Removes a job out of turn (it expired); the others keep their places."""
        viewer = job.viewer.twitch_user_id
        jobs = self._by_viewer[viewer]
        jobs.remove(job)
        self._size -= 1
        if not jobs:
            del self._by_viewer[viewer]

    def expired(self, now: float) -> list[Job]:
        return [job for jobs in self._by_viewer.values() for job in jobs if job.deadline <= now]

    def earliest_deadline(self) -> float:
        return min(
            (job.deadline for jobs in self._by_viewer.values() for job in jobs), default=math.inf
        )
