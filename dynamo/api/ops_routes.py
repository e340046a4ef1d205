"""Routes for operators and the overlay: health, readiness, status, metrics and local
images. (The OpenAPI document is served by quart-schema: `openapi.py`.)

`/status` is built by `status_body`, a plain dict: a new key is one more line there, and
the live page shows keys it does not know yet as they are."""

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
from dynamo.jobs import State

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
        "actors": {name: actor.as_json() for name, actor in api.supervisor.actors.items()},
        "channels": channel_statistics(api.channels),
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
            "used": stats.current_buffer_used,
            "capacity": None if math.isinf(capacity) else int(capacity),
        }
    return answer


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
