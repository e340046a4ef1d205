"""The resume sweep and a job that goes all the way through while the sweep reads the
rows: an invalid request's result takes milliseconds, so intake can store it, route it
and the announcer finish it between the sweep's look at what is in flight and its read of
the rows. The row it read is stale then; routing it again published a second result
(seen in CI). The resume actor alone, with a fake database."""

from __future__ import annotations

import trio

from dynamo.domain.jobs import Reason, Step
from tests.fakes.ports import nothing_within
from tests.support.timeouts import VIRTUAL_S as TEST_TIMEOUT_S
from tests.unit.test_resume_unreadable import Sweep, SweptDatabase

QUIET_S = 30


class RacedDatabase(SweptDatabase):
    """Claims `racer`'s row as it was, while its job goes through and finishes."""

    def __init__(self) -> None:
        super().__init__()
        self.racer = None
        self.pipeline = None

    async def claim_unfinished(self, worker_id, in_flight, lease_s):
        rows = await super().claim_unfinished(worker_id, in_flight, lease_s)
        if self.racer is not None and self.pipeline.inflight.add(self.racer):
            self.requests[self.racer]["step"] = Step.DONE.value
            self.pipeline.inflight.finish(self.racer)
            self.racer = None
        return rows


async def test_a_row_finished_while_the_sweep_read_it_is_not_routed_again(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        db = RacedDatabase()
        db.racer = db.add_request(step=Step.REFUNDED, failure_reason=Reason.INVALID.value,
                                  points_cost=0)
        waiting = db.add_request(step=Step.REFUNDED, failure_reason=Reason.INVALID.value,
                                 points_cost=0)
        sweep = Sweep(db)
        db.pipeline = sweep.pipeline
        async with sweep.run():
            answered = await sweep.recv("results").receive()
            assert await nothing_within(sweep.recv("results"), QUIET_S) is None
        assert answered.id == waiting
