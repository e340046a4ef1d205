"""The database port's queries for the safety net: an image's wait for the broadcaster,
the decision on it, its preview, and the counts /status shows.

A decision is one atomic UPDATE ... WHERE step = 'awaiting_approval' RETURNING: whichever
process or tab decides first moves the request on (and takes it as its owner, to route
it), and any later or racing decision finds it moved and is refused (409). A rejection
drops the image's bytes in the same transaction. Like `dynamo.database.reads`, each method runs
through the `Database`'s own calls, so the driver's errors come out as the port's.
"""

from __future__ import annotations

import uuid
from typing import Any

from dynamo.database.port import Database
from dynamo.domain.jobs import Reason, State, Step

# The decisions, as dynamo.image_request.approval_decision and the metric label name them.
APPROVED, REJECTED, TIMEOUT = "approved", "rejected", "timeout"
# At most this many timed-out waits are decided per look (the rest at the next one).
TIMEOUT_BATCH = 32

_DECIDE_SQL = """
    update dynamo.image_request set
        step = $3, state = $4, owner = $5, updated_at = now(),
        approval_decision = $6, approval_decided_at = now(),
        failure_reason = $7, error_message = $8, failure_detail = $9
    where id = $1 and step = 'awaiting_approval'
      and ($2 = false or approval_deadline <= now())
    returning id
"""


class ApprovalQueries:
    def __init__(self, db: Database):
        self.db = db

    async def await_approval(self, request_id: uuid.UUID, timeout_s: float) -> bool:
        """generated → awaiting_approval, deciding by the timeout or the request's own
        deadline, whichever comes first."""
        status = await self.db.execute(
            "update dynamo.image_request set step = 'awaiting_approval', state = $2, "
            "updated_at = now(), approval_deadline = least(now() + make_interval(secs => $3), "
            "coalesce(expires_at, 'infinity')) where id = $1 and step = 'generated'",
            request_id,
            State.PROCESSING.value,
            timeout_s,
        )
        return status.endswith(" 1")

    async def decide(
        self,
        request_id: uuid.UUID,
        decision: str,
        *,
        approve: bool,
        owner: uuid.UUID,
        message: str = "",
        detail: str = "",
    ) -> bool | None:
        """Takes the decision if the request still waits (for a TIMEOUT: and its wait is
        over); True if taken, None if the request does not wait (any more)."""
        step = Step.APPROVED if approve else Step.FAILING
        return await self.db.run_with_pool(
            _decide,
            request_id,
            decision == TIMEOUT,
            step.value,
            owner,
            decision,
            None if approve else Reason.REJECTED.value,
            None if approve else message,
            None if approve else detail[:2000],
        )

    async def timed_out(self) -> list[uuid.UUID]:
        """Requests whose wait for a decision is over, oldest deadline first."""
        rows = await self.db.fetch(
            "select id from dynamo.image_request where step = 'awaiting_approval' "
            "and approval_deadline <= now() order by approval_deadline limit $1",
            TIMEOUT_BATCH,
        )
        return [row["id"] for row in rows]

    async def preview(self, request_id: uuid.UUID) -> Any:
        """(viewer id, image bytes) of a request awaiting approval, or None."""
        return await self.db.fetchrow(
            "select r.twitch_user_id, g.data from dynamo.image_request r "
            "join dynamo.generated_image g on g.image_request_id = r.id "
            "where r.id = $1 and r.step = 'awaiting_approval'",
            request_id,
        )

    async def flag_image(self, request_id: uuid.UUID) -> None:
        """The generated image was flagged: marked, and its bytes dropped for good."""
        await self.db.execute(
            "update dynamo.image_request set image_flagged = true where id = $1", request_id
        )
        await self.db.execute(
            "delete from dynamo.generated_image where image_request_id = $1", request_id
        )

    async def counts(self) -> dict[str, int]:
        row = await self.db.fetchrow(
            "select count(*) filter (where step = 'awaiting_approval') as waiting, "
            "count(*) filter (where approval_decision = 'approved') as approved, "
            "count(*) filter (where approval_decision = 'rejected') as rejected, "
            "count(*) filter (where approval_decision = 'timeout') as timeout, "
            "count(*) filter (where image_flagged) as images_flagged "
            "from dynamo.image_request"
        )
        return dict(row) if row is not None else {}


async def _decide(pool, request_id, timed_out, step, owner, decision, reason, message, detail):
    async with pool.acquire() as conn:
        async with conn.transaction():
            moved = await conn.fetchval(
                _DECIDE_SQL,
                request_id,
                timed_out,
                step,
                State.PROCESSING.value,
                owner,
                decision,
                reason,
                message,
                detail,
            )
            if moved is None:
                return None
            if step == Step.FAILING.value:
                # Turned down: the image goes, it is nobody's to see any more.
                await conn.execute(
                    "delete from dynamo.generated_image where image_request_id = $1", request_id
                )
            return True
