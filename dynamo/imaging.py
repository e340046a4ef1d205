"""Image processing (contract §4): ghosts to JPEG, friends keyed out to WEBP with alpha.

Also draws the placeholder images of the offline development generator. Every function
here is CPU-bound and blocking (a 1024x1024 image takes tens of milliseconds), so actors
call them through `trio.to_thread.run_sync`. Inputs come from the network: decoding
accepts only PNG, WEBP and JPEG of a sane size and raises ValueError for anything else.
"""

from __future__ import annotations

import hashlib
import io
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# The image API returns PNG (or WEBP); JPEG is accepted for fakes and other providers.
_INPUT_FORMATS = ("PNG", "WEBP", "JPEG")
# Four times the pixels of the largest image we ever ask for (1792x1024): far above
# anything real, far below what would exhaust memory once decoded (4 bytes a pixel).
MAX_INPUT_PIXELS = 4096 * 4096

# Color distance (Euclidean, in 0..255 RGB; at most ~441) to the background below which
# a pixel is background and above which it is the character. Generated "solid"
# backgrounds vary by a few tens around their color; the ramp between the two
# thresholds gives anti-aliased outlines a soft edge instead of a jagged one.
KEY_TRANSPARENT_BELOW = 40.0
KEY_OPAQUE_ABOVE = 100.0
# Side of the corner squares the background is sampled from, as a fraction of the
# image's shorter side: big enough to average out noise, small enough to miss the subject.
_CORNER_FRACTION = 32

# The 13 friend colors, as drawn by the placeholder generator (saturated, so that a
# color and its complement are far apart, as the keying needs).
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (228, 26, 28),
    "red-orange": (255, 83, 36),
    "orange": (255, 140, 0),
    "yellow-orange": (255, 176, 46),
    "yellow": (255, 221, 0),
    "chartreuse": (127, 255, 0),
    "green": (0, 166, 62),
    "cyan": (0, 206, 226),
    "sky-blue": (110, 190, 240),
    "blue": (30, 80, 220),
    "indigo": (75, 0, 130),
    "purple": (128, 50, 170),
    "magenta": (226, 0, 160),
}

PLACEHOLDER_SIZE = 1024  # the size the image API is asked for
_GHOST_BACKGROUND = (14, 12, 24)
_GHOST_PALE = (222, 228, 240)
_PLACEHOLDER_TITLE = "OFFLINE PLACEHOLDER"


def _decode(image_bytes: bytes) -> Image.Image:
    """The first frame of a PNG, WEBP or JPEG image; ValueError for anything else."""
    try:
        image = Image.open(io.BytesIO(image_bytes), formats=_INPUT_FORMATS)
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"not a readable PNG, WEBP or JPEG image: {error}") from None
    width, height = image.size
    if width * height > MAX_INPUT_PIXELS:
        raise ValueError(f"image of {width}x{height} pixels is too large to process")
    try:
        image.load()
    except (OSError, SyntaxError, EOFError, ValueError) as error:
        raise ValueError(f"corrupt {image.format} image: {error}") from None
    return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_jpeg(image_bytes: bytes, quality: int = 80) -> bytes:
    """An RGB JPEG; transparency is flattened onto black, a ghost's dark background."""
    image = _decode(image_bytes)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    output = io.BytesIO()
    image.convert("RGB").save(output, "JPEG", quality=quality)
    return output.getvalue()


def _corner_color(rgb: np.ndarray) -> np.ndarray:
    """The median color of the four corner squares: robust to a subject touching one."""
    side = max(1, min(rgb.shape[:2]) // _CORNER_FRACTION)
    corners = [rgb[:side, :side], rgb[:side, -side:], rgb[-side:, :side], rgb[-side:, -side:]]
    return np.median(np.concatenate([corner.reshape(-1, 3) for corner in corners]), axis=0)


def _unmix(rgb: np.ndarray, coverage: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Edge colors with the background's share taken out, so no colored halo remains."""
    safe = np.where(coverage > 0, coverage, 1.0)[..., None]
    return np.clip(background + (rgb - background) / safe, 0, 255)


def key_out_background(image_bytes: bytes) -> tuple[bytes, str]:
    """(lossless WEBP with alpha, background color as `#rrggbb`) for a friend's image."""
    rgba = np.asarray(_decode(image_bytes).convert("RGBA"), dtype=np.float32)
    rgb, original_alpha = rgba[..., :3], rgba[..., 3]
    background = _corner_color(rgb)
    distance = np.linalg.norm(rgb - background, axis=-1)
    ramp = (distance - KEY_TRANSPARENT_BELOW) / (KEY_OPAQUE_ABOVE - KEY_TRANSPARENT_BELOW)
    coverage = np.clip(ramp, 0.0, 1.0)
    keyed = np.dstack([_unmix(rgb, coverage, background), coverage * original_alpha])
    output = io.BytesIO()
    Image.fromarray(np.rint(keyed).astype(np.uint8), "RGBA").save(output, "WEBP", lossless=True)
    red, green, blue = (int(channel) for channel in np.rint(background))
    return output.getvalue(), f"#{red:02x}{green:02x}{blue:02x}"


def _contrasting(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """A fill far from `background`, so that the placeholder keys out cleanly."""
    inverse = tuple(255 - channel for channel in background)
    if np.linalg.norm(np.subtract(inverse, background)) >= 200:
        return inverse  # type: ignore[return-value]
    return (0, 0, 0) if sum(background) > 382 else (255, 255, 255)


def placeholder_image(prompt: str, *, background: tuple[int, int, int] | None) -> bytes:
    """A 1024x1024 PNG standing in for a generated image, the same for the same prompt.

    With a `background` it looks like a friend (solid color for keying, an outlined
    shape); without, like a ghost (a pale shape on a dark background).
    """
    seed = hashlib.sha256(prompt.encode("utf-8")).digest()
    fill = _contrasting(background) if background else _GHOST_PALE
    image = Image.new("RGB", (PLACEHOLDER_SIZE, PLACEHOLDER_SIZE), background or _GHOST_BACKGROUND)
    draw = ImageDraw.Draw(image)
    centre = PLACEHOLDER_SIZE // 2
    draw.regular_polygon(
        (centre, centre - 40, 300),
        n_sides=3 + seed[0] % 6,  # the prompt picks a triangle to an octagon...
        rotation=seed[1] * 360 / 256,  # ...and how it is turned
        fill=fill,
        outline=(0, 0, 0) if background else None,
        width=8,
    )
    _draw_text(draw, prompt, fill)
    output = io.BytesIO()
    image.save(output, "PNG")
    return output.getvalue()


def _draw_text(draw: ImageDraw.ImageDraw, prompt: str, color: tuple[int, int, int]) -> None:
    # Kept away from the corners, which must stay pure background for the keying.
    title_font = ImageFont.load_default(size=64)
    draw.text(
        (PLACEHOLDER_SIZE // 2, 100),
        _PLACEHOLDER_TITLE,
        fill=color,
        font=title_font,
        anchor="mm",
        stroke_width=3,
        stroke_fill=(0, 0, 0),
    )
    prompt_font = ImageFont.load_default(size=24)
    for line_number, line in enumerate(textwrap.wrap(prompt, width=60)[:4]):
        draw.text(
            (PLACEHOLDER_SIZE // 2, 880 + 32 * line_number),
            line,
            fill=color,
            font=prompt_font,
            anchor="mm",
        )
