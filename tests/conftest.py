"""Fixtures shared by the tests: the fakes of tests/fakes, the real PostgreSQL and
RabbitMQ (throwaway database and virtual host per test), and dynamo as a subprocess."""

from __future__ import annotations

import pytest
import trio_asyncio

from tests.fakes.fixtures import fake_auth, fake_discord, fake_ledger, fake_openai, fake_s3  # noqa: F401
from tests.support import infra
from tests.support.amqp import Rabbit
from tests.support.service import ServiceProcess


@pytest.fixture
async def aio_loop():
    """A trio-asyncio loop for the test's own aio-pika and asyncpg clients."""
    async with trio_asyncio.open_loop() as loop:
        yield loop


@pytest.fixture
async def pg_database(aio_loop):
    name = await infra.create_database()
    yield name
    await infra.drop_database(name)


@pytest.fixture
def vhost():
    name = infra.create_vhost()
    yield name
    infra.delete_vhost(name)


@pytest.fixture
async def rabbit(aio_loop, vhost):
    rabbit = await Rabbit.connect(infra.amqp_url(vhost))
    yield rabbit
    await rabbit.close()


@pytest.fixture
def service_env(pg_database, vhost, fake_openai, fake_auth, fake_ledger, fake_s3):
    """The production environment of a dynamo wired to the test's systems."""
    return {
        "DYNAMO_PROFILE": "production",
        "AMQP_URL": infra.amqp_url(vhost),
        "DATABASE_URL": infra.pg_dsn(pg_database),
        **fake_openai.env(),
        **fake_auth.env(),
        **fake_ledger.env(),
        **fake_s3.env(),
        "DYNAMO_IMAGES_PER_MINUTE": "600",
        "DYNAMO_TEXT_REQUESTS_PER_MINUTE": "6000",
    }


@pytest.fixture
def dynamo_process(service_env, tmp_path):
    """Makes (not starts) the dynamo subprocess; killed at the end of the test."""
    processes = []

    def make(**overrides) -> ServiceProcess:
        process = ServiceProcess({**service_env, **overrides}, tmp_path / f"dynamo{len(processes)}")
        processes.append(process)
        return process

    yield make
    for process in processes:
        process.kill()
        # Shown by pytest only when the test failed.
        print(f"---- dynamo logs ({process.workdir}) ----\n{process.logs()[-20000:]}")
