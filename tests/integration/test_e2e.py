"""The happy path end to end: the contract's two example messages published to RabbitMQ
become two alerts on `onscreen-events`, two success results, two stored images, two
accepted debits, and the rows of the original tables. dynamo runs as `python run.py`
against the real RabbitMQ and PostgreSQL, fake OpenAI/auth/ledger and moto's S3."""

from __future__ import annotations

import io
import json
import uuid

import asyncpg
import httpx
import pytest
import trio
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from trio_asyncio import aio_as_trio

from dynamo.images import processing as imaging
from dynamo.rabbitmq import broker as topology
from tests.support import checks, infra
from tests.support.amqp import bodies
from tests.support.service import started
from tests.support.timeouts import SERVICE_S

pytestmark = pytest.mark.integration

GHOST = {"type": "image", "viewer": {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"}, "state": {"broadcast_id": 13, "screening_id": "96d1ca5c-7658-48c9-8193-9d1739854467", "tape_id": 124}, "payload": {"style": "ghost", "inputs": {"subject": "a seal"}}}
FRIEND = {"type": "image", "viewer": {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"}, "state": {"broadcast_id": 0, "screening_id": "00000000-0000-0000-0000-000000000000", "tape_id": 0}, "payload": {"style": "friend", "inputs": {"color": "yellow", "subject": "caterpillar in a top hat"}}}
VIEWER = GHOST["viewer"]


def _jpeg_tables(quality: int) -> dict:
    """The quantization tables of a JPEG that Pillow encodes at `quality`."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG", quality=quality)
    return Image.open(buffer).quantization


async def fetch_rows(database: str, sql: str, *args):
    conn = await aio_as_trio(asyncpg.connect)(infra.pg_dsn(database))
    try:
        return await aio_as_trio(conn.fetch)(sql, *args)
    finally:
        await aio_as_trio(conn.close)()


async def test_ghost_and_friend_from_rabbitmq_to_the_screen(
        rabbit, dynamo_process, fake_openai, fake_ledger, fake_s3, pg_database):
    with trio.fail_after(SERVICE_S):
        await rabbit.collect(topology.ONSCREEN_EXCHANGE)
        await rabbit.collect(topology.RESULTS_EXCHANGE)
        service = await started(dynamo_process)

        await rabbit.publish(GHOST)
        await rabbit.publish(FRIEND)
        alerts = await rabbit.wait_for(topology.ONSCREEN_EXCHANGE, 2)
        results = await rabbit.wait_for(topology.RESULTS_EXCHANGE, 2)

        # The onscreen events, field by field (eonscreen schema).
        for message in alerts + results:
            assert message.content_type == "application/json"
            assert message.delivery_mode == 2  # persistent
        events = {e["payload"]["type"]: e for e in bodies(alerts)}
        ghost, friend = events["ghost"], events["friend"]
        assert ghost["type"] == "image" and friend["type"] == "image"
        assert ghost["payload"]["viewer"] == VIEWER and friend["payload"]["viewer"] == VIEWER
        ghost_id = alerts[[e["payload"]["type"] for e in bodies(alerts)].index("ghost")].message_id
        friend_id = alerts[[e["payload"]["type"] for e in bodies(alerts)].index("friend")].message_id
        assert uuid.UUID(ghost_id).version == 4 and uuid.UUID(friend_id).version == 4
        assert ghost["payload"]["details"] == {
            "image_url": f"{fake_s3.endpoint_url}/{fake_s3.bucket}/{ghost_id}/{ghost_id}-0.jpg",
            "description": "a seal",
        }
        details = friend["payload"]["details"]
        assert set(details) == {"image_url", "description", "name", "background_color"}
        assert details["image_url"] == f"{fake_s3.endpoint_url}/{fake_s3.bucket}/{friend_id}/{friend_id}-0.webp"
        assert details["description"] == "a caterpillar in a top hat"
        assert details["name"] == "Sir Hatsworth"
        # The default image model draws the friend on a transparent background itself; the
        # color is the complement its chroma-key prompt would have named (yellow: indigo).
        assert details["background_color"] == imaging.color_hex("indigo") == "#4b0082"

        # The results: success, published after the debit was accepted.
        by_id = {r["request_id"]: r for r in bodies(results)}
        assert {m.message_id for m in results} == {f"{ghost_id}:result", f"{friend_id}:result"}
        assert by_id[ghost_id] == {"request_id": ghost_id, "outcome": "success", "viewer": VIEWER,
                                   "style": "ghost", "description": "a seal",
                                   "image_url": ghost["payload"]["details"]["image_url"]}
        assert by_id[friend_id]["outcome"] == "success" and by_id[friend_id]["style"] == "friend"
        assert by_id[friend_id]["description"] == "a caterpillar in a top hat"

        # The images download and decode: a JPEG, and a WEBP with alpha.
        async with httpx.AsyncClient() as client:
            jpeg = await client.get(ghost["payload"]["details"]["image_url"])
            webp = await client.get(details["image_url"])
        assert jpeg.status_code == 200 and webp.status_code == 200
        ghost_image = Image.open(io.BytesIO(jpeg.content))
        assert ghost_image.format == "JPEG" and ghost_image.size == (1024, 1024)
        assert ghost_image.quantization == _jpeg_tables(quality=80)  # JPEG quality 80
        friend_image = Image.open(io.BytesIO(webp.content))
        assert friend_image.format == "WEBP" and friend_image.mode == "RGBA"
        assert friend_image.getpixel((2, 2))[3] == 0 and friend_image.getpixel((512, 512))[3] == 255
        # Asked in the stored format (ghost: JPEG at 80; friend: transparent WEBP without
        # the chroma-key clause) and stored as the API sent them: no re-encoding.
        asked = {("friend" if "clip art" in c.body["prompt"] else "ghost"): c
                 for c in fake_openai.calls_to("images")}
        assert asked["ghost"].body["output_format"] == "jpeg"
        assert asked["ghost"].body["output_compression"] == 80
        assert asked["friend"].body["background"] == "transparent"
        assert asked["friend"].body["output_format"] == "webp"
        assert "chroma" not in asked["friend"].body["prompt"]
        for call in asked.values():
            assert call.body["model"] == "gpt-image-2.6-flare" and call.body["quality"] == "medium"
            assert "response_format" not in call.body and "style" not in call.body
        assert jpeg.content == asked["ghost"].extra["image"]
        assert webp.content == asked["friend"].extra["image"]

        # The ledger: exactly two accepted 200-point debits, nothing pending.
        assert fake_ledger.pending() == []
        accepted = fake_ledger.accepted()
        assert sorted(f.metadata["imageRequestId"] for f in accepted) == sorted([ghost_id, friend_id])
        assert all(f.amount == 200 and f.user_id == "90790024" for f in accepted)
        assert {f.metadata["style"] for f in accepted} == {"ghost", "friend"}

        # The rows of the original tables.
        requests = {str(r["id"]): r for r in await fetch_rows(
            pg_database, "select * from dynamo.image_request")}
        assert set(requests) == {ghost_id, friend_id}
        g, f = requests[ghost_id], requests[friend_id]
        assert g["twitch_user_id"] == "90790024" and g["broadcast_id"] == 13
        assert str(g["screening_id"]) == "96d1ca5c-7658-48c9-8193-9d1739854467"
        assert f["broadcast_id"] is None and f["screening_id"] is None
        assert json.loads(g["inputs"]) == {"subject": "a seal"}
        assert json.loads(f["inputs"]) == {"color": "yellow", "subject": "caterpillar in a top hat"}
        assert g["prompt"] == "a ghostly image of a seal, with glitchy VHS artifacts, dark background"
        # The stored prompt is the one the image was asked with: transparent, no chroma key.
        assert f["prompt"] == asked["friend"].body["prompt"] == (
            "a yellow caterpillar in a top hat, illustrated in the style of 1990s digital clip"
            " art images, with a limited 256-color palette and sharp black outlines")
        for row in (g, f):
            assert row["finished_at"] is not None and row["error_message"] is None
            assert row["state"] == "succeeded"
        images = {str(r["image_request_id"]): r for r in await fetch_rows(
            pg_database, "select * from dynamo.image")}
        assert images[ghost_id]["index"] == 0 and images[ghost_id]["color"] == "#000000"
        assert images[ghost_id]["url"] == ghost["payload"]["details"]["image_url"]
        assert images[friend_id]["color"] == details["background_color"]
        answers = await fetch_rows(pg_database, "select * from dynamo.answer")
        assert [(str(a["image_request_id"]), a["value"]) for a in answers] == [(friend_id, "Sir Hatsworth")]
        assert answers[0]["prompt"] == ("Please come up with a name for a friendly mascot character "
                                        "who is caterpillar in a top hat. Please answer with a "
                                        "single name, and no additional text.")

        # One moderation per subject, one name, two images, each image screened; the
        # viewer's id as `user`.
        assert checks.subject_moderations(fake_openai) == 2 and fake_openai.count("chat") == 1
        assert checks.image_moderations(fake_openai) == 2
        assert [c.body["user"] for c in fake_openai.calls_to("images")] == ["90790024"] * 2

        # The metrics moved with the requests, in Prometheus' own text format.
        async with httpx.AsyncClient() as client:
            scrape = await client.get(f"{service.url}/metrics")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(scrape.text)
                   for s in family.samples}
        assert samples[("dynamo_requests_finished_total",
                        (("outcome", "success"), ("reason", "")))] == 2
        assert samples[("dynamo_requests_received_total", (("source", "broker"),))] == 2
        assert samples[("dynamo_openai_calls_total", (("kind", "image"), ("status", "200")))] == 2

        assert await service.terminate() == 0
