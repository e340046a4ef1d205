"""The HTTP API (contract §7) as a QuartTrio app; `actors.http` serves it.

One module per concern: `context` (what the app is given), `access` (bearer tokens),
`errors` (JSON errors), `bodies` (rows as JSON), `schemas` (the bodies as pydantic
models), `submit_routes`, `requests_routes`, `ops_routes`, `stream_routes` (the live
event stream, with `tickets`) and `page_routes` (the live page of `dynamo/web/`): the
routes; `openapi` (the document at /openapi.json, generated from the routes and their
models) and `app` (the assembly, with one log line per request); `early_answers` (what
hypercorn is given to serve: the app, with an early answer's unread body read first, so
that kept-alive connections go on). The API reaches PostgreSQL only through the database
port (`dynamo.database.port`).
"""

from dynamo.api.app import build_app, create_app, openapi_document
from dynamo.api.context import ApiContext

__all__ = ["ApiContext", "build_app", "create_app", "openapi_document"]
