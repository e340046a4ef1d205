"""`python run.py` with an empty environment: embedded PostgreSQL, offline generator,
local images, no points, and a generated admin token printed once. A killed run leaves
no server that the next start cannot reuse, and a clean stop leaves none at all.

Every test stops whatever embedded server it caused, however it ends, so that no
postgres outlives its deleted data directory."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import trio
from PIL import Image

from dynamo.database import embedded as embedded_pg
from tests.support.service import ServiceProcess
from tests.support.timeouts import SERVICE_S as TEST_TIMEOUT_S

GHOST = {"style": "ghost", "inputs": {"subject": "a seal"}}
# The whole line, newline included: a line still being written is not read as a token.
TOKEN_LINE = re.compile(r"generated DYNAMO_ADMIN_TOKEN for this run: (\S+)\n")


def postgres_of(pgdata: Path) -> list[psutil.Process]:
    """The postmaster(s) serving `pgdata`."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] == "postgres" and "-D" in cmdline and str(pgdata) in cmdline:
            found.append(process)
    return found


def stop_postgres_of(pgdata: Path) -> None:
    for process in postgres_of(pgdata):
        try:
            process.send_signal(signal.SIGQUIT)  # immediate shutdown
            process.wait(10)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            process.kill()


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    stop_postgres_of((tmp_path / ".dynamo" / "postgres").resolve())


def a_service(workdir: Path) -> ServiceProcess:
    service = ServiceProcess({}, workdir)
    del service.env["DYNAMO_DATA_DIR"]  # the default, ./.dynamo in the working directory
    return service


async def started(service: ServiceProcess) -> str:
    """Starts the service; its admin token once it is ready."""
    service.start()
    await service.wait_ready()
    while not (match := TOKEN_LINE.search(service.log_path.read_text(errors="replace"))):
        await trio.sleep(0.05)
    return match.group(1)


async def a_ghost_succeeds(service: ServiceProcess, token: str) -> dict:
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=service.url) as client:
        answer = await client.post("/requests", json=GHOST, headers=headers)
        assert answer.status_code == 202, answer.text
        url = answer.json()["url"]
        while (request := (await client.get(url, headers=headers)).json())["state"] != "succeeded":
            assert request["state"] != "failed", request
            await trio.sleep(0.1)
    return request


async def test_empty_environment_serves_a_ghost_end_to_end(workdir):
    service = a_service(workdir)
    try:
        with trio.fail_after(TEST_TIMEOUT_S):
            token = await started(service)
            logs = service.logs()
            for system in ("RabbitMQ", "PostgreSQL", "OpenAI", "auth", "storage"):
                assert re.search(rf"WARNING .*{system}.* not configured", logs), system
            assert "OFFLINE GENERATOR" in logs
            async with httpx.AsyncClient(base_url=service.url) as client:
                refused = await client.post("/requests", json=GHOST)
                assert refused.status_code == 401
            request = await a_ghost_succeeds(service, token)
            [image] = request["images"]
            assert image["url"].startswith(f"{service.url}/images/{request['id']}/")
            async with httpx.AsyncClient() as client:
                picture = await client.get(image["url"])
            assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
            decoded = Image.open(io.BytesIO(picture.content))
            assert decoded.format == "JPEG" and decoded.size == (1024, 1024)
            pgdata = (workdir / ".dynamo" / "postgres").resolve()
            assert pgdata.is_dir() and len(postgres_of(pgdata)) == 1
            assert token not in service.logs().replace(
                f"generated DYNAMO_ADMIN_TOKEN for this run: {token}", "")  # printed once only
            assert await service.terminate() == 0
            # A clean stop stops the embedded server too.
            assert postgres_of(pgdata) == []
    finally:
        service.kill()


async def test_a_killed_run_leaves_a_server_the_next_start_reuses_then_stops(workdir):
    service = a_service(workdir)
    pgdata = (workdir / ".dynamo" / "postgres").resolve()
    try:
        with trio.fail_after(TEST_TIMEOUT_S):
            token = await started(service)
            await a_ghost_succeeds(service, token)
            [server] = postgres_of(pgdata)
            service.kill()
            assert postgres_of(pgdata) == [server]  # left running by the kill

            token = await started(service)
            assert postgres_of(pgdata) == [server]  # reused
            await a_ghost_succeeds(service, token)
            assert await service.terminate() == 0
            # The killed process is forgotten: the clean stop was the last user.
            assert postgres_of(pgdata) == []
    finally:
        service.kill()


@pytest.mark.parametrize("holder", ["dead", "foreign"])
async def test_a_stale_postmaster_pid_does_not_stop_the_next_start(workdir, holder):
    """The server died with the run (a container stopped, a machine rebooted): its
    postmaster.pid names a pid that is gone, or one reused by another process."""
    service = a_service(workdir)
    pgdata = (workdir / ".dynamo" / "postgres").resolve()
    stranger = None
    try:
        with trio.fail_after(TEST_TIMEOUT_S):
            token = await started(service)
            await a_ghost_succeeds(service, token)
            [server] = postgres_of(pgdata)
            pid_file = (pgdata / embedded_pg.PID_FILE).read_text()
            service.kill()
            server.kill()  # no shutdown: postmaster.pid stays
            server.wait(10)
            if holder == "dead":
                stale_pid = server.pid
            else:
                stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
                stale_pid = stranger.pid
            (pgdata / embedded_pg.PID_FILE).write_text(
                "\n".join([str(stale_pid), *pid_file.split("\n")[1:]]))

            token = await started(service)
            await a_ghost_succeeds(service, token)
            assert "not its server" in service.logs()
            assert await service.terminate() == 0
            assert postgres_of(pgdata) == []
    finally:
        service.kill()
        if stranger is not None:
            stranger.kill()
            stranger.wait()
