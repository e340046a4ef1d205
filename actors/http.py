"""The HTTP API actor: serves `dynamo.api`'s app with hypercorn on host:port.

Receives HTTP requests, and the database port's change feed of request steps (for the
live page's event stream; it runs in this actor's nursery and reconnects by itself).
Sends new requests into the pipeline on `reserve_send` and cancelled ones on
`finalize_send` (both in `ApiContext`); persists requests and Idempotency-Keys in
PostgreSQL through the database port.

`task_status.started(url)` reports the URL it is bound to (the real port when asked for
port 0) once the socket listens. On shutdown (cancellation) the listener closes and
requests in progress are cancelled: a request is stored before it is answered 202, and
one not yet routed into the pipeline is taken up by the resume sweep. On restart it binds
again and serves with a fresh app (the auth cache starts empty).
"""

from __future__ import annotations

import logging
from functools import partial

import hypercorn.config
import hypercorn.trio
import trio

from dynamo.api import ApiContext, create_app
from dynamo.api.early_answers import DrainUnreadBody

__all__ = ["ApiContext", "run"]

log = logging.getLogger(__name__)

# Longer than the usual client pool idle time (httpx: 5 s), so a pooled connection is
# not closed by us just as the client reuses it.
KEEP_ALIVE_S = 75.0


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run(*, api: ApiContext, host: str, port: int, task_status=trio.TASK_STATUS_IGNORED):
    config = hypercorn.config.Config()
    config.bind = [bind_address(host, port)]
    config.accesslog = None  # the app logs one line per request itself, without headers
    config.errorlog = log
    config.keep_alive_timeout = KEEP_ALIVE_S
    async with trio.open_nursery() as nursery:
        request_changes = api.pipeline.db.request_changes()
        await nursery.start(request_changes.run)
        app = create_app(api, request_changes=request_changes)
        # An answer given before the body was read must not hang or drop a kept-alive
        # connection (hypercorn issue 314): see dynamo.api.early_answers.
        served = DrainUnreadBody(app)
        # hypercorn reports the addresses as its listening sockets see them: port 0
        # comes back as the port the system chose.
        binds = await nursery.start(partial(hypercorn.trio.serve, served, config, mode="asgi"))
        url = binds[0]
        log.info("HTTP API listening on %s", url)
        task_status.started(url)
