"""Image processing (contract §4): ghosts to JPEG, friends keyed out to WEBP with alpha.

Where the image API already sent the stored format (a JPEG ghost, a WEBP friend with its
alpha channel), `sniff()` reads its header only, format, size and alpha, so that the
bytes are stored as they came: no decoding, no re-encoding. Also draws the placeholder images of the offline development generator. Every function
here is CPU-bound and blocking (a 1024x1024 image takes tens of milliseconds), so actors
call them through `trio.to_thread.run_sync`. Inputs come from the network: decoding
accepts only PNG, WEBP and JPEG of a sane size and raises ValueError for anything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import struct
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


def color_hex(name: str) -> str:
    """`#rrggbb` of one of the 13 friend colors."""
    red, green, blue = COLOR_RGB[name]
    return f"#{red:02x}{green:02x}{blue:02x}"


@dataclasses.dataclass(frozen=True)
class Header:
    """What an encoded image's header says; `whole`: its container is complete."""

    format: str  # "PNG", "JPEG" or "WEBP"
    width: int
    height: int
    alpha: bool
    whole: bool = True

    @property
    def sane(self) -> bool:
        return self.whole and 0 < self.width * self.height <= MAX_INPUT_PIXELS


# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are other markers.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_WEBP_ALPHA_FLAG = 0x10
_WEBP_ANIMATION_FLAG = 0x02


def sniff(data: bytes) -> Header | None:
    """The format, size and alpha of a PNG, JPEG or WEBP from its header alone (cheap: no
    pixel is decoded); None for anything else or a header that does not parse."""
    try:
        if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return Header("PNG", width, height, alpha=data[25] in (4, 6))
        if data.startswith(b"\xff\xd8"):
            return _sniff_jpeg(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _sniff_webp(data)
    except (struct.error, IndexError):
        return None
    return None


def _sniff_jpeg(data: bytes) -> Header | None:
    position = 2
    while position + 9 < len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return Header("JPEG", width, height, alpha=False, whole=data.endswith(b"\xff\xd9"))
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        position += 2 + length
    return None


def _sniff_webp(data: bytes) -> Header | None:
    (riff_size,) = struct.unpack("<I", data[4:8])
    whole = riff_size + 8 == len(data)
    chunk = data[12:16]
    if chunk == b"VP8X":
        flags = data[20]
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        if flags & _WEBP_ANIMATION_FLAG:
            return None  # an animation: not what was asked for
        alpha = bool(flags & _WEBP_ALPHA_FLAG) and _webp_has_chunk(data, (b"ALPH", b"VP8L"))
        return Header("WEBP", width, height, alpha, whole)
    if chunk == b"VP8L" and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        return Header("WEBP", width, height, bool((bits >> 28) & 1), whole)
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return Header("WEBP", width & 0x3FFF, height & 0x3FFF, alpha=False, whole=whole)
    return None


def _webp_has_chunk(data: bytes, names: tuple[bytes, ...]) -> bool:
    """Whether an extended WEBP holds one of the chunks `names` (its alpha data)."""
    position = 12
    while position + 8 <= len(data):
        name = data[position : position + 4]
        (size,) = struct.unpack("<I", data[position + 4 : position + 8])
        if name in names:
            return True
        position += 8 + size + (size & 1)  # chunks are padded to an even size
    return False


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
