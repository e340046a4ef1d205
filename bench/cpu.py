"""CPU per ghost and per friend: what dynamo's own process spends on one request.

Two measurements, each printed as CPU milliseconds per request:

1. **End to end**: dynamo runs as `python run.py` (production profile, no rate limit,
   zero-latency fake OpenAI, real RabbitMQ/PostgreSQL/S3/points). `--ghosts` ghosts are
   published at once and their alerts awaited; the CPU time (user + system, from
   `psutil`) dynamo's process used meanwhile, divided by their number, is the CPU per
   ghost; then the same for `--friends` friends. Everything dynamo does counts: the SDK
   parsing the base64 image, the image work, PostgreSQL and RabbitMQ clients, S3 upload.
   dynamo's idle CPU rate (heartbeats, polls) is shown too; it is not subtracted.
2. **The image step alone**, in this process with `time.process_time`: the uploader's
   `process_image` over `--repeat` runs on the exact bytes the fake OpenAI answers for
   dynamo's image request (a PNG to convert and key out before issue 9; a JPEG / a WEBP
   with alpha to check and store as they come after it, where the model supports it).

Images are as large as real 1024x1024 generations by default (`--plain-images`: the
fake's ~8 KB PNGs), since decoding and encoding cost grows with the data.

    python -m bench.cpu [--ghosts 30] [--friends 30] [--repeat 20] [--plain-images]
                        [--image-model gpt-image-2]
"""

from __future__ import annotations

import argparse
import inspect
import time

import trio

from bench import harness
from dynamo.rabbitmq import broker as topology
from tests.fakes import CHROMA_RGB

# Seconds dynamo is left alone to measure its idle CPU rate.
IDLE_S = 5.0


async def cpu_per_request(env: harness.Environment, service, alerts, bodies) -> float:
    """CPU milliseconds dynamo's process spent per request while `bodies` went through."""
    seen = len(alerts.arrived)
    before = service.cpu_seconds()
    for body in bodies:
        await env.publish(body)
    await alerts.wait_for(seen + len(bodies))
    return (service.cpu_seconds() - before) * 1000 / len(bodies)


def last_image(env: harness.Environment) -> tuple[dict, bytes]:
    """The last image call's request body, and the image bytes the fake answered it with."""
    import base64

    call = env.openai.calls_to("images")[-1]
    response = call.extra["response_json"]
    return call.body, base64.b64decode(response["data"][0]["b64_json"])


def process_image_seconds(style, raw: bytes, inputs: dict, repeat: int) -> float:
    """CPU seconds (this process) per run of the uploader's image step on `raw`."""
    from actors import uploader

    parameters = inspect.signature(uploader.process_image).parameters
    kwargs = {"inputs": inputs} if "inputs" in parameters else {}
    uploader.process_image(style, raw, **kwargs)  # warm-up: imports, caches
    started = time.process_time()
    for _ in range(repeat):
        uploader.process_image(style, raw, **kwargs)
    return (time.process_time() - started) / repeat


def record_answers(fake) -> None:
    """Keeps each image answer's JSON in `call.extra["response_json"]`."""
    import json

    receive = fake.receive

    async def recording(endpoint, respond, **kwargs):
        async def keep(call):
            response = await respond(call)
            if endpoint == "images" and response.status_code == 200:
                call.extra["response_json"] = json.loads(await response.get_data())
            return response

        return await receive(endpoint, keep, **kwargs)

    fake.receive = recording


async def main(args) -> None:
    from dynamo.domain.jobs import Style

    ghosts = [harness.ghost(f"a seal number {n}") for n in range(args.ghosts)]
    friends = [harness.friend(f"caterpillar number {n}",
                              harness.FRIEND_COLORS[n % len(harness.FRIEND_COLORS)])
               for n in range(args.friends)]
    async with harness.open_environment() as env:
        if not args.plain_images:
            harness.use_realistic_images(env.openai)
            # Made before any measurement: the ghost's picture, every background's, and
            # every friend drawn on a transparent background.
            for color in (None, *CHROMA_RGB):
                background = f"a solid {color} background suitable for chroma keying"
                env.openai.png_for(background if color else "a ghostly image", (1024, 1024))
                if color and hasattr(env.openai, "transparent_png_for"):
                    friend = f"a {color} cat, illustrated in the style of 1990s digital clip art"
                    env.openai.transparent_png_for(friend, (1024, 1024))
        record_answers(env.openai)
        alerts = await env.watch(topology.ONSCREEN_EXCHANGE)
        models = {"DYNAMO_IMAGE_MODEL": args.image_model} if args.image_model else {}
        service = await env.start_service(
            **models,
            DYNAMO_IMAGES_PER_MINUTE=harness.UNLIMITED_PER_MINUTE,
            DYNAMO_TEXT_REQUESTS_PER_MINUTE=harness.UNLIMITED_PER_MINUTE)
        # Warm-up: connections, imports, the first JPEG and WEBP encoders.
        await cpu_per_request(env, service, alerts, [harness.ghost("a warm seal"),
                                                     harness.friend("a warm cat", "yellow")])
        idle_before = service.cpu_seconds()
        await trio.sleep(IDLE_S)
        idle_ms_per_s = (service.cpu_seconds() - idle_before) * 1000 / IDLE_S
        ghost_ms = await cpu_per_request(env, service, alerts, ghosts)
        _, ghost_raw = last_image(env)
        friend_ms = await cpu_per_request(env, service, alerts, friends)
        friend_request, friend_raw = last_image(env)
        # The friend whose image that was (the prompt names its subject).
        friend_inputs = next(body["payload"]["inputs"] for body in reversed(friends)
                             if body["payload"]["inputs"]["subject"] + "," in friend_request["prompt"])
    ghost_step = process_image_seconds(Style.GHOST, ghost_raw, {"subject": "a seal"}, args.repeat)
    friend_step = process_image_seconds(Style.FRIEND, friend_raw, friend_inputs, args.repeat)
    images = "~8 KB PNGs" if args.plain_images else "images as large as real ones"
    if args.image_model:
        images += f", DYNAMO_IMAGE_MODEL={args.image_model}"
    harness.print_table(
        f"CPU per request, dynamo's process ({images}; idle: {idle_ms_per_s:.1f} ms CPU/s)",
        ("", "CPU per request", "image bytes from the API"),
        [(f"ghost, end to end ({args.ghosts})", f"{ghost_ms:.1f} ms", f"{len(ghost_raw):,} ({_kind(ghost_raw)})"),
         (f"friend, end to end ({args.friends})", f"{friend_ms:.1f} ms", f"{len(friend_raw):,} ({_kind(friend_raw)})"),
         (f"ghost, image step alone ({args.repeat} runs)", f"{ghost_step * 1000:.3f} ms", ""),
         (f"friend, image step alone ({args.repeat} runs)", f"{friend_step * 1000:.3f} ms", "")])


def _kind(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "PNG"
    if data.startswith(b"\xff\xd8"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return "?"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ghosts", type=int, default=30)
    parser.add_argument("--friends", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--image-model", help="DYNAMO_IMAGE_MODEL (default: dynamo's default); "
                        "gpt-image-2 has no transparency, so its friends are keyed out by dynamo")
    parser.add_argument("--plain-images", action="store_true",
                        help="the fake's ~8 KB PNGs instead of images as large as real ones")
    harness.run(main, parser.parse_args())
