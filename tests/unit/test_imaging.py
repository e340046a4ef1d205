"""Image processing (contract §4): JPEG for ghosts, keyed WEBP for friends, placeholders."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dynamo.domain import prompts
from dynamo.images import processing as imaging

SKY = (110, 185, 235)
RED = (220, 30, 30)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    output = io.BytesIO()
    image.save(output, fmt, **options)
    return output.getvalue()


def disc_image(size: int = 256, background=SKY, noise: int = 0) -> Image.Image:
    """A red disc with a black outline on `background`, anti-aliased by downsampling."""
    big = Image.new("RGB", (size * 4, size * 4), background)
    ImageDraw.Draw(big).ellipse(
        (size, size, size * 3, size * 3), fill=RED, outline=(0, 0, 0), width=16
    )
    image = big.resize((size, size), Image.Resampling.LANCZOS)
    if noise:
        pixels = np.asarray(image, dtype=np.int16)
        jitter = np.random.default_rng(7).integers(-noise, noise + 1, pixels.shape)
        image = Image.fromarray(np.clip(pixels + jitter, 0, 255).astype(np.uint8))
    return image


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def color_of(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))


def assert_near(color, expected, tolerance=3):
    assert all(abs(a - b) <= tolerance for a, b in zip(color, expected)), (color, expected)


@pytest.mark.parametrize("noise", [0, 12])
def test_key_out_background(noise):
    keyed, color = imaging.key_out_background(encode(disc_image(noise=noise)))
    image = decode(keyed)
    assert image.format == "WEBP"
    assert image.mode == "RGBA"
    alpha = image.getchannel("A")
    for corner in [(0, 0), (255, 0), (0, 255), (255, 255)]:
        assert alpha.getpixel(corner) == 0
    assert alpha.getpixel((128, 128)) == 255
    assert image.getpixel((128, 128))[:3] == pytest.approx(RED, abs=noise + 2)
    assert_near(color_of(color), SKY)
    assert color == color.lower() and len(color) == 7


def test_key_out_gives_a_soft_edge():
    keyed, _ = imaging.key_out_background(encode(disc_image()))
    alpha = np.asarray(decode(keyed).getchannel("A"))
    partial = np.count_nonzero((alpha > 0) & (alpha < 255))
    assert partial > 0  # anti-aliased pixels are half transparent...
    assert partial < alpha.size // 50  # ...but only along the outline


def test_key_out_ignores_a_subject_in_one_corner():
    image = disc_image()
    ImageDraw.Draw(image).rectangle((0, 0, 20, 20), fill=RED)
    _, color = imaging.key_out_background(encode(image))
    assert_near(color_of(color), SKY)


def test_key_out_reads_webp_and_keeps_existing_transparency():
    image = disc_image().convert("RGBA")
    image.putpixel((128, 128), (*RED, 0))
    keyed, color = imaging.key_out_background(encode(image, "WEBP", lossless=True))
    assert decode(keyed).getpixel((128, 128))[3] == 0
    assert color == "#6eb9eb"


def test_to_jpeg():
    jpeg = imaging.to_jpeg(encode(disc_image()))
    image = decode(jpeg)
    assert image.format == "JPEG"
    assert image.mode == "RGB"
    assert image.size == (256, 256)
    assert_near(image.getpixel((128, 128)), RED, tolerance=12)


def test_to_jpeg_flattens_alpha_onto_black():
    transparent = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    image = decode(imaging.to_jpeg(encode(transparent)))
    assert image.mode == "RGB"
    assert_near(image.getpixel((32, 32)), (0, 0, 0), tolerance=2)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_garbage_is_refused(data):
    with pytest.raises(ValueError):
        imaging.to_jpeg(data)
    with pytest.raises(ValueError):
        imaging.key_out_background(data)


def test_truncated_image_is_refused():
    with pytest.raises(ValueError):
        imaging.to_jpeg(encode(disc_image())[:2000])


def test_other_formats_are_refused():
    with pytest.raises(ValueError):
        imaging.to_jpeg(encode(disc_image(), "GIF"))


def test_absurd_size_is_refused():
    # A few kilobytes on the wire, 25 million pixels once decoded.
    huge = encode(Image.new("1", (5000, 5000)))
    assert len(huge) < 100_000
    with pytest.raises(ValueError, match="too large"):
        imaging.key_out_background(huge)


def test_color_rgb_covers_every_color():
    assert set(imaging.COLOR_RGB) == set(prompts.COLORS)


def test_ghost_placeholder():
    prompt = prompts.ghost_prompt("a seal")
    data = imaging.placeholder_image(prompt, background=None)
    image = decode(data)
    assert image.format == "PNG"
    assert image.size == (1024, 1024)
    assert sum(image.convert("RGB").getpixel((0, 0))) < 100  # dark
    assert data == imaging.placeholder_image(prompt, background=None)
    assert data != imaging.placeholder_image(prompts.ghost_prompt("an owl"), background=None)


@pytest.mark.parametrize("color", prompts.COLORS)
def test_friend_placeholder_keys_out_to_its_complement(color):
    background = imaging.COLOR_RGB[prompts.COMPLEMENTS[color]]
    prompt = prompts.friend_prompt(color, "an owl")
    data = imaging.placeholder_image(prompt, background=background)
    assert decode(data).size == (1024, 1024)
    assert data == imaging.placeholder_image(prompt, background=background)
    keyed, detected = imaging.key_out_background(data)
    assert detected == "#{:02x}{:02x}{:02x}".format(*background)
    alpha = decode(keyed).getchannel("A")
    assert alpha.getpixel((0, 0)) == 0
    assert alpha.getpixel((512, 472)) == 255  # the shape's centre
