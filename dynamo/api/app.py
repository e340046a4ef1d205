"""The QuartTrio app: the routes, JSON errors for every failure, one log line per request.

Errors: an `ApiError` answers its status; an HTTP error raised by Quart itself (unknown
route, wrong method, body too large) keeps its status with a JSON body; a value that
PostgreSQL refuses to store is 400; a deadline passed or a database that cannot be
reached is 503; anything else is logged with its traceback and answered 500 without
details. Log lines name the method, path and status, never
headers (so never a token) nor the query string.
"""

from __future__ import annotations

import logging

import asyncpg
import trio
from quart import g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from dynamo.api import access, context, ops_routes, requests_routes, submit_routes
from dynamo.api.context import ApiContext
from dynamo.api.errors import ApiError

log = logging.getLogger(__name__)

_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

# Failures that mean the database (or another dependency) is unavailable for now.
_UNAVAILABLE = (
    trio.TooSlowError,
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
)


def create_app(api: ApiContext) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = submit_routes.MAX_BODY_BYTES
    app.json.sort_keys = False  # bodies read in the order they are written
    app.extensions[context.EXTENSION_KEY] = api
    app.extensions[access.EXTENSION_KEY] = access.Authenticator(
        http_client=api.http_client,
        auth_url=api.settings.auth_url,
        auth_configured=api.auth_configured,
        admin_token=api.admin_token,
    )
    app.register_blueprint(ops_routes.blueprint)
    app.register_blueprint(submit_routes.blueprint)
    app.register_blueprint(requests_routes.blueprint)

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
        log.log(
            level, "%s %s %d %.1fms", request.method, request.path, response.status_code, elapsed_ms
        )
        return response

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError):
        return {"error": exc.message}, exc.status, exc.headers

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException):
        headers = {}
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers["Allow"] = ", ".join(exc.valid_methods)
        return {"error": (exc.name or "error").lower()}, exc.code or 500, headers

    @app.errorhandler(Exception)
    async def unexpected_error(exc: Exception):
        if isinstance(exc, asyncpg.exceptions.DataError):
            # A value the validation let through but PostgreSQL cannot store (a number
            # beyond its column's range): the client's to fix, so 400, not 500.
            log.warning("%s %s: %s", request.method, request.path, exc)
            return {"error": "a value in the request is out of range"}, 400
        if isinstance(exc, _UNAVAILABLE):
            log.warning("%s %s: unavailable: %s", request.method, request.path, type(exc).__name__)
            return (
                {"error": "a dependency is unavailable; try again later"},
                503,
                {"Retry-After": "5"},
            )
        log.error("%s %s failed", request.method, request.path, exc_info=exc)
        return {"error": "internal error"}, 500

    return app
