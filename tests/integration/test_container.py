"""The image as its users run it: built from the Containerfile (buildah, on a local Debian
base; tests/support/container.py says why and how), then started with no configuration as
its non-root user: it serves a ghost end to end with the admin token it prints, its
HEALTHCHECK command answers, and SIGTERM to the image's process gives exit 0. Also:
what the image declares (user, port, volume, command, healthcheck), that the build's pip
configuration is not in it, that a read-only root filesystem with the volume mounted
works, and that a volume the image's user cannot write, or an address it cannot bind, is
one line and exit 2.

In CI (CI=true) missing tools fail the test; elsewhere they skip it."""

from __future__ import annotations

import json
import os
import re
import socket
import time

import httpx
import pytest
import trio

from dynamo.rabbitmq import broker as topology
from dynamo.version import version
from tests.support import container
from tests.support.amqp import bodies
from tests.support.service import free_port

pytestmark = pytest.mark.integration

TEST_TIMEOUT_S = 180
TOKEN_LINE = re.compile(r"generated DYNAMO_ADMIN_TOKEN for this run: (\S+)\n")
GHOST = {"style": "ghost", "inputs": {"subject": "a seal"}}
# What dispatch publishes for a ghost (contract §2).
GHOST_MESSAGE = {
    "type": "image",
    "viewer": {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"},
    "state": {"broadcast_id": 13, "screening_id": "96d1ca5c-7658-48c9-8193-9d1739854467",
              "tape_id": 124},
    "payload": {"style": "ghost", "inputs": {"subject": "a seal"}},
}
# The image's process, as it shows on the host: the venv's console script.
DYNAMO = "/opt/dynamo/bin/dynamo"
# What buildah run adds to stderr after a command that failed.
BUILDAH_LINE = re.compile(r"(subprocess exited with status \d+|Error: exit status \d+)\n")


def dynamo_stderr(answer) -> str:
    return BUILDAH_LINE.sub("", answer.stderr)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    missing = container.missing_tools()
    if missing:
        message = f"container tools missing: {', '.join(missing)} (.ci/run installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    container.make_base_image()
    seconds = container.build(tmp_path_factory.mktemp("build"))
    print(f"\nimage built in {seconds:.1f} s")
    return container.IMAGE


@pytest.fixture
def a_container(image):
    made = container.Container(image)
    yield made
    made.remove()


def test_the_image_declares_user_port_volume_command_and_healthcheck(image, a_container):
    config = container.inspect(image)["Docker"]["config"]
    assert config["User"] == container.IMAGE_USER
    assert "DYNAMO_HTTP_ADDR=0.0.0.0:5008" in config["Env"]
    assert f"DYNAMO_DATA_DIR={container.DATA_VOLUME}" in config["Env"]
    assert list(config["ExposedPorts"]) == ["5008/tcp"]
    assert list(config["Volumes"]) == [container.DATA_VOLUME]
    assert config["Cmd"] == ["dynamo"] and not config.get("Entrypoint")
    assert config["Healthcheck"]["Test"] == ["CMD", "dynamo", "healthcheck"]
    checks = a_container.run(
        "sh", "-c",
        f"id -u; stat -c %u {container.DATA_VOLUME}; dynamo --version; "
        "python -c 'import pytest' 2>/dev/null || echo no-test-extras; "
        "python -m pip --version >/dev/null 2>&1 || echo no-pip; "
        "test -e /src || test -e /wheels || echo no-build-files",
    )
    assert checks.stdout.split("\n")[:6] == [
        str(container.IMAGE_UID), str(container.IMAGE_UID), f"dynamo {version()}",
        "no-test-extras", "no-pip", "no-build-files",
    ], checks


def test_nothing_the_build_mounted_is_left_in_the_image(image, a_container):
    """The build's pip configuration and the paths it names were mounted, not copied: the
    image holds of them only what its base holds."""
    _, paths = container.pip_configuration()
    listing = ["sh", "-c", 'for p in "$@"; do test -e "$p" && echo "$p"; done', "sh",
               container.BUILD_PIP_CONF, *paths]
    base = container.Container(container.BASE)
    try:
        in_base = base.run(*listing, user="root").stdout
    finally:
        base.remove()
    assert a_container.run(*listing).stdout == in_base


async def a_ghost_is_served(url: str, log) -> None:
    while not (match := TOKEN_LINE.search(log.read_text(errors="replace"))):
        await trio.sleep(0.05)
    headers = {"authorization": f"Bearer {match.group(1)}"}
    async with httpx.AsyncClient(base_url=url) as client:
        answer = await client.post("/requests", json=GHOST, headers=headers)
        assert answer.status_code == 202, answer.text
        while (request := (await client.get(answer.json()["url"], headers=headers)).json())[
            "state"
        ] != "succeeded":
            assert request["state"] != "failed", request
            await trio.sleep(0.1)
        picture = await client.get(request["images"][0]["url"])
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
        status = (await client.get("/status", headers=headers)).json()
        assert status["version"] == version()


async def ready_after(url: str, started: float, made: container.Container, log) -> float:
    async with httpx.AsyncClient() as client:
        while True:
            assert made.process.poll() is None, log.read_text()
            try:
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)


async def stopped_after_sigterm(made: container.Container) -> tuple[int, float]:
    started = time.monotonic()
    made.terminate(DYNAMO)
    while made.process.poll() is None:
        await trio.sleep(0.02)
    return made.process.returncode, time.monotonic() - started


async def test_the_image_serves_a_ghost_and_stops_on_sigterm(a_container, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "container.log"
    with trio.fail_after(TEST_TIMEOUT_S):
        started = time.monotonic()
        a_container.start("dynamo", log=log, env={"DYNAMO_HTTP_ADDR": f"127.0.0.1:{port}"})
        ready_s = await ready_after(url, started, a_container, log)
        await a_ghost_is_served(url, log)
        healthy = a_container.run("dynamo", "healthcheck",
                                  env={"DYNAMO_HTTP_ADDR": f"0.0.0.0:{port}"})
        assert healthy.returncode == 0, healthy.stderr
        code, stop_s = await stopped_after_sigterm(a_container)
    print(f"\nstart to /readyz 200: {ready_s:.2f} s; SIGTERM to exit: {stop_s:.2f} s")
    assert code == 0, log.read_text()
    assert "received SIGTERM" in log.read_text()


async def test_the_image_in_production_serves_a_ghost_from_rabbitmq(
        a_container, tmp_path, rabbit, service_env):
    """The production variables (the test's RabbitMQ, PostgreSQL and fakes, on the host's
    network) make it production: no embedded default, a ghost from the queue succeeds;
    DYNAMO_LOG_FORMAT=json makes every line a JSON object."""
    port = free_port()
    log = tmp_path / "container.log"
    with trio.fail_after(TEST_TIMEOUT_S):
        await rabbit.collect(topology.RESULTS_EXCHANGE)
        a_container.start("dynamo", log=log, env={
            **service_env, "DYNAMO_HTTP_ADDR": f"127.0.0.1:{port}", "DYNAMO_LOG_FORMAT": "json",
        })
        await ready_after(f"http://127.0.0.1:{port}", time.monotonic(), a_container, log)
        await rabbit.publish(GHOST_MESSAGE)
        [result] = bodies(await rabbit.wait_for(topology.RESULTS_EXCHANGE, 1))
        assert result["outcome"] == "success", result
        code, _ = await stopped_after_sigterm(a_container)
    assert code == 0, log.read_text()
    # For log collectors: every line one JSON object.
    messages = [json.loads(line)["message"] for line in log.read_text().splitlines()]
    assert f"dynamo {version()} starting (production profile)" in messages
    assert not [message for message in messages if "not configured" in message]


async def test_a_read_only_root_with_the_volume_mounted_works_as_pid_1(a_container, tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir(mode=0o700)
    os.chown(volume, container.IMAGE_UID, container.IMAGE_UID)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "container.log"
    with trio.fail_after(TEST_TIMEOUT_S):
        a_container.start_read_only(
            "sh", "-c", 'touch /written 2>/dev/null && echo ROOT-WRITABLE; echo "PID $$"; exec dynamo',
            log=log, volume=volume, env={"DYNAMO_HTTP_ADDR": f"127.0.0.1:{port}"},
        )
        await ready_after(url, time.monotonic(), a_container, log)
        await a_ghost_is_served(url, log)
        code, _ = await stopped_after_sigterm(a_container)
    assert "ROOT-WRITABLE" not in log.read_text()
    assert "PID 1\n" in log.read_text()  # SIGTERM reached dynamo as PID 1
    assert code == 0, log.read_text()
    assert (volume / "postgres").is_dir() and (volume / "images").is_dir()


def test_a_volume_of_another_uid_is_one_line_and_exit_2(a_container, tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir(mode=0o700)
    os.chown(volume, 4242, 4242)
    answer = a_container.run("dynamo", volumes=[f"{volume}:{container.DATA_VOLUME}"],
                             env={"DYNAMO_HTTP_ADDR": f"127.0.0.1:{free_port()}"})
    assert answer.returncode == 2, answer
    assert dynamo_stderr(answer) == (
        f"dynamo: the data directory {container.DATA_VOLUME} (DYNAMO_DATA_DIR) is not "
        f"writable by uid {container.IMAGE_UID}: Permission denied (it belongs to uid 4242); "
        f"give it to uid {container.IMAGE_UID} or set DYNAMO_DATA_DIR to a directory it "
        "can write\n"
    )


def test_an_address_that_cannot_be_bound_is_one_line_and_exit_2(a_container):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        answer = a_container.run("dynamo", env={"DYNAMO_HTTP_ADDR": f"127.0.0.1:{port}"})
    assert answer.returncode == 2, answer
    assert dynamo_stderr(answer) == (
        f"dynamo: DYNAMO_HTTP_ADDR=127.0.0.1:{port} cannot be bound: Address already in use\n"
    )
    privileged = a_container.run("dynamo", env={"DYNAMO_HTTP_ADDR": "127.0.0.1:80"})
    assert privileged.returncode == 2, privileged
    assert dynamo_stderr(privileged) == (
        "dynamo: DYNAMO_HTTP_ADDR=127.0.0.1:80 cannot be bound: Permission denied\n"
    )
