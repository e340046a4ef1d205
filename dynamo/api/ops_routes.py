"""Routes for operators and the overlay: health, readiness, status, metrics and local
images. (The OpenAPI document is served by quart-schema: `openapi.py`.)

`/status` is built by `status_body`, a plain dict: a new key is one more line there, and
the live page shows keys it does not know yet as they are. Its `queues` are each of the
pipeline's channels and, where a broker is configured, the RabbitMQ input queue, each
with its `depth` and `capacity` (None: unbounded); the broker is given
`BROKER_QUERY_S` to answer, so that a broker outage never holds /status up."""

from __future__ import annotations

import math

import prometheus_client
import trio
from quart import Blueprint, Response
from quart_schema import document_response, security_scheme, validate_response

from dynamo import metrics
from dynamo.api import schemas
from dynamo.api.access import authenticate_broadcaster
from dynamo.api.context import current_api
from dynamo.api.errors import bounded, not_found
from dynamo.api.openapi import PUBLIC, errors
from dynamo.domain.jobs import State
from dynamo.rabbitmq import broker as broker_port
from dynamo.version import version

blueprint = Blueprint("ops", __name__)

# Only what the pipeline stores; anything else under the images directory is not served.
IMAGE_CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".png": "image/png",
}
# An image's key contains its request id, so it never changes once written.
IMAGE_CACHE_CONTROL = "public, max-age=31536000, immutable"
# How long /status waits for RabbitMQ to say how deep the input queue is; past it the
# depth is unknown (None) and the answer says why.
BROKER_QUERY_S = 1.0


@blueprint.get("/healthz")
@validate_response(schemas.Health, 200)
@security_scheme(PUBLIC)
async def healthz():
    """Liveness: 200 while the process runs."""
    return {"status": "ok"}


@blueprint.get("/readyz")
@validate_response(schemas.Readiness, 200)
@validate_response(schemas.Readiness, 503)
@security_scheme(PUBLIC)
async def readyz():
    """Readiness: the database, and where configured the broker and the input queue."""
    checks = await current_api().readiness.check()
    not_ready = sorted(name for name, result in checks.items() if result != "ok")
    if not not_ready:
        return {"ready": True, "checks": checks}
    return {"ready": False, "checks": checks, "error": f"not ready: {', '.join(not_ready)}"}, 503


@blueprint.get("/status")
@validate_response(schemas.Status, 200)
@errors(401, 403, 503)
@bounded
async def status():
    """Actors, channels, the rate limiter, counts (broadcaster only)."""
    api = current_api()
    await authenticate_broadcaster()
    return await status_body(api)


async def status_body(api) -> dict:
    """GET /status's body (also streamed to the live page)."""
    counts = {state.value: 0 for state in State}
    counts.update(await api.pipeline.db.counts_by_state())
    return {
        "version": version(),
        "actors": {name: actor.as_json() for name, actor in api.supervisor.actors.items()},
        "queues": {**channel_statistics(api.channels), **await input_queue(api.broker)},
        "rate_limiter": api.limiter_status.as_json() if api.limiter_status is not None else None,
        "requests": counts,
        "orphan_debits": await api.pipeline.db.orphan_debit_count(),
        "in_flight": len(api.pipeline.inflight),
        "models": api.models.as_json() if api.models is not None else None,
        "spend": await api.spend.status_json() if api.spend is not None else None,
        "fleet": await api.fleet.status() if api.fleet is not None else None,
    }


def channel_statistics(channels: dict) -> dict[str, dict]:
    """Each channel's buffered items and capacity; also sets the Prometheus gauges."""
    answer = {}
    for name, channel in channels.items():
        stats = channel.statistics()
        capacity = stats.max_buffer_size
        metrics.QUEUE_DEPTH.labels(name).set(stats.current_buffer_used)
        metrics.QUEUE_CAPACITY.labels(name).set(capacity)
        answer[name] = {
            "depth": stats.current_buffer_used,
            "capacity": None if math.isinf(capacity) else int(capacity),
        }
    return answer


async def input_queue(broker) -> dict[str, dict]:
    """The RabbitMQ input queue's depth (messages ready), if a broker is configured."""
    if broker is None or not getattr(broker, "configured", False):
        return {}
    entry: dict = {"depth": None, "capacity": None}
    with trio.move_on_after(BROKER_QUERY_S) as scope:
        try:
            entry["depth"] = await broker.queue_depth()
        except broker_port.BrokerUnavailable as exc:
            entry["error"] = f"broker unreachable: {exc}"
    if scope.cancelled_caught:
        entry["error"] = f"the broker did not answer within {BROKER_QUERY_S:g} s"
    return {broker_port.REQUESTS_QUEUE: entry}


@blueprint.get("/metrics")
@document_response(schemas.PrometheusText, 200)
@security_scheme(PUBLIC)
async def prometheus_metrics():
    """Prometheus metrics."""
    channel_statistics(current_api().channels)
    return Response(
        prometheus_client.generate_latest(metrics.REGISTRY),
        content_type=prometheus_client.CONTENT_TYPE_LATEST,
    )


@blueprint.get("/images/<path:key>")
@document_response(schemas.ImageFile, 200)
@errors(404)
@security_scheme(PUBLIC)
async def image(key: str):
    """An image, when images are stored locally (development): `{id}/{id}-0.jpg`."""
    storage = current_api().local_storage
    content_type = IMAGE_CONTENT_TYPES.get(_extension(key))
    if storage is None or content_type is None:
        raise not_found("image")
    try:
        path = storage.path_for(key)
        data = None if path is None else await trio.Path(path).read_bytes()
    except (OSError, ValueError):  # missing, a directory, a name too long, a NUL byte...
        data = None
    if data is None:
        raise not_found("image")
    return Response(data, content_type=content_type, headers={"Cache-Control": IMAGE_CACHE_CONTROL})


def _extension(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    return name[name.rfind(".") :].lower() if "." in name else ""
