"""The development default database: PostgreSQL embedded with the `pgserver` package,
kept under DYNAMO_DATA_DIR so that requests survive a restart like in production.

A `run.py` stopped cleanly stops the server (pgserver does, when the last process using
it exits). One killed (`kill -9`) cannot: its server keeps running, and the next start
reuses it. Before handing over to pgserver, what a killed process leaves behind is
cleared so that the next start can always go on:

- pgserver's list of processes using the server (`.handle_pids.json`) loses the dead
  ones, else a later clean stop would think another process still uses it and leave the
  server running forever;
- a `postmaster.pid` (or a socket lock file in the data directory) naming a process that
  is gone, or one that is not this data directory's postgres (the pid was reused), is
  stale: it is removed, so that a fresh server starts instead of pgserver taking the
  pid's process for a running server and handing out a socket nobody listens on.

pgserver keeps a lock file (and, for a data directory whose path is too long for a unix
socket, the socket) in the user's runtime directory, and initdb's output in temporary
files. A container with a read-only root filesystem can write neither /run/user nor /tmp:
without XDG_RUNTIME_DIR the runtime directory is `run/` in the data directory, and when no
temporary directory is writable, temporary files go to its `tmp/`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

from dynamo.supervision.pids import process_exists

log = logging.getLogger(__name__)

HANDLES_FILE = ".handle_pids.json"  # pgserver's
PID_FILE = "postmaster.pid"
# pgserver's runtime directory, next to the database when XDG_RUNTIME_DIR is unset.
RUNTIME_DIR = "run"
# Temporary files, in the data directory when no temporary directory is writable.
TEMPORARY_DIR = "tmp"


def start(pgdata: Path) -> str:
    """Starts (or reuses) the embedded server; returns its connection URI. Blocking."""
    pgdata.mkdir(parents=True, exist_ok=True)
    pgdata = pgdata.resolve()
    _writable_places_in(pgdata.parent)
    import pgserver  # imported here: only the development profile needs it

    forget_dead_handles(pgdata)
    remove_stale_lock_files(pgdata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs' XDG_RUNTIME_DIR notice
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    log.info("embedded PostgreSQL running in %s (pid %s)", pgdata, server.get_pid())
    return server.get_uri()


def _writable_places_in(data_dir: Path) -> None:
    if not os.environ.get("XDG_RUNTIME_DIR"):
        # Read when pgserver is imported, hence before. The XDG spec wants it private.
        os.environ["XDG_RUNTIME_DIR"] = str(_private_directory(data_dir / RUNTIME_DIR))
    try:
        tempfile.gettempdir()
    except FileNotFoundError:  # none of TMPDIR, /tmp, /var/tmp, ... is writable
        tempfile.tempdir = str(_private_directory(data_dir / TEMPORARY_DIR))


def _private_directory(path: Path) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    return path


def forget_dead_handles(pgdata: Path) -> None:
    path = pgdata / HANDLES_FILE
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and process_exists(pid)]
    if alive != pids:
        log.info(
            "embedded PostgreSQL: forgetting processes that are gone: %s",
            sorted(set(pids) - set(alive)),
        )
        path.write_text(json.dumps(alive))


def remove_stale_lock_files(pgdata: Path) -> None:
    for path in [pgdata / PID_FILE, *pgdata.glob(".s.PGSQL.*.lock")]:
        pid = _first_line_pid(path)
        if pid is None or is_postgres_of(pid, pgdata):
            continue
        log.warning(
            "embedded PostgreSQL: %s names pid %d, which is not its server (a "
            "killed run left it); removed",
            path.name,
            pid,
        )
        path.unlink(missing_ok=True)


def is_postgres_of(pid: int, pgdata: Path) -> bool:
    """Whether `pid` is a running postgres serving `pgdata`."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = process.cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's process: not ours to judge, leave it
    return bool(cmdline) and Path(cmdline[0]).name == "postgres" and str(pgdata) in cmdline


def _first_line_pid(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.lstrip("-").isdigit() else None
