"""Viewers' points: the auth + ledger port (contract section 5) and the per-viewer gate.

- `dynamo.viewer_points.port`: `Points` (and `FreePoints`), `InsufficientPoints`,
  `AlreadyFinalized`.
- `dynamo.viewer_points.token_cache`: `TokenCache`, the viewers' service tokens kept by
  `Points` until shortly before they expire.
- `dynamo.viewer_points.gate`: `ViewerGate`, debits made and debits looked for take turns.
"""
