"""The uploader actor: turns a generated image into the stored alert image.

Receives jobs on `upload_recv` at step GENERATED (the raw image is in the database, and in
hand from the generator unless the job was resumed: then it is read from there). A
ghost is stored as a JPEG (quality 80) at `{id}/{id}-0.jpg`; a friend as a WEBP with
alpha at `{id}/{id}-0.webp`. Where the image API sent that format already (a JPEG ghost;
a WEBP friend with its alpha channel, drawn on a transparent background), the bytes are
stored as they came after a header check, and a friend's color is the complement its
chroma-key prompt would have named. Otherwise a ghost is converted, and a friend has its
solid background keyed out, the detected color kept. The
image is uploaded (public-read, with its content type), its URL and color recorded and the
step moved to STORED in one transaction; then the job goes on `announce_send`.

A storage outage is retried until the request's deadline, then the request fails as
expired (`finalize_send`, refunded). Image processing runs in worker threads, at most
one per core, so the event loop never stalls. On restart, a job resumes from GENERATED:
the raw bytes are still in the database, no image is bought again.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import trio

from dynamo import metrics
from dynamo.domain import prompts
from dynamo.domain.jobs import Job, Reason, Step, Style
from dynamo.domain.viewer_messages import failure
from dynamo.images import processing as imaging
from dynamo.images.storage import StoragePort
from dynamo.inflight.pipeline import Pipeline, serve_jobs
from dynamo.supervision import outages, retry

log = logging.getLogger(__name__)

ACTOR = "uploader"
# Uploads in flight at once: enough to overlap network waits with processing.
UPLOAD_CONCURRENCY = 4
# A ghost's color in dynamo.image, as the original service stored it.
GHOST_COLOR = "#000000"
# Image processing is CPU-bound numpy/Pillow work: one thread per core of this machine.
PROCESSING_THREADS = trio.CapacityLimiter(2)
# A storage outage is retried until the deadline; the backoff is capped so that uploads go
# on within seconds of the storage's return.
STORE_BACKOFF_CAP_S = 5.0


def image_key(job: Job) -> tuple[str, str]:
    """The storage key and content type of the request's image (contract §4)."""
    if job.style is Style.FRIEND:
        return f"{job.id}/{job.id}-0.webp", "image/webp"
    return f"{job.id}/{job.id}-0.jpg", "image/jpeg"


def process_image(style: Style, raw: bytes, inputs: Mapping | None = None) -> tuple[bytes, str]:
    """The stored bytes and the `#rrggbb` color for a generated image."""
    header = imaging.sniff(raw)
    sane = header if header is not None and header.sane else None  # stored as it came
    if style is Style.FRIEND:
        if sane and sane.format == "WEBP" and sane.alpha:
            return raw, imaging.color_hex(prompts.COMPLEMENTS[(inputs or {})["color"]])
        return imaging.key_out_background(raw)
    if sane and sane.format == "JPEG":
        return raw, GHOST_COLOR
    return imaging.to_jpeg(raw, quality=80), GHOST_COLOR


async def run(
    *,
    storage: StoragePort,
    pipeline: Pipeline,
    upload_recv,
    announce_send,
    finalize_send,
    task_status=trio.TASK_STATUS_IGNORED,
):
    task_status.started()
    await serve_jobs(
        upload_recv,
        actor=ACTOR,
        inflight=pipeline.inflight,
        pipeline=pipeline,
        concurrency=UPLOAD_CONCURRENCY,
        step=outages.patient_step(
            pipeline.dependencies, pipeline, functools.partial(_store, storage, pipeline)
        ),
        outboxes={"stored": announce_send, "failed": finalize_send},
    )


async def _store(storage: StoragePort, pipeline: Pipeline, job: Job) -> str:
    if job.step is Step.STORED:
        return "stored"
    started = trio.current_time()
    raw, job.generated = job.generated, None
    if raw is None:
        raw = await pipeline.db.load_generated(job.id)
    if raw is None:
        log.error("generated image missing from the database", extra=job.log_extra)
        await pipeline.fail(job, failure(Reason.ERROR, "generated image missing"))
        return "failed"
    try:
        data, color = await trio.to_thread.run_sync(
            process_image, job.valid_style, raw, job.inputs, limiter=PROCESSING_THREADS
        )
    except (ValueError, KeyError) as exc:  # not a decodable image; a friend without a color
        await pipeline.fail(job, failure(Reason.ERROR, f"image could not be processed: {exc}"))
        return "failed"
    key, content_type = image_key(job)
    try:
        url = await retry.retrying(
            functools.partial(storage.upload, key, data, content_type),
            system="storage",
            log_extra=job.log_extra,
            deadline=job.deadline,
            max_attempts=None,
            classify=_classify,
            backoff_cap_s=STORE_BACKOFF_CAP_S,
        )
    except retry.GaveUp as exc:
        await pipeline.fail(job, failure(Reason.EXPIRED, f"image not stored: {exc}"))
        return "failed"
    except retry.Permanent as exc:
        await pipeline.fail(job, failure(Reason.ERROR, f"image not stored: {exc}"))
        return "failed"
    if not await pipeline.db.save_image(job.id, url, color):
        return "dropped"
    metrics.STEP_SECONDS.labels("store").observe(trio.current_time() - started)
    job.image_url, job.image_color, job.step = url, color, Step.STORED
    log.info("image stored at %s", url, extra=job.log_extra)
    return "stored"


def _classify(exc: Exception) -> Exception:
    return retry.classify_port_error(exc)
