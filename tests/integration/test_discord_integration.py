"""Discord posts from the running service: once per successful request, never in the way
of the alert or the debit, not again after a restart."""

from __future__ import annotations

import pytest
import trio

from dynamo.rabbitmq import broker as topology
from tests.fakes.discord_server import FRIENDS_WEBHOOK, GHOSTS_WEBHOOK
from tests.support.amqp import bodies
from tests.support.service import started
from tests.support.timeouts import SERVICE_S

pytestmark = pytest.mark.integration

VIEWER = {"twitch_user_id": "90790024", "twitch_display_name": "wasabi_milk*shake"}
NONE = {"broadcast_id": 0, "screening_id": "00000000-0000-0000-0000-000000000000", "tape_id": 0}


def message(style: str, inputs: dict) -> dict:
    return {"type": "image", "viewer": VIEWER, "state": NONE,
            "payload": {"style": style, "inputs": inputs}}


async def test_each_success_is_posted_once_to_its_style_webhook(
        rabbit, dynamo_process, fake_discord, fake_ledger):
    with trio.fail_after(SERVICE_S):
        await rabbit.collect(topology.RESULTS_EXCHANGE)
        service = await started(dynamo_process, **fake_discord.env())
        await rabbit.publish(message("ghost", {"subject": "a seal @everyone"}))
        await rabbit.publish(message("friend", {"color": "blue", "subject": "owl"}))
        results = bodies(await rabbit.wait_for(topology.RESULTS_EXCHANGE, 2))
        assert {r["outcome"] for r in results} == {"success"}
        await fake_discord.wait_until(lambda: len(fake_discord.messages) == 2)

        [ghost] = fake_discord.messages_to(GHOSTS_WEBHOOK[0])
        [friend] = fake_discord.messages_to(FRIENDS_WEBHOOK[0])
        assert ghost.payload["content"] == r"Ghost from **wasabi\_milk\*shake**: _a seal @everyone_"
        assert ghost.payload["allowed_mentions"] == {"parse": []}
        assert friend.payload["content"] == (
            r"**Sir Hatsworth**, friend of **wasabi\_milk\*shake**: _an owl_")
        for post in (ghost, friend):
            [attachment] = post.files
            assert attachment.field == "files[0]" and attachment.content_type == "image/jpeg"
            assert attachment.data[:3] == b"\xff\xd8\xff"  # a JPEG
            assert post.payload["attachments"][0]["filename"] == attachment.filename

        # A restart does not post again.
        assert await service.terminate() == 0
        await service.start_ready()
        await trio.sleep(6)  # more than one resume sweep
        assert len(fake_discord.messages) == 2


async def test_a_webhook_that_is_down_changes_nothing_for_the_viewer(
        rabbit, dynamo_process, fake_discord, fake_ledger):
    with trio.fail_after(SERVICE_S):
        fake_discord.down = True
        await rabbit.collect(topology.RESULTS_EXCHANGE)
        await started(dynamo_process, **fake_discord.env())
        await rabbit.publish(message("ghost", {"subject": "a seal"}))
        [result] = bodies(await rabbit.wait_for(topology.RESULTS_EXCHANGE, 1))
        assert result["outcome"] == "success"
        [flow] = fake_ledger.accepted()
        assert flow.metadata["imageRequestId"] == result["request_id"]
        assert fake_ledger.pending() == [] and fake_discord.messages == []
