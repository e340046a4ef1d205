"""The broadcaster's live page: `GET /` and its few static files from `dynamo/web/`.

The files are read once from the package (no build step, nothing fetched from elsewhere
at run time: the stream's machine may be offline). The page signs in by itself with a
bearer token kept in the browser's sessionStorage, never in a URL; the answers carry a
Content-Security-Policy that allows only this origin's scripts and styles.
"""

from __future__ import annotations

import functools
import importlib.resources

from quart import Blueprint, Response
from quart_schema import document_response, security_scheme

from dynamo.api import schemas
from dynamo.api.errors import not_found
from dynamo.api.openapi import PUBLIC, errors

blueprint = Blueprint("page", __name__)

# Read as package resources, so that an installed wheel serves them too.
WEB_DIR = importlib.resources.files("dynamo") / "web"

# The files under /web/ and their content types; nothing else is served from there.
WEB_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "render.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# Images may come from S3-compatible storage on another origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src * data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return (WEB_DIR / name).read_bytes()


@blueprint.get("/")
@document_response(schemas.Html, 200)
@security_scheme(PUBLIC)
async def page():
    """The broadcaster's live page (it signs in by itself)."""
    return Response(
        _read("index.html"), content_type="text/html; charset=utf-8", headers=PAGE_HEADERS
    )


@blueprint.get("/web/<name>")
@document_response(schemas.StaticFile, 200)
@errors(404)
@security_scheme(PUBLIC)
async def web_file(name: str):
    """A file of the live page."""
    content_type = WEB_FILES.get(name)
    if content_type is None:
        raise not_found("file")
    return Response(_read(name), content_type=content_type, headers=PAGE_HEADERS)
