"""Logging: one line per event, readable text or JSON objects (DYNAMO_LOG_FORMAT).

Every line about a request carries its id (`extra={"request_id": ...}`, usually through
`Job.log_extra`), and the step where there is one. Secrets never reach a line: values
that look like bearer tokens, API keys or credentials in URLs are masked as a last line
of defence, on top of never logging them in the first place.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys

# Masks anything that looks like a credential, whatever the message said.
_SECRET_PATTERNS = (
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1***"),
    (re.compile(r"sk-[A-Za-z0-9_-]{6,}"), "sk-***"),
    (re.compile(r"(?i)(://[^:/@\s]+:)[^@\s]+@"), r"\1***@"),
    (re.compile(r"(?i)(webhooks/\d+/)[A-Za-z0-9_-]+"), r"\1***"),
)


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _context(record: logging.LogRecord) -> dict[str, str]:
    return {
        key: str(getattr(record, key)) for key in ("request_id", "step") if hasattr(record, key)
    }


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        context = " ".join(f"{k}={v}" for k, v in _context(record).items())
        line = f"{when:%Y-%m-%dT%H:%M:%S.%f}"[:-3] + f"Z {record.levelname:<7} {record.name}: "
        line += record.getMessage() + (f" [{context}]" if context else "")
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return redact(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry = {
            "time": when.isoformat().replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, ensure_ascii=False))


def configure(log_format: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries' per-request chatter would drown the events that matter.
    for noisy in (
        "httpx",
        "httpx2",  # the openai SDK's own copy of httpx
        "httpcore",
        "hpack",
        "aiormq",
        "aio_pika",
        "botocore",
        "boto3",
        "urllib3",
        "hypercorn.access",
        "openai",
        "pgserver",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
