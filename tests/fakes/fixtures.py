"""pytest fixtures that serve each fake in the test's nursery and give it, ready.

Import them into a conftest (`from tests.fakes.fixtures import *`). Each fake listens on
127.0.0.1, port 0, until the test ends (pytest-trio's `nursery` fixture is cancelled
then); `fake.url` is its base URL and `fake.env()` the service's environment for it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from .auth_server import FakeAuth
from .discord_server import FakeDiscord
from .ledger_server import FakeLedger
from .openai_server import FakeOpenAI
from .s3 import S3Bucket, moto_s3

__all__ = ["fake_auth", "fake_discord", "fake_ledger", "fake_openai", "fake_s3"]


@pytest.fixture
async def fake_openai(nursery: trio.Nursery) -> FakeOpenAI:
    fake = FakeOpenAI()
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def fake_auth(nursery: trio.Nursery) -> FakeAuth:
    fake = FakeAuth()
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def fake_ledger(nursery: trio.Nursery, fake_auth: FakeAuth) -> FakeLedger:
    fake = FakeLedger(fake_auth)
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def fake_discord(nursery: trio.Nursery) -> FakeDiscord:
    fake = FakeDiscord()
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
def fake_s3() -> Iterator[S3Bucket]:
    with moto_s3() as s3:
        yield s3
