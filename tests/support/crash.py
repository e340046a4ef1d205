"""Helpers for the crash-recovery tests: stopping dynamo at a chosen step, and checking
afterwards that every request ended exactly once and no viewer's points were mishandled.

Ways to stop the pipeline at a step, besides the fakes' own `hold()`:

- `S3PutGate`: holds every S3 PutObject inside moto (which serves from a thread of this
  process), so a request waits at step `generated`, its raw image in the database.
- `PublishBlocker`: binds a queue that refuses every message (`x-max-length` 0,
  `reject-publish`) to an exchange; with publisher confirms the broker then nacks dynamo's
  publishes there, so a request stays at the step before that publish (`stored` for
  `onscreen-events`, `accepted` for `generation-results`). Other queues bound to the
  exchange still receive each nacked copy: tests count what arrives after the crash.
"""

from __future__ import annotations

import collections
import json
import signal
import threading
import uuid
from dataclasses import dataclass, field

import asyncpg
import trio
from trio_asyncio import aio_as_trio

from tests.support import infra
from tests.support.service import ServiceProcess

# How often the tests look at the database or a counter while waiting for a step.
POLL_S = 0.02


async def fetch_rows(database: str, sql: str, *args) -> list[asyncpg.Record]:
    conn = await aio_as_trio(asyncpg.connect)(infra.pg_dsn(database))
    try:
        return await aio_as_trio(conn.fetch)(sql, *args)
    finally:
        await aio_as_trio(conn.close)()


async def request_rows(database: str) -> dict[str, asyncpg.Record]:
    rows = await fetch_rows(database, "select * from dynamo.image_request order by created_at")
    return {str(row["id"]): row for row in rows}


async def wait_for_steps(database: str, step: str, count: int) -> dict[str, asyncpg.Record]:
    """Waits until `count` requests are at `step` (the caller sets a deadline)."""
    while True:
        rows = await request_rows(database)
        at_step = {rid: row for rid, row in rows.items() if row["step"] == step}
        if len(at_step) >= count:
            return at_step
        await trio.sleep(POLL_S)


async def stop_with_signal(service: ServiceProcess, signum: int, *, timeout_s: float = 30) -> int:
    """SIGTERM or SIGINT; returns the exit code once the process is gone."""
    if signum == signal.SIGTERM:
        return await service.terminate(timeout_s=timeout_s)
    service.process.send_signal(signum)
    with trio.fail_after(timeout_s):
        while service.process.poll() is None:
            await trio.sleep(0.05)
    service.kill()  # only closes the log file now: the process is gone
    return service.process.returncode


class S3PutGate:
    """Holds moto's PutObject handler until `release()`; `arrived` counts held puts."""

    def __init__(self) -> None:
        self._gate = threading.Event()
        self._lock = threading.Lock()
        self.arrived = 0

    def install(self, monkeypatch) -> None:
        from moto.s3.responses import S3Response

        original = S3Response.put_object
        gate = self

        def held_put_object(response_self, *args, **kwargs):
            with gate._lock:
                gate.arrived += 1
            gate._gate.wait()
            return original(response_self, *args, **kwargs)

        monkeypatch.setattr(S3Response, "put_object", held_put_object)

    async def wait_for_puts(self, count: int) -> None:
        while self.arrived < count:
            await trio.sleep(POLL_S)

    def release(self) -> None:
        self._gate.set()


class PublishBlocker:
    """Makes RabbitMQ nack every publish to `exchange` until `unblock()`."""

    def __init__(self, rabbit, exchange: str):
        self._rabbit = rabbit
        self._exchange = exchange
        self._queue = None

    async def block(self) -> None:
        self._queue = await aio_as_trio(self._rabbit.channel.declare_queue)(
            f"crash-test.blocker.{uuid.uuid4().hex[:8]}", exclusive=True,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        await aio_as_trio(self._queue.bind)(self._exchange)

    async def unblock(self) -> None:
        if self._queue is not None:
            await aio_as_trio(self._queue.delete)(if_unused=False, if_empty=False)
            self._queue = None


async def input_queue_depth(rabbit, name: str) -> int:
    """Ready messages in a durable queue (not the ones delivered and unacked)."""
    queue = await aio_as_trio(rabbit.channel.declare_queue)(name, durable=True, passive=True)
    return queue.declaration_result.message_count


@dataclass
class Outcome:
    """What became of one request, seen from outside and in its row."""

    request_id: str
    viewer_id: str
    state: str
    step: str
    results: list[dict] = field(default_factory=list)
    alert_copies: int = 0
    accepted: int = 0
    pending: int = 0
    refunded: int = 0
    orphans: int = 0  # pending debits the service reported as possible orphans

    @property
    def result(self) -> dict:
        return self.results[0]


def by_message_id(messages) -> dict[str, list]:
    grouped: dict[str, list] = collections.defaultdict(list)
    for message in messages:
        grouped[message.message_id].append(message)
    return grouped


async def check_outcomes(database: str, alerts, results, ledger, *,
                         allow_reported_orphans: bool = False,
                         debits_by_viewer: bool = False) -> dict[str, Outcome]:
    """Asserts the crash invariants for every stored request; returns their outcomes.

    Every request: finished (step done), exactly one result (distinct `{id}:result`;
    copies of it must be identical), at most one alert (distinct message_id, identical
    copies) and exactly one for a success, at most one accepted debit and exactly one for
    a success, none for a failure, nothing pending, its state matching its result.

    With `allow_reported_orphans`, a pending debit is tolerated where contract §5 admits
    one: a kill between the ledger's answer to a reservation and the storing of its flow
    id. The service cannot know that debit, so it must have flagged the request
    (`orphan_suspected`, counted on /status) for an operator to reconcile.
    """
    rows = await request_rows(database)
    results_by_id = by_message_id(results)
    alerts_by_id = by_message_id(alerts)
    assert set(results_by_id) == {f"{rid}:result" for rid in rows}, "one result per request"
    assert set(alerts_by_id) <= set(rows), "an alert for an unknown request"
    outcomes = {}
    for rid, row in rows.items():
        copies = results_by_id[f"{rid}:result"]
        assert len({m.body for m in copies}) == 1, f"{rid}: different results {copies}"
        alert_copies = alerts_by_id.get(rid, [])
        assert len({m.body for m in alert_copies}) <= 1, f"{rid}: different alerts"
        # With `debits_by_viewer`, a request's debits are not told apart by the request id
        # in their metadata (an adopted debit may name a sibling of the same viewer, as
        # the README says): the caller checks each viewer's totals instead.
        flows = [] if debits_by_viewer else ledger.flows_for(rid)
        outcome = Outcome(
            request_id=rid, viewer_id=row["twitch_user_id"], state=row["state"], step=row["step"],
            results=[json.loads(m.body) for m in copies], alert_copies=len(alert_copies),
            accepted=sum(f.state == "accepted" for f in flows),
            pending=sum(f.state == "pending" for f in flows),
            refunded=sum(f.state == "rejected" for f in flows))
        assert outcome.step == "done", f"{rid}: unfinished at step {outcome.step}"
        if allow_reported_orphans and row["orphan_suspected"]:
            outcome.orphans, outcome.pending = outcome.pending, 0
        assert outcome.pending == 0, f"{rid}: a debit left pending"
        assert outcome.accepted <= 1, f"{rid}: charged {outcome.accepted} times"
        if debits_by_viewer:
            outcome.accepted = int(outcome.result["outcome"] == "success")
        if outcome.result["outcome"] == "success":
            assert outcome.state == "succeeded", f"{rid}: success result but state {outcome.state}"
            assert outcome.accepted == 1, f"{rid}: success without its accepted debit"
            assert alert_copies, f"{rid}: success without an alert"
            assert outcome.result["image_url"] == json.loads(
                alert_copies[0].body)["payload"]["details"]["image_url"]
        else:
            assert outcome.state == "failed", f"{rid}: failure result but state {outcome.state}"
            assert outcome.accepted == 0, f"{rid}: charged for a failed request"
            assert not alert_copies, f"{rid}: an alert for a failed request"
            assert outcome.result["reason"] == row["failure_reason"]
        outcomes[rid] = outcome
    return outcomes
