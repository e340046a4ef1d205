"""A test's own RabbitMQ client: publish like `dispatch` does, and collect what dynamo
publishes, with aio-pika under the test's trio-asyncio loop."""

from __future__ import annotations

import json

import aio_pika
import trio
from trio_asyncio import aio_as_trio

from dynamo import broker as topology


class Rabbit:
    def __init__(self, connection):
        self.connection = connection
        self.collected: dict[str, list[aio_pika.abc.AbstractIncomingMessage]] = {}

    @classmethod
    async def connect(cls, url: str) -> "Rabbit":
        connection = await aio_as_trio(aio_pika.connect_robust)(url)
        rabbit = cls(connection)
        rabbit.channel = await aio_as_trio(connection.channel)(publisher_confirms=True)
        # Declared as dispatch and the alerts service would, before dynamo runs.
        for name in (topology.REQUESTS_EXCHANGE, topology.ONSCREEN_EXCHANGE, topology.RESULTS_EXCHANGE):
            await aio_as_trio(rabbit.channel.declare_exchange)(
                name, aio_pika.ExchangeType.FANOUT, durable=True)
        return rabbit

    async def publish(self, body, *, message_id: str | None = None, exchange=topology.REQUESTS_EXCHANGE):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
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
        await aio_as_trio(self.connection.close)()


def bodies(messages) -> list[dict]:
    return [json.loads(m.body) for m in messages]
