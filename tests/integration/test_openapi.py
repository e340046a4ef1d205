"""Property-based test of the HTTP API against its own /openapi.json (schemathesis).

The app (the real actor, `actors.http.run`) is served by hypercorn on 127.0.0.1 port 0
in a thread running its own trio loop, on the real PostgreSQL; schemathesis generates
requests for every documented operation, as the broadcaster (admin token), and checks
that no answer is a 5xx and every answer matches the document: status, content type,
headers and body schema. Bounded: a few examples per operation, well under a minute.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import types
import uuid

import httpx
import pytest
import schemathesis
import trio
import trio_asyncio
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from actors import http
from dynamo import config
from dynamo.api import openapi_document, stream_routes
from dynamo.database.port import open_database
from dynamo.images.storage import LocalStorage
from dynamo.inflight.pipeline import Pipeline
from dynamo.limits.permits import CallKind
from dynamo.limits.state import RateLimiterStatus
from dynamo.supervision.readiness import Readiness
from dynamo.supervision.supervisor import ActorStatus, Supervisor
from tests.integration.test_http_api import ADMIN_TOKEN, http_database  # noqa: F401  (a fixture)
from tests.support.timeouts import PORT_S as STARTUP_TIMEOUT_S

STOP_TIMEOUT_S = 10
STREAM_S = 0.5
MAX_EXAMPLES = 12  # per operation (and generation mode): enough to find a 5xx quickly
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


async def _drain(receive_channel) -> None:
    """Plays the pipeline's part: takes every job the API sends, so it never blocks."""
    async for _ in receive_channel:
        pass


async def _serve(dsn: str, images_dir, started: queue.Queue) -> None:
    async with trio_asyncio.open_loop():
        async with open_database(dsn) as db, httpx.AsyncClient() as http_client:
            await db.apply_schema()
            pipeline = Pipeline(db, worker_id=uuid.uuid4(), request_timeout_s=900, points_cost=0)
            reserve_send, reserve_recv = trio.open_memory_channel(8)
            finalize_send, finalize_recv = trio.open_memory_channel(8)
            limiter_status = RateLimiterStatus()
            limiter_status.configure({CallKind.IMAGE: 5, CallKind.TEXT: 500})
            supervisor = Supervisor()
            supervisor.actors = {"http": ActorStatus("http", "running")}
            context = http.ApiContext(
                settings=config.load(env={"DATABASE_URL": dsn}), pipeline=pipeline,
                reserve_send=reserve_send, finalize_send=finalize_send,
                readiness=Readiness(db=db, broker=types.SimpleNamespace(configured=False),
                                    limiter_status=limiter_status),
                supervisor=supervisor,
                channels={"reserve": reserve_send, "finalize": finalize_send},
                limiter_status=limiter_status,
                local_storage=LocalStorage(images_dir, "http://127.0.0.1/images"),
                http_client=http_client, admin_token=ADMIN_TOKEN, auth_configured=False)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, reserve_recv)
                nursery.start_soon(_drain, finalize_recv)
                url = await nursery.start(functools.partial(
                    http.run, api=context, host="127.0.0.1", port=0))
                started.put((url, trio.lowlevel.current_trio_token(), nursery.cancel_scope))


@dataclasses.dataclass
class ServedApi:
    url: str
    token: trio.lowlevel.TrioToken
    scope: trio.CancelScope
    thread: threading.Thread

    def stop(self) -> None:
        trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
        self.thread.join(STOP_TIMEOUT_S)
        assert not self.thread.is_alive(), "the served API did not stop"


@pytest.fixture(scope="module")
def served_api(http_database, tmp_path_factory):  # noqa: F811
    started: queue.Queue = queue.Queue()
    images_dir = tmp_path_factory.mktemp("images")

    def run() -> None:
        try:
            trio.run(_serve, http_database, images_dir, started)
        except BaseException as exc:  # reported to the fixture, which raises it
            started.put(exc)

    thread = threading.Thread(target=run, name="served-api", daemon=True)
    # The event stream (opened with the bearer header) ends at once after its first events,
    # rather than at the client's timeout: the document's checks need only those.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stream_routes, "STREAM_MAX_S", STREAM_S)
        thread.start()
        outcome = started.get(timeout=STARTUP_TIMEOUT_S)
        if isinstance(outcome, BaseException):
            raise outcome
        served = ServedApi(*outcome, thread)
        yield served
        served.stop()


# The document the app serves (test_http_api checks that it is served as is).
schema = schemathesis.openapi.from_dict(openapi_document())


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case, served_api):
    case.call_and_validate(base_url=served_api.url, checks=CHECKS, timeout=10,
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
