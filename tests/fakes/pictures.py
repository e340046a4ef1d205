"""The fake image model: pictures that are cheap to make and easy to check.

A friend prompt ("... a solid {color} background suitable for chroma keying") gets a
solid background of exactly `CHROMA_RGB[color]` with a differently coloured, black
outlined blob in the middle, so that keying can be checked to the pixel. Any other
prompt (ghosts) gets a dark image with a pale shape. With a transparent background the
same figure (a friend's in its own color, "a yellow caterpillar ...") is drawn on pixels
of alpha 0. `encode()` gives the picture in the requested format and compression, as the
GPT image models do. Encoded pictures are cached, so a test that generates hundreds of
images stays fast; `Verdicts` remembers which pictures carry the moderation marker, so
that a picture judged once is not decoded again.
"""

from __future__ import annotations

import hashlib
import io
import re
from functools import lru_cache

from PIL import Image, ImageDraw, ImageStat

# One RGB value for each of the contract's 13 colors (contract §3), as backgrounds.
CHROMA_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 40),
    "red-orange": (235, 80, 30),
    "orange": (245, 140, 20),
    "yellow-orange": (245, 185, 25),
    "yellow": (245, 230, 40),
    "chartreuse": (150, 225, 30),
    "green": (35, 190, 60),
    "cyan": (30, 215, 225),
    "sky-blue": (90, 170, 240),
    "blue": (40, 70, 225),
    "indigo": (75, 40, 170),
    "purple": (135, 50, 185),
    "magenta": (225, 40, 200),
}

# The ghost picture: near-black background, a pale figure.
GHOST_BACKGROUND = (12, 10, 18)
GHOST_FIGURE = (220, 225, 235)

# Black clip-art outline around the friend, as thick as the prompt's "sharp" suggests.
OUTLINE_PX = 10

CHROMA_PATTERN = re.compile(r"a solid ([a-z-]+) background suitable for chroma keying")
# A friend prompt starts with its own color: "a yellow caterpillar in a top hat, ...".
FRIEND_PATTERN = re.compile(r"^an? ([a-z-]+) .*illustrated in the style of 1990s digital clip art")


def chroma_color(prompt: str) -> str | None:
    """The background color a friend prompt asks for, if it is one of the 13."""
    match = CHROMA_PATTERN.search(prompt.lower())
    if match and match.group(1) in CHROMA_RGB:
        return match.group(1)
    return None


def png_for_prompt(prompt: str, size: tuple[int, int] = (1024, 1024)) -> bytes:
    return _png(chroma_color(prompt), size)


def hex_color(color: str) -> str:
    """'#rrggbb' of a chroma color, as the service should report the detected background."""
    return "#{:02x}{:02x}{:02x}".format(*CHROMA_RGB[color])


@lru_cache(maxsize=64)
def _png(color: str | None, size: tuple[int, int]) -> bytes:
    width, height = size
    box = (width * 0.3, height * 0.25, width * 0.7, height * 0.8)
    if color is None:
        image = Image.new("RGB", size, GHOST_BACKGROUND)
        draw = ImageDraw.Draw(image)
        draw.ellipse(box, fill=GHOST_FIGURE)
        # A few dark scan lines through the figure: "glitchy VHS artifacts".
        for y in range(int(box[1]), int(box[3]), 48):
            draw.rectangle((0, y, width, y + 3), fill=GHOST_BACKGROUND)
    else:
        background = CHROMA_RGB[color]
        figure = tuple(255 - channel for channel in background)
        image = Image.new("RGB", size, background)
        draw = ImageDraw.Draw(image)
        draw.ellipse(box, fill=figure, outline=(0, 0, 0), width=OUTLINE_PX)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def friend_color(prompt: str) -> str | None:
    """A friend's own color, from the start of its prompt, if it is one of the 13."""
    match = FRIEND_PATTERN.search(prompt.lower())
    if match and match.group(1) in CHROMA_RGB:
        return match.group(1)
    return None


def transparent_png_for_prompt(prompt: str, size: tuple[int, int] = (1024, 1024)) -> bytes:
    """The figure alone on a transparent background (alpha 0 around it)."""
    return _transparent_png(friend_color(prompt), size)


@lru_cache(maxsize=64)
def _transparent_png(color: str | None, size: tuple[int, int]) -> bytes:
    width, height = size
    box = (width * 0.3, height * 0.25, width * 0.7, height * 0.8)
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    fill = (*CHROMA_RGB[color], 255) if color else (*GHOST_FIGURE, 255)
    draw.ellipse(box, fill=fill, outline=(0, 0, 0, 255), width=OUTLINE_PX)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@lru_cache(maxsize=64)
def encode(png: bytes, output_format: str, compression: int = 100) -> bytes:
    """`png` as `output_format` ("png", "jpeg" or "webp") at `compression` (0-100, the
    API's output_compression: JPEG and WEBP quality)."""
    if output_format == "png":
        return png
    image = Image.open(io.BytesIO(png))
    buffer = io.BytesIO()
    if output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=compression)
    else:
        image.save(buffer, format="WEBP", quality=compression)
    return buffer.getvalue()


# The fake moderation's marker (openai_server.IMAGE_MARKER_WORD): a picture generated
# from a prompt holding the marker word gets this block in its top-left corner, and the
# fake's moderation endpoint flags a picture that has it. Large and flat, so that it
# survives JPEG and WEBP compression.
MARK_RGB = (255, 0, 255)
MARK_BOX = (0, 0, 96, 96)
# What a compressed block may stray from MARK_RGB, per channel.
MARK_TOLERANCE = 24


@lru_cache(maxsize=16)
def marked(png: bytes) -> bytes:
    """`png` with the moderation marker painted in (opaque, also on a transparent one)."""
    image = Image.open(io.BytesIO(png))
    fill = (*MARK_RGB, 255) if image.mode == "RGBA" else MARK_RGB
    ImageDraw.Draw(image).rectangle(MARK_BOX, fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def is_marked(data: bytes) -> bool:
    """Whether an encoded picture (any format Pillow reads) carries the marker. Raises
    ValueError if `data` is not a picture."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # Pillow raises many kinds for bytes that are no picture
        raise ValueError(f"not an image: {exc}") from exc
    left, top, right, bottom = MARK_BOX
    inner = (left + 16, top + 16, right - 16, bottom - 16)
    if image.width < right or image.height < bottom:
        return False
    # Cropped before it is converted: conversion to RGB goes pixel by pixel, so the
    # square's pixels are the same, and the whole picture is not copied for 64x64 of it.
    mean = ImageStat.Stat(image.crop(inner).convert("RGB")).mean
    return all(abs(m - want) <= MARK_TOLERANCE for m, want in zip(mean, MARK_RGB, strict=True))


# Verdicts a `Verdicts` keeps (32-byte digests): far more than the distinct pictures one
# fake makes (a few per color, size, format and compression), so none it made is dropped.
REMEMBERED_VERDICTS = 1024


class Verdicts:
    """`is_marked`, remembered by the sha256 of the picture's bytes.

    The fake judges each picture it generates (`judge` when answering), so that when it
    comes back to the moderation endpoint (dynamo screens every image) it is a lookup,
    not a decode. A picture never seen (dynamo re-encoded it, a test made it) is judged
    from its pixels as before, then remembered too. The verdict is always the pixels'
    own, also for a picture a test's `png_for` serves. Bytes that are no picture are not
    remembered: each time they raise ValueError, as `is_marked` does.
    """

    def __init__(self, capacity: int = REMEMBERED_VERDICTS) -> None:
        self._capacity = capacity
        self._marked: dict[bytes, bool] = {}  # insertion order: the oldest go first

    def judge(self, data: bytes) -> bool:
        """Whether `data` carries the marker; ValueError if it is not a picture."""
        digest = hashlib.sha256(data).digest()
        known = self._marked.get(digest)
        if known is not None:
            return known
        verdict = is_marked(data)
        if len(self._marked) >= self._capacity:
            del self._marked[next(iter(self._marked))]
        self._marked[digest] = verdict
        return verdict
