"""Discord webhook posts (the original service's #ghosts posts): the message, the image, the call.

Pure parts first: `ghost_content` and `friend_content` are the original's messages with
the viewer's text escaped, `build_payload` the `payload_json` Discord expects, and
`flatten_to_jpeg` turns a stored friend WEBP back into a JPEG with its background.
Then the port: `fetch_image` downloads a stored image, `post_webhook` executes a webhook
with one attached file as multipart/form-data. Both raise `retry.Transient` (429, 408,
5xx, connection errors; a 429 carries Discord's `retry_after`) or `retry.Permanent`
(any other 4xx); the caller decides how often to try again.

A webhook URL holds its token: it never appears in an error message or a log line.
"""

from __future__ import annotations

import io
import json
import re
import secrets
from typing import Any

import httpx
from PIL import Image

from dynamo.images import processing as imaging
from dynamo.supervision import retry

# Discord markdown: bold/italic, underline, strikethrough, code, spoilers, quotes. The
# backslash comes first so that a viewer's own backslash cannot undo one of our escapes.
MARKDOWN_CHARACTERS = "\\*_~`|>"
_MARKDOWN = re.compile("([" + re.escape(MARKDOWN_CHARACTERS) + "])")
# User text is shown inline, inside `**…**` or `_…_`: a line break would end the
# formatting and start a line where `#` headings and `-` lists apply.
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029]+")
# No parse types: `@everyone`, `@here`, `<@id>` and `<@&role>` are shown, never ping.
NO_MENTIONS: dict[str, list[str]] = {"parse": []}
# Quality of the JPEG made from a friend's WEBP: the same as stored ghosts.
JPEG_QUALITY = 80
_HEX_COLOR = re.compile(r"#([0-9a-fA-F]{6})")
_JPEG_MAGIC = b"\xff\xd8\xff"
# Discord's rate-limit answers always say how long to wait; this is for one that does not.
DEFAULT_RETRY_AFTER_S = 1.0


def escape_markdown(text: str) -> str:
    """`text` with every Discord markdown character backslash-escaped, on one line."""
    return _MARKDOWN.sub(r"\\\1", _LINE_BREAKS.sub(" ", text))


def ghost_content(display_name: str, description: str) -> str:
    return f"Ghost from **{escape_markdown(display_name)}**: _{escape_markdown(description)}_"


def friend_content(name: str, display_name: str, description: str) -> str:
    return (
        f"**{escape_markdown(name)}**, friend of **{escape_markdown(display_name)}**: "
        f"_{escape_markdown(description)}_"
    )


def build_payload(content: str, description: str, filename: str) -> dict[str, Any]:
    """The `payload_json` of a post with one attachment, `files[0]`.

    The attachment's description is alt text, not markdown: it is left as it is.
    """
    return {
        "content": content,
        "allowed_mentions": NO_MENTIONS,
        "attachments": [{"id": 0, "description": description, "filename": filename}],
    }


def is_jpeg(image_bytes: bytes) -> bool:
    return image_bytes.startswith(_JPEG_MAGIC)


def flatten_to_jpeg(
    image_bytes: bytes, background_color: str | None, quality: int = JPEG_QUALITY
) -> bytes:
    """A JPEG of a keyed-out image laid back onto its `#rrggbb` background.

    The keying (dynamo.images.processing) takes the background's share out of edge pixels, so
    compositing onto the same color restores the generated picture up to rounding.
    Blocking (a 1024x1024 image takes tens of ms): call it in a worker thread. ValueError
    for a bad color or an image that is not a sane PNG, WEBP or JPEG.
    """
    match = _HEX_COLOR.fullmatch(background_color or "")
    if match is None:
        raise ValueError(f"not a #rrggbb color: {background_color!r}")
    rgb = tuple(bytes.fromhex(match.group(1)))
    try:
        image = Image.open(io.BytesIO(image_bytes), formats=("WEBP", "PNG", "JPEG"))
        if image.width * image.height > imaging.MAX_INPUT_PIXELS:
            raise ValueError(f"image of {image.width}x{image.height} pixels is too large")
        rgba = image.convert("RGBA")
    except (OSError, Image.DecompressionBombError, SyntaxError, EOFError) as error:
        raise ValueError(f"not a readable image: {error}") from None
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (*rgb, 255)), rgba)
    output = io.BytesIO()
    flat.convert("RGB").save(output, "JPEG", quality=quality)
    return output.getvalue()


def encode_multipart(
    payload: dict[str, Any],
    filename: str,
    image_bytes: bytes,
    content_type: str,
    *,
    boundary: str | None = None,
) -> tuple[bytes, str]:
    """(body, Content-Type header) of a `payload_json` part and a `files[0]` part."""
    boundary = boundary or secrets.token_hex(16)
    safe_filename = re.sub(r'["\r\n\\]', "_", filename)
    payload_json = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    body = b"".join(
        [
            f"--{boundary}\r\n".encode(),
            b'Content-Disposition: form-data; name="payload_json"\r\n',
            b"Content-Type: application/json\r\n\r\n",
            payload_json.encode("utf-8"),
            b"\r\n",
            f"--{boundary}\r\n".encode(),
            f'Content-Disposition: form-data; name="files[0]"; filename="{safe_filename}"\r\n'.encode(),
            f"Content-Type: {content_type}\r\n\r\n".encode(),
            image_bytes,
            b"\r\n",
            f"--{boundary}--\r\n".encode(),
        ]
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _error_for(response: httpx.Response, what: str) -> retry.CallError:
    status = response.status_code
    message = f"{what}: HTTP {status}"
    if status < 400 or retry.classify_http_status(status) is not retry.Transient:
        return retry.Permanent(message, status_code=status)
    retry_after_s = retry.retry_after_from_headers(response.headers)
    if status == 429:
        from_body = _retry_after_from_body(response)
        if from_body is not None:
            retry_after_s = from_body
        elif retry_after_s is None:
            retry_after_s = DEFAULT_RETRY_AFTER_S
    return retry.Transient(message, retry_after_s=retry_after_s, status_code=status)


def _retry_after_from_body(response: httpx.Response) -> float | None:
    """Discord's `{"retry_after": seconds}`, more precise than the header's whole seconds."""
    try:
        seconds = float(response.json()["retry_after"])
    except (ValueError, KeyError, TypeError):
        return None
    return seconds if 0 <= seconds < float("inf") else None


async def fetch_image(client: httpx.AsyncClient, url: str) -> bytes:
    """The stored image at `url` (on S3, or served by dynamo itself)."""
    try:
        response = await client.get(url, follow_redirects=True)
    except httpx.TransportError as exc:
        raise retry.Transient(f"image download: {type(exc).__name__}") from exc
    if response.status_code != 200:
        raise _error_for(response, f"image download {url}")
    return response.content


async def post_webhook(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    filename: str,
    image_bytes: bytes,
    content_type: str,
) -> None:
    """Executes the webhook at `url`: `payload` as payload_json, the image as files[0]."""
    body, multipart_type = encode_multipart(payload, filename, image_bytes, content_type)
    try:
        response = await client.post(url, content=body, headers={"content-type": multipart_type})
    except httpx.TransportError as exc:
        # Not str(exc): a transport error's text may quote the URL, and with it the token.
        raise retry.Transient(f"discord webhook: {type(exc).__name__}") from None
    if not 200 <= response.status_code < 300:
        raise _error_for(response, "discord webhook")
