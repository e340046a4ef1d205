"""What every fake HTTP service shares: serving, call records, waiting, holding, failures.

A fake is a QuartTrio app served by hypercorn on 127.0.0.1, port 0, inside the test's
nursery: `url = await nursery.start(fake.serve)` gives its base URL once it listens.
The service under test may be this process or a subprocess; both reach it over TCP.

Every request is answered in the same order, so that tests can reason about it:

1. it is recorded in `fake.calls` on arrival (waiters are woken, `fake.on_call` runs);
2. the answer is decided at once: outage (`fake.down`), the caller's credentials,
   a scripted status (`fake.script`), a rate limit; otherwise the normal answer;
3. the answer waits while the endpoint is held (`fake.hold`), then `fake.latency_s`;
4. it is sent, and its status recorded in the call.

Times are `trio.current_time()`, so they follow whatever clock the test runs under.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio
from quart import Response, request
from quart_trio import QuartTrio

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"

# Longer than any client's pool idle time, so that the server never closes a pooled
# connection just as a client reuses it (a race that shows up as a flaky test).
KEEP_ALIVE_S = 120.0

# What Go's http.Error puts on every error answer, as the real auth and ledger do.
GO_TEXT = "text/plain; charset=utf-8"


@dataclass
class Call:
    """One request as the fake saw it."""

    endpoint: str
    time: float
    body: Any  # parsed JSON where the endpoint takes JSON, else None
    method: str
    path: str
    headers: dict[str, str]
    raw: bytes = b""
    # None while unanswered; stays None when the client went away (or was killed) first.
    status: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload), status=status, headers=headers, content_type="application/json")


def go_json_response(payload: Any, status: int = 200) -> Response:
    """JSON as Go's json.Encoder writes it: a trailing newline, content type sniffed as text."""
    return Response(json.dumps(payload) + "\n", status=status, content_type=GO_TEXT)


def go_error(message: str, status: int) -> Response:
    """An answer as Go's http.Error writes it."""
    return Response(message + "\n", status=status, content_type=GO_TEXT, headers={"x-content-type-options": "nosniff"})


class FakeService:
    """Base class: state and scripted behaviour shared by all fakes."""

    def __init__(self) -> None:
        self.url: str | None = None
        self.calls: list[Call] = []
        # Seconds before each answer: one number for every endpoint, or {endpoint: s}.
        self.latency_s: float | dict[str, float] = 0.0
        # True: every endpoint answers 503, as during an outage.
        self.down = False
        # Called with each Call on arrival; may be async (it then delays the answer).
        self.on_call: Callable[[Call], Any] | None = None
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self._scripts: defaultdict[str, deque[Any]] = defaultdict(deque)
        self._holds: dict[str, trio.Event] = {}
        self._held: Counter[str] = Counter()
        self._changed = trio.Event()

    # ---- serving -------------------------------------------------------------------

    def build_app(self) -> QuartTrio:
        raise NotImplementedError

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `nursery.start(fake.serve)` returns the base URL."""
        config = hypercorn.config.Config()
        config.bind = [f"{LOCALHOST}:0"]
        config.keep_alive_timeout = KEEP_ALIVE_S
        config.errorlog = logger
        config.accesslog = None
        app = self.build_app()
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(hypercorn.trio.serve, app, config))
            self.url = binds[0]
            logger.debug("%s serving on %s", type(self).__name__, self.url)
            task_status.started(self.url)

    # ---- records and waiting -------------------------------------------------------

    def calls_to(self, endpoint: str) -> list[Call]:
        return [call for call in self.calls if call.endpoint == endpoint]

    def count(self, endpoint: str) -> int:
        return len(self.calls_to(endpoint))

    @property
    def counts(self) -> Counter[str]:
        return Counter(call.endpoint for call in self.calls)

    def statuses(self, endpoint: str) -> list[int | None]:
        return [call.status for call in self.calls_to(endpoint)]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once predicate() holds; it is re-checked at every arrival and answer."""
        while True:
            changed = self._changed
            if predicate():
                return
            await changed.wait()

    async def wait_for_calls(self, endpoint: str, count: int = 1) -> list[Call]:
        """Wait until `count` calls to `endpoint` have arrived; return the first `count`."""
        await self.wait_until(lambda: self.count(endpoint) >= count)
        return self.calls_to(endpoint)[:count]

    async def wait_for_answers(self, endpoint: str, count: int = 1) -> list[Call]:
        """Wait until `count` calls to `endpoint` have been answered."""
        answered = lambda: [c for c in self.calls_to(endpoint) if c.status is not None]  # noqa: E731
        await self.wait_until(lambda: len(answered()) >= count)
        return answered()[:count]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---- scripted behaviour --------------------------------------------------------

    def script(self, endpoint: str, statuses: Iterable[Any]) -> None:
        """The next calls to `endpoint` answer these statuses, in order, then normally."""
        self._scripts[endpoint].extend(statuses)

    def hold(self, endpoint: str) -> None:
        """Answers from `endpoint` wait (after arrival is recorded) until release()."""
        self._holds.setdefault(endpoint, trio.Event())

    def release(self, endpoint: str | None = None) -> None:
        """Let held answers go, for one endpoint or all."""
        names = [endpoint] if endpoint is not None else list(self._holds)
        for name in names:
            gate = self._holds.pop(name, None)
            if gate is not None:
                gate.set()

    def held_count(self, endpoint: str) -> int:
        return self._held[endpoint]

    def _latency_for(self, endpoint: str) -> float:
        if isinstance(self.latency_s, dict):
            return self.latency_s.get(endpoint, 0.0)
        return self.latency_s

    # ---- hooks for subclasses ------------------------------------------------------

    def outage_response(self, call: Call) -> Response:
        return go_error("service unavailable", 503)

    def check_caller(self, call: Call) -> Response | None:
        """A refusal when the caller's credentials are wrong; checked before scripts."""
        return None

    def scripted_response(self, call: Call, status: Any) -> Response:
        return go_error(f"scripted failure {status}", int(status))

    def check_rate(self, call: Call) -> Response | None:
        """A refusal when over a rate limit; only reached by calls not refused before."""
        return None

    # ---- the request cycle ---------------------------------------------------------

    async def receive(
        self,
        endpoint: str,
        respond: Callable[[Call], Awaitable[Response]],
        *,
        parse_json: bool = True,
    ) -> Response:
        """Run one request through the cycle described in the module docstring."""
        raw = await request.get_data()
        body = None
        if parse_json and raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        call = Call(
            endpoint=endpoint,
            time=trio.current_time(),
            body=body,
            method=request.method,
            path=request.full_path.rstrip("?"),
            headers={name.lower(): value for name, value in request.headers.items()},
            raw=raw,
        )
        self.calls.append(call)
        self.in_flight[endpoint] += 1
        self.max_in_flight[endpoint] = max(self.max_in_flight[endpoint], self.in_flight[endpoint])
        self._notify()
        try:
            if self.on_call is not None:
                result = self.on_call(call)
                if inspect.isawaitable(result):
                    await result
            response = self._refusal(call)
            await self._delay(endpoint)
            if response is None:
                response = await respond(call)
            call.status = response.status_code
            return response
        finally:
            self.in_flight[endpoint] -= 1
            self._notify()

    def _refusal(self, call: Call) -> Response | None:
        if self.down:
            return self.outage_response(call)
        refusal = self.check_caller(call)
        if refusal is not None:
            return refusal
        script = self._scripts.get(call.endpoint)
        if script:
            return self.scripted_response(call, script.popleft())
        return self.check_rate(call)

    async def _delay(self, endpoint: str) -> None:
        while (gate := self._holds.get(endpoint)) is not None:
            self._held[endpoint] += 1
            self._notify()
            try:
                await gate.wait()
            finally:
                self._held[endpoint] -= 1
        latency = self._latency_for(endpoint)
        if latency > 0:
            await trio.sleep(latency)
