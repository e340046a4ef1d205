"""Configuration (contract §1): profiles, upstream variable names, parse errors."""

from __future__ import annotations

import pytest

from dynamo import config

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


def test_production_names_every_missing_variable_at_once():
    with pytest.raises(config.ConfigError) as error:
        config.load({"DYNAMO_PROFILE": "production"})
    message = str(error.value)
    for name in ("RMQ_HOST", "PGHOST", "OPENAI_API_KEY", "AUTH_SHARED_SECRET", "SPACES_BUCKET_NAME"):
        assert name in message


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
