"""`dynamo.api.early_answers.DrainUnreadBody` alone, under the autojump clock: an ASGI
server stand-in that queues the body to the app as hypercorn does (a bounded queue, and a
disconnect put on it when the answer ends), and apps that answer early or read the body.
The service-level check, over real sockets, is tests/integration/test_http_fuzz.py."""

from __future__ import annotations

import trio

from dynamo.api import early_answers

TEST_TIMEOUT_S = 600
# hypercorn's Config.max_app_queue_size
APP_QUEUE = 10
CHUNK = b"x" * 65536


class Server:
    """Feeds a request body to the app and records what the app sent."""

    def __init__(self, chunks: int, *, ends: bool = True):
        self.put, self.receive = trio.open_memory_channel(APP_QUEUE)
        self.chunks = chunks
        self.ends = ends
        self.sent: list[dict] = []
        self.fed = 0

    async def feed(self) -> None:
        for _ in range(self.chunks):
            await self.put.send({"type": "http.request", "body": CHUNK, "more_body": True})
            self.fed += 1
        if self.ends:
            await self.put.send({"type": "http.request", "body": b"", "more_body": False})
            self.fed += 1
        else:
            await trio.sleep_forever()  # a client that stops sending

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            # As hypercorn closes the stream: a disconnect for the app, on the same queue.
            await self.put.send({"type": "http.disconnect"})

    def start_headers(self) -> list:
        [start] = [m for m in self.sent if m["type"] == "http.response.start"]
        return start["headers"]


async def early_413(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}", "more_body": False})


async def serve(server: Server, app) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.feed)
        await early_answers.DrainUnreadBody(app)({"type": "http"}, server.receive.receive,
                                                 server.send)
        nursery.cancel_scope.cancel()


async def test_the_rest_of_a_body_is_read_before_an_early_answer(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        server = Server(chunks=30)  # 2 MB: three times what hypercorn's queue holds
        await serve(server, early_413)
        assert server.fed == 31  # all of it read
        assert (b"connection", b"close") not in server.start_headers()  # kept alive


async def test_a_body_beyond_the_limit_is_answered_with_connection_close(autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        server = Server(chunks=early_answers.DRAIN_LIMIT_BYTES // len(CHUNK) + 20)
        await serve(server, early_413)
        assert server.start_headers()[-1] == (b"connection", b"close")
        # The middleware returned: it read on until the disconnect, then let go.


async def test_a_body_that_stops_coming_is_answered_with_close_after_the_drain_time(
        autojump_clock):
    with trio.fail_after(TEST_TIMEOUT_S):
        server = Server(chunks=3, ends=False)
        started = trio.current_time()
        await serve(server, early_413)
        assert trio.current_time() - started == early_answers.DRAIN_S
        assert server.start_headers()[-1] == (b"connection", b"close")


async def test_an_app_that_reads_the_body_gets_all_of_it_and_its_answer_is_untouched(
        autojump_clock):
    received = []

    async def reading_app(scope, receive, send):
        while True:
            message = await receive()
            received.append(message)
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})

    with trio.fail_after(TEST_TIMEOUT_S):
        server = Server(chunks=25)
        await serve(server, reading_app)
        assert len(received) == 26 and sum(len(m["body"]) for m in received) == 25 * len(CHUNK)
        assert server.start_headers() == []
