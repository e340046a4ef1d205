"""The broadcaster's safety net: what keeps a request from reaching the stream unseen.

- `dynamo.safety.blocked_terms`: DYNAMO_BLOCKED_TERMS_FILE, read again when it changes,
  and the check of a subject against it (whole words, case and accents ignored).
- `dynamo.safety.approval`: the broadcaster's decision on an image awaiting approval
  (DYNAMO_APPROVAL), from the API or the timeout, and where it routes the request.

The image screening itself is the `image_screen` actor; the approval's SQL is
`dynamo.database.approval`.
"""
