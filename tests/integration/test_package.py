"""What a user installs: `pip install .` (not editable). The wheel is built from a copy of
the checkout, installed into a fresh venv, and its `dynamo` command started from an empty
directory with no configuration at all: it serves a ghost end to end with the admin token
it prints, says its version, and stops on SIGTERM with exit 0. Bad input (an HTTP address
that cannot be bound, a data directory that is not one) is one line and exit 2.

Also: the top-level schema.sql is the packaged one (a link to it), not a copy."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import httpx
import pytest
import trio

from dynamo.version import version
from tests.integration.test_embedded_defaults import (
    a_ghost_succeeds,
    postgres_of,
    started,
    stop_postgres_of,
)
from tests.support.service import ROOT, ServiceProcess

pytestmark = pytest.mark.integration

# Building and installing with every dependency takes a minute or two on a loaded machine.
INSTALL_TIMEOUT_S = 600
TEST_TIMEOUT_S = 180
# What a clean clone holds that the wheel is built from.
NOT_BUILT_FROM = shutil.ignore_patterns(
    ".git", ".venv", ".dynamo", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel built from the checkout, installed into a fresh venv."""
    workdir = tmp_path_factory.mktemp("package")
    source = workdir / "source"
    shutil.copytree(ROOT, source, ignore=NOT_BUILT_FROM)
    wheels = workdir / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
         str(wheels), str(source)],
        check=True, timeout=INSTALL_TIMEOUT_S,
    )
    [wheel] = wheels.glob("dynamo-*.whl")
    environment = workdir / "venv"
    venv.create(environment, with_pip=True)
    subprocess.run(
        [str(environment / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True, timeout=INSTALL_TIMEOUT_S,
    )
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    print(f"\nwheel {wheel.name}: {len(names)} files, {wheel.stat().st_size} bytes")
    return {"wheel": wheel, "names": names, "bin": environment / "bin"}


def test_the_top_level_schema_is_the_packaged_schema():
    """One schema: the top-level schema.sql is a link to the file the package ships."""
    top = ROOT / "schema.sql"
    assert top.is_symlink(), "schema.sql must link to dynamo/database/schema.sql, not copy it"
    assert top.resolve() == (ROOT / "dynamo" / "database" / "schema.sql").resolve()


def test_the_wheel_holds_every_module_the_schema_and_the_page(installed):
    names = set(installed["names"])
    modules = {
        path.relative_to(ROOT).as_posix()
        for package in ("dynamo", "actors")
        for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert modules - names == set()
    assert "dynamo/database/schema.sql" in names
    page = {path.relative_to(ROOT).as_posix() for path in (ROOT / "dynamo" / "web").iterdir()}
    assert page and page - names == set()
    assert not [name for name in names if name.startswith(("tests/", "bench/"))]


def test_the_command_and_the_module_say_the_version(installed, tmp_path):
    # What a user's shell would have: nothing pointing at the checkout (no PYTHONPATH).
    env = {"PATH": "/usr/bin:/bin"}
    for command in (["dynamo"], ["python", "-m", "dynamo"]):
        answer = subprocess.run(
            [str(installed["bin"] / command[0]), *command[1:], "--version"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env,
        )
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip() == f"dynamo {version()}"
    where = subprocess.run(
        [str(installed["bin"] / "python"), "-c", "import dynamo; print(dynamo.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, check=True, env=env,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed["bin"].parent)  # not the checkout


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    stop_postgres_of((tmp_path / ".dynamo" / "postgres").resolve())


async def test_installed_dynamo_serves_a_ghost_from_an_empty_directory(installed, workdir):
    service = ServiceProcess({}, workdir, command=[str(installed["bin"] / "dynamo")])
    del service.env["DYNAMO_DATA_DIR"]  # no configuration at all: ./.dynamo
    healthcheck = [str(installed["bin"] / "dynamo"), "healthcheck"]
    try:
        with trio.fail_after(TEST_TIMEOUT_S):
            token = await started(service)
            request = await a_ghost_succeeds(service, token)
            headers = {"authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=service.url) as client:
                picture = await client.get(request["images"][0]["url"])
                assert picture.status_code == 200
                assert picture.headers["content-type"] == "image/jpeg"
                status = (await client.get("/status", headers=headers)).json()
                assert status["version"] == version()
                metrics = (await client.get("/metrics")).text
                assert f'dynamo_build_info{{version="{version()}"}} 1.0' in metrics
                page = await client.get("/")
                assert page.status_code == 200 and "<html" in page.text.lower()
                assert (await client.get("/web/app.js")).status_code == 200
            alive = await trio.run_process(healthcheck, env=service.env, capture_stderr=True,
                                           check=False)
            assert alive.returncode == 0, alive.stderr
            pgdata = (workdir / ".dynamo" / "postgres").resolve()
            assert len(postgres_of(pgdata)) == 1
            assert await service.terminate() == 0
            assert postgres_of(pgdata) == []
            gone = await trio.run_process(healthcheck, env=service.env, capture_stderr=True,
                                          check=False)
            assert gone.returncode == 1
            assert gone.stderr.decode().count("\n") == 1 and b"/healthz" in gone.stderr
    finally:
        service.kill()


def failed_start(installed, tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(installed["bin"] / "dynamo")], cwd=tmp_path, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "DYNAMO_DATA_DIR": str(tmp_path / "data"), **env},
        timeout=60,
    )


def test_an_address_that_cannot_be_bound_is_one_line_and_exit_2(installed, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        answer = failed_start(installed, tmp_path, DYNAMO_HTTP_ADDR=f"127.0.0.1:{port}")
    assert answer.returncode == 2
    assert answer.stderr == (
        f"dynamo: DYNAMO_HTTP_ADDR=127.0.0.1:{port} cannot be bound: Address already in use\n"
    )


def test_a_data_directory_that_is_a_file_is_one_line_and_exit_2(installed, tmp_path):
    (tmp_path / "data").write_text("not a directory")
    answer = failed_start(installed, tmp_path, DYNAMO_HTTP_ADDR="127.0.0.1:0")
    assert answer.returncode == 2
    assert answer.stderr == (
        f"dynamo: the data directory {tmp_path / 'data'} (DYNAMO_DATA_DIR) is not a directory\n"
    )
