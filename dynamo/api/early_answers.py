"""Answers given before the request's body was read, on a kept-alive HTTP/1.1 connection.

The API answers some requests without reading their bodies: 413 for a body over the
limit (by its Content-Length), 401 before a body is worth reading, 415, 404, 405.
hypercorn 0.18 then mishandles the connection (its issue 314, open): the unread rest of
the body fills its queue to the app (`max_app_queue_size` messages) and, with nobody
reading it, the connection hangs for good after the answer, so the next request on it
is never answered; and a body still on its way when the answer ends makes it close the
connection without having said `Connection: close`.

`DrainUnreadBody` wraps the ASGI app that hypercorn serves. When an answer starts before
the body has ended, it first reads and discards the rest (at most `DRAIN_LIMIT_BYTES`,
within `DRAIN_S`), so that the connection is reused as for any answer. A longer or slower
body gets its answer with `Connection: close`, and the rest is discarded while hypercorn
closes the connection. An app that answers while still reading the body it streams
would lose the rest: this API reads a body whole before it answers, or never.
"""

from __future__ import annotations

import trio

# A body the API refused is read to its end, up to this many bytes, to keep the connection:
# reading a few MB on a local network costs less than a new connection; past that, the
# connection is closed instead.
DRAIN_LIMIT_BYTES = 4 * 1024 * 1024
# ... and for at most this long: a client sending slowly has its connection closed.
DRAIN_S = 5.0


class _Body:
    """What came of the request's body, whoever read it (the app or the drain)."""

    def __init__(self) -> None:
        self.ended = trio.Event()  # nothing more will come of the body
        self.disconnected = trio.Event()
        self.bytes_read = 0
        self.held_disconnect: dict | None = None  # read by the middleware, for the app

    def note(self, message: dict, *, for_app: bool) -> None:
        if message["type"] == "http.request":
            self.bytes_read += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.ended.set()
        elif message["type"] == "http.disconnect":
            if not for_app:
                self.held_disconnect = message
            self.ended.set()
            self.disconnected.set()


class DrainUnreadBody:
    """ASGI middleware: the rest of a body is read before an early answer (see above)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _Body()

        async def app_receive() -> dict:
            if body.held_disconnect is not None:
                return body.held_disconnect
            message = await receive()
            body.note(message, for_app=True)
            return message

        async with trio.open_nursery() as nursery:

            async def app_send(message: dict) -> None:
                if message["type"] == "http.response.start" and not body.ended.is_set():
                    if not await _drain(receive, body):
                        message = _closing(message)
                        # hypercorn's queue to the app must keep moving until it has
                        # closed the connection (its last message is a disconnect).
                        nursery.start_soon(_discard_until_disconnect, receive, body)
                await send(message)

            await self.app(scope, app_receive, app_send)


async def _drain(receive, body: _Body) -> bool:
    """Reads and discards the body's rest; True once it has ended."""
    with trio.move_on_after(DRAIN_S):
        await _discard(receive, body, until=body.ended, limit_bytes=DRAIN_LIMIT_BYTES)
    return body.ended.is_set()


async def _discard_until_disconnect(receive, body: _Body) -> None:
    await _discard(receive, body, until=body.disconnected, limit_bytes=None)


async def _discard(receive, body: _Body, *, until: trio.Event, limit_bytes: int | None) -> None:
    """Reads and drops messages until `until` is set, by a message read here or by the
    app (which may be waiting in `receive()` too), or `limit_bytes` were read."""
    async with trio.open_nursery() as nursery:

        async def stop_when_set() -> None:
            await until.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_when_set)
        while limit_bytes is None or body.bytes_read <= limit_bytes:
            body.note(await receive(), for_app=False)
        nursery.cancel_scope.cancel()


def _closing(start: dict) -> dict:
    headers = [(name, value) for name, value in start.get("headers", [])
               if name.lower() != b"connection"]
    return {**start, "headers": [*headers, (b"connection", b"close")]}
