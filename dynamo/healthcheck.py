"""`dynamo healthcheck`: a container's HEALTHCHECK without curl. Asks GET /healthz of the
service at DYNAMO_HTTP_ADDR (read like the service reads it: environment over ./.env; a
wildcard address is asked on loopback) and exits 0 when it answers 200, else 1 with one
line saying why. It talks to the service directly, never through a proxy."""

from __future__ import annotations

import http.client
import sys
import urllib.parse

from dynamo import config

# Docker's HEALTHCHECK default timeout is 30 s; a live service answers in milliseconds.
TIMEOUT_S = 5.0
HEALTHY = 0
UNHEALTHY = 1


def run() -> int:
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"dynamo healthcheck: {exc}", file=sys.stderr)
        return UNHEALTHY
    url = urllib.parse.urlsplit(settings.local_http_url)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=TIMEOUT_S)
    try:
        connection.request("GET", "/healthz")
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        print(f"dynamo healthcheck: {url.geturl()}/healthz: {exc}", file=sys.stderr)
        return UNHEALTHY
    finally:
        connection.close()
    if status != 200:
        print(f"dynamo healthcheck: {url.geturl()}/healthz answered {status}", file=sys.stderr)
        return UNHEALTHY
    return HEALTHY
