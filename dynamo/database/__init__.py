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
- `dynamo.database.spend_store`: OpenAI spend's SQL (`record_call`, `totals_usd`,
  `request_calls`), for `dynamo.openai_port.spend`.

The schema itself is `schema.sql` at the top of the repository.
"""
