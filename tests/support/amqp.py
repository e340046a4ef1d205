"""A test's own RabbitMQ client: publish like `dispatch` does, and collect what dynamo
publishes, with aio-pika under the test's trio-asyncio loop. `RawPublisher` publishes
exactly the properties given, none added (aio-pika adds a message_id to every message)."""

from __future__ import annotations

import json
import urllib.parse

import aio_pika
import trio
from pamqp import body as pamqp_body
from pamqp import commands, frame, header
from trio_asyncio import aio_as_trio

from dynamo.rabbitmq import broker as topology


class Rabbit:
    def __init__(self, connection, url: str):
        self.connection = connection
        self.url = url
        self._raw: RawPublisher | None = None
        self.collected: dict[str, list[aio_pika.abc.AbstractIncomingMessage]] = {}

    @classmethod
    async def connect(cls, url: str) -> Rabbit:
        connection = await aio_as_trio(aio_pika.connect_robust)(url)
        rabbit = cls(connection, url)
        rabbit.channel = await aio_as_trio(connection.channel)(publisher_confirms=True)
        # Declared as dispatch and the alerts service would, before dynamo runs.
        for name in (topology.REQUESTS_EXCHANGE, topology.ONSCREEN_EXCHANGE, topology.RESULTS_EXCHANGE):
            await aio_as_trio(rabbit.channel.declare_exchange)(
                name, aio_pika.ExchangeType.FANOUT, durable=True)
        return rabbit

    async def publish(self, body, *, message_id: str | None = None, exchange=topology.REQUESTS_EXCHANGE):
        """Publishes persistent JSON as dispatch does; without a message_id when none is
        given (through `RawPublisher`: aio-pika would add a random one)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        if message_id is None:
            if self._raw is None:
                self._raw = await RawPublisher.connect(self.url)
            await self._raw.publish(data, exchange=exchange, content_type="application/json",
                                    delivery_mode=2)
            return
        ex = await aio_as_trio(self.channel.get_exchange)(exchange)
        await aio_as_trio(ex.publish)(
            aio_pika.Message(data, message_id=message_id, content_type="application/json",
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key="")

    async def collect(self, exchange: str) -> None:
        """Binds an exclusive queue to `exchange`; messages accumulate in collected[exchange]."""
        queue = await aio_as_trio(self.channel.declare_queue)("", exclusive=True)
        await aio_as_trio(queue.bind)(exchange)
        self.collected[exchange] = []
        self._queues = getattr(self, "_queues", {})
        self._queues[exchange] = queue

    async def drain(self, exchange: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Pulls what has arrived so far into collected[exchange] and returns it."""
        queue = self._queues[exchange]
        while True:
            message = await aio_as_trio(queue.get)(no_ack=True, fail=False)
            if message is None:
                return self.collected[exchange]
            self.collected[exchange].append(message)

    async def wait_for(self, exchange: str, count: int, *, poll_s: float = 0.05):
        """Waits until `count` messages arrived at `exchange` (the caller sets a deadline)."""
        while len(await self.drain(exchange)) < count:
            await trio.sleep(poll_s)
        return self.collected[exchange]

    async def queue_messages(self, name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        queue = await aio_as_trio(self.channel.declare_queue)(name, durable=True, passive=True)
        out = []
        while (message := await aio_as_trio(queue.get)(no_ack=True, fail=False)) is not None:
            out.append(message)
        return out

    async def close(self) -> None:
        if self._raw is not None:
            await self._raw.aclose()
        await aio_as_trio(self.connection.close)()


def bodies(messages) -> list[dict]:
    return [json.loads(m.body) for m in messages]


class RawPublisher:
    """Publishes exactly the properties it is given, over a plain AMQP 0-9-1 connection
    (pamqp frames on a trio socket), with publisher confirms.

    aio-pika cannot send a message without a `message_id`: aiormq puts a random one on
    every message that has none. The `dispatch` service's Go client does not, so a test
    of dynamo's handling of messages without one must publish through this."""

    def __init__(self, stream: trio.SocketStream):
        self._stream = stream
        self._buffer = b""
        self._delivery_tag = 0

    @classmethod
    async def connect(cls, url: str) -> RawPublisher:
        parts = urllib.parse.urlsplit(url)
        stream = await trio.open_tcp_stream(parts.hostname, parts.port or 5672)
        publisher = cls(stream)
        await stream.send_all(frame.marshal(header.ProtocolHeader(), 0))
        await publisher._expect(commands.Connection.Start)
        user = urllib.parse.unquote(parts.username or "guest")
        password = urllib.parse.unquote(parts.password or "guest")
        await publisher._send(commands.Connection.StartOk(response=f"\0{user}\0{password}"))
        tune = await publisher._expect(commands.Connection.Tune)
        await publisher._send(commands.Connection.TuneOk(
            channel_max=1, frame_max=tune.frame_max, heartbeat=0))
        vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        await publisher._send(commands.Connection.Open(virtual_host=vhost))
        await publisher._expect(commands.Connection.OpenOk)
        publisher._frame_max = tune.frame_max
        await publisher._send(commands.Channel.Open(), channel=1)
        await publisher._expect(commands.Channel.OpenOk)
        await publisher._send(commands.Confirm.Select(), channel=1)
        await publisher._expect(commands.Confirm.SelectOk)
        return publisher

    async def publish(self, body: bytes, *, exchange: str = topology.REQUESTS_EXCHANGE,
                      **properties) -> None:
        """Publishes `body` with exactly `properties` (pamqp's Basic.Properties names:
        message_id, content_type, delivery_mode, headers, ...); returns once confirmed."""
        frames = [frame.marshal(commands.Basic.Publish(exchange=exchange, routing_key=""), 1),
                  frame.marshal(header.ContentHeader(
                      body_size=len(body), properties=commands.Basic.Properties(**properties)), 1)]
        chunk = self._frame_max - 8  # frame header and end octet
        frames += [frame.marshal(pamqp_body.ContentBody(body[at:at + chunk]), 1)
                   for at in range(0, len(body), chunk)]
        await self._stream.send_all(b"".join(frames))
        self._delivery_tag += 1
        ack = await self._expect(commands.Basic.Ack)
        assert ack.delivery_tag == self._delivery_tag, ack

    async def aclose(self) -> None:
        with trio.move_on_after(5):
            await self._send(commands.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0))
            await self._expect(commands.Connection.CloseOk)
        await self._stream.aclose()

    async def _send(self, command, *, channel: int = 0) -> None:
        await self._stream.send_all(frame.marshal(command, channel))

    async def _expect(self, kind):
        received = await self._receive()
        if not isinstance(received, kind):
            raise RuntimeError(f"RabbitMQ answered {received!r}, expected {kind.__name__}")
        return received

    async def _receive(self):
        while True:
            if len(self._buffer) >= 7:
                size = int.from_bytes(self._buffer[3:7], "big")
                if len(self._buffer) >= 7 + size + 1:
                    consumed, _channel, received = frame.unmarshal(self._buffer)
                    self._buffer = self._buffer[consumed:]
                    return received
            data = await self._stream.receive_some(65536)
            if not data:
                raise RuntimeError("RabbitMQ closed the connection")
            self._buffer += data
