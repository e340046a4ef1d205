"""The `dynamo` command, also `python -m dynamo` and `python run.py`:

- `dynamo` (or `dynamo serve`) runs the service (dynamo/process.py: exit codes, signals);
- `dynamo healthcheck` asks a running service's GET /healthz (dynamo/healthcheck.py);
- `dynamo --version` says which version is installed.

Only what the chosen command needs is imported: a container's HEALTHCHECK runs
`dynamo healthcheck` every 30 s, and the service's imports cost a second of CPU.
"""

from __future__ import annotations

import argparse

from dynamo.version import version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dynamo",
        description="Golden VCR image alerts. Configured by environment variables "
        "(and ./.env); with none, the development profile with embedded defaults.",
    )
    parser.add_argument("--version", action="version", version=f"dynamo {version()}")
    commands = parser.add_subparsers(dest="command", metavar="{serve,healthcheck}")
    commands.add_parser("serve", help="run the service (the default)")
    commands.add_parser(
        "healthcheck",
        help="GET /healthz of the service at DYNAMO_HTTP_ADDR: exit 0 when it answers 200, "
        "else 1 (for a container's HEALTHCHECK)",
    )
    arguments = parser.parse_args(argv)
    if arguments.command == "healthcheck":
        from dynamo import healthcheck

        return healthcheck.run()
    from dynamo import process

    return process.serve()
