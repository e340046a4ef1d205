"""Fake external HTTP services that speak the real protocols, for integration tests.

OpenAI, auth, ledger and Discord fakes are served on 127.0.0.1, port 0, in the test's
Trio nursery (`url = await nursery.start(fake.serve)`); S3 is moto's server. See
`_service` for the behaviour they share and `fixtures` for ready-made fixtures.
`ports` holds the in-memory fakes of the ports (database, broker, points, storage,
OpenAI SDK answers) for unit tests of one actor.
"""

from ._service import Call, FakeService
from .auth_server import FakeAuth, sign
from .discord_server import FakeDiscord
from .ledger_server import FakeLedger, Flow
from .openai_server import FakeOpenAI
from .pictures import CHROMA_RGB, hex_color
from .s3 import S3Bucket, moto_s3

__all__ = [
    "CHROMA_RGB", "Call", "FakeAuth", "FakeDiscord", "FakeLedger", "FakeOpenAI",
    "FakeService", "Flow", "S3Bucket", "hex_color", "moto_s3", "sign",
]  # fmt: skip
