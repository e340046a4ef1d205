"""What runs: the installed distribution's version, read from its metadata
(`importlib.metadata`), for `dynamo --version`, GET /status and the
`dynamo_build_info` metric."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "dynamo"
# A checkout that was never installed (run.py from a bare copy) has no metadata.
UNKNOWN = "0+unknown"


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNKNOWN
