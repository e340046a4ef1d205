"""dynamo's image as CI builds and runs it. Docker's daemon does not run on the CI
machines, so the image is built with buildah on a local Debian base
(`.ci/local-base-image`) and run with `buildah run` under chroot isolation, on the host's
network (`podman run` is refused: crun cannot set rlimits there).

The machine's pip configuration (its files and PIP_* variables, as `pip config list`
reports them) reaches pip inside the build as one file mounted for the build only, with
every local path it names (CA bundle, find-links, constraints; a file:// index's parent,
which holds the files its pages link to) mounted read-only at the same place: nothing of it is copied into a layer or written in the
project."""

from __future__ import annotations

import ast
import configparser
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/dynamo:ci"
BASE = "localhost/debian-python:bookworm"
TOOLS = ("buildah", "podman", "debootstrap")
# The image's user (Containerfile) and where its pip configuration is mounted in the build.
IMAGE_USER = "dynamo"
IMAGE_UID = 10001
BUILD_PIP_CONF = "/run/dynamo-build/pip.conf"
DATA_VOLUME = "/var/lib/dynamo"
BUILD_TIMEOUT_S = 900


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def make_base_image() -> None:
    subprocess.run([str(ROOT / ".ci" / "local-base-image")], check=True, timeout=600)


def pip_configuration() -> tuple[str, list[str]]:
    """The machine's pip configuration as one file's text, and the local paths it names."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        check=True, capture_output=True, text=True,
    ).stdout
    files, variables = {}, {}
    for line in listed.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if key and key != "config-file":  # the file is what this makes
            target = variables if section == ":env:" else files
            target[(("global" if section == ":env:" else section), key)] = ast.literal_eval(value)
    parser = configparser.ConfigParser(interpolation=None)
    for (section, key), value in {**files, **variables}.items():
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key, value)
    paths = []
    for section in parser.sections():
        for value in parser[section].values():
            for word in value.split():
                path = word.removeprefix("file://")
                if word.startswith("file://"):
                    # A local index's pages link to files beside it (root/simple, root/files).
                    path = os.path.dirname(path.rstrip("/"))
                if path.startswith("/") and os.path.exists(path) and path not in paths:
                    paths.append(path)
    text = []
    for section in parser.sections():
        text.append(f"[{section}]")
        text += [f"{key} = {value}" for key, value in parser[section].items()]
    return "\n".join(text) + "\n", paths


def build(workdir: Path, *, tag: str = IMAGE, cache: bool = True) -> float:
    """Builds the image from the checkout; the seconds it took. Only the image's own
    layers stay cached between runs (the build stage is pruned)."""
    config_text, paths = pip_configuration()
    pip_conf = workdir / "pip.conf"
    pip_conf.write_text(config_text)
    volumes = [f"--volume={pip_conf}:{BUILD_PIP_CONF}:ro"]
    volumes += [f"--volume={path}:{path}:ro" for path in paths]
    started = time.monotonic()
    subprocess.run(
        ["buildah", "bud", "--isolation=chroot", "--layers", "--format=docker",
         *([] if cache else ["--no-cache"]),
         f"--build-arg=BASE={BASE}", f"--build-arg=PIP_CONFIG_FILE={BUILD_PIP_CONF}",
         *volumes, f"--tag={tag}", str(ROOT)],
        check=True, timeout=BUILD_TIMEOUT_S, stdout=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - started
    # Earlier builds' images and the build stage are dangling now: without this, each
    # change to the code would leave some 500 MB in the machine's image storage.
    subprocess.run(["buildah", "rmi", "--prune"], check=True, capture_output=True)
    return seconds


def inspect(tag: str = IMAGE) -> dict:
    answer = subprocess.run(["buildah", "inspect", "--type=image", tag],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(answer)


class Container:
    """One `buildah from` of the image; `start` runs a command in it like the image's
    CMD would run (its user, environment and working directory)."""

    def __init__(self, tag: str = IMAGE):
        self.name = f"dynamo-ci-{uuid.uuid4().hex[:8]}"
        subprocess.run(["buildah", "from", f"--name={self.name}", tag],
                       check=True, capture_output=True)
        self.root = subprocess.run(["buildah", "mount", self.name], check=True,
                                   capture_output=True, text=True).stdout.strip()
        self.process: subprocess.Popen | None = None

    def run(self, *command: str, user: str = IMAGE_USER, env: dict[str, str] | None = None,
            volumes: list[str] = (), timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self._command(command, user, env or {}, volumes),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *command: str, log: Path, user: str = IMAGE_USER,
              env: dict[str, str] | None = None, volumes: list[str] = ()) -> None:
        self._log = open(log, "wb")
        self.process = subprocess.Popen(self._command(command, user, env or {}, volumes),
                                        stdout=self._log, stderr=subprocess.STDOUT)

    def start_read_only(self, *command: str, log: Path, volume: Path,
                        env: dict[str, str] | None = None) -> None:
        """Runs `command` as the image's user on the image's root filesystem mounted
        read-only, with `volume` as its data volume: `docker run --read-only -v` as far as
        the file system goes (buildah run has no --read-only). Private mount and PID
        namespaces: the command is PID 1, as in a container runtime; /dev is the host's."""
        config = inspect()["Docker"]["config"]
        root = self.root
        environment = dict(item.split("=", 1) for item in config["Env"])
        environment.update(env or {})
        script = (
            'set -e; root="$1"; volume="$2"; shift 2; '
            'mount --bind "$root" "$root"; mount -o remount,bind,ro "$root"; '
            f'mount --bind "$volume" "$root{DATA_VOLUME}"; '
            'mount -t proc proc "$root/proc"; mount --rbind /dev "$root/dev"; '
            f'exec chroot --userspec={IMAGE_UID}:{IMAGE_UID} "$root" "$@"'
        )
        inner = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in environment.items()),
                 "/bin/sh", "-c", f'cd {config["WorkingDir"]} && exec "$@"', "sh", *command]
        self._log = open(log, "wb")
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--propagation=private",
             "sh", "-c", script, "sh", root,
             str(volume), *inner],
            stdout=self._log, stderr=subprocess.STDOUT)

    def _command(self, command, user, env, volumes) -> list[str]:
        return ["buildah", "run", "--isolation=chroot", "--network=host", f"--user={user}",
                *(f"--env={key}={value}" for key, value in env.items()),
                *(f"--volume={volume}" for volume in volumes),
                self.name, "--", *command]

    def inner_process(self, executable: str) -> psutil.Process:
        """The image's process: buildah does not pass signals on, so they go to it (under
        chroot isolation, a descendant of buildah's helper)."""
        top = psutil.Process(self.process.pid)
        found = []
        for process in [top, *top.children(recursive=True)]:
            try:
                if any(part.endswith(executable) for part in process.cmdline()[:2]):
                    found.append(process)
            except psutil.NoSuchProcess:
                continue
        # buildah's helper names the command too (buildah-chroot-exec dynamo): the image's
        # process is the one that started no other.
        for process in found:
            if not set(process.children(recursive=True)) & set(found):
                return process
        raise LookupError(f"no {executable} under buildah run {self.process.pid}")

    def terminate(self, executable: str) -> None:
        self.inner_process(executable).send_signal(signal.SIGTERM)

    def remove(self) -> None:
        if self.process is not None and self.process.poll() is None:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                child.kill()
            self.process.kill()
            self.process.wait(30)
        # The embedded PostgreSQL daemonizes: it outlives a killed run in the container.
        for process in psutil.process_iter(["name"]):
            try:
                if process.info["name"] == "postgres" and os.readlink(
                        f"/proc/{process.pid}/root") == self.root:
                    process.send_signal(signal.SIGQUIT)
            except (OSError, psutil.Error):
                continue
        if self.process is not None:
            self._log.close()
        subprocess.run(["buildah", "umount", self.name], capture_output=True)
        subprocess.run(["buildah", "rm", self.name], capture_output=True)
