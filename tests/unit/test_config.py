"""Configuration (contract §1): profiles, upstream variable names, parse errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo import config, service

RUN_PY = Path(__file__).resolve().parents[2] / "run.py"

FULL = {
    "DYNAMO_PROFILE": "production",
    "RMQ_HOST": "rabbit", "RMQ_PORT": "5672", "RMQ_VHOST": "golden", "RMQ_USER": "u",
    "RMQ_PASSWORD": "p@ss/word",
    "PGHOST": "db", "PGPORT": "5432", "PGDATABASE": "gvcr", "PGUSER": "dynamo",
    "PGPASSWORD": "secret", "PGSSLMODE": "require",
    "OPENAI_API_KEY": "sk-live-123456789",
    "AUTH_SHARED_SECRET": "hmac-secret",
    "SPACES_BUCKET_NAME": "gvcr", "SPACES_REGION_NAME": "nyc3",
    "SPACES_ENDPOINT_URL": "nyc3.digitaloceanspaces.com",
    "SPACES_ACCESS_KEY_ID": "AK", "SPACES_SECRET_KEY": "SK",
}


def test_production_with_everything_configured():
    settings = config.load(FULL)
    assert settings.amqp_url == "amqp://u:p%40ss%2Fword@rabbit:5672/golden"
    assert settings.database_url == "postgresql://dynamo:secret@db:5432/gvcr?sslmode=require"
    assert settings.storage.endpoint_url == "https://nyc3.digitaloceanspaces.com"
    assert settings.storage.public_base_url == "https://gvcr.nyc3.digitaloceanspaces.com"
    assert settings.defaults_used == ()
    assert (settings.images_per_minute, settings.generator_workers, settings.points_cost) == (5, 4, 200)
    # Secrets stay out of the settings' repr, which may end up in a log.
    for secret in ("p@ss", "secret", "sk-live", "hmac-secret", "SK'"):
        assert secret not in repr(settings)


def test_the_image_token_limit_is_learned_unless_configured():
    assert config.load(FULL).image_tokens_per_minute is None
    configured = config.load({**FULL, "DYNAMO_IMAGE_TOKENS_PER_MINUTE": "21120"})
    assert configured.image_tokens_per_minute == 21120


UPSTREAM_REQUIRED = (
    "RMQ_HOST", "RMQ_PORT", "RMQ_VHOST", "RMQ_USER", "RMQ_PASSWORD",
    "PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD",
    "OPENAI_API_KEY", "AUTH_SHARED_SECRET",
    "SPACES_BUCKET_NAME", "SPACES_REGION_NAME", "SPACES_ENDPOINT_URL", "SPACES_ACCESS_KEY_ID",
    "SPACES_SECRET_KEY",
)


def test_production_names_every_missing_variable_at_once():
    with pytest.raises(config.ConfigError) as error:
        config.load({"DYNAMO_PROFILE": "production"})
    message = str(error.value)
    assert "\n" not in message
    for name in UPSTREAM_REQUIRED:
        assert name in message


@pytest.mark.parametrize("name", UPSTREAM_REQUIRED)
def test_production_names_each_missing_variable_alone(name):
    env = {key: value for key, value in FULL.items() if key != name}
    with pytest.raises(config.ConfigError) as error:
        config.load(env)
    assert name in str(error.value)
    others = set(UPSTREAM_REQUIRED) - {name}
    assert not any(f" {other}" in str(error.value) for other in others), str(error.value)


def test_production_takes_the_url_forms_and_an_empty_password():
    env = {key: value for key, value in FULL.items() if not key.startswith(("RMQ_", "PG"))}
    settings = config.load({**env, "AMQP_URL": "amqp://u:p@rabbit/", "DATABASE_URL": "postgresql://db/x"})
    assert settings.amqp_url == "amqp://u:p@rabbit/"
    assert config.load({**FULL, "PGPASSWORD": ""}).database_url == (
        "postgresql://dynamo@db:5432/gvcr?sslmode=require")


def test_missing_variables_and_parse_errors_in_one_line():
    with pytest.raises(config.ConfigError) as error:
        config.load({"DYNAMO_PROFILE": "production", "DYNAMO_IMAGES_PER_MINUTE": "lots",
                     "DYNAMO_MAX_ATTEMPTS": "0", "AMQP_URL": "amqp://rabbit/"})
    message = str(error.value)
    assert "\n" not in message
    for name in ("DYNAMO_IMAGES_PER_MINUTE", "DYNAMO_MAX_ATTEMPTS", "PGHOST", "OPENAI_API_KEY",
                 "SPACES_SECRET_KEY"):
        assert name in message
    assert "RMQ_HOST" not in message  # AMQP_URL stands for them


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity", "nan", "1e999"])
@pytest.mark.parametrize("name", ["DYNAMO_IMAGES_PER_MINUTE", "DYNAMO_TEXT_REQUESTS_PER_MINUTE",
                                  "DYNAMO_REQUEST_TIMEOUT_S", "DYNAMO_DAILY_BUDGET_USD",
                                  "DYNAMO_IMAGE_TOKENS_PER_MINUTE"])
def test_infinite_or_not_a_number_is_refused(name, value):
    with pytest.raises(config.ConfigError) as error:
        config.load({**FULL, name: value})
    assert name in str(error.value)


@pytest.mark.parametrize("name", ["RMQ_PORT", "PGPORT"])
def test_a_port_beyond_65535_is_refused(name):
    with pytest.raises(config.ConfigError) as error:
        config.load({**FULL, name: "65536"})
    assert name in str(error.value)


def test_the_admin_token_only_without_an_auth_service_in_development():
    development = config.load({"DYNAMO_ADMIN_TOKEN": "t0ken"})
    assert development.admin_token == "t0ken"
    assert not any("DYNAMO_ADMIN_TOKEN is ignored" in line for line in development.defaults_used)
    for env in ({**FULL, "DYNAMO_ADMIN_TOKEN": "t0ken"},
                {"AUTH_SHARED_SECRET": "s", "DYNAMO_ADMIN_TOKEN": "t0ken"}):
        settings = config.load(env)
        assert settings.admin_token is None
        warning, = [line for line in settings.defaults_used if "DYNAMO_ADMIN_TOKEN is" in line]
        assert "ignored" in warning and "t0ken" not in warning
        assert service.admin_token_for(settings) is None  # and none generated either


def test_development_replaces_each_missing_system_with_one_warning():
    settings = config.load({})
    assert settings.profile == "development"
    assert settings.amqp_url is None and settings.database_url is None and settings.storage is None
    assert len(settings.defaults_used) == 5
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 5008)


def test_full_urls_and_a_local_s3_server():
    settings = config.load({
        "AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/%2F",
        "DATABASE_URL": "postgresql://postgres@127.0.0.1/x",
        "SPACES_BUCKET_NAME": "b", "SPACES_REGION_NAME": "us-east-1",
        "SPACES_ENDPOINT_URL": "http://127.0.0.1:9000/", "SPACES_ACCESS_KEY_ID": "a",
        "SPACES_SECRET_KEY": "s",
    })
    assert settings.amqp_url.endswith("/%2F") and settings.database_url.endswith("/x")
    assert settings.storage.public_base_url == "http://127.0.0.1:9000/b"
    overridden = config.load({**FULL, "SPACES_PUBLIC_BASE_URL": "https://cdn.example/"})
    assert overridden.storage.public_base_url == "https://cdn.example"


@pytest.mark.parametrize("name, value", [
    ("RMQ_PORT", "five"), ("PGPORT", "-"), ("DYNAMO_IMAGES_PER_MINUTE", "-1"),
    ("DYNAMO_TEXT_REQUESTS_PER_MINUTE", "nan"), ("DYNAMO_GENERATOR_WORKERS", "1.5"),
    ("DYNAMO_MAX_ATTEMPTS", "0"), ("DYNAMO_REQUEST_TIMEOUT_S", "soon"),
    ("DYNAMO_HTTP_ADDR", "localhost"), ("DYNAMO_LOG_FORMAT", "xml"), ("DYNAMO_PROFILE", "prod"),
    ("DYNAMO_IMAGE_TOKENS_PER_MINUTE", "0"),
])
def test_a_value_that_cannot_be_parsed_names_its_variable(name, value):
    with pytest.raises(config.ConfigError) as error:
        config.load({**FULL, name: value})
    assert name in str(error.value)


def test_dotenv_file_is_read_and_the_environment_wins(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("DYNAMO_IMAGES_PER_MINUTE=7\nDYNAMO_POINTS_COST=300\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DYNAMO_POINTS_COST", "250")
    settings = config.load()
    assert settings.images_per_minute == 7 and settings.points_cost == 250


def test_run_py_refuses_to_start_in_one_line_with_a_non_zero_exit(tmp_path):
    """The process itself: nothing started, one line on stderr, exit 2 (not 0, not a crash's
    traceback). In an empty directory, so that no .env is read."""
    env = {"PATH": os.environ.get("PATH", ""), "DYNAMO_PROFILE": "production",
           "DYNAMO_POINTS_COST": "inf", "DYNAMO_DATA_DIR": str(tmp_path / "data")}
    completed = subprocess.run([sys.executable, str(RUN_PY)], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    for name in ("DYNAMO_POINTS_COST", *UPSTREAM_REQUIRED):
        assert name in lines[0]
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("addr, url", [
    ("127.0.0.1:5008", "http://127.0.0.1:5008"),
    ("0.0.0.0:8080", "http://127.0.0.1:8080"),
    (":8080", "http://127.0.0.1:8080"),
    ("[::]:8080", "http://[::1]:8080"),
    ("[::1]:8080", "http://[::1]:8080"),
    ("[fd00::5]:8080", "http://[fd00::5]:8080"),
    ("dynamo.internal:80", "http://dynamo.internal:80"),
])
def test_local_images_are_addressed_where_the_api_is_reached(addr, url, tmp_path):
    settings = config.load({"DYNAMO_HTTP_ADDR": addr})
    assert settings.local_http_url == url
    storage = service.make_storage(dataclasses.replace(settings, data_dir=tmp_path))
    assert storage.public_url("k/k-0.jpg") == f"{url}/images/k/k-0.jpg"


@pytest.mark.parametrize("name, value", [
    ("AMQP_URL", "rabbit:5672"), ("AMQP_URL", "amqp://u:hunter2@rabbit:port/"),
    ("DATABASE_URL", "mysql://u:hunter2@db/x"), ("AUTH_URL", "localhost:5002"),
    ("LEDGER_URL", "ledger"), ("OPENAI_BASE_URL", "api.openai.com/v1"),
    ("DISCORD_GHOSTS_WEBHOOK_URL", "hunter2"), ("DISCORD_FRIENDS_WEBHOOK_URL", "ftp://x/hunter2"),
    ("SPACES_ENDPOINT_URL", "ftp://s3.local"), ("SPACES_PUBLIC_BASE_URL", "cdn/hunter2"),
])
def test_a_url_that_cannot_be_used_names_its_variable_but_not_its_value(name, value):
    with pytest.raises(config.ConfigError) as error:
        config.load({**FULL, name: value})
    assert name in str(error.value)
    assert "hunter2" not in str(error.value)  # URLs carry credentials, webhooks are secrets
