"""The live page's event stream: server-sent events of request changes (contract §7).

`POST /events/tickets` (bearer token) answers a one-use ticket (`tickets.py`);
`GET /events?ticket=...` redeems it and streams, as `text/event-stream`. A client that can
send headers (not a browser's EventSource) may instead open `GET /events` with its
`Authorization: Bearer` header, checked as on every other route. Either way no token is
ever in the URL. The stream carries:

- `hello`: who is listening (`{"caller": ...}`), once, first;
- `request`: a request's body as GET /requests/{id} answers it, whenever its step or state
  changes, whichever process changed it (the database port's change feed, fed by
  PostgreSQL NOTIFY): a viewer gets only their own requests, the broadcaster all;
- `status`: for the broadcaster, GET /status's body every `STATUS_EVERY_S`;
- `resync`: changes may have been missed (the feed reconnected): read the lists again.

A comment line every `KEEPALIVE_S` keeps proxies from closing an idle stream. A stream
ends after `STREAM_MAX_S`, or when its subscriber falls behind; the page then asks for a
new ticket, which checks its token again (a revoked token or a changed role is noticed).
"""

from __future__ import annotations

import json
import logging
import uuid

import trio
from quart import Blueprint, Response, current_app, request
from quart_schema import document_response, security_scheme, validate_querystring, validate_response

from dynamo.api import bodies, ops_routes, schemas
from dynamo.api.access import Caller, authenticate, unauthorized
from dynamo.api.context import current_api
from dynamo.api.errors import ApiError
from dynamo.api.openapi import BEARER_OR_TICKET, errors
from dynamo.api.tickets import TICKET_TTL_S
from dynamo.database.changes import RESYNC, RequestChange
from dynamo.supervision.unavailable import Unavailable

log = logging.getLogger(__name__)

blueprint = Blueprint("stream", __name__)

# Where the app keeps its Tickets and the database's change feed (`app.extensions`).
TICKETS_KEY = "dynamo.tickets"
CHANGES_KEY = "dynamo.request_changes"
# The broadcaster's status panel (rate limit, actors) refreshes this often.
STATUS_EVERY_S = 2.0
# Under the usual 60 s idle timeout of proxies.
KEEPALIVE_S = 15.0
# A stream re-authenticates this often (see the module's docstring).
STREAM_MAX_S = 15 * 60.0
# Reading one changed request; a database that hangs makes the page resync instead.
LOAD_DEADLINE_S = 5.0
STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


@blueprint.post("/events/tickets")
@validate_response(schemas.Ticket, 201)
@errors(401, 503)
async def issue_ticket():
    """A one-use ticket for the event stream, good for a few seconds."""
    caller = await authenticate()
    ticket = current_app.extensions[TICKETS_KEY].issue(caller)
    body = {"ticket": ticket, "expires_in_s": TICKET_TTL_S, "caller": _caller_json(caller)}
    return body, 201, {"Cache-Control": "no-store"}


@blueprint.get("/events")
@validate_querystring(schemas.EventsQuery)
@document_response(schemas.EventStream, 200)
@errors(401, 503)
@security_scheme(BEARER_OR_TICKET)
async def events(query_args: schemas.EventsQuery):
    """The live stream of request changes (server-sent events); a `ticket` or the bearer
    token in the Authorization header authenticates."""
    if request.headers.get("Authorization"):
        caller = await authenticate()
    else:
        caller = current_app.extensions[TICKETS_KEY].redeem(query_args.ticket)
    if caller is None:
        raise unauthorized(
            "a valid ticket (POST /events/tickets) or an Authorization: Bearer header is required"
        )
    changes = current_app.extensions.get(CHANGES_KEY)
    if changes is None:
        raise ApiError(503, "the live stream is not available", {"Retry-After": "5"})
    log.info("event stream opened for %s (%s)", caller.user_id, caller.role)
    response = Response(
        _stream(current_api(), changes, caller),
        content_type="text/event-stream",
        headers=STREAM_HEADERS,
    )
    response.timeout = None  # the stream is meant to last
    return response


async def _stream(api, changes, caller: Caller):
    started = trio.current_time()
    with changes.subscribe() as receive:
        yield _event("hello", {"caller": _caller_json(caller)})
        next_status = started
        last_sent = started
        while trio.current_time() - started < STREAM_MAX_S:
            now = trio.current_time()
            if caller.is_broadcaster and now >= next_status:
                status = await _status(api)
                if status is not None:
                    yield _event("status", status)
                    last_sent = now
                next_status = now + STATUS_EVERY_S
            if now - last_sent >= KEEPALIVE_S:
                yield b": keepalive\n\n"
                last_sent = now
            wake_at = min(
                next_status if caller.is_broadcaster else now + KEEPALIVE_S, last_sent + KEEPALIVE_S
            )
            batch: list | None = []
            # The cancel scope ends before any yield (a yield inside it would leak it).
            with trio.move_on_at(wake_at):
                batch = await _next_batch(receive)
            if batch is None:
                return  # fell behind: the page starts over with a new ticket
            for item in batch:
                event = await _event_for(api, caller, item)
                if event is not None:
                    yield event
                    last_sent = trio.current_time()


async def _next_batch(receive) -> list | None:
    """The next change and any already waiting, duplicates merged; None at the end."""
    try:
        items = [await receive.receive()]
    except trio.EndOfChannel:
        return None
    while True:
        try:
            items.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    if RESYNC in items:
        return [RESYNC]  # the page reads everything again anyway
    latest: dict[uuid.UUID, RequestChange] = {item.request_id: item for item in items}
    return list(latest.values())


async def _event_for(api, caller: Caller, item) -> bytes | None:
    if item == RESYNC:
        return _event("resync", {})
    if not caller.may_see(item.viewer_id):
        return None
    try:
        with trio.fail_after(LOAD_DEADLINE_S):
            row = await api.pipeline.db.load_request(item.request_id)
    except (Unavailable, trio.TooSlowError) as exc:
        log.warning("event stream: cannot read a changed request: %s", type(exc).__name__)
        return _event("resync", {})
    if row is None:
        return None
    return _event("request", bodies.request_json(row))


async def _status(api) -> dict | None:
    try:
        with trio.fail_after(LOAD_DEADLINE_S):
            return await ops_routes.status_body(api)
    except (Unavailable, trio.TooSlowError) as exc:
        log.warning("event stream: no status: %s", type(exc).__name__)
        return None


def _caller_json(caller: Caller) -> dict:
    return {
        "twitch_user_id": caller.user_id,
        "twitch_display_name": caller.display_name,
        "role": caller.role,
    }


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
