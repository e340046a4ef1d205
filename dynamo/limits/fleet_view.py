"""What a process knows of its fleet: every live dynamo process sharing its database, and
the figures that belong to the fleet rather than to one process.

GET /status on any process lists every live process (`Fleet.status()`, read fresh): its
id, host, pid, HTTP address, heartbeat age, requests in hand and its share of the OpenAI
budget over the last minute.

Metrics stay one scrape target per process: each exports its own counters and gauges as
before. The fleet-wide gauges (`dynamo_fleet_*`) are exported by one process only, the
oldest live one (the fleet's *reporter*), so that summing or graphing over targets never
counts them twice; when it stops, the next oldest takes over within a heartbeat. They come
from the snapshot the fleet actor takes every heartbeat, not from a query per scrape.
"""

from __future__ import annotations

import uuid
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from dynamo import metrics
from dynamo.database.fleet_store import FleetQueries, FleetUnavailable
from dynamo.database.port import iso
from dynamo.inflight.resume import LEASE_S


class Fleet:
    def __init__(self, queries: FleetQueries, *, worker_id: uuid.UUID, http_addr: str, inflight):
        self._queries = queries
        self.worker_id = worker_id
        self.http_addr = http_addr
        self._inflight = inflight
        self.snapshot: dict[str, Any] | None = None
        self.reporter = False  # whether this process exports the fleet-wide metrics

    async def beat(self) -> None:
        """Publishes this process's requests in hand and takes a fresh snapshot."""
        await self._queries.report_in_hand(self.worker_id, len(self._inflight), self.http_addr)
        self.snapshot = await self._queries.snapshot(LEASE_S)
        processes = self.snapshot["processes"]
        self.reporter = bool(processes) and processes[0]["id"] == self.worker_id

    async def status(self) -> dict[str, Any]:
        try:
            snapshot = await self._queries.snapshot(LEASE_S)
        except FleetUnavailable as exc:
            return {"this_process": str(self.worker_id), "error": f"unavailable: {exc}"}
        totals = snapshot["budget"]
        return {
            "this_process": str(self.worker_id),
            "processes": [self._process_json(process, totals) for process in snapshot["processes"]],
            "budget_last_60s": totals,
        }

    def _process_json(self, process: dict, totals: dict) -> dict[str, Any]:
        shares = {}
        for kind, total in totals.items():
            own = process["budget"].get(kind, {"calls": 0, "tokens": 0})
            share = own["calls"] / total["calls"] if total["calls"] else 0.0
            shares[kind] = {**own, "share": round(share, 3)}
        return {
            "id": str(process["id"]),
            "this": process["id"] == self.worker_id,
            "host": process["hostname"],
            "pid": process["pid"],
            "http_addr": process["http_addr"],
            "started_at": iso(process["started_at"]),
            "heartbeat_age_s": round(process["heartbeat_age_s"], 1),
            "requests_in_hand": process["in_hand"],
            "budget_last_60s": shares,
        }


class _FleetCollector:
    """The dynamo_fleet_* gauges, from the reporter's latest snapshot (else nothing)."""

    def __init__(self) -> None:
        self.fleet: Fleet | None = None

    def collect(self):
        fleet = self.fleet
        if fleet is None or not fleet.reporter or fleet.snapshot is None:
            return
        processes, totals = fleet.snapshot["processes"], fleet.snapshot["budget"]
        yield GaugeMetricFamily(
            "dynamo_fleet_processes", "Live dynamo processes sharing the database", len(processes)
        )
        yield GaugeMetricFamily(
            "dynamo_fleet_requests_in_hand",
            "Requests held by all live processes",
            sum(process["in_hand"] for process in processes),
        )
        calls = GaugeMetricFamily(
            "dynamo_fleet_openai_permits_last_minute",
            "OpenAI calls granted fleet-wide in the last 60 s, by kind",
            labels=["kind"],
        )
        tokens = GaugeMetricFamily(
            "dynamo_fleet_openai_tokens_last_minute",
            "OpenAI tokens counted fleet-wide in the last 60 s, by kind",
            labels=["kind"],
        )
        for kind, total in sorted(totals.items()):
            calls.add_metric([kind], total["calls"])
            tokens.add_metric([kind], total["tokens"])
        yield calls
        yield tokens


FLEET_COLLECTOR = _FleetCollector()
metrics.REGISTRY.register(FLEET_COLLECTOR)
