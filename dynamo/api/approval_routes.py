"""The broadcaster's decision on an image awaiting approval (contract §7), and its preview.

`POST /requests/{id}/approve` and `/reject` answer 202 with the request as it now is, or
409 when it does not await a decision (already decided, here or in another process or
tab, timed out, or at another step); two racing decisions end in one outcome and one
409. `GET /requests/{id}/preview` serves the waiting image's bytes to the broadcaster
alone (they are in PostgreSQL, in no public place): 404 when none waits. A viewer is
refused (403) even for their own request, as is a caller without a token (401).
"""

from __future__ import annotations

import logging
import uuid

from quart import Blueprint, Response
from quart_schema import document_response, validate_response

from dynamo.api import bodies, schemas
from dynamo.api.access import authenticate_broadcaster
from dynamo.api.context import current_api
from dynamo.api.errors import ApiError, bounded, not_found
from dynamo.api.openapi import errors
from dynamo.images import processing as imaging

log = logging.getLogger(__name__)

blueprint = Blueprint("approval", __name__)

# The preview is the broadcaster's alone: never kept by a shared cache.
PREVIEW_CACHE_CONTROL = "private, no-store"


def _request_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise not_found() from None


async def _decide(request_id: str, *, approve: bool):
    api = current_api()
    caller = await authenticate_broadcaster()
    parsed = _request_id(request_id)
    if api.approvals is None:
        raise ApiError(409, "this process takes no approval decisions")
    by = caller.display_name or caller.user_id
    if not await api.approvals.decide(parsed, approve=approve, by=by):
        row = await api.pipeline.db.load_request(parsed)
        if row is None:
            raise not_found()
        raise ApiError(
            409,
            f"the request does not await approval (it is {row['state']}, step "
            f"{row['step']}): already decided, timed out, or not there yet",
        )
    row = await api.pipeline.db.load_request(parsed)
    return bodies.request_json(row), 202


@blueprint.post("/requests/<request_id>/approve")
@validate_response(schemas.RequestBody, 202)
@errors(401, 403, 404, 409, 503)
@bounded
async def approve(request_id: str):
    """Approve the image awaiting approval: stored, alert, debit accepted (broadcaster)."""
    return await _decide(request_id, approve=True)


@blueprint.post("/requests/<request_id>/reject")
@validate_response(schemas.RequestBody, 202)
@errors(401, 403, 404, 409, 503)
@bounded
async def reject(request_id: str):
    """Turn the image awaiting approval down: rejected, refunded (broadcaster)."""
    return await _decide(request_id, approve=False)


@blueprint.get("/requests/<request_id>/preview")
@document_response(schemas.ImageFile, 200)
@errors(401, 403, 404, 503)
@bounded
async def preview(request_id: str):
    """The image awaiting approval, as generated (broadcaster only)."""
    api = current_api()
    await authenticate_broadcaster()
    parsed = _request_id(request_id)
    if api.approvals is None:
        raise not_found("image awaiting approval")
    waiting = await api.approvals.queries.preview(parsed)
    if waiting is None:
        raise not_found("image awaiting approval")
    data = bytes(waiting["data"])
    return Response(
        data,
        content_type=imaging.content_type(data),
        headers={"Cache-Control": PREVIEW_CACHE_CONTROL},
    )
