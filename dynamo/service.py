"""The whole service in one function: the ports, the channels, the actors, in order.

    broker ──intake──▶ reserve ──ledger(reserve)──▶ schedule ──rate_limiter──▶ generate
    http ───────────▶ reserve                                   ▲ permits       │
                                                                └──────generator pool
    generate ─▶ upload ──uploader──▶ announce ──announcer(alerts)──▶ finalize
    failures (any stage) ─────────────────────────────────────────▶ finalize
    finalize ──ledger(accept/refund)──▶ results ──announcer(results)──▶ discord

`serve()` opens every port; the graph is then declared as tables, as OTP does: the
channels (`channel_specs`: name -> capacity) and the actors (`pipeline_children`,
`door_children`: name, start function, the channels each reads and sends into, restart
policy). One loop (`dynamo.supervision.children.start_children`) starts each table in its
order, downstream first, so that each actor's outbox is being read before anything is sent
into it; `check_order` refuses a table that is not. Nested nurseries make shutdown run in
reverse: the doors (intake and the HTTP API) stop first, and the pipeline gets
`SHUTDOWN_GRACE_S` to bring what is in hand to a persisted step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import secrets
import uuid
from collections.abc import AsyncIterator

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
from dynamo.database.port import Database, open_database
from dynamo.images.storage import LocalStorage, S3Storage, StoragePort
from dynamo.inflight import resume
from dynamo.inflight.pipeline import Pipeline
from dynamo.limits.budget import Budget
from dynamo.limits.fleet_view import Fleet
from dynamo.limits.state import RateLimiterStatus
from dynamo.openai_port.catalogue import ModelsStatus, check_and_report
from dynamo.openai_port.client import GeneratorPort, OfflineGenerator, OpenAIGenerator
from dynamo.openai_port.pricing import PriceTable
from dynamo.openai_port.spend import Spend
from dynamo.rabbitmq.broker import BrokerPort, open_broker
from dynamo.supervision import outages
from dynamo.supervision.children import (
    Channels,
    ChannelSpec,
    ChildSpec,
    check_order,
    start_children,
)
from dynamo.supervision.readiness import Readiness
from dynamo.supervision.supervisor import Supervisor
from dynamo.viewer_points.port import FreePoints, Points, PointsPort

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
async def open_database_for(settings: Settings) -> AsyncIterator[Database]:
    if settings.database_url is not None:
        async with open_database(settings.database_url) as db:
            yield db
        return
    dsn = await trio.to_thread.run_sync(embedded_pg.start, settings.data_dir / "postgres")
    async with open_database(dsn) as db:
        yield db


def make_generator(settings: Settings) -> GeneratorPort:
    if settings.openai_api_key is None:
        return OfflineGenerator()
    return OpenAIGenerator(
        api_key=settings.openai_api_key,
        base_url=settings.openai_base_url,
        image_model=settings.image_model,
        text_model=settings.text_model,
        image_quality=settings.image_quality,
    )


def make_storage(settings: Settings) -> StoragePort:
    if settings.storage is not None:
        return S3Storage(settings.storage)
    return LocalStorage(settings.data_dir / "images", f"{settings.local_http_url}/images")


def make_points(settings: Settings, client: httpx.AsyncClient) -> PointsPort:
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
    db: Database
    broker: BrokerPort
    http_client: httpx.AsyncClient
    generator: GeneratorPort
    models: ModelsStatus


# The channels: capacities small on purpose, see above. A feedback channel flows
# upstream (failures back to the ledger, permit requests back to the rate limiter), so
# its reader may start after its senders.
def channel_specs(settings: Settings) -> dict[str, ChannelSpec]:
    return {
        "reserve": ChannelSpec(RESERVE_CAPACITY),
        "schedule": ChannelSpec(SCHEDULE_CAPACITY),
        "generate": ChannelSpec(GENERATE_CAPACITY),
        "permits": ChannelSpec(
            PERMITS_CAPACITY_PER_WORKER * settings.generator_workers, feedback=True
        ),
        "upload": ChannelSpec(UPLOAD_CAPACITY),
        "announce": ChannelSpec(ANNOUNCE_CAPACITY),
        "finalize": ChannelSpec(FINALIZE_CAPACITY, feedback=True),
        "results": ChannelSpec(RESULTS_CAPACITY),
        "discord": ChannelSpec(DISCORD_CAPACITY),
    }


@dataclasses.dataclass
class _Parts:
    """What the actors share besides channels, built once per run."""

    pipeline: Pipeline
    supervisor: Supervisor
    storage: StoragePort
    points: PointsPort
    spend: Spend
    limiter_status: RateLimiterStatus
    fleet: Fleet
    readiness: Readiness


def pipeline_children(settings: Settings, ports: _Ports, parts: _Parts) -> list[ChildSpec]:
    """The pipeline's actors, downstream first (`check_order` holds the table to it)."""
    db, broker, gen, pipeline = ports.db, ports.broker, ports.generator, parts.pipeline
    run_ = functools.partial
    children = [
        ChildSpec(
            "discord",
            run_(discord.run, settings=settings, db=db, http_client=ports.http_client),
            reads=("discord",),
        ),
        ChildSpec(
            "announcer",
            run_(announcer.run, broker=broker, pipeline=pipeline),
            reads=("announce", "results"),
            sends=("finalize", "discord"),
        ),
        ChildSpec(
            "uploader",
            run_(uploader.run, storage=parts.storage, pipeline=pipeline),
            reads=("upload",),
            sends=("announce", "finalize"),
        ),
        ChildSpec(
            "generator",
            run_(
                generator.run,
                generator=gen,
                pipeline=pipeline,
                workers=settings.generator_workers,
                max_attempts=settings.max_attempts,
                moderation=settings.moderation,
                spend=parts.spend,
            ),
            reads=("generate",),
            sends=("permits", "upload", "finalize"),
        ),
        ChildSpec(
            "rate_limiter",
            run_(
                rate_limiter.run,
                images_per_minute=settings.images_per_minute,
                image_tokens_per_minute=settings.image_tokens_per_minute,
                text_per_minute=settings.text_requests_per_minute,
                status=parts.limiter_status,
                queue_capacity=rate_limiter.fair_queue_capacity(
                    settings.images_per_minute, settings.request_timeout_s
                ),
            ),
            reads=("schedule", "permits"),
            sends=("generate", "finalize"),
            keywords={"schedule": "jobs", "finalize": "failures"},
        ),
        ChildSpec(
            "ledger",
            run_(ledger.run, points=parts.points, pipeline=pipeline),
            reads=("reserve", "finalize"),
            sends=("schedule", "finalize", "results"),
        ),
        # Re-routes unfinished requests to the channel of their persisted step.
        ChildSpec(
            "resume",
            run_(_resume, pipeline=pipeline),
            sends=("reserve", "schedule", "upload", "announce", "finalize", "results"),
        ),
        ChildSpec("fleet", run_(fleet_actor.run, fleet=parts.fleet)),
    ]
    if not gen.offline:  # nothing to watch in the catalogue of placeholders
        children.append(
            ChildSpec(
                "model_watch",
                run_(model_watch.run, generator=gen, models=ports.models, profile=settings.profile),
            )
        )
    return children


def door_children(settings: Settings, ports: _Ports, parts: _Parts, channels: Channels):
    """Where requests come in; they stop first at shutdown."""
    api = dict(
        settings=settings,
        pipeline=parts.pipeline,
        readiness=parts.readiness,
        supervisor=parts.supervisor,
        channels=channels.send,
        limiter_status=parts.limiter_status,
        fleet=parts.fleet,
        local_storage=parts.storage if isinstance(parts.storage, LocalStorage) else None,
        http_client=ports.http_client,
        admin_token=admin_token_for(settings),
        auth_configured=settings.auth_shared_secret is not None,
        models=ports.models,
        spend=parts.spend,
        broker=ports.broker,
    )
    return [
        ChildSpec(
            "intake",
            functools.partial(
                intake.run, broker=ports.broker, pipeline=parts.pipeline, readiness=parts.readiness
            ),
            sends=("reserve", "results"),
        ),
        ChildSpec(
            "http",
            functools.partial(
                _serve_http, host=settings.http_host, port=settings.http_port, api=api
            ),
            sends=("reserve", "finalize"),
        ),
    ]


async def _resume(*, pipeline: Pipeline, task_status=trio.TASK_STATUS_IGNORED, **sends) -> None:
    await resume.run(pipeline=pipeline, router=resume.Router(**sends), task_status=task_status)


async def _serve_http(
    *, host: str, port: int, api: dict, reserve_send, finalize_send, task_status
) -> None:
    context = http.ApiContext(reserve_send=reserve_send, finalize_send=finalize_send, **api)
    await http.run(api=context, host=host, port=port, task_status=task_status)


def _parts(settings: Settings, ports: _Ports) -> _Parts:
    db = ports.db
    # What every request needs; an outage of either is waited out (dynamo.supervision.outages).
    dependencies = outages.Dependencies(
        database=outages.Dependency("database", probe=db.ping),
        broker=outages.Dependency("broker", probe=ports.broker.probe),
    )
    pipeline = Pipeline(
        db,
        worker_id=uuid.uuid4(),
        request_timeout_s=settings.request_timeout_s,
        points_cost=settings.points_cost if settings.auth_shared_secret else 0,
        dependencies=dependencies,
    )
    # The OpenAI limits are the account's: every process of a fleet shares one budget.
    budget = Budget(PostgresStore(db, pipeline.worker_id), worker=str(pipeline.worker_id))
    limiter_status = RateLimiterStatus(budget=budget)
    return _Parts(
        pipeline=pipeline,
        supervisor=Supervisor(
            on_restart=pipeline.inflight.take_orphans, dependencies=dependencies
        ),
        storage=make_storage(settings),
        points=make_points(settings, ports.http_client),
        spend=Spend(db, PriceTable(settings.prices), daily_budget_usd=settings.daily_budget_usd),
        limiter_status=limiter_status,
        fleet=Fleet(
            FleetQueries(db),
            worker_id=pipeline.worker_id,
            http_addr=f"{settings.http_host}:{settings.http_port}",
            inflight=pipeline.inflight,
        ),
        readiness=Readiness(
            db=db, broker=ports.broker, limiter_status=limiter_status, dependencies=dependencies
        ),
    )


async def _run_graph(settings: Settings, ports: _Ports, shutdown, task_status) -> None:
    parts = _parts(settings, ports)
    pipeline, supervisor, broker = parts.pipeline, parts.supervisor, ports.broker
    specs = channel_specs(settings)
    channels = Channels(specs)
    pipeline_table = pipeline_children(settings, ports, parts)
    doors = door_children(settings, ports, parts, channels)
    check_order([*pipeline_table, *doors], specs)

    # The pipeline, downstream first. Its nursery outlives the doors', so at shutdown
    # intake and the HTTP API stop taking work first.
    async with trio.open_nursery() as pipeline_nursery:
        pipeline_nursery.start_soon(supervisor.watch_outages)
        if broker.configured:
            pipeline_nursery.start_soon(
                functools.partial(
                    outages.follow,
                    supervisor.dependencies["broker"],
                    lambda: broker.connected,
                    every_s=BROKER_FOLLOW_S,
                )
            )
        await start_children(supervisor, pipeline_nursery, pipeline_table, channels)

        async with trio.open_nursery() as doors_nursery:
            *_, url = await start_children(supervisor, doors_nursery, doors, channels)
            log.info("dynamo is running; HTTP API at %s", url)
            task_status.started(url)
            await shutdown.wait()
            log.info("shutting down: intake and the HTTP API stop first")
            doors_nursery.cancel_scope.cancel()
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
