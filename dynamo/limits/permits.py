"""The permit protocol between the generator pool and the rate limiter.

A caller `acquire_permit()`s right before each OpenAI call (a `PermitRequest` on the rate
limiter's `permits` channel, answered with a `Permit`) and `report_outcome()`s the answer
(a `CallOutcome`), from which the rate limiter learns. `actors/rate_limiter.py` serves it.

Tokens: an image call's request says what it is expected to cost (`tokens`, the
`usage.total_tokens` the price table predicts), and its outcome what the answer's `usage`
says it cost (`tokens_used`) with the `permit` it was made under, so that the budget
counts exactly what the API counted.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid

import trio

from dynamo.openai_port.rate_headers import RateLimitHeaders

# A permit request waits for exactly one answer.
REPLY_CAPACITY = 1


class CallKind(str, enum.Enum):
    IMAGE = "image"
    TEXT = "text"  # moderation and chat completions share one limit


@dataclasses.dataclass
class Permit:
    probe: bool = False  # the circuit is open: report the outcome with probe=True
    grant_id: uuid.UUID | None = None  # the budget's record of this call


@dataclasses.dataclass
class PermitRequest:
    kind: CallKind
    reply_send: trio.MemorySendChannel
    # The call's expected cost against a tokens-per-minute limit (0: not counted in tokens).
    tokens: int = 0


@dataclasses.dataclass
class CallOutcome:
    kind: CallKind
    succeeded: bool = False
    rate_limited: bool = False  # a 429
    retry_after_s: float | None = None
    limits: RateLimitHeaders = RateLimitHeaders()  # parsed by the OpenAI port
    auth_failed: bool = False  # a 401/403
    probe: bool = False  # the call was made with a probe permit
    tokens_used: int | None = None  # what the answer's `usage` says the call cost
    permit: Permit | None = None  # the permit the call was made under


async def acquire_permit(
    permits_send: trio.MemorySendChannel, kind: CallKind, *, tokens: int = 0
) -> Permit:
    """Waits until a call of `kind` (expected to cost `tokens`) may start; make the call
    right after."""
    reply_send, reply_recv = trio.open_memory_channel(REPLY_CAPACITY)
    # Closed on the way out, so that a permit for a caller cancelled meanwhile is not spent.
    with reply_recv:
        await permits_send.send(PermitRequest(kind, reply_send, tokens))
        return await reply_recv.receive()


async def report_outcome(permits_send: trio.MemorySendChannel, outcome: CallOutcome) -> None:
    await permits_send.send(outcome)
