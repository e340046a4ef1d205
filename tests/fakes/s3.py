"""A local S3 server for tests: moto's ThreadedMotoServer on 127.0.0.1, port 0.

`with moto_s3() as s3:` starts the server in a thread of this process, creates a bucket
and yields an `S3Bucket` with everything a client (or the service in a subprocess, via
`s3.env()`) needs. moto keeps its state per process, not per server, so leaving the
block resets it. Objects are readable without credentials at
`{endpoint_url}/{bucket}/{key}`, like a public-read object.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3
import httpx
from moto.server import ThreadedMotoServer

from ._service import LOCALHOST

DEFAULT_BUCKET = "dynamo-test-images"
REGION = "us-east-1"
# moto accepts any credentials; these only have to be well formed.
ACCESS_KEY_ID = "AKIAFAKEFAKEFAKEFAKE"
SECRET_ACCESS_KEY = "fake-secret-access-key"
# The reset is a local call; a longer wait would only hide a hung server.
RESET_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class S3Bucket:
    endpoint_url: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    region: str

    def client(self) -> Any:
        """A blocking boto3 client (from Trio, call it through trio.to_thread.run_sync)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def public_url(self, key: str) -> str:
        return f"{self.endpoint_url}/{self.bucket}/{key}"

    def env(self) -> dict[str, str]:
        return {
            "SPACES_BUCKET_NAME": self.bucket,
            "SPACES_REGION_NAME": self.region,
            "SPACES_ENDPOINT_URL": self.endpoint_url,
            "SPACES_ACCESS_KEY_ID": self.access_key_id,
            "SPACES_SECRET_KEY": self.secret_access_key,
        }


@contextmanager
def moto_s3(bucket: str = DEFAULT_BUCKET) -> Iterator[S3Bucket]:
    server = ThreadedMotoServer(ip_address=LOCALHOST, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Bucket(f"http://{host}:{port}", bucket, ACCESS_KEY_ID, SECRET_ACCESS_KEY, REGION)
    try:
        s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        try:
            httpx.post(f"{s3.endpoint_url}/moto-api/reset", timeout=RESET_TIMEOUT_S)
        finally:
            server.stop()
