"""How often the handling of one input message has crashed, so that intake can give up on
a poison message instead of crashing on it forever (issue 10).

A message is known by its `message_id`, or by its body's SHA-256 when it has none. The
counts live in memory: RabbitMQ's own count (the `x-delivery-count` of quorum queues) also
counts redeliveries caused by an outage, which must not use up a message's attempts.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

# Attempts at one message whose handling crashed before it is dead-lettered: a bug that
# one message triggers may be a fluke once, not three times in a row.
MAX_ATTEMPTS = 3
# Messages remembered at once; the oldest is forgotten first. A poison message comes back
# within a few deliveries (RabbitMQ requeues it near the head of the queue).
REMEMBERED = 10_000


def message_key(message_id: str | None, body: bytes) -> str:
    if message_id:
        return f"message-id:{message_id}"
    return f"body:{hashlib.sha256(body).hexdigest()}"


class CrashedAttempts:
    def __init__(self, *, max_attempts: int = MAX_ATTEMPTS, remembered: int = REMEMBERED):
        self.max_attempts = max_attempts
        self._remembered = remembered
        self._counts: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    def crashed(self, key: str) -> int:
        """Records one more crashed attempt at `key`; answers how many there were."""
        count = self._counts.pop(key, 0) + 1
        self._counts[key] = count
        while len(self._counts) > self._remembered:
            self._counts.popitem(last=False)
        return count

    def exhausted(self, count: int) -> bool:
        return count >= self.max_attempts

    def forget(self, key: str) -> None:
        self._counts.pop(key, None)
