"""dynamo as a process (`dynamo`, `dynamo serve`): reads the configuration, checks what
only the operator can fix (dynamo/preflight.py), runs the service until a signal, and
turns the way it ended into an exit code.

SIGINT/SIGTERM stop it cleanly (exit 0); a second signal stops it at once. An actor that
keeps crashing, or an outage that lasts too long, exits 1, so that the container runtime
restarts the process. Exit 2, with one line on stderr and no traceback, is for what the
operator must fix before a start can work: the configuration, a data directory this user
cannot write, an HTTP address that cannot be bound, a configured model the API refuses.
"""

from __future__ import annotations

import logging
import signal
import sys

import trio

from dynamo import config, logs, preflight, service
from dynamo.openai_port.catalogue import ModelsRefused
from dynamo.supervision.supervisor import OutageTooLong, TooManyRestarts
from dynamo.version import version

log = logging.getLogger("dynamo")

# What a start that cannot work exits with (the container runtime's restart will not help).
EXIT_CONFIGURATION = 2
# What a crash exits with (a restart may help).
EXIT_CRASHED = 1


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


def _first(group: BaseException | None) -> BaseException | None:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group
