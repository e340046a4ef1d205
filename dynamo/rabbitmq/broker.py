"""The RabbitMQ port: the topology of contract §2, consuming with manual acks, publishing
with publisher confirms. aio-pika runs behind trio-asyncio here and nowhere else.

`LogBroker` stands in when no broker is configured (development): it consumes nothing and
logs what would have been published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import aio_pika
import aiormq
import trio
from trio_asyncio import aio_as_trio

from dynamo.supervision.outages import BrokerUnavailable
from dynamo.supervision.retry import connect_at_startup

log = logging.getLogger(__name__)
# aio-pika logs every failed reconnection attempt (an ERROR and a WARNING each second of an
# outage); dynamo.supervision.outages reports the outage once when it begins and once when it ends.
for _noisy in ("aiormq.connection", "aio_pika.robust_connection"):
    logging.getLogger(_noisy).setLevel(logging.CRITICAL)

REQUESTS_EXCHANGE = "generation-requests"
REQUESTS_QUEUE = "dynamo.generation-requests"
ONSCREEN_EXCHANGE = "onscreen-events"
RESULTS_EXCHANGE = "generation-results"
DEAD_LETTER_EXCHANGE = "dynamo.dead-letter"
DEAD_LETTER_QUEUE = "dynamo.generation-requests.dead"
ERROR_HEADER = "x-dynamo-error"
# Unacked deliveries RabbitMQ hands this process at once. Small, so the backlog stays in
# RabbitMQ (and can go to another dynamo) while this process's pipeline is full.
PREFETCH = 8
# How long startup waits for the broker to come up before it gives up.
STARTUP_CONNECT_S = 60.0
# aio-pika's robust connection tries to reconnect this often (its default is 5 s): work
# resumes within about a second of the broker's return.
RECONNECT_INTERVAL_S = 1.0
# While the connection is down, the consumer looks this often whether it is back.
CONSUMER_RECHECK_S = 0.2

# The client's errors that mean the connection or its channel is gone: try again later.
_CONNECTION_ERRORS = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
    OSError,  # TimeoutError included
)


@contextlib.contextmanager
def _connection_errors_mapped(*, maybe_sent: bool = False):
    """Raises `BrokerUnavailable` in place of the client's connection errors; its
    `maybe_sent` says whether a message may have reached the broker before the break."""
    try:
        yield
    except _CONNECTION_ERRORS as exc:
        error = BrokerUnavailable(f"{type(exc).__name__}: {exc}")
        error.maybe_sent = maybe_sent
        raise error from exc


@dataclasses.dataclass
class Delivery:
    """One message from the input queue; ack or dead-letter it exactly once."""

    body: bytes
    message_id: str | None
    redelivered: bool
    _message: aio_pika.abc.AbstractIncomingMessage
    _broker: Broker

    @property
    def settled(self) -> bool:
        """Acked, dead-lettered or requeued: nothing more may be done with it."""
        return self._message.processed

    async def ack(self) -> None:
        """Acks; BrokerUnavailable if the channel it came on is gone (the broker then
        delivers the message again, and idempotent intake recognises it)."""
        with _connection_errors_mapped():
            await aio_as_trio(self._message.ack)()

    async def requeue(self) -> None:
        """Gives the message back to RabbitMQ, which delivers it again (`redelivered`)."""
        with _connection_errors_mapped():
            await aio_as_trio(self._message.nack)(requeue=True)

    async def dead_letter(self, reason: str) -> None:
        """Copies the message to the dead-letter queue with `reason`, then acks it."""
        props = self._message
        headers = dict(props.headers or {})
        headers[ERROR_HEADER] = reason
        message = aio_pika.Message(
            body=self.body,
            headers=headers,
            content_type=props.content_type,
            content_encoding=props.content_encoding,
            delivery_mode=props.delivery_mode,  # as it came (contract §3: its properties)
            priority=props.priority,
            correlation_id=props.correlation_id,
            reply_to=props.reply_to,
            message_id=props.message_id,
            timestamp=props.timestamp,
            type=props.type,
            app_id=props.app_id,
        )
        await self._broker._publish(DEAD_LETTER_EXCHANGE, message)
        await self.ack()


class BrokerPort(Protocol):
    """What the actors, readiness and the HTTP API ask of a broker: `Broker`, `LogBroker`."""

    @property
    def configured(self) -> bool: ...  # False: no broker, nothing consumed, alerts logged

    @property
    def connected(self) -> bool: ...

    async def probe(self) -> None: ...  # raises BrokerUnavailable while down

    async def publish_json(self, exchange: str, body: dict, *, message_id: str) -> None: ...

    def deliveries(self) -> AsyncGenerator[Delivery, None]: ...


class Broker:
    configured = True

    def __init__(self, connection: aio_pika.abc.AbstractRobustConnection):
        self._connection = connection
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._status_channel: aio_pika.abc.AbstractChannel | None = None  # for queue_depth

    async def _declare(self) -> None:
        self._publish_channel = await aio_as_trio(self._connection.channel)(publisher_confirms=True)
        self._consume_channel = await aio_as_trio(self._connection.channel)()
        await aio_as_trio(self._consume_channel.set_qos)(prefetch_count=PREFETCH)
        for name in (REQUESTS_EXCHANGE, ONSCREEN_EXCHANGE, RESULTS_EXCHANGE, DEAD_LETTER_EXCHANGE):
            self._exchanges[name] = await aio_as_trio(self._publish_channel.declare_exchange)(
                name, aio_pika.ExchangeType.FANOUT, durable=True
            )
        dead = await aio_as_trio(self._publish_channel.declare_queue)(
            DEAD_LETTER_QUEUE, durable=True
        )
        await aio_as_trio(dead.bind)(DEAD_LETTER_EXCHANGE)
        self._queue = await aio_as_trio(self._consume_channel.declare_queue)(
            REQUESTS_QUEUE, durable=True
        )
        await aio_as_trio(self._queue.bind)(REQUESTS_EXCHANGE)

    @property
    def connected(self) -> bool:
        # A robust connection stays open while it reconnects; `connected` is the link.
        return not self._connection.is_closed and self._connection.connected.is_set()

    async def _publish(self, exchange: str, message: aio_pika.Message) -> None:
        # With publisher confirms, publish() returns only once the broker confirmed.
        if not self.connected:
            raise BrokerUnavailable("not connected")  # certainly not sent
        with _connection_errors_mapped(maybe_sent=True):
            await aio_as_trio(self._exchanges[exchange].publish)(
                message, routing_key="", mandatory=False
            )

    async def probe(self) -> None:
        """Raises BrokerUnavailable while the connection is down."""
        if not self.connected:
            raise BrokerUnavailable("not connected")

    async def publish_json(self, exchange: str, body: dict, *, message_id: str) -> None:
        message = aio_pika.Message(
            body=json.dumps(body, separators=(",", ":")).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
        )
        await self._publish(exchange, message)

    async def deliveries(self) -> AsyncGenerator[Delivery, None]:
        """The input queue's messages, as they come, until cancelled.

        Rides out broker outages: when the connection breaks, the broker puts the
        deliveries not yet acked back in the queue; once the robust connection is back,
        the consumer is registered again (aio-pika's own iterator gives up after a minute
        of reconnecting) and they come again, marked redelivered."""
        assert self._queue is not None, "declared when the port was opened"
        while True:
            iterator = self._queue.iterator()
            try:
                with _connection_errors_mapped():
                    async with aio_as_trio(iterator):
                        # Iterate through the shim too: waiting for a message is asyncio work.
                        async for message in aio_as_trio(iterator):
                            yield Delivery(
                                body=message.body,
                                message_id=message.message_id,
                                redelivered=bool(message.redelivered),
                                _message=message,
                                _broker=self,
                            )
            except BrokerUnavailable as exc:
                log.info("input queue consumer lost its connection (%s)", exc)
            if self._connection.is_closed:
                return  # closed on purpose: shutdown
            await trio.sleep(CONSUMER_RECHECK_S)
            while not self.connected:
                await trio.sleep(CONSUMER_RECHECK_S)
            log.info("consuming the input queue again")

    async def queue_depth(self) -> int:
        """Messages ready in the input queue, from a passive declare; BrokerUnavailable when
        the broker cannot tell. On a channel of its own: a refused declare closes its
        channel, and that must never be the consuming or the publishing one. The caller
        puts a deadline around it."""
        if not self.connected:
            raise BrokerUnavailable("not connected")
        try:
            with _connection_errors_mapped():
                if self._status_channel is None or self._status_channel.is_closed:
                    self._status_channel = await aio_as_trio(self._connection.channel)()
                # The underlying channel: aio-pika's own answers a queue it has seen from a
                # cache, with the count of that first time.
                channel = await aio_as_trio(self._status_channel.get_underlay_channel)()
                declared = await aio_as_trio(channel.queue_declare)(REQUESTS_QUEUE, passive=True)
        except aiormq.exceptions.AMQPError as exc:  # e.g. the queue was deleted
            self._status_channel = None
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return declared.message_count


class LogBroker:
    """No broker configured: nothing comes in, and what would go out is logged."""

    configured = False
    connected = True

    async def probe(self) -> None:
        pass

    async def publish_json(self, exchange: str, body: dict, *, message_id: str) -> None:
        log.info(
            "no broker: would publish to %s: %s",
            exchange,
            json.dumps(body),
            extra={"request_id": message_id.split(":")[0]},
        )

    async def deliveries(self) -> AsyncGenerator[Delivery, None]:
        await trio.sleep_forever()
        yield  # pragma: no cover  (makes this an async generator)


@asynccontextmanager
async def open_broker(amqp_url: str | None) -> AsyncIterator[BrokerPort]:
    """A `Broker` with its topology declared, or a `LogBroker` when there is no URL."""
    if amqp_url is None:
        yield LogBroker()
        return
    connection = await connect_at_startup(
        functools.partial(
            aio_as_trio(aio_pika.connect_robust),
            amqp_url,
            reconnect_interval=RECONNECT_INTERVAL_S,
        ),
        system="broker",
        within_s=STARTUP_CONNECT_S,
    )
    try:
        broker = Broker(connection)
        await broker._declare()
        yield broker
    finally:
        with trio.move_on_after(5, shield=True):
            await aio_as_trio(connection.close)()
