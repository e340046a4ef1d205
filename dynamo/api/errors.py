"""Every error the API answers is JSON `{"error": "..."}` with its status (contract §7)."""

from __future__ import annotations

import functools

import trio

# A route that needs the database gives up after this long and answers 503, rather than
# keeping the client (and a connection) waiting on a database that hangs.
DATABASE_DEADLINE_S = 10.0


class ApiError(Exception):
    """Raised by a route to answer `status` with `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def not_found(what: str = "request") -> ApiError:
    return ApiError(404, f"no such {what}")


def bounded(handler):
    """Runs a route under `DATABASE_DEADLINE_S`; trio.TooSlowError becomes a 503."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        with trio.fail_after(DATABASE_DEADLINE_S):
            return await handler(*args, **kwargs)

    return wrapper
