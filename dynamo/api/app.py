"""The QuartTrio app: the routes, JSON errors for every failure, one log line per request.

`build_app()` assembles the routes and the OpenAPI document (no context needed: tools
and tests read the document from it); `create_app(api)` gives it the service's context.

Errors: an `ApiError` answers its status; a query string its model refuses is 400 with
the field and the reason; an HTTP error raised by Quart itself (unknown route, wrong
method, body too large) keeps its status with a JSON body; a value PostgreSQL refuses to
store is 400; a deadline passed or a database that cannot be reached is 503; anything
else is logged with its traceback and answered 500 without details. Log lines name the
method, path and status, never headers (so never a token) nor the query string (which
may hold a stream ticket).
"""

from __future__ import annotations

import logging

import pydantic
import trio
from quart import g, request
from quart.json.provider import DefaultJSONProvider
from quart_schema import RequestSchemaValidationError
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from dynamo.api import (
    access,
    context,
    openapi,
    ops_routes,
    page_routes,
    requests_routes,
    stream_routes,
    submit_routes,
)
from dynamo.api.context import ApiContext
from dynamo.api.errors import ApiError
from dynamo.api.tickets import Tickets
from dynamo.database.errors import DataRejected
from dynamo.supervision.unavailable import outage_of

log = logging.getLogger(__name__)

_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Paths are logged, cut to this length: a client controls them.
LOGGED_PATH_CHARS = 200


def build_app() -> QuartTrio:
    app = QuartTrio(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = submit_routes.MAX_BODY_BYTES
    openapi.install(app)
    # quart types `app.json` as the JSONProvider base; it is the default provider.
    assert isinstance(app.json, DefaultJSONProvider)
    app.json.sort_keys = False  # bodies read in the order they are written
    for routes in (page_routes, ops_routes, submit_routes, requests_routes, stream_routes):
        app.register_blueprint(routes.blueprint)
    _add_logging(app)
    _add_error_handlers(app)
    return app


def create_app(api: ApiContext, *, request_changes=None) -> QuartTrio:
    """The app for `api`; `request_changes` (the database's change feed, running) feeds
    the live event stream, which answers 503 without it."""
    app = build_app()
    app.extensions[context.EXTENSION_KEY] = api
    app.extensions[access.EXTENSION_KEY] = access.Authenticator(
        http_client=api.http_client,
        auth_url=api.settings.auth_url,
        auth_configured=api.auth_configured,
        admin_token=api.admin_token,
    )
    app.extensions[stream_routes.TICKETS_KEY] = Tickets()
    if request_changes is not None:
        app.extensions[stream_routes.CHANGES_KEY] = request_changes
    return app


def openapi_document() -> dict:
    """The OpenAPI document the app serves at /openapi.json."""
    return openapi.document_of(build_app())


def _add_logging(app: QuartTrio) -> None:
    @app.before_request
    async def start_clock():
        g.started_at = trio.current_time()

    @app.after_request
    async def log_request(response):
        elapsed_ms = (trio.current_time() - g.get("started_at", trio.current_time())) * 1000
        # Probes and scrapes come every few seconds: at INFO they would drown the events.
        level = (
            logging.DEBUG
            if request.path in _QUIET_PATHS and response.status_code < 500
            else logging.INFO
        )
        path = request.path[:LOGGED_PATH_CHARS].encode("unicode_escape").decode("ascii")
        log.log(
            level, "%s %s %d %.1fms", request.method[:20], path, response.status_code, elapsed_ms
        )
        return response


def _add_error_handlers(app: QuartTrio) -> None:
    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError):
        return {"error": exc.message}, exc.status, exc.headers

    @app.errorhandler(RequestSchemaValidationError)
    async def invalid_query(exc: RequestSchemaValidationError):
        return {"error": describe_validation_error(exc.validation_error)}, 400

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException):
        headers = {}
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers["Allow"] = ", ".join(exc.valid_methods)
        status = exc.code if exc.code and 400 <= exc.code < 600 else 400
        return {"error": (exc.name or "error").lower()}, status, headers

    @app.errorhandler(Exception)
    async def unexpected_error(exc: Exception):
        if isinstance(exc, DataRejected):
            # A value the validation let through but PostgreSQL cannot store (a number
            # beyond its column's range): the client's to fix, so 400, not 500.
            log.warning("%s %s: %s", request.method, request.path[:LOGGED_PATH_CHARS], exc)
            return {"error": "a value in the request is out of range"}, 400
        # A dependency's outage (outage_of), or one that did not answer in time: 503.
        if outage_of(exc) is not None or isinstance(exc, trio.TooSlowError):
            log.warning(
                "%s %s: unavailable: %s",
                request.method,
                request.path[:LOGGED_PATH_CHARS],
                type(exc).__name__,
            )
            return (
                {"error": "a dependency is unavailable; try again later"},
                503,
                {"Retry-After": "5"},
            )
        log.error("%s %s failed", request.method, request.path[:LOGGED_PATH_CHARS], exc_info=exc)
        return {"error": "internal error"}, 500


def describe_validation_error(error: Exception) -> str:
    """`field: what is wrong; ...` from the model's refusal of a query string."""
    if not isinstance(error, pydantic.ValidationError):
        return "the query string is invalid"
    clauses = []
    for detail in error.errors():
        field = ".".join(str(part) for part in detail["loc"]) or "query"
        message = detail["msg"].replace("Input should be", "must be")
        clauses.append(f"{field}: {message[:1].lower()}{message[1:]}")
    return "; ".join(dict.fromkeys(clauses))
