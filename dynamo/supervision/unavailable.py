"""Outage or bug: the one place that decides.

Each port maps its driver's errors onto the service's own classes (`dynamo.database.errors`
for asyncpg, `dynamo.rabbitmq.broker` for aio-pika, `dynamo.openai_port.errors` and
`retry.classify_http_status` for the HTTP services). The ones that mean "this dependency
cannot be reached for now" subclass `Unavailable` and name the dependency; `outage_of`
is what every caller asks (the supervisor, the intake actor, the pipeline, the outage
probe, the HTTP API), so that an outage is waited out and anything else is a bug.

An HTTP service's failure that is worth another attempt (`retry.Transient`) is an outage
when `http_outage(status)` says so: a 5xx or no answer at all, as opposed to a refusal of
this one call (429, 408); the OpenAI port then waits longer between attempts.
"""

from __future__ import annotations


class Unavailable(ConnectionError):
    """A dependency cannot be reached, or the connection broke: try again later.

    A ConnectionError (so an OSError), as the driver errors it replaces were."""

    dependency = "a dependency"


def http_outage(status_code: int | None) -> bool:
    """Whether an HTTP service's failure shows it down or unreachable (a 5xx, or no
    status: no connection, a timeout)."""
    return status_code is None or status_code >= 500


def outage_of(exc: BaseException) -> str | None:
    """The dependency an exception says is unreachable ("database", "broker"), or None
    (a bug, a refused value). A group is an outage when all its errors are one
    dependency's outage."""
    if isinstance(exc, Unavailable):
        return exc.dependency
    if isinstance(exc, BaseExceptionGroup):
        found = {outage_of(inner) for inner in exc.exceptions}
        if len(found) == 1:
            return found.pop()
    return None
