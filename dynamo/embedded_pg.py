"""The development default database: PostgreSQL embedded with the `pgserver` package,
kept under DYNAMO_DATA_DIR so that requests survive a restart like in production.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def start(pgdata: Path) -> str:
    """Starts (or reuses) the embedded server; returns its connection URI. Blocking."""
    import pgserver  # imported here: only the development profile needs it

    pgdata.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs' XDG_RUNTIME_DIR notice
        server = pgserver.get_server(pgdata.resolve(), cleanup_mode="stop")
    log.info("embedded PostgreSQL running in %s", pgdata)
    return server.get_uri()
