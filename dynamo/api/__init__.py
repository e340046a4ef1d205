"""The HTTP API (contract §7) as a QuartTrio app; `actors.http` serves it.

One module per concern: `context` (what the app is given), `access` (bearer tokens),
`errors` (JSON errors), `queries` (the SQL the API needs beyond the database port),
`bodies` (rows as JSON), `submit_routes`, `requests_routes` and `ops_routes` (the
routes), `openapi` (the document at /openapi.json) and `app` (the assembly, with one log
line per request).
"""

from dynamo.api.app import create_app
from dynamo.api.context import ApiContext

__all__ = ["ApiContext", "create_app"]
