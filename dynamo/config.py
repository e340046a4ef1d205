"""Configuration from the environment (and a `.env` file in the working directory).

`load()` returns a frozen `Settings`; it raises `ConfigError` with one message, on one
line, naming every variable that cannot be parsed and (production profile) every one that
is missing, each by its upstream name. In the development profile a missing external
system is replaced by its embedded default, with one WARNING line each, logged by the
caller from `Settings.defaults_used` (which also says when DYNAMO_ADMIN_TOKEN is ignored:
it is the broadcaster's token only in development without an auth service).

Why not pydantic-settings (tried, issue 19 item 4): its field declarations would replace
`_Reader`'s number/choice/port checks (~90 lines) with ~55 lines of fields, but not the rest:
the URLs must be checked without echoing them (credentials), RMQ_*/PG*/SPACES_* compose
into URLs and groups, and production names every missing variable from the raw values,
together with the parse errors, even when parsing failed. That needs the raw mapping
(`load(env)` takes one, as the tests do), so pydantic-settings' own environment and .env
sources would go unused, and a second class of ~45 fields would sit beside `Settings`
(a frozen dataclass the tests `dataclasses.replace`). Shorter by a few lines at best, less
clear for it: the hand-written reader stays.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import overload

import dotenv

from dynamo.openai_port import pricing

# Models OpenAI serves today with no announced shutdown (checked on 2026-12-01 against the
# deprecations page; README "Models and what they cost" says why these two).
DEFAULT_IMAGE_MODEL = "gpt-image-2.6-flare"
DEFAULT_TEXT_MODEL = "gpt-6-luna"
IMAGE_QUALITIES = ("low", "medium", "high")
# Crisp clip-art outlines and a clean alpha edge over video, for ~1.3 cents an image.
DEFAULT_IMAGE_QUALITY = "medium"


class ConfigError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class StorageSettings:
    bucket: str
    region: str
    endpoint_url: str  # always with a scheme
    access_key_id: str
    secret_key: str = dataclasses.field(repr=False)
    public_base_url: str  # objects are at {public_base_url}/{key}


@dataclasses.dataclass(frozen=True)
class Settings:
    profile: str
    amqp_url: str | None = dataclasses.field(repr=False)
    database_url: str | None = dataclasses.field(repr=False)
    openai_api_key: str | None = dataclasses.field(repr=False)
    openai_base_url: str | None
    auth_url: str
    auth_shared_secret: str | None = dataclasses.field(repr=False)
    ledger_url: str
    storage: StorageSettings | None
    discord_ghosts_webhook_url: str = dataclasses.field(repr=False)
    discord_friends_webhook_url: str = dataclasses.field(repr=False)
    http_host: str
    http_port: int
    data_dir: Path
    images_per_minute: float
    text_requests_per_minute: float
    generator_workers: int
    max_attempts: int
    request_timeout_s: float
    points_cost: int
    image_model: str
    text_model: str
    moderation: bool
    log_format: str
    admin_token: str | None = dataclasses.field(repr=False)
    image_quality: str = DEFAULT_IMAGE_QUALITY
    daily_budget_usd: float | None = None
    prices: dict = dataclasses.field(default_factory=dict)  # DYNAMO_PRICES: model -> Prices
    # The image API's tokens per minute; None: learned from the answers' headers.
    image_tokens_per_minute: float | None = None
    defaults_used: tuple[str, ...] = ()  # WARNING lines for the development profile

    @property
    def local_http_url(self) -> str:
        """The HTTP API's URL as this host reaches it: a wildcard bind (0.0.0.0, ::) is
        reached on loopback, and an IPv6 address is bracketed. Local images' URLs start
        with it."""
        host = _WILDCARD_TO_LOOPBACK.get(self.http_host, self.http_host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.http_port}"


# A wildcard bind address is not an address to connect to: its loopback is.
_WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


_HTTP = ("http", "https")
_RMQ_VARS = ("RMQ_HOST", "RMQ_PORT", "RMQ_VHOST", "RMQ_USER", "RMQ_PASSWORD")
_PG_VARS = ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD")
_SPACES_VARS = (
    "SPACES_BUCKET_NAME",
    "SPACES_REGION_NAME",
    "SPACES_ENDPOINT_URL",
    "SPACES_ACCESS_KEY_ID",
    "SPACES_SECRET_KEY",
)


class _Reader:
    """Reads variables, collecting every problem so they can be reported at once."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.errors: list[str] = []

    @overload
    def text(self, name: str) -> str | None: ...

    @overload
    def text(self, name: str, default: str) -> str: ...

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name, "").strip()
        return value if value else default

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float,
        integer: bool = False,
        maximum: float | None = None,
    ):
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            self.errors.append(f"{name} must be {kind}, got {raw!r}")
            return default
        if not math.isfinite(value):  # inf, nan, 1e999: no setting means that
            self.errors.append(f"{name} must be a finite number, got {raw!r}")
            return default
        if value < minimum:
            self.errors.append(f"{name} must be at least {minimum}, got {raw!r}")
            return default
        if maximum is not None and value > maximum:
            self.errors.append(f"{name} must be at most {maximum}, got {raw!r}")
            return default
        return value

    def port(self, name: str, default: int) -> int:
        return int(self.number(name, default, minimum=1, maximum=65535, integer=True))

    @overload
    def url(self, name: str, schemes: tuple[str, ...]) -> str | None: ...

    @overload
    def url(self, name: str, schemes: tuple[str, ...], default: str) -> str: ...

    def url(self, name: str, schemes: tuple[str, ...], default: str | None = None) -> str | None:
        """A URL with one of `schemes` and a host. Its value is never echoed: URLs carry
        credentials (AMQP_URL, DATABASE_URL) or are secrets themselves (webhooks)."""
        value = self.text(name)
        if value is None:
            return default
        try:
            parts = urllib.parse.urlsplit(value)
            parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
        except ValueError:
            parts = None
        # A database URL may name no host: the local socket.
        needs_host = not set(schemes) & {"postgres", "postgresql"}
        if parts is None or parts.scheme.lower() not in schemes or (needs_host and not parts.hostname):
            starts = " or ".join(f"{scheme}://" for scheme in schemes)
            self.errors.append(f"{name} must be a URL starting with {starts}")
            return default
        return value

    def optional_number(self, name: str, *, minimum: float) -> float | None:
        if self.text(name) is None:
            return None
        return self.number(name, 0.0, minimum=minimum)

    def prices(self, name: str) -> dict:
        raw = self.text(name)
        if raw is None:
            return {}
        try:
            return pricing.parse_overrides(json.loads(raw))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            self.errors.append(f"{name}: {exc}")
            return {}

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = (self.text(name) or default).lower()
        if value not in choices:
            self.errors.append(f"{name} must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value


def _amqp_url(r: _Reader) -> str | None:
    if url := r.url("AMQP_URL", ("amqp", "amqps")):
        return url
    if not r.text("RMQ_HOST"):
        return None
    port = r.port("RMQ_PORT", 5672)
    user = urllib.parse.quote(r.text("RMQ_USER", "guest"), safe="")
    password = urllib.parse.quote(r.text("RMQ_PASSWORD", "guest"), safe="")
    vhost = urllib.parse.quote(r.text("RMQ_VHOST", "/"), safe="")
    return f"amqp://{user}:{password}@{r.text('RMQ_HOST')}:{port}/{vhost}"


def _database_url(r: _Reader) -> str | None:
    if url := r.url("DATABASE_URL", ("postgresql", "postgres")):
        return url
    if not r.text("PGHOST"):
        return None
    port = r.port("PGPORT", 5432)
    user = urllib.parse.quote(r.text("PGUSER", "postgres"), safe="")
    password = r.text("PGPASSWORD")
    auth = f"{user}:{urllib.parse.quote(password, safe='')}" if password else user
    database = urllib.parse.quote(r.text("PGDATABASE", "postgres"), safe="")
    url = f"postgresql://{auth}@{r.text('PGHOST')}:{port}/{database}"
    if sslmode := r.text("PGSSLMODE"):
        url += f"?sslmode={urllib.parse.quote(sslmode)}"
    return url


def _storage(r: _Reader) -> StorageSettings | None:
    if not r.text("SPACES_BUCKET_NAME") and not r.text("SPACES_ENDPOINT_URL"):
        return None
    missing = [name for name in _SPACES_VARS if not r.text(name)]
    if missing:
        r.errors.append(f"storage is partly configured; missing {', '.join(missing)}")
        return None
    bucket = r.text("SPACES_BUCKET_NAME", "")  # all present: checked just above
    endpoint = r.text("SPACES_ENDPOINT_URL", "").rstrip("/")
    if "://" in endpoint:  # a local S3 server: path-style URLs
        if r.url("SPACES_ENDPOINT_URL", _HTTP) is None:
            return None
        public = f"{endpoint}/{bucket}"
    else:  # upstream style, a bare host: https and virtual-host URLs
        public = f"https://{bucket}.{endpoint}"
        endpoint = f"https://{endpoint}"
    public = (r.url("SPACES_PUBLIC_BASE_URL", _HTTP) or public).rstrip("/")
    return StorageSettings(
        bucket=bucket,
        region=r.text("SPACES_REGION_NAME", ""),
        endpoint_url=endpoint,
        access_key_id=r.text("SPACES_ACCESS_KEY_ID", ""),
        secret_key=r.text("SPACES_SECRET_KEY", ""),
        public_base_url=public,
    )


def _http_addr(r: _Reader) -> tuple[str, int]:
    raw = r.text("DYNAMO_HTTP_ADDR", "127.0.0.1:5008")
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        r.errors.append(f"DYNAMO_HTTP_ADDR must be host:port, got {raw!r}")
        return "127.0.0.1", 5008
    return host.strip("[]") or "0.0.0.0", int(port)


def load(env: Mapping[str, str] | None = None, *, dotenv_path: Path | None = None) -> Settings:
    """Reads the settings; `env` defaults to os.environ merged over `./.env`."""
    if env is None:
        file_values = dotenv.dotenv_values(dotenv_path or Path.cwd() / ".env")
        env = {**{k: v for k, v in file_values.items() if v is not None}, **os.environ}
    r = _Reader(env)
    profile = r.choice("DYNAMO_PROFILE", "development", ("development", "production"))
    host, port = _http_addr(r)
    settings = dict(
        profile=profile,
        amqp_url=_amqp_url(r),
        database_url=_database_url(r),
        openai_api_key=r.text("OPENAI_API_KEY"),
        openai_base_url=r.url("OPENAI_BASE_URL", _HTTP),
        auth_url=r.url("AUTH_URL", _HTTP, "http://localhost:5002").rstrip("/"),
        auth_shared_secret=r.text("AUTH_SHARED_SECRET"),
        ledger_url=r.url("LEDGER_URL", _HTTP, "http://localhost:5003").rstrip("/"),
        storage=_storage(r),
        discord_ghosts_webhook_url=r.url("DISCORD_GHOSTS_WEBHOOK_URL", _HTTP, ""),
        discord_friends_webhook_url=r.url("DISCORD_FRIENDS_WEBHOOK_URL", _HTTP, ""),
        http_host=host,
        http_port=port,
        data_dir=Path(r.text("DYNAMO_DATA_DIR", "./.dynamo")),
        images_per_minute=r.number("DYNAMO_IMAGES_PER_MINUTE", 5.0, minimum=0.01),
        text_requests_per_minute=r.number("DYNAMO_TEXT_REQUESTS_PER_MINUTE", 500.0, minimum=0.01),
        image_tokens_per_minute=r.optional_number("DYNAMO_IMAGE_TOKENS_PER_MINUTE", minimum=1),
        generator_workers=int(r.number("DYNAMO_GENERATOR_WORKERS", 4, minimum=1, integer=True)),
        max_attempts=int(r.number("DYNAMO_MAX_ATTEMPTS", 6, minimum=1, integer=True)),
        request_timeout_s=r.number("DYNAMO_REQUEST_TIMEOUT_S", 900.0, minimum=1),
        points_cost=int(r.number("DYNAMO_POINTS_COST", 200, minimum=0, integer=True)),
        image_model=r.text("DYNAMO_IMAGE_MODEL", DEFAULT_IMAGE_MODEL),
        text_model=r.text("DYNAMO_TEXT_MODEL", DEFAULT_TEXT_MODEL),
        image_quality=r.choice("DYNAMO_IMAGE_QUALITY", DEFAULT_IMAGE_QUALITY, IMAGE_QUALITIES),
        daily_budget_usd=r.optional_number("DYNAMO_DAILY_BUDGET_USD", minimum=0),
        prices=r.prices("DYNAMO_PRICES"),
        moderation=r.choice("DYNAMO_MODERATION", "on", ("on", "off", "true", "false", "1", "0"))
        in ("on", "true", "1"),
        log_format=r.choice("DYNAMO_LOG_FORMAT", "text", ("text", "json")),
        admin_token=r.text("DYNAMO_ADMIN_TOKEN"),
    )
    systems = {
        "RabbitMQ (RMQ_HOST or AMQP_URL)": settings["amqp_url"],
        "PostgreSQL (PGHOST or DATABASE_URL)": settings["database_url"],
        "OpenAI (OPENAI_API_KEY)": settings["openai_api_key"],
        "auth (AUTH_SHARED_SECRET)": settings["auth_shared_secret"],
        "storage (SPACES_BUCKET_NAME, SPACES_REGION_NAME, SPACES_ENDPOINT_URL, "
        "SPACES_ACCESS_KEY_ID, SPACES_SECRET_KEY)": settings["storage"],
    }
    missing = [name for name, value in systems.items() if value is None]
    problems = list(r.errors)
    if profile == "production" and (missing_names := _missing_in_production(r)):
        problems.append(
            "DYNAMO_PROFILE=production needs every external system but Discord configured; "
            "missing: " + ", ".join(missing_names)
        )
    if problems:
        # One line: the operator reads it in a container's log, whole.
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    warnings = [_development_warning(name) for name in missing]
    if settings["admin_token"] is not None and (
        profile == "production" or settings["auth_shared_secret"] is not None
    ):
        settings["admin_token"] = None
        warnings.append(
            "DYNAMO_ADMIN_TOKEN is ignored: it is the broadcaster's token only in the "
            "development profile without an auth service (AUTH_SHARED_SECRET unset)"
        )
    settings["defaults_used"] = tuple(warnings)
    return Settings(**settings)


# Secrets that may be set and empty (a database user without a password): set is given.
_MAY_BE_EMPTY = frozenset({"RMQ_PASSWORD", "PGPASSWORD"})


def _missing_in_production(r: _Reader) -> list[str]:
    """Each variable production needs and does not have, by its upstream name; a group
    that a URL may replace says so once."""
    groups = [
        (_RMQ_VARS, "AMQP_URL"),
        (_PG_VARS, "DATABASE_URL"),
        (("OPENAI_API_KEY", "AUTH_SHARED_SECRET", *_SPACES_VARS), None),
    ]
    named: list[str] = []
    for names, url in groups:
        if url is not None and r.text(url):
            continue
        absent = [
            name
            for name in names
            if not r.text(name) and not (name in _MAY_BE_EMPTY and name in r.env)
        ]
        if absent and url is not None:
            absent[-1] += f" (or {url})"
        named += absent
    return named


_DEFAULTS = {
    "RabbitMQ": "no broker: requests come in through the HTTP API only, alerts are logged",
    "PostgreSQL": "embedded PostgreSQL under DYNAMO_DATA_DIR",
    "OpenAI": "OFFLINE GENERATOR: images are local placeholders, not real generations",
    "auth": "points are NOT charged; the HTTP API uses DYNAMO_ADMIN_TOKEN",
    "storage": "images are kept in DYNAMO_DATA_DIR/images and served at GET /images/{key}",
}


def _development_warning(missing: str) -> str:
    system = missing.split(" ")[0]
    return f"{missing} not configured; development default: {_DEFAULTS[system]}"
