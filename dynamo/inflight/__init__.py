"""Requests in flight: the pipeline's bookkeeping of what is somewhere between intake
and the result, and how it gets back in after a restart.

- `dynamo.inflight.pipeline`: `Pipeline`, `InFlight`, `serve_jobs` (a job's failure is its own).
- `dynamo.inflight.resume`: the resume sweep (`run` is an actor), the worker's lease.
- `dynamo.inflight.confirms`: broker confirmations not stored yet (`Confirms`).
- `dynamo.inflight.fair_queue`: `FairQueue`, the rate limiter's queue of reserved requests.
- `dynamo.inflight.attempts`: `CrashedAttempts`, how often one input message crashed intake.
"""
