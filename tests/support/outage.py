"""A TCP proxy a test can cut and restore: an outage of a real server that other tests
share (PostgreSQL, RabbitMQ), or of a fake (S3), without stopping the server itself.

`Proxy(port)` listens on 127.0.0.1, a free port, and relays every connection to
127.0.0.1:`port`. `cut()` is the server going away: every open connection is reset, and
the listening socket is closed, so new connections are refused (ECONNREFUSED), as with a
stopped server. `answer_503()` is a server that is up but failing: each new connection
gets an HTTP 503 and is closed. `restore()` relays again on the same port.

Run it in the test's nursery: `proxy = await nursery.start(Proxy(5432).serve)`.
"""

from __future__ import annotations

import contextlib
import socket

import trio

LOCALHOST = "127.0.0.1"
RELAY_CHUNK = 65536
_HTTP_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 19\r\nConnection: close\r\n\r\nService Unavailable"
)


class Proxy:
    def __init__(self, target_port: int, *, target_host: str = LOCALHOST):
        self.target = (target_host, target_port)
        self.port: int | None = None
        self.mode = "relay"  # relay | cut | 503
        self.connections = 0
        self._pipes: set[trio.CancelScope] = set()
        self._listening = trio.CancelScope()
        self._restored = trio.Event()

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                listener = await self._listen()
                if task_status is not trio.TASK_STATUS_IGNORED:
                    task_status.started(self)
                    task_status = trio.TASK_STATUS_IGNORED
                with self._listening:
                    async with listener:
                        while True:
                            stream = await listener.accept()
                            nursery.start_soon(self._handle, stream)
                # cut(): the listener is closed until restore().
                await self._restored.wait()
                self._listening, self._restored = trio.CancelScope(), trio.Event()

    async def _listen(self) -> trio.SocketListener:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # The same port after a cut, so that clients find the server again.
        await sock.bind((LOCALHOST, self.port or 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        return trio.SocketListener(sock)

    def cut(self) -> None:
        """The server is gone: open connections reset, new ones refused."""
        self.mode = "cut"
        self._listening.cancel()
        for scope in list(self._pipes):
            scope.cancel()

    def answer_503(self) -> None:
        """The server answers every HTTP request with 503 (open connections reset)."""
        self.mode = "503"
        for scope in list(self._pipes):
            scope.cancel()

    def restore(self) -> None:
        self.mode = "relay"
        self._restored.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client:
            if self.mode == "503":
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    with trio.move_on_after(5):
                        await client.receive_some(RELAY_CHUNK)
                        await client.send_all(_HTTP_503)
                return
            if self.mode != "relay":
                _reset(client)
                return
            try:
                server = await trio.open_tcp_stream(*self.target)
            except OSError:
                _reset(client)
                return
            async with server:
                with trio.CancelScope() as scope:
                    self._pipes.add(scope)
                    try:
                        async with trio.open_nursery() as pipes:
                            pipes.start_soon(_pump, client, server, pipes.cancel_scope)
                            pipes.start_soon(_pump, server, client, pipes.cancel_scope)
                    finally:
                        self._pipes.discard(scope)
                if scope.cancelled_caught:  # cut: an abrupt reset, as a dead server gives
                    _reset(client)
                    _reset(server)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope):
    try:
        while data := await source.receive_some(RELAY_CHUNK):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    done.cancel()


def _reset(stream: trio.SocketStream) -> None:
    """Closes with RST instead of FIN (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
