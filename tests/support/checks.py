"""Checks shared by the failure and intake integration tests: genreq messages to publish,
what dynamo leaves in PostgreSQL, RabbitMQ and the fake ledger, and the shape of a
failure result (contract §2, §3, §5).

Everything here looks at dynamo from outside, as the other golden-vcr services and an
operator would: the queues, the tables, the ledger's flows.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from typing import Any

import aio_pika
import asyncpg
import trio
from trio_asyncio import aio_as_trio

from dynamo.rabbitmq import broker as topology
from tests.support import infra

# How often a test looks again at a queue or a table while it waits.
POLL_S = 0.05
# The points one image alert costs by default (contract §1, DYNAMO_POINTS_COST).
POINTS_COST = 200
# The keys of a failure result, no more, no fewer (contract §3).
FAILURE_RESULT_KEYS = {"request_id", "outcome", "viewer", "style", "description", "reason", "message"}
# Words that belong in an operator's log, not in a sentence shown to a viewer on stream.
_TECHNICAL = re.compile(
    r"https?:|openai|ledger|auth|flow|http|\b[45]\d\d\b|exception|traceback|gave up|"
    r"deadline|attempt|moderation|pydantic|json|[{}\[\]]",
    re.IGNORECASE,
)

VIEWER = {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"}
NO_STATE = {"broadcast_id": 0, "screening_id": "00000000-0000-0000-0000-000000000000", "tape_id": 0}


def genreq(subject: str = "a seal", *, style: str = "ghost", color: str | None = None,
           viewer: dict | None = None) -> dict:
    """A golden-vcr `genreq` image message as dispatch publishes it."""
    inputs: dict[str, Any] = {"subject": subject}
    if color is not None:
        inputs["color"] = color
    return {"type": "image", "viewer": viewer or VIEWER, "state": NO_STATE,
            "payload": {"style": style, "inputs": inputs}}


# ---- PostgreSQL ----------------------------------------------------------------------


async def fetch_rows(database: str, sql: str, *args) -> list[asyncpg.Record]:
    conn = await aio_as_trio(asyncpg.connect)(infra.pg_dsn(database))
    try:
        return await aio_as_trio(conn.fetch)(sql, *args)
    finally:
        await aio_as_trio(conn.close)()


async def request_rows(database: str) -> list[asyncpg.Record]:
    return await fetch_rows(database, "select * from dynamo.image_request order by created_at")


# How long a request's row may take to show `done` after its result arrived.
ROW_TRAILS_RESULT_S = 10.0


async def check_failed_row(database: str, request_id: str, *, reason: str, message: str,
                           viewer: dict = VIEWER) -> asyncpg.Record:
    """The request's row: failed for `reason`, the viewer's sentence kept, finished.

    The result is published before its step `done` is stored (a crash between the two
    publishes it again, never loses it), so the row may trail the result by a moment."""
    with trio.move_on_after(ROW_TRAILS_RESULT_S):
        while True:
            rows = await fetch_rows(
                database, "select * from dynamo.image_request where id = $1", uuid.UUID(request_id))
            assert len(rows) == 1, f"no row for request {request_id}"
            if rows[0]["step"] == "done":
                break
            await trio.sleep(0.05)
    row = rows[0]
    assert row["twitch_user_id"] == viewer["twitch_user_id"]
    assert (row["state"], row["step"]) == ("failed", "done")
    assert row["failure_reason"] == reason
    assert row["error_message"] == message
    assert row["finished_at"] is not None and row["finished_at"] >= row["created_at"]
    return row


# ---- RabbitMQ ------------------------------------------------------------------------


async def publish_with_properties(rabbit, body: bytes, **properties) -> None:
    """Publishes `body` to generation-requests with any AMQP properties, confirmed."""
    exchange = await aio_as_trio(rabbit.channel.get_exchange)(topology.REQUESTS_EXCHANGE)
    await aio_as_trio(exchange.publish)(aio_pika.Message(body, **properties), routing_key="")


async def wait_for_dead_letters(rabbit, count: int, *, into: list | None = None) -> list:
    """Takes messages off the dead-letter queue until `count` have arrived (the caller
    sets a deadline). Pass the same `into` list again to keep waiting for more."""
    taken = [] if into is None else into
    while len(taken) < count:
        taken.extend(await rabbit.queue_messages(topology.DEAD_LETTER_QUEUE))
        if len(taken) < count:
            await trio.sleep(POLL_S)
    return taken


async def queue_depth(rabbit, name: str) -> int:
    """Messages ready in the queue `name`, from a passive declare (unacked ones not counted).

    Declared on the underlying channel: aio-pika's robust channel answers a passive
    declare of a queue it has seen from its cache, with the count of that first time.
    """
    channel = await aio_as_trio(rabbit.channel.get_underlay_channel)()
    declared = await aio_as_trio(channel.queue_declare)(name, passive=True)
    return declared.message_count


async def queue_counts(vhost: str, name: str) -> dict[str, int]:
    """{"ready", "unacked", "consumers"} of a queue, as the broker reports it."""
    completed = await trio.to_thread.run_sync(lambda: subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "messages_ready",
         "messages_unacknowledged", "consumers", "--no-table-headers"],
        check=True, capture_output=True, text=True, timeout=60))
    for line in completed.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == name:
            ready, unacked, consumers = (int(value) for value in fields[1:4])
            return {"ready": ready, "unacked": unacked, "consumers": consumers}
    raise AssertionError(f"no queue {name!r} in vhost {vhost!r}: {completed.stdout!r}")


def header_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_dead_letter(dead, *, body: bytes, message_id: str | None, **properties) -> str:
    """A dead letter: the original body and properties, and a reason; returns the reason."""
    assert dead.body == body
    assert dead.message_id == message_id
    for name, value in properties.items():
        if name == "headers":
            for key, header in value.items():
                assert header_text(dead.headers.get(key)) == header, (key, dead.headers)
        else:
            assert getattr(dead, name) == value, (name, getattr(dead, name), value)
    reason = header_text((dead.headers or {}).get(topology.ERROR_HEADER) or "")
    assert reason.strip(), f"dead letter without {topology.ERROR_HEADER}: {dead.headers}"
    return reason


# ---- results -------------------------------------------------------------------------


def check_viewer_sentence(message: Any) -> None:
    """A sentence fit to show a viewer on stream: plain words, no operator details."""
    assert isinstance(message, str), message
    assert 10 <= len(message) <= 200, message
    assert "\n" not in message and message == message.strip(), message
    assert message[0].isupper() and message[-1] in ".!", message
    assert not _TECHNICAL.search(message), f"operator detail in a viewer message: {message!r}"


def check_failure_result(message, *, reason: str, style: str | None, description: str,
                         viewer: dict = VIEWER) -> dict:
    """A result on generation-results for a failed request; returns its body."""
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    body = json.loads(message.body)
    assert set(body) == FAILURE_RESULT_KEYS, body
    assert uuid.UUID(body["request_id"]).version == 4
    assert message.message_id == f"{body['request_id']}:result"
    assert body["outcome"] == "failure"
    assert body["reason"] == reason
    assert body["viewer"] == viewer
    assert body["style"] == style
    assert body["description"] == description
    check_viewer_sentence(body["message"])
    return body


# ---- the fake ledger -----------------------------------------------------------------


def check_refunded(fake_ledger, request_id: str, *, cost: int = POINTS_COST,
                   alone: bool = True) -> None:
    """The request's one debit was reserved, then refunded (the fake calls it rejected);
    `alone`: and no other debit is pending or accepted."""
    flows = fake_ledger.flows_for(request_id)
    assert len(flows) == 1, flows
    flow = flows[0]
    assert flow.state == "rejected", flow
    assert flow.amount == cost and flow.user_id == VIEWER["twitch_user_id"]
    assert [(method, status) for method, status, _ in flow.history] == [
        ("POST", 200), ("DELETE", 204)]
    if alone:
        assert fake_ledger.pending() == [] and fake_ledger.accepted() == []


def paid_openai_calls(fake_openai) -> list:
    """The fake OpenAI's calls but the (free) model catalogue reads made at startup."""
    return [call for call in fake_openai.calls if call.endpoint != "models"]


def check_no_points_moved(fake_auth, fake_ledger) -> None:
    """Not one call to auth or the ledger: nothing reserved, nothing to refund."""
    assert fake_ledger.calls == [] and fake_ledger.flows == {}
    assert fake_auth.count("service-token") == 0
