"""Reading, listing and cancelling image requests over HTTP (contract §7).

A viewer sees only their own requests, a broadcaster any; a request the caller may not
see answers 404, so that its existence is not revealed. Listing is newest first, in
pages with an opaque cursor (created_at, id). Cancelling is the broadcaster's alone, and
only before the image is being generated (nothing has been paid for yet): the request
fails as `cancelled` and goes to `finalize_send`, where the ledger refunds its debit.
"""

from __future__ import annotations

import logging
import uuid

from quart import Blueprint, request

from dynamo import genreq
from dynamo.api import bodies, queries
from dynamo.api.access import Caller, authenticate, authenticate_broadcaster
from dynamo.api.context import current_api
from dynamo.api.errors import ApiError, bounded, not_found
from dynamo.jobs import CANCELLABLE_STEPS, Reason, State, Style
from dynamo.messages import failure

log = logging.getLogger(__name__)

blueprint = Blueprint("requests", __name__)

# Listing pages: the default size and the most one page may hold.
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
STATES = tuple(state.value for state in State)
STYLES = tuple(style.value for style in Style)


@blueprint.get("/requests/<request_id>")
@bounded
async def get_request(request_id: str):
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
@bounded
async def list_requests():
    api = current_api()
    caller = await authenticate()
    args = request.args
    viewer = args.get("viewer") or None
    if viewer is not None:
        _check_viewer_id(viewer)
    if not caller.is_broadcaster:
        if viewer is not None and viewer != caller.user_id:
            raise ApiError(403, "a viewer may only list their own requests")
        viewer = caller.user_id
    state = _choice(args, "state", STATES)
    style = _choice(args, "style", STYLES)
    limit = _limit(args.get("limit") or None)
    before = None
    if cursor := args.get("before"):
        try:
            before = bodies.parse_cursor(cursor)
        except ValueError:
            raise ApiError(400, "before: must be a `next` cursor from an earlier page") from None
    rows = await queries.list_requests(
        api.pipeline.db, viewer_id=viewer, state=state, style=style, before=before, limit=limit + 1
    )
    page = rows[:limit]
    following = bodies.cursor_after(page[-1]) if len(rows) > limit else None
    return {"requests": [bodies.request_json(row) for row in page], "next": following}


def _check_viewer_id(viewer: str) -> None:
    if len(viewer) > genreq.MAX_VIEWER_FIELD_CHARS or not viewer.isprintable():
        raise ApiError(
            400,
            f"viewer: must be a Twitch user id (1 to "
            f"{genreq.MAX_VIEWER_FIELD_CHARS} printable characters)",
        )


def _choice(args, name: str, choices: tuple[str, ...]) -> str | None:
    value = args.get(name) or None
    if value is not None and value not in choices:
        raise ApiError(400, f"{name}: must be one of {', '.join(choices)}")
    return value


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE_SIZE
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
        raise ApiError(400, "limit: must be a whole number of at least 1")
    return min(int(raw), MAX_PAGE_SIZE)


@blueprint.delete("/requests/<request_id>")
@bounded
async def cancel_request(request_id: str):
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
    if not await pipeline.fail(job, failure(Reason.CANCELLED, "cancelled by the broadcaster")):
        raise ApiError(409, "the request moved on while being cancelled; it was not cancelled")
    log.info("request cancelled by the broadcaster", extra=job.log_extra)
    # Reloaded: a debit reserved meanwhile has its flow id stored now, and must be refunded.
    row = await pipeline.db.load_request(job.id)
    job = pipeline.job_from_row(row)
    added = pipeline.inflight.add(job.id)
    try:
        await api.finalize_send.send(job)
    except BaseException:
        if added:
            pipeline.inflight.finish(job.id)  # not sent: the resume sweep routes it again
        raise
    return bodies.request_json(row), 202
