"""The database port: PostgreSQL, and every line of SQL dynamo runs.

Reached through asyncpg behind trio-asyncio here and nowhere else; callers get the
service's own errors, never a driver's.

- `dynamo.database.port`: `Database` (every query), `open_database`, `iso`.
- `dynamo.database.errors`: `DatabaseUnavailable`, `DataRejected`, `driver_errors_mapped`.
- `dynamo.database.changes`: the change feed (LISTEN/NOTIFY): `RequestChanges`, `RequestChange`.
- `dynamo.database.reads`: the HTTP API's reads (request pages, Idempotency-Key records).
- `dynamo.database.embedded`: the development default, PostgreSQL embedded with `pgserver`.
- `dynamo.database.fleet_store`: the fleet's tables: `PostgresStore` (the shared OpenAI
  budget), `FleetQueries`, `FleetUnavailable`.
- `dynamo.database.approval`: the safety net's queries: an image's wait for the
  broadcaster, the decision on it (one atomic UPDATE), its preview, the counts.
- `dynamo.database.spend_store`: OpenAI spend's SQL (`record_call`, `totals_usd`,
  `request_calls`), for `dynamo.openai_port.spend`.

The schema itself is `schema.sql` here (the repository's top-level `schema.sql` links to it).
"""
