"""Starts dynamo: `python run.py`. SIGINT/SIGTERM stop it cleanly (exit 0); a second
signal stops it at once. A configuration error or an actor that keeps crashing exits
non-zero, so that the container runtime restarts the process.
"""

import logging
import signal
import sys

import trio

from dynamo import config, logs, service
from dynamo.openai_port.catalogue import ModelsRefused
from dynamo.supervision.supervisor import OutageTooLong, TooManyRestarts

log = logging.getLogger("dynamo")


async def main(settings: config.Settings) -> None:
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


def cli() -> int:
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"dynamo: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format)
    try:
        trio.run(main, settings, strict_exception_groups=True)
    except BaseExceptionGroup as group:
        refused, rest = group.split(ModelsRefused)
        if refused is not None:
            # One line naming the variable, the model and what the API said.
            log.critical("%s", _first(refused))
            return 2
        crashed, rest = group.split((TooManyRestarts, OutageTooLong))
        if rest is not None:
            raise
        log.critical("stopping: %s", _first(crashed))
        return 1
    log.info("stopped")
    return 0


def _first(group: BaseExceptionGroup) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


if __name__ == "__main__":
    sys.exit(cli())
