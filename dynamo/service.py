"""The whole service in one function: the ports, the channels, the actors, in order.

    broker ──intake──▶ reserve ──ledger(reserve)──▶ schedule ──rate_limiter──▶ generate
    http ───────────▶ reserve                                   ▲ permits       │
                                                                └──────generator pool
    generate ─▶ upload ──uploader──▶ announce ──announcer(alerts)──▶ finalize
    failures (any stage) ─────────────────────────────────────────▶ finalize
    finalize ──ledger(accept/refund)──▶ results ──announcer(results)──▶ discord

`serve()` opens every port, opens every channel, and starts the actors downstream first,
so that each actor's outbox is being read before anything is sent into it. Nested
nurseries make shutdown run in reverse: intake and the HTTP API stop first, and the
pipeline gets `SHUTDOWN_GRACE_S` to bring what is in hand to a persisted step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import secrets
import uuid

import httpx
import trio
import trio_asyncio

from actors import (
    announcer,
    discord,
    generator,
    http,
    intake,
    ledger,
    model_watch,
    rate_limiter,
    uploader,
)
from actors import fleet as fleet_actor
from dynamo.config import Settings
from dynamo.database import embedded as embedded_pg
from dynamo.database.fleet_store import FleetQueries, PostgresStore
from dynamo.database.port import open_database
from dynamo.images.storage import LocalStorage, S3Storage
from dynamo.inflight import resume
from dynamo.inflight.pipeline import Pipeline
from dynamo.limits.budget import Budget
from dynamo.limits.fleet_view import Fleet
from dynamo.limits.state import RateLimiterStatus
from dynamo.openai_port.catalogue import ModelsStatus, check_and_report
from dynamo.openai_port.client import OfflineGenerator, OpenAIGenerator
from dynamo.openai_port.pricing import PriceTable
from dynamo.openai_port.spend import Spend
from dynamo.rabbitmq.broker import open_broker
from dynamo.supervision import outages
from dynamo.supervision.readiness import Readiness
from dynamo.supervision.supervisor import Supervisor
from dynamo.viewer_points.port import FreePoints, Points

log = logging.getLogger(__name__)

# Channel capacities. Small on purpose: a full channel is how backpressure travels
# upstream to intake, and from there to RabbitMQ, which holds the backlog.
RESERVE_CAPACITY = 8  # new requests waiting for the ledger
SCHEDULE_CAPACITY = 4  # reserved requests on their way into the limiter's fair queue
GENERATE_CAPACITY = 0  # a job is handed over only when a generator worker is free
UPLOAD_CAPACITY = 4  # generated images waiting for the uploader
ANNOUNCE_CAPACITY = 4  # stored images waiting for their alert
# Failures and accepts come from every stage; a larger buffer keeps stages from waiting
# on the ledger during a burst of failures.
FINALIZE_CAPACITY = 32
RESULTS_CAPACITY = 32
DISCORD_CAPACITY = 64  # posts never delay anything: when full, a post is skipped
# Each generator worker asks for at most one permit at a time, plus its outcome report.
PERMITS_CAPACITY_PER_WORKER = 2

# Time the pipeline gets at shutdown to reach a persisted step.
SHUTDOWN_GRACE_S = 10.0
DRAIN_POLL_S = 0.1
HTTP_CLIENT_TIMEOUT_S = 30.0
# How often the broker's connection state is looked at for its outage reports.
BROKER_FOLLOW_S = 0.5


@contextlib.asynccontextmanager
async def open_database_for(settings: Settings):
    if settings.database_url is not None:
        async with open_database(settings.database_url) as db:
            yield db
        return
    dsn = await trio.to_thread.run_sync(embedded_pg.start, settings.data_dir / "postgres")
    async with open_database(dsn) as db:
        yield db


def make_generator(settings: Settings):
    if settings.openai_api_key is None:
        return OfflineGenerator()
    return OpenAIGenerator(
        api_key=settings.openai_api_key,
        base_url=settings.openai_base_url,
        image_model=settings.image_model,
        text_model=settings.text_model,
        image_quality=settings.image_quality,
    )


def make_storage(settings: Settings):
    if settings.storage is not None:
        return S3Storage(settings.storage)
    return LocalStorage(settings.data_dir / "images", f"{settings.local_http_url}/images")


def make_points(settings: Settings, client: httpx.AsyncClient):
    if settings.auth_shared_secret is None:
        return FreePoints()
    return Points(
        client,
        auth_url=settings.auth_url,
        ledger_url=settings.ledger_url,
        shared_secret=settings.auth_shared_secret,
        points_cost=settings.points_cost,
    )


def admin_token_for(settings: Settings) -> str | None:
    """The bearer token with broadcaster rights when there is no auth service."""
    if settings.auth_shared_secret is not None or settings.profile == "production":
        return None  # contract §1: only in development without an auth service
    if settings.admin_token:
        return settings.admin_token
    token = secrets.token_urlsafe(24)
    # The one secret ever printed (contract §1): the operator needs it to use the API.
    print(f"dynamo: generated DYNAMO_ADMIN_TOKEN for this run: {token}", flush=True)
    return token


async def serve(
    settings: Settings, shutdown: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """Runs dynamo until `shutdown` is set. task_status.started(http_url) once it serves.

    Raises ModelsRefused (production) when a configured model is unknown or shut down."""
    for warning in settings.defaults_used:
        log.warning(warning)
    gen = make_generator(settings)
    try:
        models = ModelsStatus(
            image_model=gen.image_model, text_model=gen.text_model, offline=gen.offline
        )
        # Before anything else: a model that cannot be used stops a production start.
        await check_and_report(gen, models, profile=settings.profile, at_startup=True)
        async with trio_asyncio.open_loop():
            async with (
                open_database_for(settings) as db,
                open_broker(settings.amqp_url) as broker,
                httpx.AsyncClient(timeout=HTTP_CLIENT_TIMEOUT_S) as http_client,
            ):
                await db.apply_schema()
                ports = _Ports(db, broker, http_client, gen, models)
                await _run_graph(settings, ports, shutdown, task_status)
    finally:
        await gen.aclose()


@dataclasses.dataclass
class _Ports:
    db: object
    broker: object
    http_client: httpx.AsyncClient
    generator: object
    models: ModelsStatus


async def _run_graph(settings: Settings, ports: _Ports, shutdown, task_status) -> None:
    db, broker, http_client, gen = ports.db, ports.broker, ports.http_client, ports.generator
    # What every request needs; an outage of either is waited out (dynamo.supervision.outages).
    dependencies = outages.Dependencies(
        database=outages.Dependency("database", probe=db.ping),
        broker=outages.Dependency("broker", probe=broker.probe),
    )
    pipeline = Pipeline(
        db,
        worker_id=uuid.uuid4(),
        request_timeout_s=settings.request_timeout_s,
        points_cost=settings.points_cost if settings.auth_shared_secret else 0,
        dependencies=dependencies,
    )
    supervisor = Supervisor(on_restart=pipeline.inflight.take_orphans, dependencies=dependencies)
    storage = make_storage(settings)
    points = make_points(settings, http_client)
    spend = Spend(db, PriceTable(settings.prices), daily_budget_usd=settings.daily_budget_usd)
    # The OpenAI limits are the account's: every process of a fleet shares one budget.
    budget = Budget(PostgresStore(db, pipeline.worker_id), worker=str(pipeline.worker_id))
    limiter_status = RateLimiterStatus(budget=budget)
    fleet_view = Fleet(
        FleetQueries(db),
        worker_id=pipeline.worker_id,
        http_addr=f"{settings.http_host}:{settings.http_port}",
        inflight=pipeline.inflight,
    )
    readiness = Readiness(
        db=db, broker=broker, limiter_status=limiter_status, dependencies=dependencies
    )

    reserve_send, reserve_recv = trio.open_memory_channel(RESERVE_CAPACITY)
    schedule_send, schedule_recv = trio.open_memory_channel(SCHEDULE_CAPACITY)
    generate_send, generate_recv = trio.open_memory_channel(GENERATE_CAPACITY)
    permits_send, permits_recv = trio.open_memory_channel(
        PERMITS_CAPACITY_PER_WORKER * settings.generator_workers
    )
    upload_send, upload_recv = trio.open_memory_channel(UPLOAD_CAPACITY)
    announce_send, announce_recv = trio.open_memory_channel(ANNOUNCE_CAPACITY)
    finalize_send, finalize_recv = trio.open_memory_channel(FINALIZE_CAPACITY)
    results_send, results_recv = trio.open_memory_channel(RESULTS_CAPACITY)
    discord_send, discord_recv = trio.open_memory_channel(DISCORD_CAPACITY)
    channels = {
        "reserve": reserve_send,
        "schedule": schedule_send,
        "generate": generate_send,
        "permits": permits_send,
        "upload": upload_send,
        "announce": announce_send,
        "finalize": finalize_send,
        "results": results_send,
        "discord": discord_send,
    }
    router = resume.Router(
        reserve_send=reserve_send,
        schedule_send=schedule_send,
        upload_send=upload_send,
        announce_send=announce_send,
        finalize_send=finalize_send,
        results_send=results_send,
    )
    start = supervisor.start

    # The pipeline, downstream first. Its nursery outlives intake's and the API's, so
    # at shutdown those stop taking work first.
    async with trio.open_nursery() as pipeline_nursery:
        pipeline_nursery.start_soon(supervisor.watch_outages)
        if broker.configured:
            pipeline_nursery.start_soon(
                functools.partial(
                    outages.follow,
                    dependencies["broker"],
                    lambda: broker.connected,
                    every_s=BROKER_FOLLOW_S,
                )
            )
        await start(
            pipeline_nursery,
            "discord",
            lambda task_status: discord.run(
                settings=settings,
                db=db,
                http_client=http_client,
                discord_recv=discord_recv,
                task_status=task_status,
            ),
        )
        await start(
            pipeline_nursery,
            "announcer",
            lambda task_status: announcer.run(
                broker=broker,
                pipeline=pipeline,
                announce_recv=announce_recv,
                results_recv=results_recv,
                finalize_send=finalize_send,
                discord_send=discord_send,
                task_status=task_status,
            ),
        )
        await start(
            pipeline_nursery,
            "ledger",
            lambda task_status: ledger.run(
                points=points,
                pipeline=pipeline,
                reserve_recv=reserve_recv,
                finalize_recv=finalize_recv,
                schedule_send=schedule_send,
                finalize_send=finalize_send,
                results_send=results_send,
                task_status=task_status,
            ),
        )
        await start(
            pipeline_nursery,
            "uploader",
            lambda task_status: uploader.run(
                storage=storage,
                pipeline=pipeline,
                upload_recv=upload_recv,
                announce_send=announce_send,
                finalize_send=finalize_send,
                task_status=task_status,
            ),
        )
        await start(
            pipeline_nursery,
            "generator",
            lambda task_status: generator.run(
                generator=gen,
                pipeline=pipeline,
                generate_recv=generate_recv,
                permits_send=permits_send,
                upload_send=upload_send,
                finalize_send=finalize_send,
                workers=settings.generator_workers,
                max_attempts=settings.max_attempts,
                moderation=settings.moderation,
                spend=spend,
                task_status=task_status,
            ),
        )
        if not gen.offline:
            await start(
                pipeline_nursery,
                "model_watch",
                lambda task_status: model_watch.run(
                    generator=gen,
                    models=ports.models,
                    profile=settings.profile,
                    task_status=task_status,
                ),
            )
        await start(
            pipeline_nursery,
            "rate_limiter",
            lambda task_status: rate_limiter.run(
                jobs_recv=schedule_recv,
                generate_send=generate_send,
                permits_recv=permits_recv,
                failures_send=finalize_send,
                images_per_minute=settings.images_per_minute,
                image_tokens_per_minute=settings.image_tokens_per_minute,
                text_per_minute=settings.text_requests_per_minute,
                status=limiter_status,
                queue_capacity=rate_limiter.fair_queue_capacity(
                    settings.images_per_minute, settings.request_timeout_s
                ),
                task_status=task_status,
            ),
        )
        await start(
            pipeline_nursery,
            "resume",
            lambda task_status: resume.run(
                pipeline=pipeline, router=router, task_status=task_status
            ),
        )
        await start(
            pipeline_nursery,
            "fleet",
            lambda task_status: fleet_actor.run(fleet=fleet_view, task_status=task_status),
        )

        async with trio.open_nursery() as intake_nursery:
            await start(
                intake_nursery,
                "intake",
                lambda task_status: intake.run(
                    broker=broker,
                    pipeline=pipeline,
                    reserve_send=reserve_send,
                    results_send=results_send,
                    readiness=readiness,
                    task_status=task_status,
                ),
            )
            api = http.ApiContext(
                settings=settings,
                pipeline=pipeline,
                reserve_send=reserve_send,
                finalize_send=finalize_send,
                readiness=readiness,
                supervisor=supervisor,
                channels=channels,
                limiter_status=limiter_status,
                fleet=fleet_view,
                local_storage=storage if isinstance(storage, LocalStorage) else None,
                http_client=http_client,
                admin_token=admin_token_for(settings),
                auth_configured=settings.auth_shared_secret is not None,
                models=ports.models,
                spend=spend,
                broker=broker,
            )
            url = await start(
                intake_nursery,
                "http",
                lambda task_status: http.run(
                    api=api,
                    host=settings.http_host,
                    port=settings.http_port,
                    task_status=task_status,
                ),
            )
            log.info("dynamo is running; HTTP API at %s", url)
            task_status.started(url)
            await shutdown.wait()
            log.info("shutting down: intake and the HTTP API stop first")
            intake_nursery.cancel_scope.cancel()
        # The pipeline gets its grace period to finish or persist what it holds; every
        # step is persisted before the next starts, so cancelling after that is safe.
        with trio.move_on_after(SHUTDOWN_GRACE_S):
            while len(pipeline.inflight):
                await trio.sleep(DRAIN_POLL_S)
        log.info(
            "stopping the pipeline with %d request(s) in flight; they resume on the next start",
            len(pipeline.inflight),
        )
        pipeline_nursery.cancel_scope.cancel()
    # Reached only at a clean shutdown (a crash propagates past it): only now may the
    # worker row go, and with it this process's claim on its requests.
    await resume.retire_at_shutdown(pipeline)
