"""The database port's own errors, and the one place that maps the driver's onto them.

Callers of `dynamo.database.port.Database` never see an asyncpg exception type: a value PostgreSQL
refuses is `DataRejected` (retrying cannot help), a database that cannot be reached, that
dropped the connection, or that could not answer now (a lock not free within the
transaction's `lock_timeout`, a query cancelled by a statement timeout or an operator) is
`DatabaseUnavailable` (try again later). Anything else (a bug in a query, a column that
is not there) passes through unchanged, so that it is loud.
"""

from __future__ import annotations

import contextlib
import logging

import asyncpg

from dynamo.supervision.unavailable import Unavailable

# asyncpg's pool logs a WARNING with a traceback each time it fails to reconnect its
# minimum of connections (every 1-8 s of an outage); dynamo.supervision.outages reports the outage
# once when it begins and once when it ends.
logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)


class DataRejected(Exception):
    """PostgreSQL refused a value (out of range, bad encoding): retrying cannot help."""


class DatabaseUnavailable(Unavailable):
    """PostgreSQL cannot be reached, or the connection broke: try again later."""

    dependency = "database"


# The driver's errors that mean "not now" rather than "never".
_UNAVAILABLE = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout, pg_cancel_backend
)


@contextlib.contextmanager
def driver_errors_mapped():
    """Raises the port's errors in place of the driver's inside the block."""
    try:
        yield
    except asyncpg.exceptions.DataError as exc:
        raise DataRejected(f"{type(exc).__name__}: {exc}") from exc
    except DatabaseUnavailable:
        raise
    except _UNAVAILABLE as exc:
        raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
    except OSError as exc:  # TimeoutError included
        # A refused or reset connection comes out of the pool as a bare OSError; a
        # connect that hangs as a timeout.
        raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
