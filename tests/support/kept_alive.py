"""HTTP/1.1 on one kept-alive connection, as browsers and reverse proxies use it: a raw
client that sends request after request on the same socket and reads each answer to its
end, and a seeded mix of hostile requests that the server answers early (413, 401, 415,
404, 405) while their bodies are still coming.

A server may end a kept-alive connection, but only after an answer that says
`Connection: close`; then the client connects again. Any other end, or an answer that
does not come within `ANSWER_WITHIN_S`, is a request left unanswered.
"""

from __future__ import annotations

import dataclasses
import random
import re

import trio

from tests.support import hostile

# Every answer comes at once on loopback; this is generous for a loaded machine.
ANSWER_WITHIN_S = 10
_CONTENT_LENGTH = re.compile(rb"^content-length:\s*(\d+)\s*$", re.IGNORECASE | re.MULTILINE)
_CHUNKED = re.compile(rb"^transfer-encoding:\s*chunked\s*$", re.IGNORECASE | re.MULTILINE)
_CLOSE = re.compile(rb"^connection:\s*close\s*$", re.IGNORECASE | re.MULTILINE)


class Unanswered(Exception):
    """The request got no answer: none in time, or the connection ended without one."""


@dataclasses.dataclass
class Answer:
    status: int
    closes: bool  # the answer said `Connection: close`


class KeptAliveConnection:
    """One connection to 127.0.0.1:port, reused for every request until the server
    says `Connection: close` (then the next request opens a new one)."""

    def __init__(self, port: int):
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.buffer = b""
        self.connections = 0

    async def exchange(self, raw: bytes, *, head: bool = False) -> Answer:
        """Sends `raw` (a whole request) while reading its answer; raises Unanswered."""
        if self.stream is None:
            self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            self.buffer = b""
            self.connections += 1
        answer, broken, self._sent = None, None, False
        with trio.move_on_after(ANSWER_WITHIN_S):
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send, raw)
                    answer = await self._read_answer(head=head)
                    # The server may answer before reading the whole request; the rest of
                    # it must still go out (or the connection end, as announced).
                    if answer.closes:
                        nursery.cancel_scope.cancel()
            except* Unanswered as group:
                broken = group.exceptions[0]
        if broken is not None or answer is None or not (answer.closes or self._sent):
            await self.close()
            if broken is not None:
                raise broken
            if answer is None:
                raise Unanswered(f"no complete answer within {ANSWER_WITHIN_S} s")
            raise Unanswered(f"answered {answer.status}, then the rest of the request was "
                             f"not read within {ANSWER_WITHIN_S} s")
        if answer.closes:
            await self.close()
        return answer

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
        self.stream = None

    async def _send(self, raw: bytes) -> None:
        try:
            await self.stream.send_all(raw)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # an answer may have ended the connection: _read_answer says whether
        self._sent = True

    async def _receive(self) -> bytes:
        try:
            chunk = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise Unanswered(f"connection broken: {exc!r}") from exc
        if not chunk:
            raise Unanswered("connection closed without an answer")
        return chunk

    async def _read_answer(self, *, head: bool) -> Answer:
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += await self._receive()
        header, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        match = hostile.STATUS_LINE.match(header)
        if match is None:
            raise Unanswered(f"not an HTTP answer: {header[:100]!r}")
        status = int(match.group(1))
        if head or status in (204, 304) or 100 <= status < 200:
            return Answer(status, bool(_CLOSE.search(header)))
        if _CHUNKED.search(header):
            await self._skip_chunked()
        else:
            length = _CONTENT_LENGTH.search(header)
            if length is None:
                raise Unanswered(f"an answer without a length: {header[:200]!r}")
            await self._skip(int(length.group(1)))
        return Answer(status, bool(_CLOSE.search(header)))

    async def _skip(self, count: int) -> None:
        while len(self.buffer) < count:
            self.buffer += await self._receive()
        self.buffer = self.buffer[count:]

    async def _skip_chunked(self) -> None:
        while True:
            while b"\r\n" not in self.buffer:
                self.buffer += await self._receive()
            size_line, self.buffer = self.buffer.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            await self._skip(size + 2)
            if size == 0:
                return


def kept_alive(raw: bytes) -> bytes:
    """A request of tests.support.hostile without its `Connection: close`."""
    return raw.replace(b"Connection: close\r\n", b"", 1)


def early_answer_case(rng: random.Random, auth: bytes) -> tuple[str, bytes]:
    """(kind, raw request) that the service answers before reading the body, if it can."""
    json_type = b"Content-Type: application/json\r\n"
    kind = rng.choice(["big body", "big body", "10 KB token", "bad token with body",
                       "wrong content type", "junk path", "junk method", "random"])
    if kind == "big body":
        body = b"x" * rng.randrange(100_000, 2_000_001)
        raw = hostile.request(b"POST", b"/requests", auth + json_type, body)
    elif kind == "10 KB token":
        raw = hostile.request(b"GET", b"/requests", b"Authorization: Bearer " + b"a" * 10_000 + b"\r\n")
    elif kind == "bad token with body":
        body = hostile.VALID_GHOST * rng.randrange(1, 4000)
        raw = hostile.request(b"POST", b"/requests", b"Authorization: Bearer nope\r\n" + json_type, body)
    elif kind == "wrong content type":
        body = b"style=ghost&" * rng.randrange(1, 20_000)
        raw = hostile.request(b"POST", b"/requests", auth + b"Content-Type: text/plain\r\n", body)
    elif kind == "junk path":
        body = b"j" * rng.randrange(0, 300_000)
        raw = hostile.request(b"POST", b"/no/such/%d" % rng.randrange(10**6), auth, body)
    elif kind == "junk method":
        body = b"m" * rng.randrange(0, 300_000)
        raw = hostile.request(rng.choice([b"PUT", b"PATCH", b"QUUX"]), b"/status", auth, body)
    else:
        raw = hostile.random_case(rng, auth)
    return kind, kept_alive(raw)
