"""The storage port: processed images go to S3-compatible storage (boto3, in a worker
thread so the event loop never blocks) or, in development, to a local directory that the
HTTP API serves at GET /images/{key}.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Protocol

import boto3
import botocore.config
import botocore.exceptions
import trio

from dynamo.config import StorageSettings
from dynamo.supervision.retry import Permanent, Transient

log = logging.getLogger(__name__)

# boto3's own retries are off: dynamo.supervision.retry is the one retry policy.
_BOTO_CONFIG = botocore.config.Config(
    retries={"max_attempts": 1, "mode": "standard"},
    connect_timeout=10,
    read_timeout=30,
    s3={"addressing_style": "path"},
)
# Uploads run in threads; a few at once are plenty for images of ~1 MB.
UPLOAD_THREADS = trio.CapacityLimiter(4)


class StoragePort(Protocol):
    """Where the uploader puts images: `S3Storage` or `LocalStorage`."""

    def public_url(self, key: str) -> str: ...

    async def upload(self, key: str, data: bytes, content_type: str) -> str: ...  # the URL

    async def ping(self) -> None: ...


class S3Storage:
    def __init__(self, settings: StorageSettings):
        self._settings = settings
        self._client = boto3.session.Session().client(
            "s3",
            region_name=settings.region,
            endpoint_url=settings.endpoint_url,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_key,
            config=_BOTO_CONFIG,
        )

    def public_url(self, key: str) -> str:
        return f"{self._settings.public_base_url}/{key}"

    async def upload(self, key: str, data: bytes, content_type: str) -> str:
        put = functools.partial(
            self._client.put_object,
            Bucket=self._settings.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
            ACL="public-read",
        )
        try:
            await trio.to_thread.run_sync(put, limiter=UPLOAD_THREADS)
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status in (408, 429) or status >= 500:
                raise Transient(f"storage upload: HTTP {status}") from exc
            raise Permanent(
                f"storage upload: HTTP {status} {exc.response.get('Error', {}).get('Code')}"
            ) from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise Transient(f"storage upload: {type(exc).__name__}") from exc
        return self.public_url(key)

    async def ping(self) -> None:
        await trio.to_thread.run_sync(
            functools.partial(self._client.head_bucket, Bucket=self._settings.bucket),
            limiter=UPLOAD_THREADS,
        )


class LocalStorage:
    """Images in a directory, served by the HTTP API under /images/."""

    def __init__(self, directory: Path, public_base_url: str):
        self.directory = directory
        self._public_base_url = public_base_url.rstrip("/")

    def public_url(self, key: str) -> str:
        return f"{self._public_base_url}/{key}"

    def path_for(self, key: str) -> Path | None:
        """The file for `key`, or None when the key would leave the directory."""
        path = (self.directory / key).resolve()
        if not path.is_relative_to(self.directory.resolve()):
            return None
        return path

    async def upload(self, key: str, data: bytes, content_type: str) -> str:
        path = self.path_for(key)
        if path is None:
            raise Permanent(f"storage upload: bad key {key!r}")
        await trio.to_thread.run_sync(_write_atomically, path, data)
        return self.public_url(key)

    async def ping(self) -> None:
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_bytes(data)
    partial.replace(path)
