"""The database port's change feed: each step or state change of a request, whichever
dynamo process made it, as PostgreSQL announces it.

The trigger `image_request_notify` (schema.sql) calls `pg_notify(CHANNEL, json)` with the
request's id, viewer, step and state whenever a row is inserted or its step or state
changes; the notification is delivered when the writer commits, to every session that
LISTENs. `RequestChanges.run` keeps one dedicated connection LISTENing (asyncpg's
`add_listener`, behind trio-asyncio like the rest of the port) and hands each change to
every subscriber's Trio memory channel. Subscribers never see asyncio.

What a subscriber may miss is said, never hidden: after (re)connecting the feed sends
`RESYNC` (changes while it was not listening are lost, so re-read the state), and a
subscriber that falls `SUBSCRIBER_BUFFER` changes behind has its channel closed, so it
ends and starts over rather than showing a stale page.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import uuid

import asyncpg
import trio
from trio_asyncio import aio_as_trio

from dynamo.database.errors import DatabaseUnavailable, driver_errors_mapped
from dynamo.supervision.backoff import Backoff

log = logging.getLogger(__name__)

# The NOTIFY channel; the trigger in schema.sql names it too.
CHANNEL = "dynamo_request_changes"
# Changes one subscriber may have waiting; a page that falls further behind starts over.
SUBSCRIBER_BUFFER = 256
# Between attempts to (re)connect: an outage is waited out, not hammered.
RECONNECT_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
RECONNECT_BACKOFF = Backoff(steps_s=RECONNECT_BACKOFF_S)
# An idle LISTEN connection is checked this often, so a silently dead one is replaced.
HEALTH_CHECK_S = 15.0
HEALTH_CHECK_DEADLINE_S = 5.0
HEALTH_CHECK_QUERY = "select 1"
CONNECT_DEADLINE_S = 10.0
CLOSE_DEADLINE_S = 2.0
# How the LISTEN session shows in pg_stat_activity.
APPLICATION_NAME = "dynamo-change-feed"


@dataclasses.dataclass(frozen=True)
class RequestChange:
    request_id: uuid.UUID
    viewer_id: str
    step: str
    state: str


# Sent to every subscriber after the feed (re)connected: changes may have been missed.
RESYNC = "resync"

# What means the LISTEN connection is lost or cannot be made now (the database port's
# mapping decides for the driver's errors; a deadline here is one more): the feed
# reconnects. Anything else is a bug and raises, for the supervisor to count.
_CONNECTION_LOST = (DatabaseUnavailable, trio.TooSlowError)


def parse_notification(payload: str) -> RequestChange | None:
    """The change a trigger's payload describes; None for anything else."""
    try:
        data = json.loads(payload)
        return RequestChange(
            uuid.UUID(data["id"]), str(data["viewer"]), str(data["step"]), str(data["state"])
        )
    except (ValueError, TypeError, KeyError):
        return None


class RequestChanges:
    def __init__(self, dsn: str | None):
        self._dsn = dsn
        self._subscribers: set[trio.MemorySendChannel] = set()
        self.listening = False

    @contextlib.contextmanager
    def subscribe(self):
        """A receive channel of `RequestChange`s and `RESYNC`s, open for the block.

        It ends (EndOfChannel) if the subscriber falls too far behind."""
        send, receive = trio.open_memory_channel(SUBSCRIBER_BUFFER)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()
            receive.close()

    def publish(self, item: RequestChange | str) -> None:
        for send in list(self._subscribers):
            try:
                send.send_nowait(item)
            except trio.WouldBlock:
                log.warning("a change-feed subscriber fell behind; it must start over")
                self._subscribers.discard(send)
                send.close()
            except trio.BrokenResourceError:
                self._subscribers.discard(send)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """LISTENs until cancelled, reconnecting after any loss of the connection; started
        at once (serving does not wait for the database). A query the database refuses
        for another reason (a bug) raises."""
        if self._dsn is None:
            raise ValueError("the change feed needs the database's DSN")
        task_status.started()
        failures = 0
        while True:
            try:
                await self._listen_until_lost()
            except _CONNECTION_LOST as exc:
                if failures == 0:
                    log.warning("change feed: not listening: %s", type(exc).__name__)
                failures += 1
            else:
                failures = 1
                log.warning("change feed: connection lost; reconnecting")
            self.listening = False
            await trio.sleep(RECONNECT_BACKOFF.delay_s(failures - 1))

    async def _listen_until_lost(self) -> None:
        with driver_errors_mapped():
            await self._listen()

    async def _listen(self) -> None:
        with trio.fail_after(CONNECT_DEADLINE_S):
            conn = await aio_as_trio(asyncpg.connect)(
                self._dsn, server_settings={"application_name": APPLICATION_NAME}
            )
        lost = trio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            with trio.fail_after(CONNECT_DEADLINE_S):
                await aio_as_trio(conn.add_listener)(CHANNEL, self._on_notification)
            self.listening = True
            log.info("change feed: listening on %s", CHANNEL)
            self.publish(RESYNC)  # whatever changed while not listening was missed
            while not lost.is_set():
                with trio.move_on_after(HEALTH_CHECK_S):
                    await lost.wait()
                if not lost.is_set():
                    with trio.fail_after(HEALTH_CHECK_DEADLINE_S):
                        await aio_as_trio(conn.execute)(HEALTH_CHECK_QUERY)
        finally:
            with trio.move_on_after(CLOSE_DEADLINE_S, shield=True):
                try:
                    with driver_errors_mapped():
                        await aio_as_trio(conn.close)()
                except DatabaseUnavailable:
                    pass  # already gone

    def _on_notification(self, _conn, _pid, _channel, payload: str) -> None:
        # Called by asyncpg inside the trio-asyncio loop, on Trio's thread.
        change = parse_notification(payload)
        if change is None:
            log.warning("change feed: unreadable notification ignored")
            return
        self.publish(change)
