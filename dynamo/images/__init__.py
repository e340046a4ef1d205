"""Images: processing (contract section 4) and the storage port.

- `dynamo.images.processing`: ghosts to JPEG, friends keyed out to WEBP with alpha.
- `dynamo.images.storage`: `S3Storage` and, in development, `LocalStorage`.
"""
