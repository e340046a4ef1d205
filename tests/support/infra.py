"""The real PostgreSQL and RabbitMQ for integration tests: a throwaway database and a
throwaway RabbitMQ virtual host per test, so tests never see each other's rows or
messages.

When a service is unreachable the test is skipped locally with the reason, but fails
under CI (`CI=true`): CI must never pass by skipping what it should run.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import asyncpg
import pytest
from trio_asyncio import aio_as_trio

PG_ADMIN_DSN = os.environ.get("TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_BASE = os.environ.get("TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")


def unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable: {type(exc).__name__}: {exc}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def pg_dsn(database: str) -> str:
    return PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{database}"


async def create_database() -> str:
    name = f"dynamo_test_{uuid.uuid4().hex[:12]}"
    try:
        conn = await aio_as_trio(asyncpg.connect)(PG_ADMIN_DSN)
    except (OSError, asyncpg.PostgresError) as exc:
        unavailable("PostgreSQL at 127.0.0.1:5432", exc)
    try:
        await aio_as_trio(conn.execute)(f'create database "{name}"')
    finally:
        await aio_as_trio(conn.close)()
    return name


async def drop_database(name: str) -> None:
    conn = await aio_as_trio(asyncpg.connect)(PG_ADMIN_DSN)
    try:
        await aio_as_trio(conn.execute)(f'drop database if exists "{name}" with (force)')
    finally:
        await aio_as_trio(conn.close)()


def create_vhost() -> str:
    name = f"dynamo-test-{uuid.uuid4().hex[:12]}"
    try:
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True,
                       capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        unavailable("RabbitMQ (rabbitmqctl)", exc)
    return name


def delete_vhost(name: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], capture_output=True, timeout=60)


def amqp_url(vhost: str) -> str:
    return f"{AMQP_BASE}/{vhost}"
