"""Capacity: requests completed per second end to end when nothing outside dynamo limits
it, and where the time goes.

The fake OpenAI answers at once, no rate limit applies (DYNAMO_IMAGES_PER_MINUTE and
DYNAMO_TEXT_REQUESTS_PER_MINUTE huge), images are real (the fake's 1024x1024 PNGs become
JPEGs and keyed WEBPs) and go to moto's S3; RabbitMQ and PostgreSQL are the real ones,
and the auth + ledger fakes move points. `--ghosts` + `--friends` requests are published
at once; a request is complete when its result is on `generation-results`.

CPU seconds are shown per process group (dynamo; this process, which serves the fakes and
moto; PostgreSQL; RabbitMQ) to tell which one is the bottleneck on this 2-core machine.
`--profile py-spy` (default when py-spy is installed: `pip install -e '.[bench]'`) samples
dynamo with py-spy and prints where its threads spend their time; `--profile cprofile`
runs it under `python -m cProfile` instead (main thread only, large overhead), and
`--profile cpu` the same timed by CPU time (`bench/cpu_profile.py`). Per request: dynamo's
CPU, this database's PostgreSQL backends' CPU and transactions, and with
`--count-statements` the statements and round trips (`bench/pg_cost.py`).

    python -m bench.capacity [--ghosts 100 --friends 100] [--profile py-spy|cprofile|cpu|none]
    python -m bench.capacity --processes 2 --profile none     # a fleet of two

`--processes N` runs N dynamo processes on the one database and vhost (competing
consumers, one shared OpenAI budget); their CPU is summed under "dynamo".
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import trio

from bench import harness, pg_cost
from dynamo.rabbitmq import broker as topology
from tests.fakes import CHROMA_RGB

# py-spy's samples per second; --nonblocking so that it does not pause dynamo to sample.
PY_SPY_RATE = 200
TOP = 25


def group_of(process: psutil.Process, dynamo_pids: set[int]) -> str | None:
    name = process.info["name"] or ""
    if process.pid in dynamo_pids:
        return "dynamo"
    if process.pid == os.getpid():
        return "bench (fakes, moto S3)"
    if name.startswith("postgres"):
        return "PostgreSQL"
    if name.startswith("beam"):
        return "RabbitMQ"
    if name.startswith("py-spy"):
        return "py-spy"
    return None


def cpu_by_process(dynamo_pids: set[int]) -> dict[int, tuple[str, float]]:
    """{pid: (group, CPU seconds so far)} for the processes of the groups above."""
    found = {}
    for process in psutil.process_iter(["name"]):
        try:
            group = group_of(process, dynamo_pids)
            if group is not None:
                times = process.cpu_times()
                found[process.pid] = (group, times.user + times.system)
        except psutil.Error:
            continue
    return found


def cpu_deltas(before, after) -> dict[str, float]:
    """CPU seconds per group between two snapshots (a process started since counts whole)."""
    totals: dict[str, float] = collections.defaultdict(float)
    for pid, (group, seconds) in after.items():
        totals[group] += seconds - before.get(pid, (group, 0.0))[1]
    return totals


async def main(args) -> None:
    out = Path(args.out or tempfile.mkdtemp(prefix="dynamo-capacity-"))
    out.mkdir(parents=True, exist_ok=True)
    profile = args.profile
    if args.processes > 1 and profile != "none":
        print("profiling one process of a fleet would mislead: running without a profile")
        profile = "none"
    if profile == "py-spy" and not shutil.which("py-spy", path=str(Path(sys.executable).parent)):
        print("py-spy is not installed (pip install py-spy): running without a profile")
        profile = "none"
    python_args = {
        "cprofile": ["-m", "cProfile", "-o", str(out / "dynamo.prof")],
        "cpu": [str(Path(__file__).with_name("cpu_profile.py")), str(out / "dynamo.prof")],
    }.get(profile, [])
    bodies = [harness.ghost(f"a seal number {n}") for n in range(args.ghosts)] + [
        harness.friend(f"caterpillar number {n}", harness.FRIEND_COLORS[n % len(harness.FRIEND_COLORS)])
        for n in range(args.friends)]
    total = len(bodies)
    async with harness.open_environment() as env:
        if args.realistic_images:
            harness.use_realistic_images(env.openai)
            # Made before the clock starts: the ghost's picture and every background's.
            for color in (None, *CHROMA_RGB):
                background = f"a solid {color} background suitable for chroma keying"
                env.openai.png_for(background if color else "a ghostly image", (1024, 1024))
        alerts = await env.watch(topology.ONSCREEN_EXCHANGE)
        results = await env.watch(topology.RESULTS_EXCHANGE)
        counter, database_env = None, {}
        if args.count_statements:
            counter = await env.nursery.start(pg_cost.StatementCounter().serve)
            database_env = {"DATABASE_URL": counter.dsn(env.database)}
        services = await env.start_services(
            args.processes,
            python_args=python_args,
            DYNAMO_IMAGES_PER_MINUTE=harness.UNLIMITED_PER_MINUTE,
            DYNAMO_TEXT_REQUESTS_PER_MINUTE=harness.UNLIMITED_PER_MINUTE,
            **database_env,
            **dict(setting.split("=", 1) for setting in args.env))
        backends = await env.nursery.start(pg_cost.BackendCpu(env.database).follow)
        service, pids = services[0], {each.pid for each in services}
        spy = None
        if profile == "py-spy":
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(service.pid),
                 "--rate", str(PY_SPY_RATE), "--nonblocking", "--threads", "--format", "raw",
                 "--output", str(out / "dynamo.pyspy.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            await trio.sleep(1.0)  # py-spy attaches
        await trio.sleep(2.0)  # startup's own queries settle, and their statistics
        cpu_before, machine_before = cpu_by_process(pids), psutil.cpu_times()
        backends.reset()
        xacts_before = await pg_cost.transactions(env.database)
        statements_before = counter.snapshot() if counter else None
        started = trio.current_time()
        for body in bodies:
            await env.publish(body)
        published = trio.current_time()
        with trio.fail_after(600):
            await alerts.wait_for(total)
            await results.wait_for(total)
        done = trio.current_time()
        cpu_after, machine_after = cpu_by_process(pids), psutil.cpu_times()
        backend_s = backends.seconds()
        statements_after = counter.snapshot() if counter else None
        await trio.sleep(1.5)  # pg_stat_database is flushed about once a second
        xacts = await pg_cost.transactions(env.database) - xacts_before
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            await trio.to_thread.run_sync(spy.wait)
        for each in services:
            await each.stop()

    outcomes = collections.Counter(
        __import__("json").loads(m.body)["outcome"] for _, m in results.arrived)
    wall = done - started
    rows = [
        ("requests (ghosts + friends)", f"{total} ({args.ghosts} + {args.friends})"),
        ("outcomes", dict(outcomes)),
        ("publishing them took", f"{published - started:.2f} s"),
        ("first publish → last alert", f"{alerts.arrived[-1][0] - started:.2f} s"),
        ("first publish → last result", f"{wall:.2f} s"),
        ("completed per second", f"{total / wall:.1f}"),
    ]
    images = "~1.7 MB" if args.realistic_images else "~8 KB"
    harness.print_table(f"capacity, zero-latency OpenAI, no rate limit, {images} PNGs, "
                        f"{args.processes} process(es) (profile: {profile})",
                        ("", ""), rows)
    busy = sum(getattr(machine_after, f) - getattr(machine_before, f)
               for f in ("user", "system", "nice", "irq", "softirq"))
    used = cpu_deltas(cpu_before, cpu_after)
    rows = [(group, f"{seconds:.1f} s", f"{seconds / wall:.2f}")
            for group, seconds in sorted(used.items(), key=lambda item: -item[1])]
    others = busy - sum(used.values())
    rows.append(("anything else (other jobs on the machine)", f"{others:.1f} s", f"{others / wall:.2f}"))
    rows.append(("whole machine", f"{busy:.1f} s", f"{busy / wall:.2f} of {psutil.cpu_count()}"))
    harness.print_table("CPU during the run", ("", "CPU time", "cores busy"), rows)
    report_per_request(total, used.get("dynamo", 0.0), backend_s, xacts,
                       statements_before, statements_after)

    if profile == "py-spy":
        summarize_py_spy(out / "dynamo.pyspy.txt", spy)
    elif profile in ("cprofile", "cpu"):
        summarize_cprofile(out / "dynamo.prof")
    print(f"\nprofile files in {out}")


def report_per_request(total, dynamo_s, backend_s, xacts, before, after) -> None:
    """dynamo's and PostgreSQL's CPU, transactions and statements, per request."""
    rows = [
        ("dynamo CPU", f"{dynamo_s / total * 1000:.1f} ms"),
        ("PostgreSQL CPU (this database's backends)", f"{backend_s / total * 1000:.1f} ms"),
        ("transactions (pg_stat_database commits + rollbacks, as flushed)", f"{xacts / total:.1f}"),
    ]
    if before is not None:
        statements = after[0] - before[0]
        rows += [
            ("statements (Query and Execute messages)", f"{sum(statements.values()) / total:.1f}"),
            ("round trips (Query and Sync messages)", f"{(after[1] - before[1]) / total:.1f}"),
            ("statements prepared (Parse messages)", f"{(after[2] - before[2]) / total:.1f}"),
            ("transactions (counted on the wire: back to idle after statements)",
             f"{(after[4] - before[4]) / total:.1f}"),
        ]
        rows += [(f"  {word}", f"{count / total:.2f}") for word, count in statements.most_common()]
    harness.print_table("per request", ("", ""), rows)
    if before is not None:
        texts = after[3] - before[3]
        harness.print_table("statements per request, by their opening", ("", ""),
                            [(text, f"{count / total:.2f}") for text, count in texts.most_common(40)])


FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def short(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match.group('function')} ({path})"


def summarize_py_spy(path: Path, spy) -> None:
    if not path.exists():
        error = spy.stderr.read().decode(errors="replace") if spy and spy.stderr else ""
        print(f"\npy-spy wrote no profile: {error.strip()[-500:]}")
        return
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else ""
        frames = [f for f in frames if not f.startswith(("thread", "process"))]
        if not frames:
            continue
        samples += count
        threads["main thread (event loop)" if "MainThread" in thread or thread.endswith("main")
                else "worker threads"] += count
        own[short(frames[-1])] += count
        for frame in set(map(short, frames)):
            inclusive[frame] += count
        areas[area_of(frames)] += count
    if not samples:
        print("\npy-spy recorded no samples")
        return
    print(f"\npy-spy: {samples} samples at {PY_SPY_RATE}/s of non-idle threads "
          f"(= {samples / PY_SPY_RATE:.1f} thread-seconds busy)")
    harness.print_table("busy samples by thread", ("", "share"),
                        [(t, f"{n / samples:.1%}") for t, n in threads.most_common()])
    harness.print_table("busy samples by area (innermost recognised frame)", ("", "share"),
                        [(a, f"{n / samples:.1%}") for a, n in areas.most_common()])
    harness.print_table(f"top {TOP} functions, own time", ("", "share"),
                        [(f, f"{n / samples:.1%}") for f, n in own.most_common(TOP)])
    harness.print_table(f"top {TOP} functions, inclusive (in the stack)", ("", "share"),
                        [(f, f"{n / samples:.1%}") for f, n in inclusive.most_common(TOP * 2)
                         if not f.startswith(("<module>", "run (", "_run ", "cli ", "main "))][:TOP])


# Where a busy sample is, by the innermost frame from a library we recognise.
AREAS = (
    ("imaging (PIL, numpy)", ("PIL/", "numpy/", "dynamo/images/processing.py")),
    ("S3 (boto3/botocore)", ("boto3/", "botocore/", "s3transfer/", "dynamo/images/storage.py")),
    ("RabbitMQ (aio-pika, aiormq, pamqp)", ("aio_pika/", "aiormq/", "pamqp/")),
    ("PostgreSQL (asyncpg)", ("asyncpg/",)),
    ("OpenAI SDK, pydantic", ("openai/", "pydantic")),
    ("HTTP (httpx, httpcore, h11, hypercorn)", ("httpx/", "httpcore/", "h11/", "hypercorn/", "quart")),
    ("logging", ("logging/", "dynamo/logs.py")),
    ("JSON", ("json/",)),
    ("trio-asyncio, asyncio", ("trio_asyncio/", "asyncio/")),
    ("trio", ("trio/",)),
    ("dynamo, actors", ("dynamo/", "actors/")),
)


def area_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for area, markers in AREAS:
            if any(marker in frame for marker in markers):
                return area
    return "other"


def summarize_cprofile(path: Path) -> None:
    if not path.exists():
        print("\ncProfile wrote no profile (dynamo did not exit cleanly?)")
        return
    print("\ncProfile (main thread only), top functions by own time:")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(TOP)
    stats.sort_stats("cumulative").print_stats(TOP * 2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ghosts", type=int, default=100)
    parser.add_argument("--friends", type=int, default=100)
    parser.add_argument("--processes", type=int, default=1, help="dynamo processes (a fleet)")
    parser.add_argument("--profile", choices=("py-spy", "cprofile", "cpu", "none"), default="py-spy",
                        help="cpu: cProfile timed by the main thread's CPU time (bench/cpu_profile.py)")
    parser.add_argument("--realistic-images", action="store_true",
                        help="~1.7 MB PNGs, as large as real generations (default: the fake's ~8 KB)")
    parser.add_argument("--count-statements", action="store_true",
                        help="relay dynamo's PostgreSQL connections through a counter of "
                             "statements and round trips (bench/pg_cost.py)")
    parser.add_argument("--out", help="directory for the profile files (default: a temp dir)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="one more variable for dynamo, e.g. DYNAMO_IMAGE_MODERATION=off")
    harness.run(main, parser.parse_args())
