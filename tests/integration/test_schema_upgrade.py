"""schema.sql on a database the original Go service made (contract §6): applied twice, it
keeps the original rows and dynamo runs on the result."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest
import trio
from trio_asyncio import aio_as_trio

from dynamo.database.port import open_database
from dynamo.rabbitmq import broker as topology
from tests.support import infra
from tests.support.amqp import bodies
from tests.support.service import started
from tests.support.timeouts import SERVICE_S

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[1] / "fixtures" / "original_migrations.sql"
OLD_SUCCESS = uuid.UUID("0b9a3f3e-5a4b-4b8e-9c61-2f1d7c3a9e01")
OLD_FAILURE = uuid.UUID("7c1e2d44-9f0a-4e1b-8d2c-5b6a7f8e9d02")


async def _original_database(database: str) -> None:
    conn = await aio_as_trio(asyncpg.connect)(infra.pg_dsn(database))
    try:
        await aio_as_trio(conn.execute)(MIGRATIONS.read_text())
        await aio_as_trio(conn.execute)(
            """
            insert into dynamo.image_request
                (id, twitch_user_id, broadcast_id, screening_id, style, inputs, prompt, finished_at)
            values ($1, '90790024', 13, null, 'ghost', '{"subject":"a cardboard box"}',
                    'a ghostly image of a cardboard box, with glitchy VHS artifacts, dark background', now());
            """, OLD_SUCCESS)
        await aio_as_trio(conn.execute)(
            "insert into dynamo.image (image_request_id, index, url, color) "
            "values ($1, 0, 'https://example.invalid/old.jpg', '#000000')", OLD_SUCCESS)
        await aio_as_trio(conn.execute)(
            """
            insert into dynamo.image_request
                (id, twitch_user_id, style, inputs, prompt, finished_at, error_message)
            values ($1, '1234', 'ghost', '{"subject":"x"}', 'p', now(), 'generation failed')
            """, OLD_FAILURE)
    finally:
        await aio_as_trio(conn.close)()


async def test_schema_upgrades_the_original_database_and_keeps_its_rows(pg_database):
    with trio.fail_after(60):
        await _original_database(pg_database)
        async with open_database(infra.pg_dsn(pg_database)) as db:
            await db.apply_schema()
            await db.apply_schema()  # safe to apply again
            rows = {r["id"]: r for r in await db.fetch("select * from dynamo.image_request")}
            image = await db.fetchrow("select * from dynamo.image where image_request_id = $1",
                                      OLD_SUCCESS)
            unfinished = await db.unfinished_requests()
        assert set(rows) == {OLD_SUCCESS, OLD_FAILURE}
        old = rows[OLD_SUCCESS]
        assert old["twitch_user_id"] == "90790024" and old["broadcast_id"] == 13
        assert old["inputs"] == {"subject": "a cardboard box"}
        assert old["prompt"].startswith("a ghostly image of a cardboard box")
        assert old["state"] == "succeeded" and old["step"] == "done"
        assert rows[OLD_FAILURE]["state"] == "failed"
        assert rows[OLD_FAILURE]["error_message"] == "generation failed"
        assert image["url"] == "https://example.invalid/old.jpg" and image["color"] == "#000000"
        assert unfinished == []  # the old service's history is never resumed


async def test_the_service_runs_on_an_upgraded_database(pg_database, rabbit, dynamo_process):
    with trio.fail_after(SERVICE_S):
        await _original_database(pg_database)
        await rabbit.collect(topology.RESULTS_EXCHANGE)
        service = await started(dynamo_process)
        await rabbit.publish({
            "type": "image",
            "viewer": {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"},
            "state": {"broadcast_id": 13, "screening_id": "96d1ca5c-7658-48c9-8193-9d1739854467",
                      "tape_id": 124},
            "payload": {"style": "ghost", "inputs": {"subject": "a seal"}}})
        [result] = bodies(await rabbit.wait_for(topology.RESULTS_EXCHANGE, 1))
        assert result["outcome"] == "success"
        assert await service.terminate() == 0
        conn = await aio_as_trio(asyncpg.connect)(infra.pg_dsn(pg_database))
        try:
            count = await aio_as_trio(conn.fetchval)("select count(*) from dynamo.image_request")
            old = await aio_as_trio(conn.fetchval)(
                "select prompt from dynamo.image_request where id = $1", OLD_SUCCESS)
        finally:
            await aio_as_trio(conn.close)()
        assert count == 3 and old.startswith("a ghostly image of a cardboard box")
