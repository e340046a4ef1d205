"""Rate limits and the shared budget: how fast OpenAI may be called, by this process and
by every process of its fleet.

- `dynamo.limits.window`: `SlidingWindow`, `Grant`, the 60-s window of calls and tokens.
- `dynamo.limits.adaptive`: `AdaptiveLimit`, a limit that follows the API's answers.
- `dynamo.limits.kind`: `KindLimiter` (one kind of call) and `AuthCircuit`.
- `dynamo.limits.budget`: `Budget`, the account's budget, over a `MemoryStore` or the
  fleet's `PostgresStore` (`dynamo.database.fleet_store`).
- `dynamo.limits.permits`: the permit protocol (`acquire_permit`, `report_outcome`).
- `dynamo.limits.state`: `RateLimiterStatus`, what the rate limiter actor keeps across
  restarts and shows at GET /status (and re-exports of the names above).
- `dynamo.limits.fleet_view`: `Fleet`, every live process sharing the database and the
  fleet-wide figures.
"""
