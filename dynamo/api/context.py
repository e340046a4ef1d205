"""What the HTTP API is given by the service graph, and how a route reaches it."""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx
from quart import current_app

from dynamo.config import Settings
from dynamo.images.storage import LocalStorage
from dynamo.inflight.pipeline import Pipeline
from dynamo.supervision.readiness import Readiness
from dynamo.supervision.supervisor import Supervisor

# Where the app keeps its context (`app.extensions[...]`).
EXTENSION_KEY = "dynamo"


@dataclasses.dataclass
class ApiContext:
    settings: Settings
    pipeline: Pipeline
    reserve_send: Any  # trio.MemorySendChannel[Job]: new requests go to the ledger
    finalize_send: Any  # trio.MemorySendChannel[Job]: cancelled requests get refunded
    readiness: Readiness
    supervisor: Supervisor
    channels: dict[str, Any]  # name -> a channel end, for /status and /metrics
    limiter_status: Any  # dynamo.limits.state.RateLimiterStatus (`.as_json()`)
    local_storage: LocalStorage | None  # None when images live in S3-compatible storage
    http_client: httpx.AsyncClient  # for the auth service
    admin_token: str | None = dataclasses.field(repr=False)
    auth_configured: bool = False
    models: Any = None  # dynamo.openai_port.catalogue.ModelsStatus (`.as_json()`), for /status
    spend: Any = None  # dynamo.openai_port.spend.Spend: /status `spend`, a request's calls and cost
    fleet: Any = None  # dynamo.limits.fleet_view.Fleet (`await .status()`); None: not shown
    broker: Any = None  # dynamo.rabbitmq.broker's port: /status asks it for the input queue's depth


def current_api() -> ApiContext:
    return current_app.extensions[EXTENSION_KEY]
