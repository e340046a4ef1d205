"""Outage or bug: the one place that decides.

Each port maps its driver's errors onto the service's own classes (`dynamo.database.errors`
for asyncpg, `dynamo.rabbitmq.broker` for aio-pika, `dynamo.openai_port.errors` and
`retry.classify_http_status` for the HTTP services). The ones that mean "this dependency
cannot be reached for now" subclass `Unavailable` and name the dependency; `outage_of`
is what every caller asks (the supervisor, the intake actor, the pipeline, the outage
probe, the HTTP API), so that an outage is waited out and anything else is a bug.
"""

from __future__ import annotations


class Unavailable(ConnectionError):
    """A dependency cannot be reached, or the connection broke: try again later.

    A ConnectionError (so an OSError), as the driver errors it replaces were."""

    dependency = "a dependency"


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
