"""Log lines: one per event, JSON when asked, the request id on each, no secrets."""

from __future__ import annotations

import json
import logging

from dynamo import logs


def _record(message: str, *args, **extra) -> logging.LogRecord:
    record = logging.LogRecord("dynamo.test", logging.INFO, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_request_id_and_step():
    line = logs.JsonFormatter().format(_record("image stored at %s", "s3://x", request_id="abc", step="stored"))
    entry = json.loads(line)
    assert entry["message"] == "image stored at s3://x"
    assert entry["request_id"] == "abc" and entry["step"] == "stored" and entry["level"] == "INFO"
    assert "\n" not in line


def test_text_lines_are_one_line_even_with_a_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        record = _record("failed", request_id="abc")
        record.exc_info = sys.exc_info()
    line = logs.TextFormatter().format(record)
    assert "\n" not in line and "request_id=abc" in line and "ValueError: boom" in line


def test_secrets_are_masked_whatever_the_message_says():
    line = logs.TextFormatter().format(_record(
        "calling with Authorization: Bearer eyJhbGciOi.abc.def key sk-proj-ABCDEFGH12345 "
        "amqp://user:hunter2@rabbit:5672/ https://discord.com/api/webhooks/123/SeCrEtToKeN"))
    for secret in ("eyJhbGciOi", "ABCDEFGH12345", "hunter2", "SeCrEtToKeN"):
        assert secret not in line
