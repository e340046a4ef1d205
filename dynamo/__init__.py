"""dynamo: image requests from RabbitMQ to the screen, with points.

The top level holds what is not one concern: `config` (the environment), `logs`,
`metrics` and `service` (the wiring of ports, channels and actors), and the `dynamo`
command: `cli` (its arguments; `python -m dynamo` and `run.py` too), `process` (serving
until a signal, exit codes), `preflight`, `healthcheck` and `version`. Everything else
lives in a room (the actors themselves are in the top-level `actors` package):

- `dynamo.database`: the PostgreSQL port and all its SQL.
- `dynamo.openai_port`: the OpenAI port, its catalogue, dialects, errors, prices, spend.
- `dynamo.limits`: rate limits and the account's shared budget.
- `dynamo.domain`: the request domain (genreq messages, jobs, prompts, published bodies).
- `dynamo.images`: image processing and the storage port.
- `dynamo.supervision`: supervisor, outages, readiness, retry.
- `dynamo.inflight`: requests in flight: pipeline, resume sweep, confirms, fair queue.
- `dynamo.viewer_points`: the auth + ledger port of viewers' points.
- `dynamo.rabbitmq`: the RabbitMQ port.
- `dynamo.discord`: Discord webhook posts.
- `dynamo.api`: the HTTP API (quart-trio); `dynamo/web/`: the page it serves.

A regular package (not a namespace one), so that its files (`database/schema.sql`, to
which the repository's top-level `schema.sql` links; `web/`) are found with
`importlib.resources` in every install.
"""
