"""Property-based tests of the HTTP handlers (issue 10): whatever the body, headers, path,
method or query string, the app answers a status below 500, and an error is JSON
`{"error": "..."}`. The app runs in-process (`test_client`) on the real PostgreSQL with
the fake auth service; hypothesis makes the requests. The running service gets the same
treatment over TCP in tests/integration/test_http_fuzz.py."""

from __future__ import annotations

import functools
import json
import urllib.parse

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.test_http_api import (  # noqa: F401  (fixtures)
    BROADCASTER_TOKEN,
    VIEWER_TOKEN,
    api,
    bearer,
    http_database,
)

pytestmark = pytest.mark.integration

EXAMPLES = 60
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
REQUEST_DEADLINE_S = 30

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["style", "inputs", "subject", "color", "type", "viewer",
                                       "payload", "state", "twitch_user_id", "broadcast_id"])
                      | st.text(max_size=8), children, max_size=4),
    max_leaves=12)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                        max_size=300)
tokens = st.sampled_from([VIEWER_TOKEN, BROADCASTER_TOKEN, "nope", ""])
paths = st.sampled_from(["/requests", "/requests/", "/status", "/events", "/events/tickets",
                         "/images/", "/web/", "/", "/healthz", "/metrics"])
methods = st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"])


# The app under test has no change feed: an authenticated GET /events (a bearer header
# opens it too) answers this documented 503, not a failure.
NO_STREAM = (503, {"error": "the live stream is not available"})


async def check(response) -> None:
    if response.status_code == 503 and response.mimetype == "application/json":
        assert (503, await response.get_json()) == NO_STREAM
        return
    assert response.status_code < 500, (response.status_code, await response.get_data())
    if response.status_code >= 400 and response.mimetype == "application/json":
        body = await response.get_json()
        assert set(body) == {"error"} and isinstance(body["error"], str)


async def run_property(api, prop) -> None:  # noqa: F811
    """Runs the hypothesis test `prop(send)` in a worker thread, so the app (and the fake
    auth service) keep running in the test's Trio loop; `send(method, path, **kwargs)`
    makes one request there and checks its answer."""

    async def send(method: str, path: str, **kwargs) -> int:
        with trio.fail_after(REQUEST_DEADLINE_S):
            response = await api.client().open(path, method=method, **kwargs)
            await check(response)
            while True:  # the pipeline's part: take what was routed, so it never fills
                try:
                    api.reserve_recv.receive_nowait()
                except trio.WouldBlock:
                    break
            return response.status_code

    await trio.to_thread.run_sync(prop, lambda *args, **kwargs: trio.from_thread.run(
        functools.partial(send, *args, **kwargs)))


async def test_any_body_to_post_requests_is_answered_below_500(api):  # noqa: F811
    @SETTINGS
    @given(body=st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()),
           content_type=st.sampled_from(["application/json", "text/plain", "",
                                         "application/json; x=y"]),
           idempotency_key=st.none() | header_values, token=tokens)
    def prop(send, body, content_type, idempotency_key, token):
        headers = {**bearer(token), "Content-Type": content_type}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        send("POST", "/requests", data=body, headers=headers)

    await run_property(api, prop)


async def test_deeply_nested_json_is_400(api):  # noqa: F811
    @SETTINGS
    @given(depth=st.integers(min_value=500, max_value=6000),
           opener=st.sampled_from(["[", '{"a":', '{"style":"ghost","inputs":', '{"payload":']))
    def prop(send, depth, opener):
        closer = "]" if opener == "[" else "}"
        body = (opener * depth + ("" if opener == "[" else "1") + closer * depth).encode()
        # Kept under the size limit (so it is parsed): closed or not, it is never a 5xx.
        body = body[: 16 * 1024]
        status = send("POST", "/requests", data=body,
                      headers={**bearer(VIEWER_TOKEN), "Content-Type": "application/json"})
        assert status == 400

    await run_property(api, prop)


async def test_any_path_method_and_query_is_answered_below_500(api):  # noqa: F811
    @SETTINGS
    @given(method=methods, path=paths, tail=st.text(max_size=60),
           query=st.dictionaries(st.sampled_from(["limit", "before", "state", "style", "viewer",
                                                  "ticket", "x"]), st.text(max_size=40),
                                 max_size=4),
           token=tokens)
    def prop(send, method, path, tail, query, token):
        url = path + urllib.parse.quote(tail, safe="/")
        send(method, url, headers=bearer(token), query_string=query)

    await run_property(api, prop)


async def test_any_header_value_is_answered_below_500(api):  # noqa: F811
    @SETTINGS
    @given(name=st.sampled_from(["Authorization", "Content-Type", "Idempotency-Key", "Accept",
                                 "X-Anything"]),
           value=header_values, path=paths)
    def prop(send, name, value, path):
        send("GET", path, headers={**bearer(BROADCASTER_TOKEN), name: value})

    await run_property(api, prop)


# The bodies of issue 10 that broke the broker door, each with its field, on POST /requests.
_GENREQ = {"type": "image", "viewer": {"twitch_user_id": "1", "twitch_display_name": "x"},
           "payload": {"style": "ghost", "inputs": {"subject": "a seal"}}}
_MESSAGE = json.dumps(_GENREQ).encode()
_SHORT = b'{"style":"ghost","inputs":{"subject":"a seal"}}'
HOSTILE_BODIES = {
    "5,000-deep brackets": b"[" * 5000 + b"]" * 5000,
    "deep extra field": _SHORT[:-1] + b',"x":' + b"[" * 3000 + b"]" * 3000 + b"}",
    "4,400-digit number": _SHORT[:-1] + b',"x":' + b"9" * 4400 + b"}",
    "5,000-digit broadcast id": _MESSAGE[:-1] + b',"state":{"broadcast_id":' + b"9" * 5000 + b"}}",
    "1e400 broadcast id": _MESSAGE[:-1] + b',"state":{"broadcast_id":1e400}}',
    "NaN broadcast id": _MESSAGE[:-1] + b',"state":{"broadcast_id":NaN}}',
    "not UTF-8": _SHORT.replace(b"a seal", b"a \xff seal"),
    "UTF-16": _SHORT.decode().encode("utf-16"),
    "CESU-8 surrogate": _SHORT.replace(b"a seal", "a \ud800 seal".encode("utf-8", "surrogatepass")),
    "lone surrogate, short form": _SHORT.replace(b"a seal", b"a \\ud800 seal"),
    "lone surrogate, message": _MESSAGE.replace(b'"x"', b'"\\udc00"'),
    "lone surrogate, extra field": _SHORT[:-1] + b',"note":"\\ud800"}',
    "subject a list": _SHORT.replace(b'"a seal"', b'["a"]'),
    "subject a list, message": _MESSAGE.replace(b'"a seal"', b'["a"]'),
    "style a list": _SHORT.replace(b'"ghost"', b'["ghost"]'),
    "NUL in subject": _SHORT.replace(b"a seal", b"a \\u0000 seal"),
}


async def test_the_hostile_bodies_of_issue_10_are_400(api):  # noqa: F811
    @settings(max_examples=len(HOSTILE_BODIES) * 3, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(name=st.sampled_from(sorted(HOSTILE_BODIES)), token=st.sampled_from([VIEWER_TOKEN,
                                                                               BROADCASTER_TOKEN]))
    def prop(send, name, token):
        status = send("POST", "/requests", data=HOSTILE_BODIES[name],
                      headers={**bearer(token), "Content-Type": "application/json"})
        assert status == 400, name

    await run_property(api, prop)
