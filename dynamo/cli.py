"""The `dynamo` command, also `python -m dynamo` and `python run.py`.

- `dynamo` (or `dynamo serve`) runs the service. SIGINT/SIGTERM stop it cleanly (exit 0);
  a second signal stops it at once. An actor that keeps crashing, or an outage that lasts
  too long, exits 1, so that the container runtime restarts the process.
- `dynamo healthcheck` asks a running service's GET /healthz (dynamo/healthcheck.py).
- `dynamo --version` says which version is installed.

Exit code 2, with one line on stderr and no traceback, is for what the operator must fix
before a start can work: the configuration, a data directory this user cannot write, an
HTTP address that cannot be bound (dynamo/preflight.py), a configured model the API
refuses.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from dynamo import config, healthcheck, logs, preflight, service
from dynamo.openai_models import ModelsRefused
from dynamo.supervisor import OutageTooLong, TooManyRestarts
from dynamo.version import version

log = logging.getLogger("dynamo")

# What a start that cannot work exits with (the container runtime's restart will not help).
EXIT_CONFIGURATION = 2
# What a crash exits with (a restart may help).
EXIT_CRASHED = 1


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
        return healthcheck.run()
    return serve()


def serve() -> int:
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"dynamo: {exc}", file=sys.stderr)
        return EXIT_CONFIGURATION
    problem = preflight.problem(settings)
    if problem is not None:
        print(f"dynamo: {problem}", file=sys.stderr)
        return EXIT_CONFIGURATION
    logs.configure(settings.log_format)
    log.info("dynamo %s starting (%s profile)", version(), settings.profile)
    try:
        trio.run(_serve_until_signalled, settings, strict_exception_groups=True)
    except BaseExceptionGroup as group:
        refused, rest = group.split(ModelsRefused)
        if refused is not None:
            # One line naming the variable, the model and what the API said.
            log.critical("%s", _first(refused))
            return EXIT_CONFIGURATION
        crashed, rest = group.split((TooManyRestarts, OutageTooLong))
        if rest is not None:
            raise
        log.critical("stopping: %s", _first(crashed))
        return EXIT_CRASHED
    log.info("stopped")
    return 0


async def _serve_until_signalled(settings: config.Settings) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def watch_signals():
                async for signum in signals:
                    if shutdown.is_set():
                        log.warning("second signal: stopping now")
                        nursery.cancel_scope.cancel()
                        return
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    shutdown.set()

            nursery.start_soon(watch_signals)
            await service.serve(settings, shutdown)
            nursery.cancel_scope.cancel()


def _first(group: BaseExceptionGroup) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group
