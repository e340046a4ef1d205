"""Supervision, outages, readiness and retries: how dynamo keeps going when a
dependency or an actor fails, and tells a bug from an outage.

- `dynamo.supervision.supervisor`: `Supervisor`, one-for-one restarts after Erlang/OTP.
- `dynamo.supervision.children`: `ChildSpec`, `ChannelSpec`, `Channels`: a graph declared
  as a table, checked for its order (`check_order`) and started by one loop
  (`start_children`).
- `dynamo.supervision.outages`: outages of PostgreSQL and RabbitMQ, waited out
  (`patiently`, `patient_write`, `Dependencies`).
- `dynamo.supervision.readiness`: `Readiness`, what GET /readyz reports.
- `dynamo.supervision.retry`: the retry policy for external calls (`retrying`,
  `Transient`, `Permanent`, `backoff_s`).
- `dynamo.supervision.unavailable`: outage or bug, decided in one place: `Unavailable`
  (the ports' outage errors subclass it) and `outage_of`.
- `dynamo.supervision.backoff`: `Backoff`, the one backoff policy every retrying,
  probing, restarting or reconnecting loop is given.
- `dynamo.supervision.pids`: `process_exists`, whether a pid on this host is alive.
"""
