"""What every benchmark needs: the real RabbitMQ and PostgreSQL (a throwaway virtual host
and database, removed afterwards), the fakes of tests/fakes served on 127.0.0.1 in this
process (OpenAI, auth, ledger, moto's S3), dynamo as `python run.py` in a subprocess
wired to all of them, a watcher that stamps each message dynamo publishes as it arrives,
and small helpers for percentiles and tables.

Every time here is `trio.current_time()` of this process, the clock the fakes stamp
their calls with, so a publish, a fake's call and an alert's arrival compare directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import aio_pika
import psutil
import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from dynamo.rabbitmq import broker as topology
from tests.fakes import FakeAuth, FakeLedger, FakeOpenAI, moto_s3
from tests.support import infra
from tests.support.amqp import Rabbit
from tests.support.service import ROOT, ServiceProcess

# Points enough for any run: one viewer pays 200 per request.
PLENTY_OF_POINTS = 10**12
# dynamo's startup, up to /readyz.
READY_S = 60.0
# SIGTERM, then this long for a clean exit before SIGKILL.
STOP_S = 30.0
# A limit so high that pacing never delays a call: the benchmark measures something else.
UNLIMITED_PER_MINUTE = "10000000"
BROADCASTER_TOKEN = "bench-broadcaster-token"
# Standard deviations of the noise that makes the fake's pictures real-sized (PNG does not
# compress noise): strong on the figure, faint on a friend's background (keying tolerates it).
REALISTIC_FIGURE_NOISE = 24
REALISTIC_BACKGROUND_NOISE = 2

VIEWER = {"twitch_user_id": "90790024", "twitch_display_name": "wasabimilkshake"}
# Contract §3's example ghost, as dispatch publishes it.
GOLDEN_GHOST = {
    "type": "image",
    "viewer": VIEWER,
    "state": {"broadcast_id": 13, "screening_id": "96d1ca5c-7658-48c9-8193-9d1739854467",
              "tape_id": 124},
    "payload": {"style": "ghost", "inputs": {"subject": "a seal"}},
}
NO_STATE = {"broadcast_id": 0, "screening_id": "00000000-0000-0000-0000-000000000000",
            "tape_id": 0}
FRIEND_COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta")


def ghost(subject: str) -> dict:
    return {"type": "image", "viewer": VIEWER, "state": NO_STATE,
            "payload": {"style": "ghost", "inputs": {"subject": subject}}}


def friend(subject: str, color: str) -> dict:
    return {"type": "image", "viewer": VIEWER, "state": NO_STATE,
            "payload": {"style": "friend", "inputs": {"color": color, "subject": subject}}}


# ---- dynamo ------------------------------------------------------------------------


class BenchService(ServiceProcess):
    """`python run.py`, optionally behind a wrapper (cProfile), from any checkout."""

    def __init__(self, env: dict[str, str], workdir: Path, *,
                 python_args: Sequence[str] = (), root: Path = ROOT):
        super().__init__(env, workdir)
        self.python_args = list(python_args)
        self.root = Path(root)

    def start(self) -> None:
        self.starts += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, *self.python_args, str(self.root / "run.py")], cwd=self.workdir,
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system

    async def stop(self) -> int | None:
        """SIGTERM and a clean exit (so that a profiler writes its file), else SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        try:
            return await self.terminate(timeout_s=STOP_S)
        except trio.TooSlowError:
            self.kill()
            return None


# ---- the environment ---------------------------------------------------------------


@dataclasses.dataclass
class Environment:
    rabbit: Rabbit
    openai: FakeOpenAI
    auth: FakeAuth
    ledger: FakeLedger
    s3: object
    database: str
    vhost: str
    workdir: Path
    nursery: trio.Nursery
    services: list[BenchService] = dataclasses.field(default_factory=list)

    def service_env(self) -> dict[str, str]:
        """dynamo's production environment, wired to this run's systems."""
        return {
            "DYNAMO_PROFILE": "production",
            "AMQP_URL": infra.amqp_url(self.vhost),
            "DATABASE_URL": infra.pg_dsn(self.database),
            **self.openai.env(),
            **self.auth.env(),
            **self.ledger.env(),
            **self.s3.env(),
        }

    def service(self, *, python_args: Sequence[str] = (), root: Path | None = None,
                **env: str) -> BenchService:
        service = BenchService({**self.service_env(), **env},
                               self.workdir / f"dynamo{len(self.services)}",
                               python_args=python_args, root=root or service_root())
        self.services.append(service)
        return service

    async def start_service(self, **kwargs) -> BenchService:
        service = self.service(**kwargs)
        service.start()
        with trio.fail_after(READY_S):
            await service.wait_ready()
        return service

    async def start_services(self, count: int, **kwargs) -> list[BenchService]:
        """A fleet: `count` processes with the same configuration, started together."""
        services = [self.service(**kwargs) for _ in range(count)]
        for service in services:
            service.start()
        with trio.fail_after(READY_S * count):
            for service in services:
                await service.wait_ready()
        return services

    async def metrics(self, service: BenchService) -> dict[tuple[str, tuple], float]:
        """A process's /metrics: {(sample name, sorted labels): value}."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        async with httpx.AsyncClient() as client:
            text = (await client.get(f"{service.url}/metrics")).text
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    async def watch(self, exchange: str) -> Watcher:
        watcher = Watcher(self.rabbit, exchange)
        await self.nursery.start(watcher.run)
        return watcher

    async def publish(self, body: dict) -> float:
        """Publishes like dispatch (persistent, confirmed); returns when it was sent."""
        sent_at = trio.current_time()
        await self.rabbit.publish(body)
        return sent_at

    async def queue_ready(self) -> int:
        """Messages ready in dynamo's input queue, from a fresh passive declare (aio-pika's
        robust channel would answer a repeated one from its cache)."""
        queue = await aio_as_trio(self.rabbit.channel.declare_queue)(
            topology.REQUESTS_QUEUE, durable=True, passive=True, robust=False)
        return (await aio_as_trio(queue.declare)()).message_count

    async def status(self, service: BenchService) -> dict:
        """dynamo's GET /status, as the broadcaster."""
        import httpx

        self.auth.add_broadcaster(BROADCASTER_TOKEN, "1000", "broadcaster")
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"{service.url}/status",
                                      headers={"authorization": f"Bearer {BROADCASTER_TOKEN}"})
        answer.raise_for_status()
        return answer.json()

    async def stored_requests(self) -> int:
        import asyncpg

        conn = await aio_as_trio(asyncpg.connect)(infra.pg_dsn(self.database))
        try:
            return await aio_as_trio(conn.fetchval)("select count(*) from dynamo.image_request")
        finally:
            await aio_as_trio(conn.close)()


def service_root() -> Path:
    """The checkout whose run.py is benchmarked: this one, or $DYNAMO_BENCH_ROOT (to compare
    a patched copy against the same harness)."""
    return Path(os.environ.get("DYNAMO_BENCH_ROOT") or ROOT)


@contextlib.asynccontextmanager
async def open_environment(*, keep_workdir: bool = False):
    """RabbitMQ vhost, PostgreSQL database, fakes and S3 for one run; all removed after."""
    workdir = Path(tempfile.mkdtemp(prefix="dynamo-bench-"))
    async with trio_asyncio.open_loop():
        database = await infra.create_database()
        vhost = await trio.to_thread.run_sync(infra.create_vhost)
        environment = None
        try:
            with moto_s3() as s3:
                async with trio.open_nursery() as nursery:
                    openai = FakeOpenAI()
                    auth = FakeAuth()
                    ledger = FakeLedger(auth)
                    ledger.default_balance = PLENTY_OF_POINTS
                    for fake in (openai, auth, ledger):
                        await nursery.start(fake.serve)
                    record_answer_times(openai)
                    rabbit = await Rabbit.connect(infra.amqp_url(vhost))
                    environment = Environment(rabbit, openai, auth, ledger, s3, database, vhost,
                                              workdir, nursery)
                    try:
                        yield environment
                    finally:
                        with trio.CancelScope(shield=True):
                            for service in environment.services:
                                await service.stop()
                            with trio.move_on_after(5):
                                await rabbit.close()
                        nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for service in environment.services if environment else ():
                    service.kill()
                await infra.drop_database(database)
                await trio.to_thread.run_sync(infra.delete_vhost, vhost)
                if not keep_workdir:
                    shutil.rmtree(workdir, ignore_errors=True)


def record_answer_times(fake) -> None:
    """Stamps `call.extra["answered_at"]` when a fake's normal answer is ready (after its
    latency); refused calls (429, scripted) keep only their arrival time."""
    receive = fake.receive

    async def timed_receive(endpoint, respond, **kwargs):
        async def timed(call):
            response = await respond(call)
            call.extra["answered_at"] = trio.current_time()
            return response

        return await receive(endpoint, timed, **kwargs)

    fake.receive = timed_receive


def hide_rate_limit_headers(fake: FakeOpenAI) -> None:
    """The fake answers like an API without x-ratelimit-* headers; 429s keep retry-after."""
    check_rate = fake.check_rate

    def without_limit_headers(call):
        refusal = check_rate(call)
        headers = call.extra.get("headers", {})
        call.extra["headers"] = {k: v for k, v in headers.items() if not k.startswith("x-ratelimit-")}
        return refusal

    fake.check_rate = without_limit_headers


def use_realistic_images(fake: FakeOpenAI) -> None:
    """The fake's pictures become about as large as real 1024x1024 generations (~1.7 MB
    of PNG instead of ~8 KB): noise on the figure, faint noise on a friend's background
    (which still keys out); a transparent picture keeps its transparent pixels clear. One
    picture per color, made once; the fake then encodes it as each request asks."""
    import io

    import numpy as np
    from PIL import Image

    made: dict[bytes, bytes] = {}

    def noisy(make):
        def picture(prompt: str, size: tuple[int, int]) -> bytes:
            plain = make(prompt, size)
            if plain not in made:
                image = Image.open(io.BytesIO(plain))
                pixels = np.asarray(image.convert("RGBA")).astype(np.int16)
                rgb, alpha = pixels[..., :3], pixels[..., 3]
                background = np.all(rgb == rgb[0, 0], axis=-1) | (alpha == 0)
                amplitude = np.where(background, REALISTIC_BACKGROUND_NOISE, REALISTIC_FIGURE_NOISE)
                noise = np.random.default_rng(0).standard_normal(rgb.shape) * amplitude[..., None]
                rgb = np.clip(rgb + noise.astype(np.int16), 0, 255).astype(np.uint8)
                mode = "RGBA" if image.mode == "RGBA" else "RGB"
                channels = np.dstack([rgb, alpha.astype(np.uint8)]) if mode == "RGBA" else rgb
                buffer = io.BytesIO()
                Image.fromarray(channels, mode).save(buffer, "PNG")
                made[plain] = buffer.getvalue()
            return made[plain]

        return picture

    fake.png_for = noisy(fake.png_for)
    fake.transparent_png_for = noisy(fake.transparent_png_for)


class Watcher:
    """Consumes an exclusive queue bound to `exchange`; stamps each message on arrival."""

    def __init__(self, rabbit: Rabbit, exchange: str):
        self._rabbit = rabbit
        self._exchange = exchange
        self.arrived: list[tuple[float, aio_pika.abc.AbstractIncomingMessage]] = []
        self._changed = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        channel = await aio_as_trio(self._rabbit.connection.channel)()
        queue = await aio_as_trio(channel.declare_queue)("", exclusive=True)
        await aio_as_trio(queue.bind)(self._exchange)
        iterator = queue.iterator(no_ack=True)
        task_status.started()
        async with aio_as_trio(iterator):
            async for message in aio_as_trio(iterator):
                self.arrived.append((trio.current_time(), message))
                self._changed.set()
                self._changed = trio.Event()

    async def wait_for(self, count: int) -> list[tuple[float, aio_pika.abc.AbstractIncomingMessage]]:
        while len(self.arrived) < count:
            await self._changed.wait()
        return self.arrived[:count]


# ---- figures -----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the nearest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def most_in_any_window(times: Sequence[float], window_s: float = 60.0) -> int:
    ordered, most, first = sorted(times), 0, 0
    for last, at in enumerate(ordered):
        while ordered[first] <= at - window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds == seconds else "-"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for number, row in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if number == 0:
            print("  " + "  ".join("-" * w for w in widths))


def run(main: Callable, *args) -> None:
    """trio.run with Ctrl-C stopping the benchmark (and so its subprocess) cleanly."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # moto's server logs every request; the figures are what this prints.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    trio.run(main, *args)
