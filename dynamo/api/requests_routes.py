"""Reading, listing and cancelling image requests over HTTP (contract §7).

A viewer sees only their own requests, a broadcaster any; a request the caller may not
see answers 404, so that its existence is not revealed. Listing is newest first, in
pages with an opaque cursor (created_at, id); `before` also takes a request id (the page
after it) or an RFC 3339 time (requests created before it). Cancelling is the broadcaster's alone, and
only before the image is being generated (nothing has been paid for yet): the request
fails as `cancelled` and goes to `finalize_send`, where the ledger refunds its debit.
"""

from __future__ import annotations

import datetime
import logging
import uuid

from quart import Blueprint
from quart_schema import validate_querystring, validate_response

from dynamo.api import bodies, schemas
from dynamo.api.access import Caller, authenticate, authenticate_broadcaster
from dynamo.api.context import current_api
from dynamo.api.errors import ApiError, bounded, not_found
from dynamo.api.openapi import errors
from dynamo.domain.jobs import CANCELLABLE_STEPS, Reason, Step
from dynamo.domain.viewer_messages import failure

log = logging.getLogger(__name__)

blueprint = Blueprint("requests", __name__)

# Listing pages: the default size and the most one page may hold.
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


@blueprint.get("/requests/<request_id>")
@validate_response(schemas.RequestBody, 200)
@errors(401, 404, 503)
@bounded
async def get_request(request_id: str):
    """One request (its viewer's, or any for the broadcaster)."""
    api = current_api()
    caller = await authenticate()
    row = await _visible_row(api, caller, request_id)
    answer = bodies.request_json(row)
    if api.spend is not None:
        answer["openai_calls"] = await api.spend.request_calls(row["id"])
    return answer


async def _visible_row(api, caller: Caller, request_id: str):
    try:
        parsed_id = uuid.UUID(request_id)
    except ValueError:
        raise not_found() from None
    row = await api.pipeline.db.load_request(parsed_id)
    if row is None or not caller.may_see(row["twitch_user_id"]):
        raise not_found()
    return row


@blueprint.get("/requests")
@validate_querystring(schemas.ListQuery)
@validate_response(schemas.RequestPage, 200)
@errors(400, 401, 403, 503)
@bounded
async def list_requests(query_args: schemas.ListQuery):
    """List requests, newest first (a viewer sees only their own)."""
    api = current_api()
    caller = await authenticate()
    viewer = query_args.viewer
    if not caller.is_broadcaster:
        if viewer is not None and viewer != caller.user_id:
            raise ApiError(403, "a viewer may only list their own requests")
        viewer = caller.user_id
    limit = min(query_args.limit or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    before = None
    if query_args.before is not None:
        before = await _before(api, caller, query_args.before)
    rows = await api.pipeline.db.list_requests(
        viewer_id=viewer,
        state=query_args.state,
        style=query_args.style,
        before=before,
        limit=limit + 1,
    )
    page = rows[:limit]
    following = bodies.cursor_after(page[-1]) if len(rows) > limit else None
    return {"requests": [bodies.request_json(row) for row in page], "next": following}


async def _before(api, caller: Caller, value: str) -> tuple[datetime.datetime, uuid.UUID]:
    """(created_at, id) the page starts after; raises ApiError 400."""
    try:
        before = bodies.parse_before(value)
    except ValueError:
        raise ApiError(
            400, "before: must be a `next` cursor, a request id or an RFC 3339 time"
        ) from None
    if not isinstance(before, uuid.UUID):
        return before
    row = await api.pipeline.db.load_request(before)
    if row is None or not caller.may_see(row["twitch_user_id"]):
        raise ApiError(400, "before: no such request")
    return row["created_at"], row["id"]


@blueprint.delete("/requests/<request_id>")
@validate_response(schemas.RequestBody, 202)
@errors(401, 403, 404, 409, 503)
@bounded
async def cancel_request(request_id: str):
    """Cancel a request whose image is not yet being generated; its points are refunded
    and the viewer is told (broadcaster only)."""
    api = current_api()
    caller = await authenticate_broadcaster()
    pipeline = api.pipeline
    row = await _visible_row(api, caller, request_id)
    job = pipeline.job_from_row(row)
    if job.step not in CANCELLABLE_STEPS:
        raise ApiError(
            409,
            f"the request is {row['state']} (step {row['step']}): only a "
            "request whose image is not yet being generated can be cancelled",
        )
    # Only from a step that can be cancelled: the generator's claim (screened →
    # generating) may come between the read above and this compare-and-set.
    cancelled = failure(Reason.CANCELLED, "cancelled by the broadcaster")
    if not await pipeline.fail(job, cancelled, from_steps=CANCELLABLE_STEPS | {Step.RESERVING}):
        raise ApiError(409, "the request moved on while being cancelled; it was not cancelled")
    log.info("request cancelled by the broadcaster", extra=job.log_extra)
    # Reloaded: a debit reserved meanwhile has its flow id stored now, and must be refunded.
    row = await pipeline.db.load_request(job.id)
    job = pipeline.job_from_row(row)
    added = pipeline.inflight.add(job.id)
    await pipeline.inflight.route(job, api.finalize_send, added=added)
    return bodies.request_json(row), 202
