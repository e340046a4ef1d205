"""dynamo as an operator runs it: `python run.py` (or an installed `dynamo`
command) in a subprocess, configured through its
environment, stopped with SIGTERM or killed with SIGKILL.

The one service harness: `started(dynamo_process, rabbit=..., **env)` collects what dynamo
publishes (when given the broker), starts the process and returns it once /readyz says
ready; `started_fleet` does that for several processes sharing one database, and
`ServiceProcess.start_ready` restarts one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from dynamo.rabbitmq import broker as topology
from tests.support.timeouts import STARTUP_S

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    def __init__(self, env: dict[str, str], workdir: Path, *, command: list[str] | None = None):
        self.command = command or [sys.executable, str(ROOT / "run.py")]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/root"),
            "DYNAMO_HTTP_ADDR": f"127.0.0.1:{self.port}",
            "DYNAMO_DATA_DIR": str(workdir / "data"),
            **env,
        }
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"service-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command, cwd=self.workdir, env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT)

    async def start_ready(self, *, within_s: float = STARTUP_S) -> None:
        """Starts the process; returns once it is ready, within `within_s`."""
        self.start()
        with trio.fail_after(within_s):
            await self.wait_ready()

    async def wait_ready(self, *, path: str = "/readyz") -> None:
        """Polls until the service answers 200 (the caller sets a deadline)."""
        async with httpx.AsyncClient() as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"dynamo exited with {self.process.returncode}:\n{self.logs()}")
                try:
                    if (await client.get(self.url + path)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)

    async def wait_exited(self) -> int:
        """Waits until the process is gone (the caller sets a deadline); its exit code."""
        while self.process.poll() is None:
            await trio.sleep(0.01)
        return self.process.returncode

    async def metrics(self) -> str:
        async with httpx.AsyncClient() as client:
            return (await client.get(self.url + "/metrics")).text

    def kill(self) -> None:
        """kill -9: no cleanup at all."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self._log.close()

    async def terminate(self, *, timeout_s: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(timeout_s):
            while self.process.poll() is None:
                await trio.sleep(0.05)
        self._log.close()
        return self.process.returncode

    def logs(self) -> str:
        return "\n".join(
            (self.workdir / f"service-{n}.log").read_text(errors="replace")
            for n in range(1, self.starts + 1)
            if (self.workdir / f"service-{n}.log").exists())


# What a test reads back from RabbitMQ by default: the alerts and the viewers' results.
PUBLISHED = (topology.ONSCREEN_EXCHANGE, topology.RESULTS_EXCHANGE)


async def started(
    dynamo_process, *, rabbit=None, collect=PUBLISHED, within_s: float = STARTUP_S, **env
) -> ServiceProcess:
    """A dynamo process (the `dynamo_process` fixture's, with `env` on top of the test's),
    started and ready. With `rabbit`, the exchanges in `collect` are collected first, so
    that nothing it publishes is missed."""
    if rabbit is not None:
        for exchange in collect:
            await rabbit.collect(exchange)
    service = dynamo_process(**env)
    await service.start_ready(within_s=within_s)
    return service


async def started_fleet(
    dynamo_process, count: int, *, within_s: float = STARTUP_S, **env
) -> list[ServiceProcess]:
    """`count` processes sharing the test's database and broker, started together (so
    that they race for the same rows), each ready within `within_s`."""
    services = [dynamo_process(**env) for _ in range(count)]
    for service in services:
        service.start()
    with trio.fail_after(within_s):
        for service in services:
            await service.wait_ready()
    return services
