"""Submitting an image request over HTTP: POST /requests (contract §7).

The body is a whole `genreq` message (a broadcaster may submit for anyone, a viewer only
for themselves) or the short form `{"style", "inputs"}` for the caller; it is validated
as the broker's messages are (an invalid one is answered 400 and not stored). A valid
request is stored (source "http") and routed into the pipeline through `reserve_send`,
then answered 202.

`Idempotency-Key` (per caller): a retry with the same body (compared as canonical JSON)
answers exactly what the first try was answered (202, the same body, whatever state the
request has reached since) plus `Idempotent-Replayed: true`, without storing or routing
anything; another body is 409. Two concurrent first tries make one request: the request
row's unique `message_key` is derived from the caller and the key.
"""

from __future__ import annotations

import hashlib
import json
import logging

import trio
from quart import Blueprint, request
from quart_schema import document_headers, document_request, document_response, validate_response

from dynamo import metrics
from dynamo.api import bodies, schemas
from dynamo.api.access import Caller, authenticate
from dynamo.api.context import current_api
from dynamo.api.errors import DATABASE_DEADLINE_S, ApiError
from dynamo.api.openapi import errors
from dynamo.domain import genreq
from dynamo.domain.jobs import Step, state_for

log = logging.getLogger(__name__)

blueprint = Blueprint("submit", __name__)

# A genreq message is a few hundred bytes; this leaves room while refusing junk.
MAX_BODY_BYTES = 16 * 1024
# Keys of the full genreq message; a body with none of them is the short form.
MESSAGE_KEYS = frozenset({"type", "viewer", "state", "payload"})
IDEMPOTENCY_KEY_MAX_CHARS = 255
# The state a new request is answered with: a stored, valid request not yet routed.
ACCEPTED_STATE = state_for(Step.RECEIVED, failed=False).value


@blueprint.post("/requests")
@document_request(schemas.NewRequest)
@document_headers(schemas.SubmitHeaders)
# Documents the headers; the body is checked by validate_response (quart-schema keeps
# one entry per status, and the later decorator's stands in the document).
@document_response(schemas.Accepted, 202, schemas.AcceptedHeaders)
@validate_response(schemas.Accepted, 202)
@errors(400, 401, 403, 409, 413, 415, 503)
async def submit_request():
    """Submit an image request."""
    api = current_api()
    caller = await authenticate()
    if request.mimetype != "application/json":
        raise ApiError(415, "the body must be JSON (Content-Type: application/json)")
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body must be at most {MAX_BODY_BYTES} bytes")
    raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)  # app's MAX_CONTENT_LENGTH bounds a chunked body
    body = _json_object(raw)
    idempotency_key = _idempotency_key()
    parsed = _parse(body, raw, caller)
    digest = _canonical_digest(body)
    with trio.fail_after(DATABASE_DEADLINE_S):
        row, created = await _store(api, caller, parsed, idempotency_key, digest)
    headers = {"Location": bodies.request_url(row["id"])}
    # The first answer, and every replay of it, says what the request was when accepted.
    answer = {**bodies.accepted_json(row), "state": ACCEPTED_STATE}
    if created:
        metrics.REQUESTS_RECEIVED.labels("http").inc()
        log.info(
            "request received over HTTP from %s",
            caller.user_id,
            extra={"request_id": str(row["id"])},
        )
        await _route(api, row)
    else:
        headers["Idempotent-Replayed"] = "true"
    return answer, 202, headers


async def _store(api, caller: Caller, parsed, idempotency_key: str | None, digest: str):
    """(the request's row, created); a repeated Idempotency-Key answers the first request."""
    db = api.pipeline.db
    fields = api.pipeline.request_fields(parsed, source="http")
    if idempotency_key is None:
        request_id, created = await db.insert_request(**fields)
        return await db.load_request(request_id), created
    known = await db.find_idempotency_key(caller.user_id, idempotency_key)
    if known is not None:
        _same_body_or_conflict(known["body_sha256"], digest)
        return await db.load_request(known["image_request_id"]), False
    # The request row's unique message_key makes two concurrent first tries one request.
    scope = hashlib.sha256(f"{caller.user_id}\n{idempotency_key}".encode()).hexdigest()
    request_id, created = await db.insert_request(
        **fields, message_key=f"http:{scope}", body_sha256=digest
    )
    if not created:
        _same_body_or_conflict(await db.request_body_sha256(request_id), digest)
    await db.save_idempotency_key(caller.user_id, idempotency_key, digest, request_id)
    return await db.load_request(request_id), created


def _canonical_digest(body: dict) -> str:
    """SHA-256 of the body as canonical JSON: field order and spacing do not make a retry
    a different request."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _same_body_or_conflict(stored_digest: str | None, digest: str) -> None:
    if stored_digest != digest:
        raise ApiError(409, "this Idempotency-Key was already used with a different body")


async def _route(api, row) -> None:
    pipeline = api.pipeline
    job = pipeline.job_from_row(row)
    if not pipeline.inflight.add(job.id):
        return
    try:
        # Waits while the pipeline is full: backpressure reaches the client.
        await pipeline.inflight.route(job, api.reserve_send)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        # Shutting down: the request is stored and resumes on the next start.
        log.warning("pipeline closed; the request waits for the next start", extra=job.log_extra)


def _json_object(raw: bytes) -> dict:
    """The body's JSON object, read as the broker's messages are (UTF-8 only, depth and
    numbers bounded, no lone surrogates), or a 400 saying why not."""
    try:
        return genreq.load_json(raw)
    except genreq.InvalidRequest as exc:
        raise ApiError(400, exc.reason_text) from None


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX_CHARS or not all("!" <= c <= "~" for c in key):
        raise ApiError(
            400,
            f"Idempotency-Key: must be 1 to {IDEMPOTENCY_KEY_MAX_CHARS} visible ASCII characters",
        )
    return key


def _parse(body: dict, raw: bytes, caller: Caller) -> genreq.ParsedRequest:
    try:
        if MESSAGE_KEYS & body.keys():
            parsed = genreq.parse_message(raw)
        else:
            parsed = genreq.parse_inputs(caller.viewer, body.get("style"), body.get("inputs"))
    except genreq.InvalidRequest as exc:
        raise ApiError(400, exc.reason_text) from None
    except RecursionError:  # parsed once already, but deeper in the stack this time
        raise ApiError(400, "body: nested too deeply") from None
    if not caller.may_see(parsed.viewer.twitch_user_id):
        raise ApiError(403, "a viewer may only submit requests for themselves")
    return parsed
