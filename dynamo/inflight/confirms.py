"""The broker's confirmations that are not stored yet: a confirmed publish is a fact.

Once RabbitMQ confirmed an alert (or a result), it is on its way to the viewer's screen;
if PostgreSQL cannot take the step that records it (ANNOUNCED, DONE), the confirmation is
held here, in memory, and the step is written again until the database takes it. While
it is held, nothing publishes that alert or result again: not the stage retrying its
write, not the same stage after a crash, not the resume sweep routing the request back.

At a clean shutdown `flush()` writes what is still held, if the database allows. What is
lost is only what a process that dies (kill -9) or cannot reach its database at shutdown
was holding: those requests are published again by whoever resumes them.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

import trio

log = logging.getLogger(__name__)

ALERT = "alert"
RESULT = "result"
# At shutdown, how long flushing the held confirmations may take.
FLUSH_S = 3.0


@dataclasses.dataclass(frozen=True)
class Held:
    request_id: uuid.UUID
    kind: str  # ALERT or RESULT
    from_step: object  # the Step the write moves from
    to_step: object
    fields: tuple  # (column, value) pairs for db.advance


class Confirms:
    def __init__(self) -> None:
        self._held: dict[tuple[uuid.UUID, str], Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def confirmed(self, request_id: uuid.UUID, kind: str) -> bool:
        return (request_id, kind) in self._held

    def hold(self, request_id, kind, *, from_step, to_step, **fields) -> None:
        self._held[(request_id, kind)] = Held(
            request_id, kind, from_step, to_step, tuple(fields.items())
        )

    def release(self, request_id: uuid.UUID, kind: str) -> None:
        self._held.pop((request_id, kind), None)

    async def flush(self, db) -> int:
        """Writes every held step the database takes; returns how many stay unwritten."""
        with trio.move_on_after(FLUSH_S, shield=True):
            for key, held in list(self._held.items()):
                try:
                    await db.advance(
                        held.request_id, [held.from_step], held.to_step, **dict(held.fields)
                    )
                except OSError as exc:  # DatabaseUnavailable: what is left is logged below
                    log.warning("held confirmations not written at shutdown: %s", exc)
                    break
                self._held.pop(key, None)
        for held in self._held.values():
            log.warning(
                "the broker confirmed this %s but its step was not stored; it will be "
                "published again when the request resumes",
                held.kind,
                extra={"request_id": str(held.request_id)},
            )
        return len(self._held)
