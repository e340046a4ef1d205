"""Hostile HTTP requests, as raw bytes: the known-bad cases of issue 10 and a seeded
generator of random ones, for the fuzz of the running service (tests/integration/test_http_fuzz.py).

A request is sent on its own connection with `Connection: close` and read to the end;
`send` answers the status code, or None when the connection was dropped without one."""

from __future__ import annotations

import json
import random
import re

import trio

RESPONSE_DEADLINE_S = 30
STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})")
VALID_GHOST = b'{"style":"ghost","inputs":{"subject":"a fuzzed seal"}}'
JSON = b"Content-Type: application/json\r\n"
# Odd but harmless: answered as a normal request (a page limit above 100 gives 100).
ANSWERED_NORMALLY = frozenset({"2,000 headers", "limit=10^30"})


def request(method: bytes, path: bytes, headers: bytes = b"", body: bytes | None = b"") -> bytes:
    head = method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers
    if body is not None:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + (body or b"")


def known_cases(auth: bytes) -> dict[str, bytes]:
    """name -> raw request: the cases issue 10 names, and their neighbours."""
    genreq = {"type": "image", "viewer": {"twitch_user_id": "1", "twitch_display_name": "x"},
              "payload": {"style": "ghost", "inputs": {"subject": "a"}}}

    def with_state(value: bytes) -> bytes:
        return json.dumps(genreq).encode()[:-1] + b', "state": {"broadcast_id": ' + value + b"}}"

    post = lambda body, extra=b"": request(b"POST", b"/requests", auth + JSON + extra, body)  # noqa: E731
    return {
        "5,000-deep brackets": post(b"[" * 5000 + b"]" * 5000),
        "5,000-deep objects": post(b'{"a":' * 2500 + b"1" + b"}" * 2500),
        "deep payload": post(b'{"type":"image","payload":' + b"[" * 900 + b"]" * 900 + b"}"),
        "deep inputs": post(b'{"style":"ghost","inputs":' + b"[" * 2000 + b"]" * 2000 + b"}"),
        "not UTF-8": post(b'{"style":"ghost","inputs":{"subject":"\xff\xfe"}}'),
        "lone surrogate": post(b'{"style":"ghost","inputs":{"subject":"a \\ud800 seal"}}'),
        "NUL in subject": post(b'{"style":"ghost","inputs":{"subject":"a \\u0000 seal"}}'),
        "subject a list": post(b'{"style":"ghost","inputs":{"subject":["a"]}}'),
        "number 1e400": post(with_state(b"1e400")),
        "5,000-digit number": post(with_state(b"9" * 5000)),
        "int beyond the column": post(with_state(b"4294967296")),
        "a JSON list": post(b"[1, 2]"),
        "a JSON string": post(b'"a seal"'),
        "empty body": post(b""),
        "2 MB body": post(b"x" * 2_000_000),
        "2 MB body, no length": request(b"POST", b"/requests", auth + JSON
                                        + b"Transfer-Encoding: chunked\r\n",
                                        None) + b"".join(b"%x\r\n%s\r\n" % (64 * 1024, b"[" * 64 * 1024)
                                                         for _ in range(32)) + b"0\r\n\r\n",
        "text/plain": request(b"POST", b"/requests", auth + b"Content-Type: text/plain\r\n", VALID_GHOST),
        "form": request(b"POST", b"/requests", auth
                        + b"Content-Type: application/x-www-form-urlencoded\r\n", b"style=ghost"),
        "no content type": request(b"POST", b"/requests", auth, VALID_GHOST),
        "Idempotency-Key 8-bit": post(VALID_GHOST, b"Idempotency-Key: \xff\xfe\r\n"),
        "Idempotency-Key 1 KB": post(VALID_GHOST, b"Idempotency-Key: " + b"k" * 1024 + b"\r\n"),
        "Idempotency-Key spaces": post(VALID_GHOST, b"Idempotency-Key: a b\r\n"),
        "100 KB header": request(b"GET", b"/healthz", b"X-Big: " + b"a" * 100_000 + b"\r\n"),
        "2,000 headers": request(b"GET", b"/healthz", b"".join(b"X-%d: a\r\n" % i for i in range(2000))),
        "10 KB token": request(b"GET", b"/requests", b"Authorization: Bearer " + b"a" * 10_000 + b"\r\n"),
        "8-bit token": request(b"GET", b"/requests", b"Authorization: Bearer \xff\xfe\r\n"),
        "/requests/%00": request(b"GET", b"/requests/%00", auth),
        "/requests/%ff": request(b"GET", b"/requests/%ff", auth),
        "non-UUID id": request(b"GET", b"/requests/not-a-uuid", auth),
        "cancel non-UUID": request(b"DELETE", b"/requests/../status", auth),
        "60 KB path": request(b"GET", b"/requests/" + b"a" * 60_000, auth),
        "images ../": request(b"GET", b"/images/../../etc/passwd", b""),
        "images %2e%2e": request(b"GET", b"/images/%2e%2e/%2e%2e/etc/passwd.png", b""),
        "images %2f": request(b"GET", b"/images/..%2f..%2fetc%2fpasswd.jpg", b""),
        "images NUL": request(b"GET", b"/images/a%00.jpg", b""),
        "web ../": request(b"GET", b"/web/..%2fapi%2fapp.py", b""),
        "PROPFIND": request(b"PROPFIND", b"/requests", auth),
        "TRACE": request(b"TRACE", b"/", b""),
        "made-up method": request(b"FROBNICATE", b"/status", auth),
        "limit=-1": request(b"GET", b"/requests?limit=-1", auth),
        "limit=1e9": request(b"GET", b"/requests?limit=1e9", auth),
        "limit=10^30": request(b"GET", b"/requests?limit=" + b"9" * 30, auth),
        "limit=%ff": request(b"GET", b"/requests?limit=%ff", auth),
        "before=garbage": request(b"GET", b"/requests?before=garbage", auth),
        "before huge": request(b"GET", b"/requests?before=OTk5OTk5OTk5OTk5OTk5OTk5OTk5OS5hYmM", auth),
        "state twice": request(b"GET", b"/requests?state=queued&state=failed", auth),
        "viewer NUL": request(b"GET", b"/requests?viewer=%00", auth),
        "ticket 8-bit": request(b"GET", b"/events?ticket=%ff%fe", b""),
        "ticket 10 KB": request(b"GET", b"/events?ticket=" + b"t" * 10_000, b""),
        "garbage line": b"\x00\x01\x02 garbage\r\n\r\n",
        "HTTP/0.9": b"GET /\r\n\r\n",
        "negative length": b"POST /requests HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        "length and chunked": (b"POST /requests HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                               b"Transfer-Encoding: chunked\r\n" + auth + JSON + b"\r\n0\r\n\r\n"),
        "bad chunk": (b"POST /requests HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                      + auth + JSON + b"\r\nzz\r\nabc\r\n"),
    }


_PATHS = [b"/", b"/requests", b"/requests/", b"/status", b"/events", b"/events/tickets",
          b"/images/", b"/web/", b"/healthz", b"/readyz", b"/metrics", b"/openapi.json"]
_METHODS = [b"GET", b"POST", b"DELETE", b"PUT", b"PATCH", b"OPTIONS", b"HEAD", b"QUUX"]


def _junk(rng: random.Random, size: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(size))


def _junk_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 4 else 4)
    if kind == 0:
        return rng.choice([None, True, False, 0, -1, 2**63, 1.5e308, "", "\u0000", "\ud800"])
    if kind == 1:
        return "".join(chr(rng.randrange(0x11000)) for _ in range(rng.randrange(40)))
    if kind in (2, 3):
        return rng.choice(["ghost", "friend", "image", "yellow", "a seal", " " * 200, "x" * 121])
    if kind in (4, 5):
        keys = ["style", "inputs", "subject", "color", "type", "viewer", "payload", "state",
                "twitch_user_id", "twitch_display_name", "broadcast_id", "screening_id"]
        return {rng.choice(keys): _junk_json(rng, depth + 1) for _ in range(rng.randrange(5))}
    return [_junk_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def random_case(rng: random.Random, auth: bytes) -> bytes:
    """One random hostile request: a random mix of method, path, query, headers, body."""
    method = rng.choice(_METHODS)
    path = rng.choice(_PATHS)
    if rng.random() < 0.5:
        path += b"".join(b"%%%02x" % rng.randrange(256) if rng.random() < 0.3
                         else bytes([rng.choice(b"abcXYZ019-_./~")]) for _ in range(rng.randrange(40)))
    if rng.random() < 0.4:
        path += b"?" + b"&".join(
            rng.choice([b"limit", b"state", b"style", b"viewer", b"before", b"ticket", b"x"]) + b"="
            + rng.choice([b"-1", b"0", b"1e9", b"%00", b"%ff", b"queued", b"a" * 300, b""])
            for _ in range(rng.randrange(1, 4)))
    headers = auth if rng.random() < 0.7 else b""
    if rng.random() < 0.6:
        headers += b"Content-Type: " + rng.choice([b"application/json", b"text/plain",
                                                   b"application/json; charset=utf-16", b"\xff"]) + b"\r\n"
    if rng.random() < 0.2:
        headers += b"Idempotency-Key: " + _junk(rng, rng.randrange(1, 40)).replace(b"\r", b"").replace(
            b"\n", b"") + b"\r\n"
    kind = rng.randrange(4)
    if kind == 0:
        body = _junk(rng, rng.randrange(200))
    elif kind == 1:
        body = json.dumps(_junk_json(rng)).encode()
    elif kind == 2:
        body = json.dumps(_junk_json(rng), ensure_ascii=False).encode("utf-8", "surrogatepass")
    else:
        body = b""
    return request(method, path, headers, body)


async def send(port: int, raw: bytes) -> int | None:
    """The status the service answered `raw` with; None if it closed without answering."""
    with trio.fail_after(RESPONSE_DEADLINE_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(raw)
            except trio.BrokenResourceError:
                pass  # the server may answer (413, 431) and close before reading it all
            received = b""
            while b"\r\n" not in received:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                received += chunk
    match = STATUS_LINE.match(received)
    return int(match.group(1)) if match else None
