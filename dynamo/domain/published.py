"""The bodies dynamo publishes (contract §3): onscreen events and generation results.

Each function returns a plain dict with exactly the contract's keys; `encode` turns one
into the bytes to publish. The shapes are what the alert overlay and the other
golden-vcr services parse, so no key is added or renamed here.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from dynamo.domain.jobs import Failure, Job, Style, Viewer


def onscreen_event(job: Job) -> dict[str, Any]:
    """The golden-vcr `eonscreen` image event for a generated and stored `job`."""
    if job.image_url is None:
        raise ValueError(f"request {job.id} has no image to show")
    details: dict[str, Any] = {"image_url": job.image_url, "description": job.description}
    if job.style is Style.FRIEND:
        details["name"] = job.name
        details["background_color"] = job.image_color
    return {
        "type": "image",
        "payload": {"type": job.valid_style.value, "viewer": job.viewer.as_json(), "details": details},
    }


def success_result(job: Job) -> dict[str, Any]:
    if job.image_url is None:
        raise ValueError(f"request {job.id} has no image to report")
    return {
        "request_id": str(job.id),
        "outcome": "success",
        "viewer": job.viewer.as_json(),
        "style": job.valid_style.value,
        "description": job.description,
        "image_url": job.image_url,
    }


def failure_result(job: Job) -> dict[str, Any]:
    if job.failure is None:
        raise ValueError(f"request {job.id} has not failed")
    # An invalid request has no Style; its result carries the style as it was sent.
    style = job.style.value if job.style is not None else job.raw_style
    return _failure(job.id, job.viewer, style, job.description, job.failure)


def result_for_invalid(
    request_id: uuid.UUID,
    viewer: Viewer,
    style: str | None,
    description: str,
    failure: Failure,
) -> dict[str, Any]:
    """The result for a message that failed validation: `style` is whatever it said, or None."""
    return _failure(request_id, viewer, style, description, failure)


def _failure(
    request_id: uuid.UUID, viewer: Viewer, style: str | None, description: str, failure: Failure
) -> dict[str, Any]:
    # `failure.detail` is for operators only and never leaves the process.
    return {
        "request_id": str(request_id),
        "outcome": "failure",
        "viewer": viewer.as_json(),
        "style": style,
        "description": description,
        "reason": failure.reason.value,
        "message": failure.message,
    }


def encode(body: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, as the Go services write it (no ASCII escaping)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
