"""Checks made before the service starts, for what only the operator can fix. Each
problem is one line (the caller prints it and exits 2) instead of a traceback from deep
inside a start:

- the data directory (DYNAMO_DATA_DIR), where it is used (embedded PostgreSQL, local
  images), must be writable by this process's uid: a volume owned by another uid is the
  usual cause;
- DYNAMO_HTTP_ADDR must be an address this host can bind (taken, not this host's, or a
  port below 1024 for a non-root user).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from dynamo.config import Settings

# Subdirectories of the data directory the service writes into.
DATA_SUBDIRECTORIES = ("postgres", "images")


def problem(settings: Settings) -> str | None:
    """The first problem found, as one line, or None."""
    return data_dir_problem(settings) or http_addr_problem(settings.http_host, settings.http_port)


def data_dir_problem(settings: Settings) -> str | None:
    if settings.database_url is not None and settings.storage is not None:
        return None  # production: nothing is kept locally
    data_dir = settings.data_dir.absolute()
    for directory in [data_dir, *(data_dir / name for name in DATA_SUBDIRECTORIES)]:
        if directory != data_dir and not directory.is_dir():
            continue  # made later, inside a directory found writable
        if directory.exists() and not directory.is_dir():
            return f"the data directory {directory} (DYNAMO_DATA_DIR) is not a directory"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            return (
                f"the data directory {directory} (DYNAMO_DATA_DIR) is not writable by uid "
                f"{os.getuid()}: {exc.strerror}{_owner(directory)}; give it to uid "
                f"{os.getuid()} or set DYNAMO_DATA_DIR to a directory it can write"
            )
    return None


def _owner(directory: Path) -> str:
    try:
        return f" (it belongs to uid {directory.stat().st_uid})"
    except OSError:
        return ""


def http_addr_problem(host: str, port: int) -> str | None:
    """Binds the address as the HTTP server will (SO_REUSEADDR, like hypercorn), then
    lets it go."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        return f"DYNAMO_HTTP_ADDR={shown} cannot be bound: {exc.strerror or exc}"
    return None
